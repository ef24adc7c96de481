"""`capsdist-shards` (`python -m data_prep.multimnist` in a checkout): write MultiMNIST as deterministic, resumable
WebDataset tar shards.

    python -m data_prep.multimnist --split train --per_digit 1000 --out shards/train --workers 16
    python -m data_prep.multimnist --split test --num_samples 10000 --out shards/test
    python -m data_prep.multimnist --benchmark          # = python -m capsdist.bench --what shard_write,shard_read
    python -m data_prep.multimnist verify shards/train  # every shard against manifest.json (sha256, count)

Output: ``OUT/<split>-NNNNNN.tar`` and ``OUT/manifest.json`` (per-shard count and sha256, parameters, seed).
The sample format (keys, PNG geometry, version) is ``capsdist.data.shard_format``; which samples each shard holds
is ``capsdist.data.shard_plan``. This module only writes them to disk.

Determinism: shard ``s`` is a pure function of (seed, split, s), and tar members carry fixed metadata, so the
output is byte-identical whatever ``--workers`` is.

Atomicity and resume: a shard is written to a hidden temporary file and renamed when complete; the main process
records (count, sha256) of each finished shard in ``OUT/.journal.json``. A re-run after a crash keeps journalled
shards whose sha256 still matches, regenerates the rest, and ends byte-identical to an uninterrupted run. A lock
on ``OUT/.lock`` (held for the whole run) makes a second concurrent run into the same folder refuse to start.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capsdist.core.errors import prog, write_error
from capsdist.core.files import atomic_write
from capsdist.core.progress import Progress
from capsdist.core.shipped import data_tool
from capsdist.data import mnist, recipe, shard_format
from capsdist.data.shard_format import MANIFEST, tar_bytes
from capsdist.data.shard_plan import Plan, make_shard

__all__ = ["Plan", "generate", "main"]
JOURNAL = ".journal.json"
LOCK = ".lock"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes atomically (temporary sibling, fsync, rename) with the umask's mode: ``path`` is either absent
    or complete."""
    atomic_write(path, lambda f: f.write(data))


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
        "format": shard_format.FORMAT,
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
        if n == plan_name(n) and (out / n).is_file() and sha256_file(out / n) == e["sha256"]
    }


def plan_name(name: str) -> str:
    """A name from a journal or manifest, reduced to a plain file name: file content never points elsewhere."""
    return Path(name).name


def lock_folder(out: Path) -> Any:
    """Hold an exclusive lock on ``out`` for this process's lifetime; a second writer gets a clear refusal."""
    handle = open(out / LOCK, "a+")  # noqa: SIM115 - held open until the run ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(handle.fileno()).st_ino != os.stat(out / LOCK).st_ino:  # its holder removed it as we opened it
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        handle.close()
        raise SystemExit(
            f"error: another `{data_tool('multimnist')}` run is writing into {out} (it holds {out / LOCK}). "
            "Fix: wait for it to finish (a re-run then keeps its shards), or choose another --out."
        ) from None
    return handle


def verify(folder: str | os.PathLike) -> list[str]:
    """Problems of a shard folder against its manifest.json (missing, changed or unlisted shards); [] if none."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return [f"{folder / MANIFEST} is missing: not a folder written by {data_tool('multimnist')}"]
    manifest = json.loads((folder / MANIFEST).read_text())
    listed = {plan_name(e["name"]): e for e in manifest.get("shards", [])}
    problems = [f"{n}: missing" for n in listed if not (folder / n).is_file()]
    problems += [
        f"{n}: sha256 differs from manifest.json (changed, truncated or written by another run)"
        for n, e in listed.items()
        if (folder / n).is_file() and sha256_file(folder / n) != e["sha256"]
    ]
    if sum(e["count"] for e in listed.values()) != manifest.get("total"):
        problems.append(f"manifest.json: shard counts add up to {sum(e['count'] for e in listed.values())}, "
                        f"not its total {manifest.get('total')}")  # fmt: skip
    problems += [f"{p.name}: not in manifest.json" for p in sorted(folder.glob("*.tar")) if p.name not in listed]
    return problems


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
    lock = lock_folder(out)
    try:
        return _generate_locked(src, out, plan, split, workers)
    finally:
        (out / LOCK).unlink(missing_ok=True)  # removed while still held, so a finished folder holds no stray file
        lock.close()


def _generate_locked(src: Path, out: Path, plan: Plan, split: str, workers: int) -> Path:
    """``generate``'s work, under the folder lock."""
    for stale in out.glob(".*.tmp"):  # temporaries of a killed run: never visible under a final name
        stale.unlink()
    params = _params(plan)
    done = _kept_shards(out, params, plan)
    todo = [s for s in range(plan.num_shards) if plan.shard_name(s) not in done]
    journal = {"params": params, "shards": done}
    with (
        Progress(plan.total, initial=sum(e["count"] for e in done.values())) as bar,
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


def main_verify(folder: str) -> int:
    """`verify DIR`: print each problem; exit 0 when every shard matches the manifest, 1 otherwise."""
    problems = verify(folder)
    for line in problems:
        print(f"{folder}: {line}", file=sys.stderr)
    print(json.dumps({"folder": folder, "ok": not problems, "problems": len(problems)}))
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    """The flags, in the training CLI's underscore style (the hyphenated spellings are kept as aliases)."""
    ap = argparse.ArgumentParser(prog=prog("capsdist.prep.multimnist"), description=__doc__.split("\n")[0])
    ap.add_argument(
        "--mnist_dir", "--mnist-dir", help="MNIST folder (default: $CAPSDIST_MNIST_DIR, repo data/mnist, cache)"
    )
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--out", help="output folder for shards and manifest.json")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--per_digit", "--per-digit", type=int, help="overlays per source digit (paper: 1000)")
    size.add_argument("--num_samples", "--num-samples", type=int, help="total samples (first digit drawn uniformly)")
    ap.add_argument("--shard_size", "--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (output does not depend on it)")
    ap.add_argument("--benchmark", action="store_true", help="print generation and decode speed, write nothing")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (`capsdist-shards`); `verify DIR` checks a shard folder against its manifest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        if len(argv) != 2:
            print(f"usage: {prog('capsdist.prep.multimnist')} verify DIR", file=sys.stderr)
            return 2
        return main_verify(argv[1])
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.benchmark:
            from capsdist.bench.data import shard_benchmark  # benches (webdataset baseline) only with --benchmark

            print(json.dumps(shard_benchmark(args.mnist_dir, args.num_samples or 4000), indent=1))
            return 0
        if not args.out or not (args.per_digit or args.num_samples):
            ap.error("--out and one of --per_digit / --num_samples are required")
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
    except OSError as e:  # disk full, read-only or unwritable --out: one paragraph, not a traceback
        print(f"error: {write_error(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
