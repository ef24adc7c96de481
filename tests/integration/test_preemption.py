"""Every way SLURM stops a job, for real: sbatch of the repo's template on the test cluster, a tiny 2-rank model.

A job is held at a known step by tests/scale_probe.py (``pause_at_step``), stopped the way a cluster stops it,
and released; the assertions are about the step each run started from, the samples and weights per rank
(equal to an uninterrupted job where the data order allows), the accounting (``sacct``) and leftovers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.scale_probe import probe_config, records, train_env, write_yaml
from tests.slurm_cluster import SlurmCluster, free_port
from tests.slurm_jobs import (
    BATCH,
    MAX_STEPS,
    PAUSE_AT,
    SLURM_CONFIG,
    STEPS_PER_EPOCH,
    assert_nothing_left,
    digest,
    held_then,
    job_log,
    sacct,
    states,
    submit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-task sbatch job of the template trained to the end: its job id, sacct lines and probe records."""
    tmp = tmp_path_factory.mktemp("ddp")
    job = submit(slurm_cluster, tmp, "capsdist-ddp", probe_config(tmp / "probe.yaml", tmp / "probe"))
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    assert state == "COMPLETED", job_log(tmp, "capsdist-ddp", job)[-4000:]
    return {"job": job, "tmp": tmp, "sacct": sacct(slurm_cluster, job), "records": records(tmp / "probe")}


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
    assert f"run folder {root}: a fresh run" in job_log(uninterrupted["tmp"], "capsdist-ddp", uninterrupted["job"])


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
    job = submit(slurm_cluster, tmp_path, name, probe_config(tmp_path / "p.yaml", out, pause_at_step=PAUSE_AT))
    held_then(slurm_cluster, job, out, 2, "scancel", "--batch", "--signal=USR1", str(job))
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    lines, log = sacct(slurm_cluster, job), job_log(tmp_path, name, job)
    print("\n".join(["sacct:", *lines]))
    assert state == "COMPLETED", log[-4000:]
    assert states(lines) == ["REQUEUED", "COMPLETED"]
    assert f"resuming by itself from {tmp_path}/runs/" in log and f"hpc_ckpt_1.ckpt at step {PAUSE_AT}" in log
    _check_resumed(records(out, 0), records(out, 1), uninterrupted["records"])
    (root,) = (tmp_path / "runs").glob(f"{name}-*")
    assert not list(root.glob("hpc_ckpt_*.ckpt"))  # superseded by the final last.ckpt, so deleted
    assert_nothing_left(slurm_cluster, job, tmp_path)


