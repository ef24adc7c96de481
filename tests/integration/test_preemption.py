"""Every way SLURM stops a job, for real: sbatch of the repo's template on the test cluster, a tiny 2-rank model.

A job is held at a known step by tests/scale_probe.py (``pause_at_step``), stopped the way a cluster stops it,
and released; the assertions are about the step each run started from, the samples and weights per rank
(equal to an uninterrupted job where the data order allows), the accounting (``sacct``) and leftovers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL
from tests.scale_probe import probe_config, records, train_env, wait_paused, write_yaml
from tests.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

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


def _submit(cluster: SlurmCluster, tmp: Path, name: str, probe: Path, *args: str, tasks: int = 2) -> int:
    """sbatch the single-node template (CPU: no GPUs) with the tiny config, the probe and ``args``."""
    config = write_yaml(tmp / "tiny.yaml", SLURM_CONFIG)
    return cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config), "--config", str(probe), "--wandb_mode=offline", *args,
        options=[f"--job-name={name}", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--gpus-per-node=0",
                 f"--chdir={tmp}"],
        env=train_env(CAPSDIST_HOME=str(REPO)),
    )  # fmt: skip


def _log(tmp: Path, name: str, job: int) -> str:
    return (tmp / f"{name}-{job}.out").read_text(errors="replace")


def _sacct(cluster: SlurmCluster, job: int | str) -> list[str]:
    """The job's sacct lines once accounting has its end (slurmdbd lags slurmctld by a moment)."""
    deadline = time.monotonic() + 30
    while True:
        lines = cluster.sacct(job)
        if (lines and all(line.split("|")[-1] != "Unknown" for line in lines)) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def _states(lines: list[str]) -> list[str]:
    """The job-level states of ``sacct --duplicates`` lines, one per run of the job."""
    return [line.split("|")[2] for line in lines if "." not in line.split("|")[0]]


def _assert_nothing_left(cluster: SlurmCluster, job: int, tmp: Path) -> None:
    """No queue entry and no process of this job (its command lines name files under ``tmp``)."""
    deadline = time.monotonic() + 30
    while cluster.run("squeue", "-h", "-j", str(job), check=False).strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not cluster.run("squeue", "-h", "-j", str(job), check=False).strip()
    mine = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp) in cmdline and int(proc.name) != os.getpid():
            mine.append(cmdline)
    assert not mine, mine


