"""Every resume is exact or refused (issue 19 item 3), with the defaults users get: loader workers on, W&B offline.

Each run is `python -m capsdist.train fit` as a subprocess, measured by the largest weight difference against a
straight run of the same length (it must be 0). A refused resume runs fit's main in this process (the refusal comes
before any training; another world size, which only the launched ranks see, stays a subprocess) and must have
written nothing.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsdist.training import cli as train
from capsdist.training.resume import TRAINER_KEY, check_trainer
from capsdist.training.run import RUN_ID_FILE
from tests.conftest import TINY, refused
from tests.faults import fault_config
from tests.scale_probe import train_env

# 1024 samples / 32 = 32 batches an epoch: every run below stops mid-epoch 0
USER = ["--data.train_samples=1024", "--data.val_samples=32", "--data.num_workers=2", "--wandb_mode=offline",
        "--trainer.deterministic=true", "--model.log_images_every_n_steps=0"]  # fmt: skip
STEPS = 16


def fit(root: Path, *extra: str) -> tuple[int, str]:
    """Run fit into ``root`` to its end: (exit code, output)."""
    args = [*TINY, *USER, f"--trainer.default_root_dir={root}", *extra]
    proc = subprocess.run([sys.executable, "-m", "capsdist.train", "fit", *args], env=train_env(WANDB_SILENT="true"),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the last.ckpt weights of two run folders."""
    wa, wb = (torch.load(r / "checkpoints/last.ckpt", weights_only=True)["state_dict"] for r in (a, b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def listing(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps."""
    root = tmp_path_factory.mktemp("straight") / "run"
    code, output = fit(root, f"--trainer.max_steps={STEPS}")
    assert code == 0, output[-3000:]
    return root


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fit of STEPS / 2 steps (mid-epoch), to continue or to resume wrongly."""
    root = tmp_path_factory.mktemp("half") / "run"
    code, output = fit(root, f"--trainer.max_steps={STEPS // 2}")
    assert code == 0 and "--ckpt_path last" in output, output[-3000:]
    return root


@pytest.mark.slow
def test_crash_inside_a_step_resumes_exactly(straight: Path, tmp_path: Path) -> None:
    """A callback raising before the optimizer step of step 7: interrupted.ckpt holds 6 steps and the loader state
    of 6 batches (not the 7th, never trained on); `--ckpt_path last` then ends on the straight run's weights."""
    root = tmp_path / "run"
    config = fault_config(tmp_path / "f.yaml", "RaiseBeforeStep", step=7, marker=str(tmp_path / "fired"))
    code, output = fit(root, f"--trainer.max_steps={STEPS}", "--config", str(config))
    assert code == 1 and "planted failure in step 7" in output, output[-3000:]
    assert "rerun the same command plus `--ckpt_path last`" in output
    saved = torch.load(root / "checkpoints/interrupted.ckpt", weights_only=True)
    loader = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (saved["global_step"], loader["epoch"], loader["batches"]) == (6, 0, 6)
    code, output = fit(root, f"--trainer.max_steps={STEPS}", "--ckpt_path=last", "--config", str(config))
    assert code == 0 and "at step 6" in output, output[-3000:]
    assert weight_difference(root, straight) == 0


@pytest.mark.slow
def test_continuing_a_finished_fit_continues_its_epoch(straight: Path, half: Path, tmp_path: Path) -> None:
    """A finished mid-epoch fit continued with a larger max_steps trains the rest of the same epoch (before: it
    jumped to epoch 1), ending on the straight run's weights."""
    root = tmp_path / "run"
    subprocess.run(["cp", "-a", str(half), str(root)], check=True)
    code, output = fit(root, f"--trainer.max_steps={STEPS}", "--ckpt_path=last")
    assert code == 0 and f"at step {STEPS // 2}" in output, output[-3000:]
    saved = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] == 0
    assert weight_difference(root, straight) == 0


@pytest.mark.parametrize(
    ("change", "fix"),
    [("--data.batch_size=16", "--data.batch_size 32"), ("--data.seed=1", "--data.seed 0"),
     ("--data.max_shift=0", "--data.max_shift 2"), ("--data.train_samples=2048", "--data.train_samples 1024"),
     ("--trainer.devices=2", "resume with 1 processes in all"),
     ("--trainer.precision=bf16-mixed --trainer.accumulate_grad_batches=2 --trainer.gradient_clip_val=1 "
      "--trainer.limit_train_batches=8", "--trainer.accumulate_grad_batches 1 --trainer.gradient_clip_val 0.0 "
      "--trainer.limit_train_batches 1.0 --trainer.precision 32-true"),
     (f"{RUN_ID_FILE}=../..", f"{RUN_ID_FILE} holds '../..\\n', which is not a W&B run id")],
)  # fmt: skip
def test_a_resume_that_would_differ_is_refused_and_writes_nothing(half: Path, change: str, fix: str, capsys) -> None:
    """Data or trainer settings that change the training stream or the optimizer's steps, another world size, or a
    stored W&B run id W&B refuses (planted in the folder): exit 2 naming the fix, and the folder's files
    (checkpoints, csv, config.yaml, W&B runs, the lock file) are exactly as they were."""
    stored, kept = half / RUN_ID_FILE, (half / RUN_ID_FILE).read_text()
    planted = change.startswith(f"{RUN_ID_FILE}=")
    if planted:
        stored.write_text(change.split("=", 1)[1] + "\n")
    before = listing(half)
    args = [f"--trainer.max_steps={STEPS}", "--ckpt_path=last", *([] if planted else change.split())]
    try:
        if "devices" in change:  # the ranks' own check: 2 processes launched by the real command
            code, output = fit(half, *args, "--trainer.strategy=ddp")
            assert code == 2 and fix in output and "Traceback" not in output, output[-3000:]
        else:
            error = refused(train.main, ["fit", *TINY, *USER, f"--trainer.default_root_dir={half}", *args], capsys)
            assert fix in error, error
        after = listing(half)
    finally:
        stored.write_text(kept)
    assert after == before


def test_a_checkpoint_without_the_trainer_record_resumes(half: Path) -> None:
    """The trainer settings are recorded in every checkpoint; one written before they were (no record) resumes
    with any settings, as it did."""
    checkpoint = torch.load(half / "checkpoints/last.ckpt", weights_only=True)
    recorded = {"precision": "32-true", "accumulate_grad_batches": 1, "gradient_clip_val": 0.0,
                "gradient_clip_algorithm": None, "limit_train_batches": 1.0}  # fmt: skip
    assert checkpoint.pop(TRAINER_KEY) == recorded
    check_trainer(checkpoint, half / "checkpoints/last.ckpt", {"precision": "bf16-mixed", "accumulate_grad_batches": 4})


def lr_column(root: Path) -> dict[int, float]:
    """The learning rate logged per step (LearningRateMonitor), from the run's CSV files."""
    rates = {}
    for path in sorted((root / "csv").rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("lr-Adam"):
                rates[int(row["step"])] = float(row["lr-Adam"])
    return rates


def test_changed_learning_rate_applies_from_the_resume_step(half: Path, tmp_path: Path) -> None:
    """`--model.lr` changed on resume: said in the log, and from the resume step on the logged rate is the new
    schedule's (before: silently the old one)."""
    root = tmp_path / "run"
    subprocess.run(["cp", "-a", str(half), str(root)], check=True)
    code, output = fit(root, f"--trainer.max_steps={STEPS // 2 + 2}", "--ckpt_path=last", "--model.lr=0.001",
                       "--model.lr_decay_steps=4")  # fmt: skip
    assert code == 0, output[-3000:]
    assert "learning-rate settings changed on resume" in output and f"from step {STEPS // 2}" in output
    rates = lr_column(root)
    for step in (STEPS // 2, STEPS // 2 + 1):
        assert rates[step] == pytest.approx(0.001 * 0.96 ** (step / 4)), rates
