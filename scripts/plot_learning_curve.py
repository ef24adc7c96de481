"""Draw a run's learning curve (validation accuracy against step and wall time) from its Lightning CSV log.

    pip install matplotlib   # only this script needs it
    python scripts/plot_learning_curve.py pretrained/train_metrics.csv pretrained/learning_curve.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def validation_points(path: Path) -> list[tuple[int, float, float]]:
    """(step, elapsed seconds, accuracy %) of every validation row."""
    rows = csv.DictReader(path.open())
    return [
        (int(r["step"]), float(r["time/elapsed_s"]), 100 * float(r["val/acc"])) for r in rows if r.get("val/acc")
    ]


def main(metrics_csv: str, out_png: str) -> None:
    """Two panels sharing the accuracy axis: against optimizer steps and against wall-clock seconds."""
    points = validation_points(Path(metrics_csv))
    steps, seconds, acc = zip(*points, strict=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, x, label in ((axes[0], steps, "optimizer step (batch 128)"), (axes[1], seconds, "wall time (s)")):
        ax.plot(x, acc, marker="o", markersize=3)
        ax.axhline(99.60, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.locator_params(axis="x", nbins=5)
    axes[0].set_ylabel("MNIST test accuracy (%)")
    axes[0].set_ylim(98.5, 100)
    axes[0].text(steps[0], 99.63, "99.60%", color="grey")
    last = f"{acc[-1]:.2f}% after {steps[-1] + 1} steps, {seconds[-1]:.0f} s"
    fig.suptitle(f"Paper CapsNet, validation on the 10k test digits each epoch: {last}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