def _held_then(cluster: SlurmCluster, job: int, out: Path, ranks: int, *stop: str) -> None:
    """Wait until every rank holds at the pause step, stop the job with the command ``stop``, release the ranks."""
    wait_paused(out, ranks, lambda: cluster.job_state(job) in ("PENDING", "RUNNING"))
    cluster.run(*stop)
    time.sleep(1)  # the held ranks record the signal, then go on to the end of the pause step
    (out / "resume").touch()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-task sbatch job of the template trained to the end: its job id, sacct lines and probe records."""
    tmp = tmp_path_factory.mktemp("ddp")
    job = _submit(slurm_cluster, tmp, "capsdist-ddp", probe_config(tmp / "probe.yaml", tmp / "probe"))
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    assert state == "COMPLETED", _log(tmp, "capsdist-ddp", job)[-4000:]
    return {"job": job, "tmp": tmp, "sacct": _sacct(slurm_cluster, job), "records": records(tmp / "probe")}


def test_sbatch_ddp_two_tasks_completes_with_identical_params(uninterrupted: dict) -> None:
    """The template's 2-task job ends COMPLETED, both ranks at MAX_STEPS with the same parameters, in a run
    folder named after the job and a hash of its config and overrides."""
    print("\n".join(["sacct:", *uninterrupted["sacct"]]))
    job_line, *steps = uninterrupted["sacct"]
    assert job_line.split("|")[2] == "COMPLETED"
    assert any(line.split("|")[1] == "python" and line.split("|")[6] == "2" for line in steps)  # srun: 2 tasks
    ranks = uninterrupted["records"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["global_step"] for r in ranks} == {MAX_STEPS}
    assert ranks[0]["params"] == ranks[1]["params"]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == MAX_STEPS * BATCH
    (root,) = (uninterrupted["tmp"] / "runs").glob("capsdist-ddp-*")
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1  # one W&B run: rank 0 logs
    assert f"run folder {root}: a fresh run" in _log(uninterrupted["tmp"], "capsdist-ddp", uninterrupted["job"])


def _check_resumed(first: list[dict], second: list[dict], reference: list[dict]) -> None:
    """The two runs together trained on exactly the uninterrupted schedule and ended with the same weights."""
    assert {r["global_step"] for r in first} == {PAUSE_AT} and {r["global_step"] for r in second} == {MAX_STEPS}
    for rank in (0, 1):
        assert first[rank]["train"] + second[rank]["train"] == reference[rank]["train"]
        assert second[rank]["params"] == reference[rank]["params"]


def test_usr1_to_batch_shell_requeues_and_resumes_exactly(
    slurm_cluster: SlurmCluster, uninterrupted: dict, tmp_path: Path
) -> None:
    """`scancel --signal=USR1 --batch` (what `B:USR1@90` sends): the batch shell survives, forwards it, the
    ranks save hpc_ckpt at step PAUSE_AT, the shell requeues, the restart resumes by itself, exactly."""
    name, out = "capsdist-usr1", tmp_path / "probe"
    job = _submit(slurm_cluster, tmp_path, name, probe_config(tmp_path / "p.yaml", out, pause_at_step=PAUSE_AT))
    _held_then(slurm_cluster, job, out, 2, "scancel", "--batch", "--signal=USR1", str(job))
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    lines, log = _sacct(slurm_cluster, job), _log(tmp_path, name, job)
    print("\n".join(["sacct:", *lines]))
    assert state == "COMPLETED", log[-4000:]
    assert _states(lines) == ["REQUEUED", "COMPLETED"]
    assert f"resuming by itself from {tmp_path}/runs/" in log and f"hpc_ckpt_1.ckpt at step {PAUSE_AT}" in log
    _check_resumed(records(out, 0), records(out, 1), uninterrupted["records"])
    (root,) = (tmp_path / "runs").glob(f"{name}-*")
    assert not list(root.glob("hpc_ckpt_*.ckpt"))  # superseded by the final last.ckpt, so deleted
    _assert_nothing_left(slurm_cluster, job, tmp_path)


@pytest.fixture(scope="module")
def sigterm_requeued(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A job held at PAUSE_AT and requeued with `scontrol requeue` (SIGTERM, as preemption and node failure)."""
    tmp, name = tmp_path_factory.mktemp("sigterm"), "capsdist-term"
    out = tmp / "probe"
    job = _submit(slurm_cluster, tmp, name, probe_config(tmp / "p.yaml", out, pause_at_step=PAUSE_AT),
                  "--run_name=term")  # fmt: skip
    _held_then(slurm_cluster, job, out, 2, "scontrol", "requeue", str(job))
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    return {"tmp": tmp, "name": name, "job": job, "state": state, "out": out, "sacct": _sacct(slurm_cluster, job)}


def test_sigterm_requeue_resumes_where_it_stopped(
    slurm_cluster: SlurmCluster, uninterrupted: dict, sigterm_requeued: dict
) -> None:
    """SIGTERM saves at the next step boundary (inside KillWait); SLURM requeues; the restart resumes from that
    step by itself and ends with the uninterrupted weights."""
    run, log = sigterm_requeued, _log(sigterm_requeued["tmp"], sigterm_requeued["name"], sigterm_requeued["job"])
    print("\n".join(["sacct:", *run["sacct"]]))
    assert run["state"] == "COMPLETED", log[-4000:]
    assert _states(run["sacct"]) == ["REQUEUED", "COMPLETED"]
    assert f"SIGTERM -> saved {run['tmp']}/runs/term/hpc_ckpt_1.ckpt at step {PAUSE_AT}" in log
    assert f"resuming by itself from {run['tmp']}/runs/term/hpc_ckpt_1.ckpt at step {PAUSE_AT}" in log
    _check_resumed(records(run["out"], 0), records(run["out"], 1), uninterrupted["records"])
    _assert_nothing_left(slurm_cluster, run["job"], run["tmp"])


