"""The own-data table of docs/own-data.md: learnable synthetic labelled images (``tests.conftest.image_shards``: noise
with a bright square whose quadrant is the class, 4 classes) in the three shapes, written by webdataset's own
ShardWriter; each trained by `python -m capsdist.train fit --data.source image_shards` for ``--steps`` steps with
the user's defaults (2 loader workers) and scored by `python -m capsdist.evaluate` on held-out shards. Prints a
Markdown table: shape, steps, accuracy, training images/s (the run's CSV log, first logging step to last) with the
machine's 1-minute load average after the run (other work on a shared machine slows it), and the CPU.

    PYTHONPATH=$PWD python scripts/own_data_table.py [--steps 60]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import image_shards, subprocess_env

SHAPES = [("28×28 grey (MNIST-like)", 28, 1, "png", []), ("32×32 RGB (SVHN/CIFAR-10-like)", 32, 3, "png", []),
          ("96×96 two views (smallNORB-like)", 96, 2, "npy", ["--model.primary_stride=4"])]  # fmt: skip
MODEL = ["--model.num_classes=4", "--model.conv_channels=64", "--model.primary_channels=8",
         "--model.decoder_hidden=[128, 256]", "--model.log_images_every_n_steps=0"]  # fmt: skip


def images_per_second(root: Path) -> float:
    """Training images/s between the first and the last logging step of a run's CSV log."""
    rows = [r for p in sorted((root / "csv").rglob("metrics.csv")) for r in csv.DictReader(p.open()) if r["train/time"]]
    first, last = rows[0], rows[-1]
    return (float(last["train/samples"]) - float(first["train/samples"])) / (
        float(last["train/time"]) - float(first["train/time"])
    )


def run(argv: list[str]) -> str:
    """Run a capsdist command; its stdout (stderr shown on failure)."""
    done = subprocess.run([sys.executable, "-m", *argv], env=subprocess_env(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))  # fmt: skip
    print(f"CPU: {cpu}; {args.steps} steps of batch {args.batch_size}; model flags: {' '.join(MODEL)}\n")
    print("| data | image key | steps | accuracy (held-out, 512 images) | training images/s | load average |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, channels, key, extra in SHAPES:
            folder = Path(tmp) / f"{size}-{channels}"
            train = image_shards(folder / "train", size, channels, 4096, key, per_shard=512)
            val = image_shards(folder / "val", size, channels, 512, key, seed=1, per_shard=512)
            root = folder / "run"
            run(["capsdist.train", "fit", "--data.source=image_shards", f"--data.train_shards={train}",
                 f"--data.val_shards={val}", "--data.train_samples=4096", f"--data.batch_size={args.batch_size}",
                 f"--trainer.max_steps={args.steps}", "--trainer.log_every_n_steps=10", "--wandb_mode=disabled",
                 "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", *MODEL,
                 *extra])  # fmt: skip
            last = str(root / "checkpoints" / "last.ckpt")
            scores = json.loads(run(["capsdist.evaluate", "--ckpt", last, "--device", "cpu"]).splitlines()[-1])
            rate = images_per_second(root)
            load = os.getloadavg()[0]
            print(f"| {name} | {key} | {args.steps} | {scores['acc']:.3f} | {rate:.0f} | {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()