@pytest.fixture(scope="module")
def sigterm_requeued(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A job held at PAUSE_AT and requeued with `scontrol requeue` (SIGTERM, as preemption and node failure), with
    the defaults users run: 2 loader workers per rank and W&B offline (SIGTERM reaches the workers and W&B's
    service too)."""
    tmp, name = tmp_path_factory.mktemp("sigterm"), "capsdist-term"
    out = tmp / "probe"
    job = submit(slurm_cluster, tmp, name, probe_config(tmp / "p.yaml", out, pause_at_step=PAUSE_AT),
                 "--run_name=term", "--data.num_workers=2")  # fmt: skip
    held_then(slurm_cluster, job, out, 2, "scontrol", "requeue", str(job))
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    return {"tmp": tmp, "name": name, "job": job, "state": state, "out": out, "sacct": sacct(slurm_cluster, job)}


def test_sigterm_requeue_resumes_where_it_stopped(
    slurm_cluster: SlurmCluster, uninterrupted: dict, sigterm_requeued: dict
) -> None:
    """SIGTERM saves at the next step boundary (inside KillWait), loader workers and W&B untouched; SLURM
    requeues (no FAILED line in sacct); the restart resumes from that step by itself and ends with the
    uninterrupted weights; one W&B run, every segment finished, history through the last step."""
    run, log = sigterm_requeued, job_log(sigterm_requeued["tmp"], sigterm_requeued["name"], sigterm_requeued["job"])
    print("\n".join(["sacct:", *run["sacct"]]))
    assert run["state"] == "COMPLETED", log[-4000:]
    assert states(run["sacct"]) == ["REQUEUED", "COMPLETED"] and not any("FAILED" in line for line in run["sacct"])
    assert f"SIGTERM -> saved {run['tmp']}/runs/term/hpc_ckpt_1.ckpt at step {PAUSE_AT}" in log
    assert "killed by signal" not in log and "Connection" not in log
    _one_wandb_run(run["tmp"] / "runs" / "term")
    assert f"resuming by itself from {run['tmp']}/runs/term/hpc_ckpt_1.ckpt at step {PAUSE_AT}" in log
    _check_resumed(records(run["out"], 0), records(run["out"], 1), uninterrupted["records"])
    assert_nothing_left(slurm_cluster, run["job"], run["tmp"])


def test_resubmitted_finished_job_does_not_go_back(slurm_cluster: SlurmCluster, sigterm_requeued: dict) -> None:
    """Resubmitting the finished experiment: without --ckpt_path it is refused and nothing changes; with
    `--ckpt_path last` it starts at the final step, not at an older (planted, newer-file) hpc checkpoint."""
    tmp, root = sigterm_requeued["tmp"], sigterm_requeued["tmp"] / "runs" / "term"
    last = root / "checkpoints" / "last.ckpt"
    (best,) = root.glob("checkpoints/best-*.ckpt")  # written at an epoch end, before the last step
    shutil.copy(best, root / "hpc_ckpt_1.ckpt")  # an old preemption's checkpoint, newest file on disk
    before = digest(last)
    refused = submit(slurm_cluster, tmp, "resubmit", tmp / "p.yaml", "--run_name=term", tasks=1)
    assert slurm_cluster.wait_for_state(refused, [], timeout=120) == "FAILED"
    lines = sacct(slurm_cluster, refused)
    print("\n".join(["sacct (refused):", *lines]))
    assert lines[0].split("|")[3] == "2:0" and "--ckpt_path last" in job_log(tmp, "resubmit", refused)
    assert digest(last) == before and (root / "hpc_ckpt_1.ckpt").is_file()

    out = tmp / "probe-again"
    job = submit(slurm_cluster, tmp, "resubmit", probe_config(tmp / "p2.yaml", out), "--run_name=term",
                  "--ckpt_path=last")  # fmt: skip
    assert slurm_cluster.wait_for_state(job, [], timeout=120) == "COMPLETED", job_log(tmp, "resubmit", job)[-4000:]
    print("\n".join(["sacct (resubmitted):", *sacct(slurm_cluster, job)]))
    assert f"resuming from {last} at step {MAX_STEPS}" in job_log(tmp, "resubmit", job)
    assert {r["global_step"] for r in records(out)} == {MAX_STEPS} and records(out)[0]["train"] == []
    assert not (root / "hpc_ckpt_1.ckpt").exists()  # the stale one is gone once superseded
    assert_nothing_left(slurm_cluster, job, tmp)


def test_two_experiments_with_one_job_name_do_not_share_state(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Same job name, different overrides: two run folders, each run starts at step 0 and ends at its own step."""
    jobs = {}
    for steps in (3, 4):
        out = tmp_path / f"probe{steps}"
        jobs[steps] = submit(slurm_cluster, tmp_path, "same", probe_config(tmp_path / f"p{steps}.yaml", out),
                              f"--trainer.max_steps={steps}", tasks=1)  # fmt: skip
        assert slurm_cluster.wait_for_state(jobs[steps], [], timeout=120) == "COMPLETED", job_log(
            tmp_path, "same", jobs[steps]
        )[-4000:]
        print("\n".join([f"sacct ({steps} steps):", *sacct(slurm_cluster, jobs[steps])]))
        (record,) = records(out)
        assert record["global_step"] == steps and len(record["train"]) == steps * BATCH  # from step 0
        assert "a fresh run" in job_log(tmp_path, "same", jobs[steps])
    assert len(list((tmp_path / "runs").glob("same-*"))) == 2
    for job in jobs.values():
        assert_nothing_left(slurm_cluster, job, tmp_path)


def test_job_stopped_early_without_requeue_exits_nonzero(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGTERM to the tasks with no requeue (e.g. `scancel --signal=TERM`): a checkpoint at that step, a summary
    line, and a FAILED job with a non-zero exit code (the tasks end 0 and leave a mark; the batch script exits 143),
    so `afterok` chains do not go on."""
    out = tmp_path / "probe"
    job = submit(slurm_cluster, tmp_path, "early", probe_config(tmp_path / "p.yaml", out, pause_at_step=3),
                  "--run_name=early", tasks=1)  # fmt: skip
    held_then(slurm_cluster, job, out, 1, "scancel", "--signal=TERM", str(job))
    state = slurm_cluster.wait_for_state(job, [], timeout=120)
    lines, log = sacct(slurm_cluster, job), job_log(tmp_path, "early", job)
    print("\n".join(["sacct:", *lines]))
    assert state == "FAILED" and lines[0].split("|")[3] != "0:0", log[-3000:]
    assert "exiting (exit code 0)" in log and "does not look finished" in log
    assert '"stopped": "SIGTERM"' in log and '"global_step": 3' in log
    assert (tmp_path / "runs" / "early" / "hpc_ckpt_1.ckpt").is_file()
    assert_nothing_left(slurm_cluster, job, tmp_path)


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
        assert task_env["SLURM_CPUS_PER_TASK"] == "2" and "MASTER_ADDR" not in task_env
        assert task_env["MASTER_PORT"] != "1"  # a port free on the node, not the login shell's
    assert folders[0] != folders[1] and folders[0].removesuffix("-task0") == folders[1].removesuffix("-task1")
    assert folders[0].startswith("runs/arr-")


def test_template_keeps_an_exported_rendezvous_of_its_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """MASTER_ADDR/MASTER_PORT exported by the user, naming this (the first) node, reach the tasks as they are
    (a stub in place of Python records them), and the log says so."""
    stub = tmp_path / "stub.sh"
    stub.write_text('#!/bin/bash\nenv > "$STUB_OUT/task.env"\n')
    stub.chmod(0o755)
    config, port = write_yaml(tmp_path / "tiny.yaml", SLURM_CONFIG), str(free_port())
    env = {k: v for k, v in train_env().items() if k != "CAPSDIST_MASTER_PORT"}
    env |= {"CAPSDIST_HOME": str(REPO), "CAPSDIST_PYTHON": str(stub), "STUB_OUT": str(tmp_path),
            "MASTER_ADDR": slurm_cluster.node, "MASTER_PORT": port}  # fmt: skip
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config), env=env,
        options=["--job-name=rdv", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                 f"--chdir={tmp_path}"],
    )  # fmt: skip
    assert slurm_cluster.wait_for_state(job, [], timeout=120) == "COMPLETED"
    task_env = dict(line.split("=", 1) for line in (tmp_path / "task.env").read_text().splitlines() if "=" in line)
    assert (task_env["MASTER_ADDR"], task_env["MASTER_PORT"]) == (slurm_cluster.node, port)
    assert f"rendezvous at the exported MASTER_ADDR={slurm_cluster.node}, port {port}" in job_log(tmp_path, "rdv", job)


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
    assert "--ntasks-per-node=2 with --gpus-per-node=2" in job_log(tmp_path, "gpus", job)
    assert not (tmp_path / "runs").exists()


def test_time_limit_shorter_than_the_warning_lead_is_refused(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`--time=1` with the template's `--signal=B:USR1@90`: the warning would come before the first step, and the
    job would requeue again and again with nothing saved. The batch script refuses at the start with the fix
    (exit 2, a FAILED job, no requeue), before any task starts or anything is written."""
    config = write_yaml(tmp_path / "tiny.yaml", SLURM_CONFIG)
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config), env=train_env(CAPSDIST_HOME=str(REPO)),
        options=["--job-name=short", "--time=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                 f"--chdir={tmp_path}"],
    )  # fmt: skip
    assert slurm_cluster.wait_for_state(job, [], timeout=120) == "FAILED"
    lines, log = sacct(slurm_cluster, job), job_log(tmp_path, "short", job)
    print("\n".join(["sacct:", *lines]))
    assert states(lines) == ["FAILED"] and lines[0].split("|")[3] == "2:0", log
    assert "stop for a requeue 90 s before it" in log and "Fix: sbatch --time=3 (minutes) or more" in log
    assert not (tmp_path / "runs").exists()


def _one_wandb_run(root: Path, last: int = MAX_STEPS) -> list[dict]:
    """The run folder's offline W&B files: one run id across all of them, each finished (exit record), the
    history reaching step ``last``. Returns the history rows of all segments."""
    from tests.wandb_records import finished_records, read_run, wandb_files

    files = wandb_files(root)
    assert files, f"no W&B files under {root}"
    for file in files:  # a segment whose service died keeps only its header and has no exit record
        assert any(r.WhichOneof("record_type") == "exit" for r in finished_records(file.parent)), file
    runs = [read_run(f) for f in files]
    assert len({r["run"]["id"] for r in runs}) == 1, [r["run"]["id"] for r in runs]
    rows = [row for r in runs for row in r["history"]]
    assert max(row.get("trainer/global_step", -1) for row in rows) >= last - 1
    return rows


def _requeued_to_completion(cluster: SlurmCluster, tmp: Path, name: str, job: int, out: Path, *stop: str) -> str:
    """Hold both ranks, stop the job with ``stop``; it must requeue once and complete with no FAILED line in
    sacct (the batch script exits 0 on a routine requeue). Returns the job log."""
    held_then(cluster, job, out, 2, *stop)
    state = cluster.wait_for_state(job, [], timeout=240)
    lines, log = sacct(cluster, job), job_log(tmp, name, job)
    print("\n".join(["sacct:", *lines]))
    assert state == "COMPLETED", log[-4000:]
    assert states(lines) == ["REQUEUED", "COMPLETED"] and not any("FAILED" in line for line in lines)
    return log


def test_requeue_during_validation_redoes_it(slurm_cluster: SlurmCluster, uninterrupted: dict, tmp_path: Path) -> None:
    """`scontrol requeue` during the validation at the end of the first epoch, with 2 loader workers per rank and
    W&B offline: the pass is abandoned and the last training step saved; the job requeues (no FAILED line), the
    restart redoes that validation whole and ends with the uninterrupted weights and validation samples; one
    W&B run with that validation and history through the last step; nothing left."""
    name, out, step = "capsdist-val", tmp_path / "probe", STEPS_PER_EPOCH
    probe = probe_config(tmp_path / "p.yaml", out, pause_at_step=step, pause_in="val")
    job = submit(slurm_cluster, tmp_path, name, probe, "--data.num_workers=2", "--run_name=val")
    log = _requeued_to_completion(slurm_cluster, tmp_path, name, job, out, "scontrol", "requeue", str(job))
    assert f"SIGTERM -> during validation, saved {tmp_path}/runs/val/hpc_ckpt_1.ckpt at step {step}" in log
    assert f"resuming by itself from {tmp_path}/runs/val/hpc_ckpt_1.ckpt at step {step}" in log
    assert "killed by signal" not in log and "Connection" not in log
    first, second, reference = records(out, 0), records(out, 1), uninterrupted["records"]
    for rank in (0, 1):
        assert first[rank]["train"] + second[rank]["train"] == reference[rank]["train"]
        assert second[rank]["params"] == reference[rank]["params"]
        assert second[rank]["val"] == reference[rank]["val"]  # the abandoned pass, redone whole, and the last
    rows = _one_wandb_run(tmp_path / "runs" / "val")
    assert any("val/loss" in row and row.get("trainer/global_step") == step - 1 for row in rows)
    assert_nothing_left(slurm_cluster, job, tmp_path)


def test_usr1_before_the_first_step_requeues_and_trains(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """USR1 to every process of the step (`scancel --signal=USR1`, as `--signal=USR1@N` may send it during
    setup) before the first step: nothing is killed; the tasks leave with nothing to save, the batch script
    requeues, and the restart trains from step 0 to the end."""
    name, out = "capsdist-early", tmp_path / "probe"
    probe = probe_config(tmp_path / "p.yaml", out, pause_at_step=0, pause_in="start")
    job = submit(slurm_cluster, tmp_path, name, probe, "--data.num_workers=2", "--run_name=early",
                 "--trainer.max_steps=3")  # fmt: skip
    log = _requeued_to_completion(slurm_cluster, tmp_path, name, job, out, "scancel", "--signal=USR1", str(job))
    assert "nothing new to save (no step taken)" in log and log.count("a fresh run") == 2
    assert {r["global_step"] for r in records(out, 1)} == {3}
    _one_wandb_run(tmp_path / "runs" / "early", last=3)
    assert_nothing_left(slurm_cluster, job, tmp_path)


@pytest.mark.parametrize("strategy", ["capsule_parallel", "fsdp"])
def test_sharded_strategies_finish_with_wandb(slurm_cluster: SlurmCluster, tmp_path: Path, strategy: str) -> None:
    """Capsule parallelism and FSDP on 2 tasks with W&B on end COMPLETED: the end-of-fit figures are drawn by a
    plain CapsNet holding the gathered weights (no collective on rank 0 alone, no sharded flat weights)."""
    overlay = REPO / "configs" / "strategy" / f"{strategy}.yaml"
    job = submit(slurm_cluster, tmp_path, strategy, probe_config(tmp_path / "p.yaml", tmp_path / "probe"),
                 "--config", str(overlay), f"--run_name={strategy}")  # fmt: skip
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    print("\n".join(["sacct:", *sacct(slurm_cluster, job)]))
    assert state == "COMPLETED", job_log(tmp_path, strategy, job)[-4000:]
    root = tmp_path / "runs" / strategy
    assert sorted(p.name for p in (root / "figures").glob("*.png"))
    rows = _one_wandb_run(root)
    assert any(key.startswith("figures/") for row in rows for key in row)
    assert_nothing_left(slurm_cluster, job, tmp_path)