def test_resubmitted_finished_job_does_not_go_back(slurm_cluster: SlurmCluster, sigterm_requeued: dict) -> None:
    """Resubmitting the finished experiment: without --ckpt_path it is refused and nothing changes; with
    `--ckpt_path last` it starts at the final step, not at an older (planted, newer-file) hpc checkpoint."""
    tmp, root = sigterm_requeued["tmp"], sigterm_requeued["tmp"] / "runs" / "term"
    last = root / "checkpoints" / "last.ckpt"
    (best,) = root.glob("checkpoints/best-*.ckpt")  # written at an epoch end, before the last step
    shutil.copy(best, root / "hpc_ckpt_1.ckpt")  # an old preemption's checkpoint, newest file on disk
    before = _digest(last)
    refused = _submit(slurm_cluster, tmp, "resubmit", tmp / "p.yaml", "--run_name=term", tasks=1)
    assert slurm_cluster.wait_for_state(refused, [], timeout=120) == "FAILED"
    lines = _sacct(slurm_cluster, refused)
    print("\n".join(["sacct (refused):", *lines]))
    assert lines[0].split("|")[3] == "2:0" and "--ckpt_path last" in _log(tmp, "resubmit", refused)
    assert _digest(last) == before and (root / "hpc_ckpt_1.ckpt").is_file()

    out = tmp / "probe-again"
    job = _submit(slurm_cluster, tmp, "resubmit", probe_config(tmp / "p2.yaml", out), "--run_name=term",
                  "--ckpt_path=last")  # fmt: skip
    assert slurm_cluster.wait_for_state(job, [], timeout=120) == "COMPLETED", _log(tmp, "resubmit", job)[-4000:]
    print("\n".join(["sacct (resubmitted):", *_sacct(slurm_cluster, job)]))
    assert f"resuming from {last} at step {MAX_STEPS}" in _log(tmp, "resubmit", job)
    assert {r["global_step"] for r in records(out)} == {MAX_STEPS} and records(out)[0]["train"] == []
    assert not (root / "hpc_ckpt_1.ckpt").exists()  # the stale one is gone once superseded
    _assert_nothing_left(slurm_cluster, job, tmp)


