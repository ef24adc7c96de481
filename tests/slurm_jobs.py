"""Helpers for the SLURM tests: sbatch of the repo's template with a tiny 2-rank config, logs, accounting, leftovers.

A job is held at a known step by tests/scale_probe.py (``pause_at_step``), stopped the way a cluster stops it,
and released; these read back what happened.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from tests.conftest import REPO, TINY_MODEL
from tests.scale_probe import train_env, wait_paused, write_yaml
from tests.slurm_cluster import SlurmCluster

BATCH, STEPS_PER_EPOCH, MAX_STEPS, PAUSE_AT = 4, 6, 12, 9  # stopped mid-way through the second epoch
# 2 ranks x BATCH samples x STEPS_PER_EPOCH batches of MNIST per epoch; 2 validation batches per rank.
SLURM_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "precision": 32, "max_steps": MAX_STEPS, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1, "enable_progress_bar": False},
    "model": TINY_MODEL,
    "data": {"source": "mnist", "batch_size": BATCH, "num_workers": 0, "train_samples": 2 * BATCH * STEPS_PER_EPOCH,
             "val_samples": 4 * BATCH},
}  # fmt: skip


def submit(cluster: SlurmCluster, tmp: Path, name: str, probe: Path, *args: str, tasks: int = 2) -> int:
    """sbatch the single-node template (CPU: no GPUs) with the tiny config, the probe and ``args``."""
    config = write_yaml(tmp / "tiny.yaml", SLURM_CONFIG)
    return cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config), "--config", str(probe), "--wandb_mode=offline", *args,
        options=[f"--job-name={name}", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--gpus-per-node=0",
                 f"--chdir={tmp}"],
        env=train_env(CAPSDIST_HOME=str(REPO)),
    )  # fmt: skip


def job_log(tmp: Path, name: str, job: int) -> str:
    return (tmp / f"{name}-{job}.out").read_text(errors="replace")


def sacct(cluster: SlurmCluster, job: int | str) -> list[str]:
    """The job's sacct lines once accounting has its end (slurmdbd lags slurmctld by a moment)."""
    deadline = time.monotonic() + 30
    while True:
        lines = cluster.sacct(job)
        if (lines and all(line.split("|")[-1] != "Unknown" for line in lines)) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def states(lines: list[str]) -> list[str]:
    """The job-level states of ``sacct --duplicates`` lines, one per run of the job."""
    return [line.split("|")[2] for line in lines if "." not in line.split("|")[0]]


def assert_nothing_left(cluster: SlurmCluster, job: int, tmp: Path) -> None:
    """No queue entry and no process of this job: none whose command line names a file under ``tmp`` or whose
    working directory is under it (the job's --chdir: W&B's service and loader workers inherit it)."""
    deadline = time.monotonic() + 30
    while cluster.run("squeue", "-h", "-j", str(job), check=False).strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not cluster.run("squeue", "-h", "-j", str(job), check=False).strip()
    deadline = time.monotonic() + 10  # W&B's service leaves within a second of the training process
    while (mine := _processes_under(tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not mine, mine


def _processes_under(tmp: Path) -> list[str]:
    mine = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if (str(tmp) in cmdline or cwd.startswith(str(tmp))) and int(proc.name) != os.getpid():
            mine.append(cmdline)
    return mine


def held_then(cluster: SlurmCluster, job: int, out: Path, ranks: int, *stop: str) -> None:
    """Wait until every rank holds at the pause step, stop the job with the command ``stop``, release the ranks."""
    wait_paused(out, ranks, lambda: cluster.job_state(job) in ("PENDING", "RUNNING"))
    cluster.run(*stop)
    time.sleep(1)  # the held ranks record the signal, then go on to the end of the pause step
    (out / "resume").touch()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
