"""One fit per run folder, and launchers that rerun the same command line resume by themselves.

The lock (two fits at once; kill -9 never blocks the resume), `--ckpt_path auto` both ways, a torchrun restart after
a rank dies, and slurm/launch.sh finding the same run folder for a resubmission with `--ckpt_path last`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsdist.training import cli as train
from tests.conftest import REPO, TINY, TINY_MODEL, refused
from tests.faults import fault_config
from tests.scale_probe import probe_config, train_env, wait_paused, write_yaml
from tests.torchrun_jobs import torchrun

DATA = ["--data.train_samples=256", "--data.val_samples=32", "--wandb_mode=disabled"]


def start(root: Path, *extra: str, log: str = "log") -> subprocess.Popen:
    """Start fit into ``root``; output to ``root``'s sibling file ``log``."""
    args = [*TINY, *DATA, f"--trainer.default_root_dir={root}", *extra]
    out = (root.parent / log).open("w")
    return subprocess.Popen([sys.executable, "-m", "capsdist.train", "fit", *args], env=train_env(), stdout=out,
                            stderr=subprocess.STDOUT)  # fmt: skip


def test_second_fit_into_a_running_folder_exits_2_and_kill_9_never_blocks(tmp_path: Path, capsys) -> None:
    """A fit holds the folder's lock: a second one (same command, run in this process) exits 2 naming its PID,
    writing nothing; after a kill -9 of the first the kernel has dropped the lock and `--ckpt_path last` resumes."""
    root, probe = tmp_path / "run", tmp_path / "probe"
    first = start(root, "--trainer.max_steps=8", "--checkpoint_every_n_steps=2", "--data.num_workers=2",
                  "--config", str(probe_config(tmp_path / "p.yaml", probe, pause_at_step=3)))  # fmt: skip
    try:
        wait_paused(probe, 1, lambda: first.poll() is None)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        args = ["fit", *TINY, *DATA, f"--trainer.default_root_dir={root}", "--trainer.max_steps=8", "--ckpt_path=last"]
        error = refused(train.main, args, capsys)
        assert f"another fit is running in the run folder {root} (process {first.pid} holds" in error, error
        assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = start(root, "--trainer.max_steps=8", "--ckpt_path=last", "--data.num_workers=2", log="resumed")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "resumed").read_text()
    assert torch.load(root / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 8


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path: Path) -> None:
    """The one line a scheduler reruns: on an empty folder a fresh run; rerun (a larger budget), it resumes."""
    root = tmp_path / "run"
    assert start(root, "--trainer.max_steps=2", "--ckpt_path=auto").wait(timeout=300) == 0
    assert "a fresh run (--ckpt_path auto" in (tmp_path / "log").read_text()
    assert start(root, "--trainer.max_steps=4", "--ckpt_path=auto").wait(timeout=300) == 0
    output = (tmp_path / "log").read_text()
    assert "--ckpt_path auto: resuming from" in output and "at step 2" in output, output[-3000:]
    assert json.loads([x for x in output.splitlines() if x.startswith("{")][-1])["global_step"] == 4


@pytest.mark.slow
def test_torchrun_restart_after_a_rank_dies_resumes_by_itself(tmp_path: Path) -> None:
    """torchrun --max-restarts 1, rank 1 killed after step 6 of the first attempt: the restart (the same command,
    no --ckpt_path) resumes the folder's newest state by itself, exits 0 and ends on an uninterrupted run's
    weights; a first attempt on the empty folder is not refused."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert torchrun(straight, tmp_path / "straight.log") == 0, (tmp_path / "straight.log").read_text()[-3000:]
    kill = fault_config(tmp_path / "kill.yaml", "KillRankOnce", step=6, rank=1)
    code = torchrun(cut, tmp_path / "cut.log", "--config", str(kill))
    output = (tmp_path / "cut.log").read_text()
    assert code == 0, output[-4000:]
    assert "a fresh run" in output and "torchrun restart 1" in output and "resuming by itself" in output, output[-4000:]
    weights = [torch.load(r / "checkpoints/last.ckpt", weights_only=True) for r in (straight, cut)]
    assert weights[1]["global_step"] == 12
    assert all(torch.equal(weights[0]["state_dict"][k], weights[1]["state_dict"][k]) for k in weights[0]["state_dict"])


def test_launch_sh_finds_the_same_folder_for_a_resubmission(tmp_path: Path) -> None:
    """slurm/launch.sh names the run folder after what defines the experiment: the same line plus
    `--ckpt_path last` or another budget gives the same folder, another setting another one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    for tool in ("squeue", "scontrol"):
        (bin_dir / tool).write_text("#!/bin/bash\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    config = write_yaml(tmp_path / "tiny.yaml", {"model": TINY_MODEL})
    slurm = {"SLURM_JOB_NAME": "exp", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_JOB_NODELIST": "localhost", "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip

    def folder(*args: str) -> str:
        out = tmp_path / "args"
        env = {**os.environ, **slurm, "STUB_OUT": str(out), "SLURM_JOB_ID": str(len(args))}
        subprocess.run(["bash", str(REPO / "slurm/launch.sh"), str(config), *args], env=env, check=True,
                       cwd=tmp_path, capture_output=True, timeout=60)  # fmt: skip
        return next(a for a in out.read_text().splitlines() if a.startswith("--trainer.default_root_dir="))

    base = folder("--model.lr=0.001", "--trainer.max_steps=100")
    assert folder("--model.lr=0.001", "--trainer.max_steps=100", "--ckpt_path", "last") == base
    assert folder("--model.lr=0.001", "--trainer.max_steps=200", "--ckpt_path=last") == base
    assert folder("--trainer.max_time=00:01:00:00", "--model.lr=0.001") == base
    assert folder("--model.lr=0.002", "--trainer.max_steps=100") != base
