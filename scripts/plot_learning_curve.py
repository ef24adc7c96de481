"""Draw a run's learning curve (validation accuracy against images seen and training time) from its Lightning CSV
log; a resumed run passes each of its CSV versions in order.

    pip install matplotlib   # only this script needs it
    python scripts/plot_learning_curve.py pretrained/train_metrics.csv pretrained/learning_curve.png
    python scripts/plot_learning_curve.py RUN/csv/version_0/metrics.csv RUN/csv/version_1/metrics.csv \\
        pretrained/capsnet-multimnist_curve.png --batch 64 --reference 94.8 --low 50 \\
        --title "Slim CapsNet on MultiMNIST, 2 CPU cores"
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def validation_points(paths: list[Path]) -> list[tuple[int, float, float]]:
    """(step, training seconds, accuracy %) of every validation row, over the CSVs of one run in order.

    Training seconds add up the increments of the logged ``train/time`` (time in training steps, validation
    excluded; ``time/elapsed_s`` in logs without it) between logged rows. An increment over 5x the median is a
    pause, not training (the process stopped between two sessions, a suspended job), and counts as the median; so
    does the first one of a resumed CSV.
    """
    rows = [(row, i == 0) for path in paths for i, row in enumerate(csv.DictReader(path.open()))]
    key = "train/time" if any(r.get("train/time") for r, _ in rows) else "time/elapsed_s"  # older logs: wall time
    times = [(float(r[key]), first) for r, first in rows if r.get(key)]
    gaps = [b - a for (a, _), (b, first) in zip(times, times[1:], strict=False) if not first and b > a]
    median = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    points, trained, previous = [], 0.0, None
    for row, first in rows:
        if row.get(key):
            now = float(row[key])
            gap = median if previous is None or first or not 0 <= now - previous <= 5 * median else now - previous
            trained, previous = trained + gap, now
        if row.get("val/acc"):
            points.append((int(row["step"]), trained, 100 * float(row["val/acc"])))
    return sorted(dict((p[0], p) for p in points).values())  # a step validated twice (a resume): the later row


def main(argv: list[str] | None = None) -> None:
    """Two panels sharing the accuracy axis: against images seen and against training minutes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csvs", nargs="+", help="the run's metrics.csv files in order, then the PNG to write")
    parser.add_argument("--batch", type=int, default=128, help="images per optimizer step")
    parser.add_argument("--reference", type=float, default=99.60, help="a dashed line: the number to compare with")
    parser.add_argument("--reference-label", default="99.60%")
    parser.add_argument("--low", type=float, default=98.5, help="bottom of the accuracy axis")
    parser.add_argument("--ylabel", default="MNIST test accuracy (%)")
    parser.add_argument("--title", default="Paper CapsNet, validation on the 10k test digits each epoch")
    args = parser.parse_args(argv)
    *csvs, out_png = args.csvs
    steps, seconds, acc = zip(*validation_points([Path(p) for p in csvs]), strict=True)
    images = [(s + 1) * args.batch / 1e6 for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    minutes = [s / 60 for s in seconds]
    for ax, x, label in ((axes[0], images, "images seen (millions)"), (axes[1], minutes, "training time (min)")):
        ax.plot(x, acc, marker="o", markersize=3)
        ax.axhline(args.reference, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.locator_params(axis="x", nbins=5)
    axes[0].set_ylabel(args.ylabel)
    axes[0].set_ylim(args.low, 100)
    axes[0].text(images[0], args.reference + (100 - args.low) * 0.02, args.reference_label, color="grey")
    last = f"{acc[-1]:.2f}% after {steps[-1] + 1} steps, {minutes[-1]:.0f} min of training"
    fig.suptitle(f"{args.title}: {last}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    main()
