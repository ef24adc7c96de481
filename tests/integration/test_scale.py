"""Scale-out, for real: sbatch of the repo's templates on a live SLURM cluster (DDP over gloo, preemption and
requeue), two torchrun "nodes" on loopback reading shards, and FSDP on two CPU processes.

Every run is `python -m capsdist.train fit` with a tiny model on CPU; tests/scale_probe.py records, per rank,
the samples trained on and a parameter digest, so the assertions are about what really happened on each rank.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep import multimnist
from tests.conftest import REPO, TINY_MODEL
from tests.scale_probe import probe_config, records, train_env, write_yaml
from tests.slurm_cluster import SlurmCluster, free_port


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
    # B:USR1: the batch shell gets the warning and forwards it (README "SLURM", slurm/launch.sh)
    assert directives["signal"] == "B:USR1@90" and directives["open-mode"] == "append"
    assert "#SBATCH --requeue" in path.read_text()
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert directives["job-name"] not in ("bash", "interactive")  # Lightning would ignore SLURM


def _torchrun_node(rank: int, port: int, config: Path, probe: Path, log: Path) -> subprocess.Popen:
    """One torchrun "node" (one process) of a 2-node job rendezvousing on 127.0.0.1."""
    # fmt: off
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=capsdist-test", "-m",
           "capsdist.train", "fit", "--config", str(config), "--config", str(probe), "--wandb_mode=disabled"]
    # fmt: on
    return subprocess.Popen(cmd, env=train_env(), cwd=config.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_torchrun_nodes_read_disjoint_shards(tmp_path: Path) -> None:
    """2 nodes x 1 process on loopback, 3 shards (not divisible by 2): equal batch counts, disjoint samples."""
    for split in ("train", "val"):
        plan = {"split": "test", "per_digit": None, "num_samples": 36, "shard_size": 12, "seed": 3}
        multimnist.generate(REPO / "data" / "mnist", tmp_path / split, plan, workers=1)
    config = write_yaml(tmp_path / "shards.yaml", {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 2, "precision": 32, "max_steps": 6,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run")},
        "model": TINY_MODEL,
        "data": {"source": "multimnist_shards", "train_shards": str(tmp_path / "train"),
                 "val_shards": str(tmp_path / "val"), "batch_size": 4, "num_workers": 0,
                 "train_batches_per_epoch": 3, "val_batches": 3},
    })  # fmt: skip
    probe = probe_config(tmp_path / "probe.yaml", tmp_path / "probe")
    port = free_port()
    nodes = [_torchrun_node(r, port, config, probe, tmp_path / f"node{r}.log") for r in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=240) == 0, (tmp_path / f"node{rank}.log").read_text()[-4000:]
    ranks = records(tmp_path / "probe")
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
    proc = subprocess.run(cmd, env=train_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from capsdist.training.cli import CapsNetModule

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    module = CapsNetModule.load_from_checkpoint(last, map_location="cpu")  # full tensors, strict, one process
    n_primary = 4 * 10 * 10  # primary_channels x 10 x 10 grid on 36 px MultiMNIST
    assert tuple(module.model.caps[0].weight.shape) == (n_primary, 8, 8, 8)
    assert tuple(module.model.caps[1].weight.shape) == (8, 10, 16, 8)
    lengths = module(torch.rand(2, 1, 36, 36))
    assert lengths.shape == (2, 10) and torch.isfinite(lengths).all()
