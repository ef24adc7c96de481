"""Scale-out, for real: sbatch of the repo's templates on a live SLURM cluster (DDP over gloo, preemption and
requeue), two torchrun "nodes" on loopback reading shards, and FSDP on two CPU processes.

Every run is `python -m capsdist.train fit` with a tiny model on CPU; tests/scale_probe.py records, per rank,
the samples trained on and a parameter digest, so the assertions are about what really happened on each rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_prep import multimnist
from tests.conftest import REPO, TINY_MODEL
from tests.slurm_cluster import SlurmCluster, free_port

BATCH, STEPS_PER_EPOCH, MAX_STEPS, PAUSE_AT = 4, 6, 12, 9  # preempted mid-way through the second epoch
# 2 ranks x BATCH samples x STEPS_PER_EPOCH batches of MNIST per epoch; 2 validation batches per rank.
SLURM_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "precision": 32, "max_steps": MAX_STEPS, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1, "enable_progress_bar": False},
    "model": TINY_MODEL,
    "data": {"source": "mnist", "batch_size": BATCH, "num_workers": 0, "train_samples": 2 * BATCH * STEPS_PER_EPOCH,
             "val_samples": 4 * BATCH},
}  # fmt: skip


def _env() -> dict[str, str]:
    """Environment for training subprocesses: the repo importable, one thread per process on the 2-core box."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}


def _write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _probe_config(path: Path, out: Path, **probe: object) -> Path:
    """A config snippet adding tests.scale_probe.RankProbe to the trainer's callbacks."""
    callback = {"class_path": "tests.scale_probe.RankProbe", "init_args": {"out_dir": str(out), **probe}}
    return _write_yaml(path, {"trainer": {"callbacks": [callback]}})


def _records(out: Path, run: int = 0) -> list[dict]:
    """The probe records of one run, by rank."""
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"rank*-run{run}.json"))]


def _submit(cluster: SlurmCluster, tmp: Path, name: str, out: Path, **probe: object) -> int:
    """sbatch the repo's single-node template with 2 tasks (CPU: no GPUs requested) and the tiny config."""
    config = _write_yaml(tmp / "tiny.yaml", SLURM_CONFIG)
    extra = _probe_config(tmp / f"{name}-probe.yaml", out, **probe)
    return cluster.sbatch(
        REPO / "slurm" / "single_node.sbatch", str(config), "--config", str(extra), "--wandb_mode=offline",
        options=[f"--job-name={name}", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                 f"--chdir={tmp}"],
        env={**_env(), "CAPSDIST_HOME": str(REPO)},
    )  # fmt: skip


def _job_log(tmp: Path, name: str, job: int) -> str:
    return (tmp / f"{name}-{job}.out").read_text(errors="replace")[-4000:]


@pytest.mark.slurm
@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_templates_accepted_by_slurmctld(slurm_cluster: SlurmCluster, template: str) -> None:
    """Both templates parse and schedule (``sbatch --test-only``, sized down to this one CPU node) and carry
    the directives requeue depends on; one task per GPU."""
    path = REPO / "slurm" / template
    options = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
    proc = subprocess.run(["sbatch", "--test-only", *options, str(path), "configs/quickstart.yaml"],
                          env=slurm_cluster.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    directives = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in path.read_text().splitlines()
                      if line.startswith("#SBATCH --") and "=" in line)  # fmt: skip
    assert directives["signal"] == "USR1@90" and directives["open-mode"] == "append"
    assert "#SBATCH --requeue" in path.read_text()
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert directives["job-name"] not in ("bash", "interactive")  # Lightning would ignore SLURM


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-task sbatch job of the template trained to the end: its job id, sacct lines and probe records."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "probe"
    job = _submit(slurm_cluster, tmp, "capsdist-ddp", out)
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    assert state == "COMPLETED", _job_log(tmp, "capsdist-ddp", job)
    return {"job": job, "tmp": tmp, "sacct": slurm_cluster.sacct(job), "records": _records(out)}


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_ddp_two_tasks_completes_with_identical_params(uninterrupted: dict) -> None:
    """The template's 2-task job ends COMPLETED, both ranks at MAX_STEPS with the same parameters."""
    print("\n".join(["sacct:", *uninterrupted["sacct"]]))
    job_line, *steps = uninterrupted["sacct"]
    assert job_line.split("|")[2] == "COMPLETED"
    assert any(line.split("|")[1] == "python" and line.split("|")[6] == "2" for line in steps)  # srun: 2 tasks
    ranks = uninterrupted["records"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["global_step"] for r in ranks} == {MAX_STEPS}
    assert ranks[0]["params"] == ranks[1]["params"]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == MAX_STEPS * BATCH
    root = uninterrupted["tmp"] / "runs" / "capsdist-ddp"  # per job name, as the template sets it
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1  # one W&B run: rank 0 logs


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_without_losing_samples(
    slurm_cluster: SlurmCluster, uninterrupted: dict, tmp_path: Path
) -> None:
    """USR1 mid-epoch: hpc checkpoint at that step, `scontrol requeue`, the second run resumes from it and ends
    exactly as the uninterrupted job did (same samples in the same order, same weights)."""
    name, out = "capsdist-preempt", tmp_path / "probe"
    job = _submit(slurm_cluster, tmp_path, name, out, pause_at_step=PAUSE_AT)
    deadline = time.monotonic() + 180
    while len(list(out.glob("paused-rank*"))) < 2:
        assert time.monotonic() < deadline and slurm_cluster.job_state(job) in ("PENDING", "RUNNING"), _job_log(
            tmp_path, name, job
        )
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--signal=USR1", str(job))  # what --signal=USR1@90 sends the tasks
    time.sleep(1)  # the held ranks handle the signal, then go on to the end of step PAUSE_AT
    (out / "resume").touch()
    state = slurm_cluster.wait_for_state(job, [], timeout=240)
    lines = slurm_cluster.sacct(job)
    print("\n".join(["sacct:", *lines]))
    assert state == "COMPLETED", _job_log(tmp_path, name, job)
    assert [line.split("|")[2] for line in lines if "." not in line.split("|")[0]] == ["REQUEUED", "COMPLETED"]
    assert (tmp_path / "runs" / name / "hpc_ckpt_1.ckpt").is_file()
    first, second, reference = _records(out, 0), _records(out, 1), uninterrupted["records"]
    assert {r["global_step"] for r in first} == {PAUSE_AT} and {r["global_step"] for r in second} == {MAX_STEPS}
    for rank in (0, 1):  # the two runs together saw exactly the uninterrupted schedule, then the same weights
        assert first[rank]["train"] + second[rank]["train"] == reference[rank]["train"]
        assert second[rank]["params"] == reference[rank]["params"]


