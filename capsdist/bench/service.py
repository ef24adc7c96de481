"""`python -m capsdist.bench --what service`: the training service against a bare PyTorch loop on the same model.

The CLI's fit (`python -m capsdist.train fit --config configs/quickstart.yaml`, every default on: loader workers,
W&B offline, diagnostics, image logging, the non-finite guard, checkpoints) and a bare loop (the same CapsNet,
fused Adam, the paper's random shifts, no Lightning) each run in a fresh subprocess, alternating, for
``--repetitions`` rounds; each times its own steps ``warmup .. warmup + steps`` (images/s, data wait included).
The row's ``ratio`` is the median of the per-round CLI / bare ratios, with their min and max as the spread and the
load average before and after. ``--baseline_root DIR`` measures another checkout's CLI and loop in the same rounds
(e.g. /work/main: before and after a change, under the same load). This file also runs as a script in those
subprocesses (``--one cli|bare``): then it imports only what every capsdist checkout has.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from capsdist.data import mnist, recipe
from capsdist.data.batch import to_batch
from capsdist.model.capsnet import CapsNet
from capsdist.model.losses import capsnet_loss

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(batch_size: int, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of a plain loop: quickstart's CapsNet, fused Adam, MNIST shifted by up to 2 px, no Lightning."""

    torch.manual_seed(0)
    model_args = yaml.safe_load(QUICKSTART.read_text())["model"]
    model = CapsNet(**{k: v for k, v in model_args.items() if k in inspect.signature(CapsNet).parameters})
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    images, labels = (torch.from_numpy(a) for a in mnist.load(mnist.resolve_dir(), "train"))
    order, gen = torch.randperm(len(labels)), torch.Generator().manual_seed(0)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        idx = order[step * batch_size % (len(labels) - batch_size) :][:batch_size]
        shifted = recipe.shift(images[idx], torch.randint(5, (batch_size, 2), generator=gen), 2)
        batch = {k: v.to(device) for k, v in to_batch(shifted, labels[idx, None], shifted[:, None]).items()}
        out = model(batch["image"], batch["labels"])
        total, _, _ = capsnet_loss(out, batch["labels"], batch["recon"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def cli_rate(batch_size: int, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of `capsdist.train fit` on the quickstart config over its steps warmup .. warmup + steps."""
    import pytorch_lightning as pl  # Lightning: heavy, only for the service bench

    from capsdist.training import cli as train  # the training CLI (Lightning): only for the service bench

    marks: dict[str, float] = {}

    class StepClock(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == warmup:
                _sync(device)
                marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == warmup + steps:
                _sync(device)
                marks["end"] = time.perf_counter()
                rate = batch_size * steps / (marks["end"] - marks["start"])
                print(json.dumps({"rate": rate}), flush=True)  # now: what the fit does after it is not timed

    instantiate = train.CapsCLI.instantiate_trainer

    def with_clock(self: Any, **kwargs: Any) -> pl.Trainer:
        trainer = instantiate(self, **kwargs)
        trainer.callbacks.insert(0, StepClock())
        return trainer

    train.CapsCLI.instantiate_trainer = with_clock
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        args = ["fit", f"--config={QUICKSTART}", f"--trainer.default_root_dir={folder}"]
        args += [f"--data.batch_size={batch_size}", f"--trainer.max_steps={warmup + steps}"]
        args += [f"--trainer.accelerator={accelerator}"]
        train.main(args)
    return batch_size * steps / (marks["end"] - marks["start"])  # printed again by main(): the parent takes the last


def run_one(impl: str, code: Path, args: argparse.Namespace) -> float:
    """One measurement in a fresh interpreter that imports capsdist from ``code``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", impl, "--batch_size", str(args.batch_size)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(code), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    rows = [line for line in result.stdout.splitlines() if line.startswith('{"rate"')]
    if not rows:  # a rate printed before a failure later in the fit still counts
        raise RuntimeError(f"service bench {impl} ({code}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(rows[-1])["rate"]


def loadavg() -> float:
    """The 1-minute load average (other processes on this machine), or -1 where there is none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0


def service_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """CLI and bare rates per checkout over interleaved rounds; one row per checkout (this one first)."""
    roots = [REPO] + ([Path(args.baseline_root).resolve()] if args.baseline_root else [])
    runs: dict[Path, dict[str, list[float]]] = {r: {"cli": [], "bare": []} for r in roots}
    load = [loadavg()]
    for _ in range(args.repetitions):
        for root in roots:
            for impl in ("cli", "bare"):
                runs[root][impl].append(run_one(impl, root, args))
                progress = {"code": str(root), "impl": impl, "images_per_s": round(runs[root][impl][-1], 1)}
                print(json.dumps({**progress, "loadavg": loadavg()}), file=sys.stderr, flush=True)  # partial results
    load.append(loadavg())
    rows = []
    for root in roots:
        cli, bare = runs[root]["cli"], runs[root]["bare"]
        ratios = [c / b for c, b in zip(cli, bare, strict=True)]
        rows.append({
            "what": "service", "code": str(root), "device": args.device, "precision": "32",
            "batch_size": args.batch_size, "steps": [args.warmup, args.warmup + args.steps],
            "cli_images_per_s": round(statistics.median(cli), 1),
            "bare_images_per_s": round(statistics.median(bare), 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "repetitions": args.repetitions,
            "cli_runs": [round(c, 1) for c in cli], "bare_runs": [round(b, 1) for b in bare],
            "loadavg_before_after": load, "threads": torch.get_num_threads(),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    """Child mode (``--one cli|bare``): print {"rate": images/s}; else the rows (as `capsdist.bench --what service`)."""
    parser = argparse.ArgumentParser(prog="python -m capsdist.bench.service", description=__doc__)
    parser.add_argument("--one", choices=("cli", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--baseline_root", help="another checkout measured in the same rounds (e.g. /work/main)")
    args = parser.parse_args(argv)
    if args.one:
        measure = cli_rate if args.one == "cli" else bare_rate
        rate = measure(args.batch_size, args.warmup, args.steps, torch.device(args.device))
        print(json.dumps({"rate": rate}), flush=True)
        return
    for row in service_rows(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: this folder's data.py/models.py must not shadow anything
    main()
