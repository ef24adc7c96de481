"""`python -m capsdist.report RUN_DIR... [--format markdown|csv|json]`: one row per run folder, as Table 1.

Reads only what every run leaves on disk (its ``config.yaml``, ``csv/version_*/metrics.csv`` and the step count of
``checkpoints/last.ckpt``; no W&B): routing iterations, reconstruction, steps, best and final validation error,
test error (when ``test`` was run into the same folder), training images/s (median of the logged steps) and wall
time (``time/elapsed_s`` at the last validation of each fit process, summed over resumes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from capsdist.checkpoint.single import read_weights_only
from capsdist.core.errors import CapsdistError, prog, user_errors
from capsdist.training.config import bounded_yaml_load

COLUMNS = {  # key -> markdown header
    "run": "run",
    "routing_iterations": "routing iterations",
    "reconstruction": "reconstruction",
    "steps": "steps",
    "best_val_error": "best val error",
    "final_val_error": "final val error",
    "test_error": "test error",
    "images_per_s": "images/s",
    "wall_time_s": "wall time",
}


class NotARunError(CapsdistError):
    """A folder given to the report that is not a run folder written by `capsdist.train fit`."""


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    """The non-empty values of one metric, in logging order."""
    return [float(row[key]) for row in rows if row.get(key)]


def trained_steps(run_dir: Path, rows: list[dict[str, str]]) -> int:
    """Optimizer steps: ``last.ckpt``'s global step (memory-mapped: no weights read), else the CSV's last step + 1
    (the CSV's step column is 0-based and, after a resume, not exact)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return int(read_weights_only(last).get("global_step", 0))
    return int(max(_column(rows, "step"), default=-1)) + 1


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """One run folder's Table 1 row (errors as fractions, None where the run logged nothing of the kind)."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    # config.yaml is in the run folder; runs of earlier versions without W&B have it in csv/version_N
    configs = [run_dir / "config.yaml", *sorted(run_dir.glob("csv/version_*/config.yaml"), reverse=True)]
    config = next((path for path in configs if path.is_file()), None)
    if config is None:
        raise NotARunError(
            f"{run_dir} is not a capsdist run folder (it has no config.yaml, which every `fit` writes first). "
            "Fix: pass the trainer.default_root_dir of a `python -m capsdist.train fit` run, e.g. runs/mnist."
        )
    model = (bounded_yaml_load(config.read_text()) or {}).get("model", {})  # a run folder's file: bounded
    versions = [list(csv.DictReader(io.StringIO(path.read_text()))) for path in files]  # none: a run too short to log
    rows = [row for version in versions for row in version]
    val, test = _column(rows, "val/error"), _column(rows, "test/error")
    # ThroughputMonitor's running totals: images over training seconds (data wait included), per fit process
    speed = [s[-1] / t[-1] for s, t in ((_column(v, "train/samples"), _column(v, "train/time")) for v in versions) if s]
    elapsed = [max(_column(version, "time/elapsed_s"), default=0.0) for version in versions]
    return {
        "run": run_dir.name,
        "routing_iterations": model.get("routing_iterations"),
        "reconstruction": model.get("reconstruction"),
        "steps": trained_steps(run_dir, rows),
        "best_val_error": min(val, default=None),
        "final_val_error": val[-1] if val else None,
        "test_error": test[-1] if test else None,
        "images_per_s": statistics.median(speed) if speed else None,  # median over the fit processes (resumes)
        "wall_time_s": sum(elapsed) if any(elapsed) else None,
    }


# what a folder that cannot be summarized raises: missing or damaged files (a crashed run, a foreign folder)
UNREADABLE = (CapsdistError, OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, yaml.YAMLError)


def summarize_all(run_dirs: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the folders that can be read, and for each other one a line naming it and why it was skipped."""
    rows, skipped = [], []
    for run_dir in run_dirs:
        try:
            if not Path(run_dir).is_dir():
                raise NotARunError(f"{run_dir} is not a folder")
            rows.append(summarize(run_dir))
        except UNREADABLE as err:
            # our errors whole (they name the fix); others' first sentence (torch's run on for a paragraph)
            why = str(err) if isinstance(err, CapsdistError) else f"{type(err).__name__}: {str(err).split('. ')[0]}"
            skipped.append(f"skipped {run_dir}: {' '.join(why.split())[:400]}")
    return rows, skipped


def _cell(key: str, value: Any) -> str:
    """A value as a markdown cell: errors in percent, booleans as yes/no, times as h:mm:ss."""
    if value is None:
        return "–"
    if key.endswith("error"):
        return f"{100 * value:.2f}%"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "images_per_s":
        return f"{value:,.0f}"
    if key == "wall_time_s":
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    return str(value)


def render(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    """The rows as a markdown table, CSV (raw values) or JSON (a list of objects)."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table of the given run folders."""
    parser = argparse.ArgumentParser(prog=prog("capsdist.report"), description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (trainer.default_root_dir)")
    parser.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    args = parser.parse_args(argv)
    with user_errors():
        rows, skipped = summarize_all(args.run_dirs)
        for line in skipped:
            print(f"capsdist: {line}", file=sys.stderr)
        if not rows:
            raise NotARunError(f"none of the {len(args.run_dirs)} folder(s) could be read (reasons above).")
        print(render(rows, args.format))


if __name__ == "__main__":
    main()
