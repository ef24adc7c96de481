"""The stop's edge cases (issue 28 item 7), in-process with the tiny model: a stop in the fit's last validation
resumes into it, and the stopping step's values reach the CSV and W&B (no gap in the history)."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch

from capsdist.cluster import signals
from capsdist.training.cli import main
from tests.conftest import TINY
from tests.faults import fault_config
from tests.wandb_records import read_run, wandb_files

# 3 batches an epoch, validation (1 batch) at its end, which is also the last step
RUN = [*TINY, "--data.train_samples=96", "--data.val_samples=32", "--trainer.max_steps=3", "--wandb_mode=offline",
       "--model.log_images_every_n_steps=0", "--trainer.deterministic=true"]  # fmt: skip


def fit(root: Path, *extra: str) -> int:
    """Run fit in this process; its exit code (0 when it returns). A stop leaves the job's handlers and its request
    in place (the CLI's process ends there): put them back for the next fit."""
    try:
        main(["fit", *RUN, f"--trainer.default_root_dir={root}", *extra])
    except SystemExit as stop:
        signals.restore()
        return int(stop.code or 0)
    return 0


def csv_steps(root: Path, key: str) -> list[int]:
    """The steps at which ``key`` was logged, over every CSV version of the run."""
    rows = [row for f in sorted(root.glob("csv/version_*/metrics.csv")) for row in csv.DictReader(f.open())]
    return [int(row["step"]) for row in rows if row.get(key)]


def wandb_steps(root: Path, key: str) -> list[int]:
    """The steps at which ``key`` was logged, over every W&B file of the run (one run id)."""
    runs = [read_run(f) for f in wandb_files(root)]
    assert len({run["run"]["id"] for run in runs}) == 1
    return [int(row["trainer/global_step"]) for run in runs for row in run["history"] if key in row]


def state(path: Path) -> dict:
    """A checkpoint's weights, loop state and best score."""
    saved = torch.load(path, weights_only=True)
    best = next(v for k, v in saved["callbacks"].items() if "val/error" in k)
    return {"weights": saved["state_dict"], "loops": saved["loops"], "best": best["best_model_score"]}


def same(a: dict, b: dict) -> bool:
    return a["loops"] == b["loops"] and a["best"] == b["best"] and all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted fit of 3 steps."""
    root = tmp_path_factory.mktemp("straight") / "run"
    assert fit(root) == 0
    return root


def test_stop_in_the_last_validation_resumes_into_it(straight: Path, tmp_path: Path) -> None:
    """SIGTERM during the validation at max_steps: exit 143 with the last step saved; `--ckpt_path last` redoes
    that validation: its metrics in the CSV and W&B, best and last.ckpt as the uninterrupted run has them."""
    root = tmp_path / "run"
    sent = fault_config(tmp_path / "f.yaml", "SignalOnce", signal=int(signal.SIGTERM), step=3,
                        marker=str(tmp_path / "sent"), where="val")  # fmt: skip
    assert fit(root, "--config", str(sent)) == 143
    assert csv_steps(root, "val/error") == []
    assert fit(root, "--config", str(sent), "--ckpt_path=last") == 0
    for steps in (csv_steps, wandb_steps):
        assert steps(root, "val/error") == steps(straight, "val/error") == [2]
    (best,) = (root / "checkpoints").glob("best-*.ckpt")
    assert best.name == next((straight / "checkpoints").glob("best-*.ckpt")).name
    assert same(state(best), state(straight / "checkpoints" / best.name))
    assert same(state(root / "checkpoints/last.ckpt"), state(straight / "checkpoints/last.ckpt"))


def test_the_stopping_steps_values_reach_csv_and_wandb(straight: Path, tmp_path: Path) -> None:
    """SIGTERM after step 2's batch: that step's values are in the CSV and W&B of the stopped run, and the
    resumed run's follow, so the history has every step once; the weights end as the uninterrupted run's."""
    root = tmp_path / "run"
    sent = fault_config(tmp_path / "f.yaml", "SignalOnce", signal=int(signal.SIGTERM), step=2,
                        marker=str(tmp_path / "sent"))  # fmt: skip
    assert fit(root, "--config", str(sent)) == 143
    assert csv_steps(root, "train/loss") == wandb_steps(root, "train/loss") == [0, 1]
    assert fit(root, "--config", str(sent), "--ckpt_path=last") == 0
    for steps in (csv_steps, wandb_steps):
        assert steps(root, "train/loss") == steps(straight, "train/loss") == [0, 1, 2]
    assert same(state(root / "checkpoints/last.ckpt"), state(straight / "checkpoints/last.ckpt"))
