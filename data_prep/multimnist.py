"""Write MultiMNIST as deterministic, resumable WebDataset tar shards.

    python -m data_prep.multimnist --split train --per-digit 1000 --out shards/train --workers 16
    python -m data_prep.multimnist --split test --num-samples 10000 --out shards/test
    python -m data_prep.multimnist --benchmark          # generation samples/s per core, decode samples/s per worker

Output: ``OUT/<split>-NNNNNN.tar`` and ``OUT/manifest.json`` (per-shard count and sha256, parameters, seed).
Each sample holds ``input.png`` (36x36 overlay), ``digit0.png``/``digit1.png`` (each digit alone on its canvas)
and ``meta.json`` ``{"labels": [l0, l1], "indices": [i0, i1], "offsets": [[r0, c0], [r1, c1]]}``; so
``input = clip(digit0 + digit1, 0, 255)`` exactly. PNG and JSON only: nothing that decodes with pickle.

Determinism: shard ``s`` is a pure function of (seed, split, s), and tar members carry fixed metadata, so the
output is byte-identical whatever ``--workers`` is. With ``--per-digit K`` the sample stream is K rounds, each a
seeded permutation of the split, so every digit is the first digit of exactly K samples, spread over all shards.

Atomicity and resume: a shard is written to a hidden temporary file and renamed when complete; the main process
records (count, sha256) of each finished shard in ``OUT/.journal.json``. A re-run after a crash keeps journalled
shards whose sha256 still matches, regenerates the rest, and ends byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data_prep import mnist, recipe

FORMAT = "capsdist-multimnist-v1"
MANIFEST = "manifest.json"
JOURNAL = ".journal.json"
_SPLIT_CODE = {"train": 0, "test": 1}
_ROUND_TAG = 1  # seed-key namespace of the per-round permutations (shards use tag 0)


@dataclass(frozen=True)
class Plan:
    """What to generate: everything the bytes depend on, and nothing else (not the worker count)."""

    split: str
    split_size: int
    per_digit: int | None
    num_samples: int | None
    shard_size: int
    seed: int

    @property
    def total(self) -> int:
        """Total number of samples."""
        return self.split_size * self.per_digit if self.per_digit else int(self.num_samples or 0)

    @property
    def num_shards(self) -> int:
        """Number of shards (the last may be short)."""
        return -(-self.total // self.shard_size)

    def shard_name(self, shard: int) -> str:
        """File name of a shard."""
        return f"{self.split}-{shard:06d}.tar"

    def bounds(self, shard: int) -> tuple[int, int]:
        """Global sample range [start, end) of a shard."""
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.total)

    def first_digits(self, start: int, end: int, gen: torch.Generator) -> torch.Tensor:
        """Split indices of the first digit of samples start..end-1."""
        if not self.per_digit:
            return torch.randint(self.split_size, (end - start,), generator=gen)
        t = torch.arange(start, end)
        rounds = t // self.split_size
        first = torch.empty_like(t)
        for r in rounds.unique().tolist():
            perm = torch.randperm(
                self.split_size, generator=recipe.generator("cpu", self.seed, _SPLIT_CODE[self.split], _ROUND_TAG, r)
            )
            sel = rounds == r
            first[sel] = perm[t[sel] % self.split_size]
        return first


@dataclass
class Shard:
    """One generated shard, in memory."""

    start: int
    overlay: torch.Tensor  # uint8 [n, 36, 36]
    placed: torch.Tensor  # uint8 [n, 2, 36, 36]
    indices: torch.Tensor  # long [n, 2]
    labels: torch.Tensor  # long [n, 2]
    offsets: torch.Tensor  # long [n, 2, 2]


def make_shard(images: torch.Tensor, labels: torch.Tensor, plan: Plan, shard: int) -> Shard:
    """Generate shard ``shard`` of ``plan`` from the split's uint8 images [N,28,28] and long labels [N]."""
    start, end = plan.bounds(shard)
    gen = recipe.generator("cpu", plan.seed, _SPLIT_CODE[plan.split], 0, shard)
    indices, offsets = recipe.draw(labels, plan.first_digits(start, end, gen), gen)
    overlay, placed = recipe.compose(images, indices, offsets)
    return Shard(start, overlay, placed, indices, labels[indices], offsets)