def test_two_experiments_with_one_job_name_do_not_share_state(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Same job name, different overrides: two run folders, each run starts at step 0 and ends at its own step."""
    jobs = {}
    for steps in (3, 4):
        out = tmp_path / f"probe{steps}"
        jobs[steps] = _submit(slurm_cluster, tmp_path, "same", probe_config(tmp_path / f"p{steps}.yaml", out),
                              f"--trainer.max_steps={steps}", tasks=1)  # fmt: skip
        assert slurm_cluster.wait_for_state(jobs[steps], [], timeout=120) == "COMPLETED", _log(
            tmp_path, "same", jobs[steps]
        )[-4000:]
        print("\n".join([f"sacct ({steps} steps):", *_sacct(slurm_cluster, jobs[steps])]))
        (record,) = records(out)
        assert record["global_step"] == steps and len(record["train"]) == steps * BATCH  # from step 0
        assert "a fresh run" in _log(tmp_path, "same", jobs[steps])
    assert len(list((tmp_path / "runs").glob("same-*"))) == 2
    for job in jobs.values():
        _assert_nothing_left(slurm_cluster, job, tmp_path)


def test_job_stopped_early_without_requeue_exits_nonzero(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGTERM to the tasks with no requeue (e.g. `scancel --signal=TERM`): a checkpoint at that step, a summary
    line, and a FAILED job with a non-zero exit code (the tasks exit 143; sacct records srun's 15), so `afterok`
    chains do not go on."""
    out = tmp_path / "probe"
    job = _submit(slurm_cluster, tmp_path, "early", probe_config(tmp_path / "p.yaml", out, pause_at_step=3),
                  "--run_name=early", tasks=1)  # fmt: skip
    _held_then(slurm_cluster, job, out, 1, "scancel", "--signal=TERM", str(job))
    state = slurm_cluster.wait_for_state(job, [], timeout=120)
    lines, log = _sacct(slurm_cluster, job), _log(tmp_path, "early", job)
    print("\n".join(["sacct:", *lines]))
    assert state == "FAILED" and lines[0].split("|")[3] != "0:0", log[-3000:]
    assert "exiting (exit code 143)" in log
    assert '"stopped": "SIGTERM"' in log and '"global_step": 3' in log
    assert (tmp_path / "runs" / "early" / "hpc_ckpt_1.ckpt").is_file()
    _assert_nothing_left(slurm_cluster, job, tmp_path)


def test_template_folder_per_array_task_cpus_and_no_stale_rendezvous(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The template itself, with a stub in place of Python: each array task gets its own run folder (one hash of
    config + overrides), srun hands the tasks --cpus-per-task, and a stale MASTER_ADDR/PORT does not reach them."""
    stub = tmp_path / "stub.sh"
    stub.write_text('#!/bin/bash\nout="$STUB_OUT/${SLURM_ARRAY_TASK_ID}"\nprintf "%s\\n" "$@" > "$out.args"\n'
                    'env > "$out.env"\n')  # fmt: skip
    stub.chmod(0o755)
    config = write_yaml(tmp_path / "tiny.yaml", SLURM_CONFIG)
    env = {k: v for k, v in train_env().items() if k != "CAPSDIST_MASTER_PORT"}
    env |= {"CAPSDIST_HOME": str(REPO), "CAPSDIST_PYTHON": str(stub), "STUB_OUT": str(tmp_path),
            "MASTER_ADDR": "stale.example", "MASTER_PORT": "1"}  # fmt: skip
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config), "--trainer.max_steps=3", env=env,
        options=["--job-name=arr", "--array=0-1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0",
                 f"--chdir={tmp_path}"],
    )  # fmt: skip
    for task in (0, 1):
        assert slurm_cluster.wait_for_state(f"{job}_{task}", [], timeout=120) == "COMPLETED"
    folders = []
    for task in (0, 1):
        args = (tmp_path / f"{task}.args").read_text().splitlines()
        folders += [a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")]
        task_env = dict(
            line.split("=", 1) for line in (tmp_path / f"{task}.env").read_text().splitlines() if "=" in line
        )
        assert (
            task_env["SLURM_CPUS_PER_TASK"] == "2" and "MASTER_ADDR" not in task_env and "MASTER_PORT" not in task_env
        )
    assert folders[0] != folders[1] and folders[0].removesuffix("-task0") == folders[1].removesuffix("-task1")
    assert folders[0].startswith("runs/arr-")


def test_more_gpus_than_tasks_is_an_error(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """2 GPUs per node with 1 task per node would leave a GPU idle: the template refuses with the fix (the test
    node has no GPUs, so the allocation's SLURM_GPUS_ON_NODE is given through the job environment)."""
    config = write_yaml(tmp_path / "tiny.yaml", SLURM_CONFIG)
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config),
        env=train_env(CAPSDIST_HOME=str(REPO), SLURM_GPUS_ON_NODE="2"),
        options=["--job-name=gpus", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                 f"--chdir={tmp_path}"],
    )  # fmt: skip
    assert slurm_cluster.wait_for_state(job, [], timeout=120) == "FAILED"
    assert "--ntasks-per-node=2 with --gpus-per-node=2" in _log(tmp_path, "gpus", job)
    assert not (tmp_path / "runs").exists()
