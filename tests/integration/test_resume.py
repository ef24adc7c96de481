"""The resume rule and stops outside SLURM, run as a user would: `fit` twice, Ctrl-C, SIGTERM, damaged files.

Each test reads back what the CLI printed and what it left in the run folder (README "Training": resume rule). The
refusals run the CLI's main in this process (they come before any work); runs, stops and resumes are subprocesses.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsdist.core.files import atomic_save
from capsdist.data.modules import CapsDataModule
from capsdist.training import cli as train
from tests.conftest import TINY, refused
from tests.scale_probe import probe_config, records, train_env, wait_paused

DATA = ["--data.train_samples=128", "--data.val_samples=32", "--wandb_mode=disabled"]


def fit(root: Path, *extra: str, probe: Path | None = None) -> subprocess.Popen:
    """Start `python -m capsdist.train fit` on the tiny model into ``root`` (stdout/stderr to ``root``.log)."""
    args = [*TINY, *DATA, f"--trainer.default_root_dir={root}", *extra]
    if probe is not None:
        args += ["--config", str(probe)]
    log = root.with_suffix(".log").open("w")
    return subprocess.Popen([sys.executable, "-m", "capsdist.train", "fit", *args], env=train_env(), stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def finish(root: Path, *extra: str) -> tuple[int, str]:
    """Run fit to its end; (exit code, output)."""
    code = fit(root, *extra).wait(timeout=300)
    return code, root.with_suffix(".log").read_text()


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def summary(output: str) -> dict:
    """The JSON line fit printed last."""
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder after 4 steps."""
    root = tmp_path_factory.mktemp("run") / "run"
    code, output = finish(root, "--trainer.max_steps=4")
    assert code == 0, output[-3000:]
    return root