def png(array: np.ndarray) -> bytes:
    """Encode an 8-bit grayscale array as PNG with fixed settings (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def samples(shard: Shard) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a shard, extensions sorted."""
    overlay, placed = shard.overlay.numpy(), shard.placed.numpy()
    for i in range(len(overlay)):
        meta = {
            "labels": shard.labels[i].tolist(),
            "indices": shard.indices[i].tolist(),
            "offsets": shard.offsets[i].tolist(),
        }
        yield (
            f"{shard.start + i:010d}",
            {
                "digit0.png": png(placed[i, 0]),
                "digit1.png": png(placed[i, 1]),
                "input.png": png(overlay[i]),
                "meta.json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
            },
        )


def tar_bytes(shard: Shard) -> bytes:
    """Serialise a shard as a tar with fixed member metadata (mtime 0, uid/gid 0, mode 0644, sorted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples(shard):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a hidden temporary sibling, fsync, then rename: ``path`` is either absent or complete."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


_WORKER: dict[str, Any] = {}


def _init_worker(mnist_dir: str, split: str, plan: Plan, out: str) -> None:
    """Pool initializer: one torch thread per process, the split in memory."""
    torch.set_num_threads(1)
    images, labels = mnist.load(mnist_dir, split)  # type: ignore[arg-type]
    _WORKER.update(images=torch.from_numpy(images), labels=torch.from_numpy(labels).long(), plan=plan, out=Path(out))


def _write_shard(shard: int) -> tuple[int, int, str]:
    """Generate and atomically write one shard; return (shard, sample count, sha256)."""
    plan: Plan = _WORKER["plan"]
    data = tar_bytes(make_shard(_WORKER["images"], _WORKER["labels"], plan, shard))
    write_atomic(_WORKER["out"] / plan.shard_name(shard), data)
    start, end = plan.bounds(shard)
    return shard, end - start, hashlib.sha256(data).hexdigest()


def _params(plan: Plan) -> dict[str, Any]:
    """Generation parameters recorded in the manifest and journal (includes the source files' md5s)."""
    names = mnist.file_names(plan.split)  # type: ignore[arg-type]
    return {
        **asdict(plan),
        "canvas": recipe.CANVAS,
        "max_offset": recipe.MAX_OFFSET,
        "source_md5": {n: mnist.MD5[n] for n in names},
        "format": FORMAT,
    }


def _kept_shards(out: Path, params: dict[str, Any], plan: Plan) -> dict[str, dict[str, Any]]:
    """Shards from an earlier run with the same parameters whose bytes still match the journal/manifest."""
    for name in (MANIFEST, JOURNAL):
        if (out / name).is_file():
            old = json.loads((out / name).read_text())
            break
    else:
        return {}
    if old.get("params") != params:
        raise SystemExit(
            f"error: {out} holds shards made with other parameters ({out / name}). "
            "Fix: choose another --out, or delete that folder to regenerate."
        )
    entries = old["shards"] if isinstance(old["shards"], dict) else {s["name"]: s for s in old["shards"]}
    return {
        n: {"count": e["count"], "sha256": e["sha256"]}
        for n, e in entries.items()
        if (out / n).is_file() and sha256_file(out / n) == e["sha256"]
    }


def generate(
    mnist_dir: str | os.PathLike | None, out: str | os.PathLike, plan_args: dict[str, Any], workers: int
) -> Path:
    """Generate (or finish) the shard set described by ``plan_args`` in ``out``; return the manifest path."""
    src = mnist.resolve_dir(mnist_dir)
    split = plan_args["split"]
    n = len(mnist.load(src, split)[1])
    plan = Plan(split_size=n, **plan_args)
    if plan.total <= 0 or plan.shard_size <= 0:
        raise SystemExit("error: nothing to generate. Fix: pass --per-digit K or --num-samples N > 0, --shard-size > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # temporaries of a killed run: never visible under a final name
        stale.unlink()
    params = _params(plan)
    done = _kept_shards(out, params, plan)
    todo = [s for s in range(plan.num_shards) if plan.shard_name(s) not in done]
    journal = {"params": params, "shards": done}
    with (
        tqdm(total=plan.total, initial=sum(e["count"] for e in done.values()), unit="sample", disable=None) as bar,
        mp.get_context("spawn").Pool(max(1, workers), _init_worker, (str(src), split, plan, str(out))) as pool,
    ):
        for shard, count, digest in pool.imap_unordered(_write_shard, todo):
            journal["shards"][plan.shard_name(shard)] = {"count": count, "sha256": digest}
            write_atomic(out / JOURNAL, json.dumps(journal).encode())
            bar.update(count)
    shards = [{"name": plan.shard_name(s), **journal["shards"][plan.shard_name(s)]} for s in range(plan.num_shards)]
    manifest = {"params": params, "seed": plan.seed, "total": plan.total, "shards": shards}
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    (out / JOURNAL).unlink(missing_ok=True)
    return out / MANIFEST


def benchmark(
    mnist_dir: str | os.PathLike | None = None, num_samples: int = 4000, workers: int = 1
) -> dict[str, float]:
    """Measure generation samples/s per core (compose + PNG + tar) and shard decode samples/s per loader worker."""
    from capsdist.data import decode_rate  # lazy: data_prep does not need the runtime package otherwise

    torch.set_num_threads(1)
    images, labels = mnist.load(mnist.resolve_dir(mnist_dir), "train")
    plan = Plan("train", len(labels), None, num_samples, 1000, 0)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels).long()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for s in range(plan.num_shards):
            (Path(tmp) / plan.shard_name(s)).write_bytes(tar_bytes(make_shard(images_t, labels_t, plan, s)))
        gen_rate = plan.total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(plan.num_shards):
            make_shard(images_t, labels_t, plan, s)
        compose_rate = plan.total / (time.perf_counter() - t0)
        dec = decode_rate(sorted(str(p) for p in Path(tmp).glob("*.tar")), num_workers=workers)
    return {
        "generate_samples_per_s_per_core": gen_rate,
        "compose_only_samples_per_s_per_core": compose_rate,
        "decode_samples_per_s_per_worker": dec / max(1, workers),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m data_prep.multimnist", description=__doc__.split("\n")[0])
    ap.add_argument("--mnist-dir", help="MNIST folder (default: $CAPSDIST_MNIST_DIR, repo data/mnist, cache)")
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--out", help="output folder for shards and manifest.json")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--per-digit", type=int, help="overlays per source digit (paper: 1000)")
    size.add_argument("--num-samples", type=int, help="total samples (first digit drawn uniformly)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (output does not depend on it)")
    ap.add_argument("--benchmark", action="store_true", help="print generation and decode speed, write nothing")
    args = ap.parse_args(argv)
    try:
        if args.benchmark:
            print(json.dumps(benchmark(args.mnist_dir, args.num_samples or 4000), indent=1))
            return 0
        if not args.out or not (args.per_digit or args.num_samples):
            ap.error("--out and one of --per-digit / --num-samples are required")
        plan_args = {
            "split": args.split,
            "per_digit": args.per_digit,
            "num_samples": args.num_samples,
            "shard_size": args.shard_size,
            "seed": args.seed,
        }
        print(generate(args.mnist_dir, args.out, plan_args, args.workers))
    except mnist.MnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
