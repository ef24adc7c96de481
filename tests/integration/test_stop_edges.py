"""The stop's edge cases (issue 28 item 7), in-process with the tiny model where they can be: a stop in the fit's
last validation resumes into it, the stopping step's values reach the CSV and W&B (no gap in the history), and a
stop during startup (imports, the checkpoint's reading) ends the process at once with the stop's exit code."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsdist import train
from capsdist.cluster import signals
from capsdist.training import resume
from capsdist.training.cli import main
from tests.conftest import TINY, subprocess_env
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
    runs = [read_run(f, finished=True) for f in wandb_files(root)]  # fits in this process: its service writes on
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


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt"))
    return bool(int(caught.split()[1], 16) >> (sig - 1) & 1)


def test_usr1_before_the_imports_finish_leaves_at_once_for_requeue(tmp_path: Path) -> None:
    """SIGUSR1 (SLURM's early time-limit warning) while `python -m capsdist.train` still imports torch: not the
    default action's death (exit 138, a FAILED job), but the stop convention at once: under the templates rank 0
    leaves the requeue mark and exits 0, saying that nothing was saved; nothing is written in the run folder."""
    mark, root = tmp_path / "requeue-mark", tmp_path / "run"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "capsdist",
             "CAPSDIST_REQUEUE": "batch", "CAPSDIST_REQUEUE_MARK": str(mark)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "capsdist.train", "fit", *RUN, f"--trainer.default_root_dir={root}"],
                            env=subprocess_env(**slurm), stderr=subprocess.PIPE, text=True)  # fmt: skip
    while not _catches(proc.pid, signal.SIGUSR1):
        time.sleep(0.005)
    importing = "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert importing and time.monotonic() - sent < 5
    assert proc.returncode == 0 and mark.read_text().startswith("nothing saved"), err[-2000:]  # the batch log's
    assert "before any training step -> stopped at once, nothing saved" in err
    assert "the batch script requeues job 7 (exit code 0)" in err and "Traceback" not in err
    assert not root.exists()


def test_sigterm_while_reading_the_checkpoint_leaves_at_once(
    straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """SIGTERM while the resume reads the checkpoint (capsdist's full read, before the fit): the entry point
    leaves at once with the stop's code (143), says nothing was saved, and the run folder is as it was (its lock
    file included)."""
    root = tmp_path / "run"
    shutil.copytree(straight, root)
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    read = resume.read_checkpoint

    def read_under_sigterm(path: Path) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        return read(path)

    monkeypatch.setattr(resume, "read_checkpoint", read_under_sigterm)
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(["fit", *RUN, f"--trainer.default_root_dir={root}", "--ckpt_path=last",
                        "--trainer.max_steps=4"])  # fmt: skip
    finally:
        signals.restore()
    err = capsys.readouterr().err
    assert stop.value.code == 143 and "SIGTERM before any training step -> stopped at once" in err
    assert "nothing saved" in err and "saved /" not in err
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before
