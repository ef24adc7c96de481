"""Capsule parallelism with the PrimaryCaps convolution split and sharded (DCP) checkpoints, real gloo processes:
the split model equals the unsplit one in values and every gradient, and a checkpoint written by 2 ranks loads on
1 and on 4 ranks (and converts to one file) with the weights and Adam moments of the unsplit run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from capsdist.checkpoint import sharded
from capsdist.model import CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.parallel import sharded_state
from capsdist.parallel.capsule_parallel import (
    full_optimizer_state,
    full_state_dict,
    row_splits,
    shard_capsnet,
)
from tests.conftest import subprocess_env
from tests.integration.test_capsule_parallel import batches, spawn

pytestmark = pytest.mark.usefixtures("one_thread")
# two routed layers (the second split with a full input), 4 maps of 10x10 (uneven on 3 ranks), chunked routing
NET = dict(conv_channels=8, primary_channels=4, primary_dim=4, caps_layers=[(6, 5), (10, 6)], decoder_hidden=(16,),
           routing_chunk_size=70)  # fmt: skip


def make_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(**NET)


def grads(model: CapsNet) -> dict[str, torch.Tensor]:
    """Values and parameter gradients of one forward/backward on a fixed batch."""
    x, labels = batches(1)[0]
    out = model(x, labels)
    (out.lengths.pow(2).sum() + out.recon.sum()).backward()
    return {"caps": out.caps.detach(), **{n: p.grad for n, p in model.named_parameters()}}


def split_worker(rank: int, tmp: str) -> None:
    model = shard_capsnet(make_model())
    got = grads(model)
    for key, split in row_splits(model).items():
        got[key] = split.gather(got[key])  # the whole gradient from every rank's rows
    torch.save({**got, "u_grad_bytes": model.caps[0].comm.bytes}, f"{tmp}/split{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_split_convolution_equals_unsplit_in_values_and_gradients(tmp_path: Path, world: int) -> None:
    spawn(split_worker, world, tmp_path)
    want = grads(make_model())
    for rank in range(world):
        got = torch.load(tmp_path / f"split{rank}.pt")
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
        # first layer: s [4, 6, 5] of 3 routing rounds forward and 2 backward, plus Conv1's gradient
        # (8x1x9x9 + 8); no u gradient [4, 400, 4] crosses ranks
        assert got["u_grad_bytes"] == (5 * 4 * 6 * 5 + (8 * 81 + 8)) * 4


def save_worker(rank: int, tmp: str, steps: int) -> None:
    model = shard_capsnet(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_with(model, optimizer, steps)
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": steps}
    sharded.save(checkpoint, f"{tmp}/last.ckpt", sharded_state.split_keys(model, [optimizer]))


def load_worker(rank: int, tmp: str) -> None:
    model = shard_capsnet(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sharded_state.load_module(f"{tmp}/last.ckpt", model)
    sharded_state.load_optimizers(f"{tmp}/last.ckpt", model, [optimizer])
    state = {"weights": full_state_dict(model), "adam": full_optimizer_state(model, optimizer)}
    if rank == 0:
        torch.save(state, f"{tmp}/loaded{dist.get_world_size()}.pt")


def train_with(model: CapsNet, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for x, labels in batches(steps):
        optimizer.zero_grad()
        capsnet_loss(model(x, labels), labels, x.unsqueeze(1))[0].backward()
        optimizer.step()


def assert_unsplit(weights: dict, adam: dict, model: CapsNet, optimizer: torch.optim.Optimizer) -> None:
    for name, value in model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
    for index, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(adam["state"][index][key], value, rtol=1e-4, atol=1e-6, msg=f"{index}.{key}")


def test_sharded_checkpoint_of_2_ranks_loads_on_1_and_4_ranks_and_converts(tmp_path: Path) -> None:
    steps = 2
    spawn(save_worker, 2, tmp_path, steps)
    saved = tmp_path / "last.ckpt"
    assert sorted(p.name for p in saved.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not list(tmp_path.glob(".last.ckpt*"))  # the temp directory was renamed into place
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_with(model, optimizer, steps)
    for world in (1, 4):
        spawn(load_worker, world, tmp_path)
        loaded = torch.load(tmp_path / f"loaded{world}.pt")
        assert_unsplit(loaded["weights"], loaded["adam"], model, optimizer)
    out = tmp_path / "one.ckpt"
    proc = subprocess.run([sys.executable, "-m", "capsdist.checkpoint", "convert", str(saved), str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = torch.load(out, weights_only=True)
    assert one["global_step"] == steps
    assert_unsplit(one["state_dict"], one["optimizer_states"][0], model, optimizer)


def test_superseded_sharded_hpc_checkpoints_are_removed(tmp_path: Path) -> None:
    """A requeue's hpc_ckpt_N under capsule parallelism is a directory: once superseded it is removed like a file
    (after_fit and the next stop failed with IsADirectoryError: a capsule-parallel job stopped under SLURM ended
    FAILED 1:0 after training its last step in the resumed run)."""
    from capsdist.training.resume import remove_stale_hpc

    weights = {"state_dict": {"w": torch.ones(4, 2)}, "global_step": 9}
    sharded.save(weights, tmp_path / "hpc_ckpt_1.ckpt", {})
    torch.save({"global_step": 10}, tmp_path / "hpc_ckpt_2.ckpt")
    remove_stale_hpc(tmp_path, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_2.ckpt"]
    remove_stale_hpc(tmp_path, 11, keep=tmp_path / "hpc_ckpt_2.ckpt")
    assert (tmp_path / "hpc_ckpt_2.ckpt").is_file()