def refit(root: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`fit` on the tiny model into ``root`` in this process, as a refusal: its one-paragraph error line."""
    return refused(train.main, ["fit", *TINY, *DATA, f"--trainer.default_root_dir={root}", *extra], capsys)


def test_fit_into_used_folder_refuses_and_changes_nothing(trained: Path, capsys) -> None:
    """A second fresh `fit` into a folder with checkpoints exits 2 with the fix, writing nothing there."""
    before = snapshot(trained)
    error = refit(trained, "--trainer.max_steps=8", capsys=capsys)
    assert "already holds checkpoints" in error and "--ckpt_path last" in error, error
    assert snapshot(trained) == before


def test_last_is_the_highest_step_never_a_newer_older_file(trained: Path, tmp_path: Path) -> None:
    """`--ckpt_path last` takes the highest global step: not a newer file of an earlier step (an old hpc
    checkpoint, Lightning's choice on SLURM), not a step-0 file (a failed start's)."""
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    early = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    atomic_save({**early, "global_step": 2}, root / "hpc_ckpt_7.ckpt")  # step 2, newest file
    atomic_save({"global_step": 0, "state_dict": {}}, root / "checkpoints" / "interrupted.ckpt")
    code, output = finish(root, "--trainer.max_steps=6", "--ckpt_path=last")
    assert code == 0, output[-3000:]
    assert f"resuming from {root.resolve()}/checkpoints/last.ckpt at step 4" in output
    assert summary(output)["global_step"] == 6
    assert not (root / "hpc_ckpt_7.ckpt").exists()  # superseded by the final last.ckpt: cleaned up


def test_corrupt_checkpoint_is_a_one_paragraph_error(trained: Path, tmp_path: Path, capsys) -> None:
    """A torn last.ckpt (a kill on a filesystem without atomic rename) is named, with the fix; no traceback."""
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    last = root / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    error = refit(root, "--trainer.max_steps=6", "--ckpt_path=last", capsys=capsys)
    assert f"{last} is not a readable checkpoint" in error and "weights_only=False" not in error, error


def test_checkpoint_of_another_experiment_is_refused_before_anything_is_written(trained: Path, capsys) -> None:
    """Same shapes, other routing: resuming would continue another experiment; refused, nothing written."""
    before = snapshot(trained)
    error = refit(trained, "--trainer.max_steps=6", "--ckpt_path=last", "--model.routing_iterations=1", capsys=capsys)
    assert "routing_iterations': '3 vs 1'" in error, error
    assert snapshot(trained) == before and not (trained / "checkpoints" / "interrupted.ckpt").exists()


def _stopped_at(root: Path, sig: signal.Signals, step: int, *extra: str) -> tuple[int, str]:
    """A fit held at ``step`` by the probe, sent ``sig`` there, then released: (exit code, output)."""
    out = root.parent / f"{root.name}-probe"
    proc = fit(root, "--trainer.max_steps=12", *extra, probe=probe_config(root.parent / "p.yaml", out,
                                                                       pause_at_step=step))  # fmt: skip
    wait_paused(out, 1, lambda: proc.poll() is None)
    proc.send_signal(sig)
    (out / "resume").touch()
    return proc.wait(timeout=120), root.with_suffix(".log").read_text()


@pytest.mark.slow
def test_ctrl_c_resume_is_exact_and_validate_keeps_checkpoints(tmp_path: Path) -> None:
    """Ctrl-C at step 5: exit 130, interrupted.ckpt at step 5; resuming ends with the weights and samples of an
    uninterrupted run (before, the loader had counted the batch in flight). validate then deletes nothing."""
    code, output = finish(tmp_path / "full", "--trainer.max_steps=12", "--config",
                          str(probe_config(tmp_path / "pf.yaml", tmp_path / "full-probe")))  # fmt: skip
    assert code == 0, output[-2000:]
    root = tmp_path / "cut"
    code, output = _stopped_at(root, signal.SIGINT, 5)
    assert code == 130 and summary(output)["stopped"] == "Ctrl-C (SIGINT)", output[-3000:]
    interrupted = root / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True, mmap=True)["global_step"] == 5
    first = records(tmp_path / "cut-probe")[0]["train"]  # written at the pause step
    code, output = finish(root, "--trainer.max_steps=12", "--ckpt_path=last", "--config",
                          str(probe_config(tmp_path / "pr.yaml", tmp_path / "resumed-probe")))  # fmt: skip
    assert code == 0 and "at step 5" in output, output[-3000:]
    (full,), (resumed,) = records(tmp_path / "full-probe"), records(tmp_path / "resumed-probe")
    assert first + resumed["train"] == full["train"] and resumed["params"] == full["params"]

    before = snapshot(root / "checkpoints")
    validate = [sys.executable, "-m", "capsdist.train", "validate", *TINY, *DATA,
                f"--trainer.default_root_dir={root}", f"--ckpt_path={interrupted}"]  # fmt: skip
    proc = subprocess.run(validate, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(root / "checkpoints") == before


def test_sigterm_saves_and_exits_nonzero_with_a_summary(tmp_path: Path) -> None:
    """SIGTERM outside SLURM (docker stop, a supervisor): checkpoint at the next step, summary, exit 143."""
    root = tmp_path / "run"
    code, output = _stopped_at(root, signal.SIGTERM, 3)
    assert code == 143, output[-3000:]
    result = summary(output)
    assert result["stopped"] == "SIGTERM" and result["global_step"] == 3 and result["exit_code"] == 143
    assert torch.load(result["checkpoint"], weights_only=True, mmap=True)["global_step"] == 3


def test_atomic_save_never_leaves_a_torn_file(tmp_path: Path) -> None:
    """A save that fails midway keeps the previous file intact and leaves no temp file beside it."""
    target = tmp_path / "last.ckpt"
    atomic_save({"global_step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"global_step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_short_time_left_stops_before_validation(tmp_path: Path) -> None:
    """With less time left than the stop lead (the templates export the job's end), the run saves and exits 75
    (requeue) at the first step boundary instead of running on into validation and the time limit."""
    root = tmp_path / "run"
    env = {"CAPSDIST_JOB_END": str(int(time.time()) + 1000), "CAPSDIST_STOP_LEAD_S": "1200"}
    args = [*TINY, *DATA, f"--trainer.default_root_dir={root}", "--trainer.max_steps=12"]
    proc = subprocess.run([sys.executable, "-m", "capsdist.train", "fit", *args], env=train_env(**env),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 75, proc.stderr[-3000:]
    result = summary(proc.stdout)
    assert result["global_step"] == 1 and result["stopped"].startswith("requeue") and "val/loss" not in result


def test_loader_workers_default_from_the_source_and_the_slurm_allocation(
    tmp_path: Path, shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards decode images in DataLoader workers: 2 of them, or under SLURM the task's CPUs minus the training
    process (read back from the loader state a checkpoint records, as a resume checks it); the in-memory sources
    make their batches in the training process (a worker would only add the hand-over)."""
    root = tmp_path / "run"
    data = [f"--data.train_shards={shards}", f"--data.val_shards={shards}", "--data.batch_size=8"]
    args = [*[f for f in TINY if "num_workers" not in f], "--data.source=multimnist_shards", *data,
            "--data.train_samples=32", f"--trainer.default_root_dir={root}", "--trainer.max_steps=1",
            "--wandb_mode=disabled"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "capsdist.train", "fit", *args], capture_output=True, text=True,
                          timeout=300, env=train_env(SLURM_CPUS_PER_TASK="5"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"][0]["num_workers"] == 4
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert CapsDataModule(source="multimnist_shards", train_shards=str(shards)).num_workers == 2
    for source in ("mnist", "multimnist_onthefly"):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
        assert CapsDataModule(source=source).num_workers == 0


def test_usr1_without_scontrol_saves_and_exits_for_requeue(tmp_path: Path) -> None:
    """A SLURM task whose environment has no `scontrol` (a container): USR1 still saves hpc_ckpt_1.ckpt, logs why
    it cannot requeue and exits 75 (requeued by the batch script, or by a site's RequeueExit=75)."""
    slurm = {"SLURM_JOB_ID": "999", "SLURM_JOB_NAME": "capsdist-test", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost", "PATH": str(Path(sys.executable).parent)}  # fmt: skip
    root, out = tmp_path / "run", tmp_path / "probe"
    args = [*TINY, *DATA, f"--trainer.default_root_dir={root}", "--trainer.max_steps=12", "--config",
            str(probe_config(tmp_path / "p.yaml", out, pause_at_step=2))]  # fmt: skip
    log = (tmp_path / "log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "capsdist.train", "fit", *args], env=train_env(**slurm),
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    wait_paused(out, 1, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGUSR1)
    (out / "resume").touch()
    output = (tmp_path / "log").read_text() if proc.wait(timeout=120) else ""
    assert proc.returncode == 75, (tmp_path / "log").read_text()[-3000:]
    assert "no `scontrol` in the task environment" in output and "RequeueExit=75" in output
    assert torch.load(root / "hpc_ckpt_1.ckpt", weights_only=True, mmap=True)["global_step"] == 2
