"""Draw a run's capsule dashboard locally, as W&B would show it: from the run folder's CSV log and offline W&B run.

    pip install matplotlib   # only this script needs it
    python scripts/plot_dashboard.py runs/quickstart docs/figures/dashboard.png

Panels: routing entropy per round against step (validation), largest coupling per round, capsule length of
present vs absent digits, per-class accuracy at the last validation, and the last confusion matrix (read from the
table W&B wrote for `val/confusion_matrix`).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that logged `key`."""
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [s for s, _ in points], [v for _, v in points]


def confusion(run: Path) -> list[list[int]] | None:
    """The last confusion matrix W&B stored for the run (offline tables are JSON files under media/table)."""
    tables = sorted(run.glob("wandb/offline-run-*/files/media/table/val/confusion_matrix_table_*.table.json"))
    if not tables:
        return None
    data = json.loads(tables[-1].read_text())["data"]
    n = int(len(data) ** 0.5)
    matrix = [[0] * n for _ in range(n)]
    for actual, predicted, count in data:
        matrix[int(actual)][int(predicted)] = count
    return matrix


def main(run_dir: str, out_png: str) -> None:
    """Five panels in one PNG."""
    run = Path(run_dir)
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    rounds = sorted({k.rsplit("iter", 1)[1] for k in rows[0] if k.startswith("val/routing_entropy/iter")})
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for k in rounds:
        axes[0].plot(*series(rows, f"val/routing_entropy/iter{k}"), marker="o", label=f"round {k}")
        axes[1].plot(*series(rows, f"val/routing_max_coupling/iter{k}"), marker="o", label=f"round {k}")
    axes[0].set_title("coupling entropy (nats), validation")
    axes[1].set_title("largest coupling coefficient, validation")
    for name in ("present", "absent"):
        axes[2].plot(*series(rows, f"val/capsule_length_{name}"), marker="o", label=f"{name} digits")
    axes[2].axhline(0.9, color="grey", linestyle="--", linewidth=1)
    axes[2].axhline(0.1, color="grey", linestyle="--", linewidth=1)
    axes[2].set_title("class capsule length (margins 0.9 / 0.1)")
    last = [r for r in rows if r.get("val/class_acc/0")][-1]
    classes = sorted((k for k in last if k.startswith("val/class_acc/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    axes[3].bar([k.rsplit("/", 1)[1] for k in classes], [100 * float(last[k]) for k in classes])
    axes[3].set_ylim(min(100 * float(last[k]) for k in classes) - 2, 100)
    axes[3].set_title(f"per-class accuracy (%), step {last['step']}")
    for ax in axes[:3]:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    matrix = confusion(run)
    if matrix is not None:
        off_diagonal = [[0 if a == p else c for p, c in enumerate(row)] for a, row in enumerate(matrix)]
        axes[4].imshow(off_diagonal, cmap="Reds")
        for a, row in enumerate(matrix):
            for p, c in enumerate(row):
                axes[4].text(p, a, str(c), ha="center", va="center", fontsize=6)
        axes[4].set_xticks(range(len(matrix)))
        axes[4].set_yticks(range(len(matrix)))
        axes[4].set_xlabel("predicted")
        axes[4].set_ylabel("actual")
        axes[4].set_title("confusion matrix (colour: errors only)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:3])