def _torchrun_node(rank: int, port: int, config: Path, probe: Path, log: Path) -> subprocess.Popen:
    """One torchrun "node" (one process) of a 2-node job rendezvousing on 127.0.0.1."""
    # fmt: off
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=capsdist-test", "-m",
           "capsdist.train", "fit", "--config", str(config), "--config", str(probe), "--wandb_mode=disabled"]
    # fmt: on
    return subprocess.Popen(cmd, env=_env(), cwd=config.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_torchrun_nodes_read_disjoint_shards(tmp_path: Path) -> None:
    """2 nodes x 1 process on loopback, 3 shards (not divisible by 2): equal batch counts, disjoint samples."""
    for split in ("train", "val"):
        plan = {"split": "test", "per_digit": None, "num_samples": 36, "shard_size": 12, "seed": 3}
        multimnist.generate(REPO / "data" / "mnist", tmp_path / split, plan, workers=1)
    config = _write_yaml(tmp_path / "shards.yaml", {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 2, "precision": 32, "max_steps": 6,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run")},
        "model": TINY_MODEL,
        "data": {"source": "multimnist_shards", "train_shards": str(tmp_path / "train"),
                 "val_shards": str(tmp_path / "val"), "batch_size": 4, "num_workers": 0,
                 "train_batches_per_epoch": 3, "val_batches": 3},
    })  # fmt: skip
    probe = _probe_config(tmp_path / "probe.yaml", tmp_path / "probe")
    port = free_port()
    nodes = [_torchrun_node(r, port, config, probe, tmp_path / f"node{r}.log") for r in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=240) == 0, (tmp_path / f"node{rank}.log").read_text()[-4000:]
    ranks = _records(tmp_path / "probe")
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["global_step"] for r in ranks} == {6} and ranks[0]["params"] == ranks[1]["params"]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 6 * 4  # same batches per rank, 3 shards
    assert ranks[0]["train"] != ranks[1]["train"]  # resampled training shards: each rank its own stream
    assert len(ranks[0]["val"]) == len(ranks[1]["val"]) == 2 * 3 * 4  # 2 epochs x 3 batches x 4 samples
    assert len(set(ranks[0]["val"])) == len(set(ranks[1]["val"])) == 3 * 4  # the same 12 samples each epoch
    assert not set(ranks[0]["val"]) & set(ranks[1]["val"])  # validation shards split by rank: disjoint


@pytest.mark.slow
def test_fsdp_two_cpu_processes_large_config_reloads_in_one_process(tmp_path: Path) -> None:
    """configs/large.yaml under CapsFSDPStrategy (gloo, shrunk), then its full checkpoint in a plain module."""
    cmd = [sys.executable, "-m", "capsdist.train", "fit", "--config", str(REPO / "configs" / "large.yaml"),
           "--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"), "--wandb_mode=disabled",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32", "--trainer.max_steps=3",
           "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={tmp_path / 'run'}", "--model.conv_channels=16",
           "--model.primary_channels=4", "--model.caps_layers=[[8, 8], [10, 16]]", "--model.decoder_hidden=[32, 64]",
           "--model.log_images_every_n_steps=0", "--data.batch_size=4", "--data.num_workers=0",
           "--data.train_samples=24", "--data.val_samples=8"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from capsdist.train import CapsNetModule

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    module = CapsNetModule.load_from_checkpoint(last, map_location="cpu")  # full tensors, strict, one process
    n_primary = 4 * 10 * 10  # primary_channels x 10 x 10 grid on 36 px MultiMNIST
    assert tuple(module.model.caps[0].weight.shape) == (n_primary, 8, 8, 8)
    assert tuple(module.model.caps[1].weight.shape) == (8, 10, 16, 8)
    lengths = module(torch.rand(2, 1, 36, 36))
    assert lengths.shape == (2, 10) and torch.isfinite(lengths).all()
