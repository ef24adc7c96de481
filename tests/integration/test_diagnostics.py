"""The capsule dashboard: a short fit's offline W&B file and CSV hold every diagnostic key, with sane values."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from capsdist.training.cli import main
from tests.conftest import TINY
from tests.wandb_records import finished_records, history

RUN = [*TINY, "--trainer.max_steps=24", "--trainer.val_check_interval=12", "--data.train_samples=768"]
RUN += ["--data.val_samples=256", "--model.log_diagnostics_every_n_steps=4", "--wandb_mode=offline"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-step fit with two validations and diagnostics every 4 steps, logged offline to W&B and CSV."""
    root = tmp_path_factory.mktemp("diag")
    main(["fit", *RUN, f"--trainer.default_root_dir={root}"])
    return root


def offline_run(root: Path) -> Path:
    """The run folder's single offline W&B run."""
    (found,) = root.glob("wandb/offline-run-*")
    return found


def latest(rows: list[dict], key: str) -> object:
    """The last logged value of `key`."""
    return [row[key] for row in rows if key in row][-1]


def test_wandb_file_holds_every_capsule_panel(run: Path) -> None:
    rows = history(offline_run(run))
    keys = set().union(*rows)
    expected = {f"val/class_acc/{c}" for c in range(10)} | {"train/grad_norm", "val/capsule_length_present"}
    for stage in ("train", "val"):
        expected |= {f"{stage}/routing_entropy/iter{k}" for k in (1, 2, 3)}
        expected |= {f"{stage}/routing_max_coupling/iter{k}" for k in (1, 2, 3)}
    expected |= {"val/capsule_length_absent", "train/device/samples_per_sec", "time/elapsed_s"}
    assert expected <= keys, expected - keys
    # routing starts uniform over the 10 classes and sharpens in later rounds
    assert latest(rows, "val/routing_entropy/iter1") == pytest.approx(math.log(10))
    assert latest(rows, "val/routing_max_coupling/iter1") == pytest.approx(0.1)
    assert latest(rows, "val/routing_entropy/iter3") < latest(rows, "val/routing_entropy/iter1")
    assert latest(rows, "val/routing_max_coupling/iter3") > 0.1
    assert 0 < latest(rows, "val/capsule_length_absent") < 1 and latest(rows, "train/grad_norm") > 0
    assert all(0 <= latest(rows, f"val/class_acc/{c}") <= 1 for c in range(10))
    # W&B objects: histogram, confusion matrix (10 x 10 cells), misclassified table, figures
    assert latest(rows, "val/capsule_length/_type") == "histogram"
    assert sum(latest(rows, "val/capsule_length/values")) > 0
    assert latest(rows, "val/confusion_matrix_table/_type") == "table-file"
    assert latest(rows, "val/confusion_matrix_table/nrows") == 100  # 10 x 10 cells
    assert latest(rows, "val/misclassified/_type") == "table-file" and latest(rows, "val/misclassified/ncols") == 5
    assert 0 < latest(rows, "val/misclassified/nrows") <= 32
    assert latest(rows, "figures/perturbation/_type") == "image-file"
    picture = offline_run(run) / "files" / latest(rows, "figures/perturbation/path")
    assert picture.stat().st_size > 10_000


def test_checkpoints_become_model_artifacts_with_metrics(run: Path) -> None:
    artifacts = [r.artifact for r in finished_records(offline_run(run)) if r.WhichOneof("record_type") == "artifact"]
    models = [a for a in artifacts if a.type == "model"]
    assert len(models) == 2  # best and last
    assert all('"val/error"' in a.metadata for a in models)


def test_csv_holds_the_scalars(run: Path) -> None:
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    columns = set(next(csv.reader(metrics.open())))
    assert {"val/class_acc/9", "val/routing_entropy/iter3", "train/grad_norm", "val/capsule_length_present"} <= columns
