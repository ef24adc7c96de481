"""Capsule parallelism with real gloo process groups: the sharded layer and a sharded training run against one
process (values, dL/du, W-slice gradients, loss curve, final weights), and the checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from capsdist.checkpoint.rows import shard_bounds
from capsdist.model import CapsLayer, CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.parallel import process_group
from capsdist.parallel.capsule_parallel import (
    ShardedCapsLayer,
    full_state_dict,
    load_full_state_dict,
    shard_capsnet,
)

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER_CONFIGS = [  # n_in (uneven for 2 and 4 ranks), iterations, detach, chunk_size
    (13, 3, False, None),
    (13, 3, False, 2),
    (13, 2, True, 3),
    (13, 1, False, None),
]
TINY = dict(conv_channels=8, primary_channels=4, primary_dim=4, caps_layers=[(10, 6)], decoder_hidden=(16,))


def spawn(fn, world: int, tmp_path: Path, *args) -> None:
    mp.spawn(_worker, args=(fn, world, str(tmp_path), *args), nprocs=world, join=True)


def _worker(rank: int, fn, world: int, tmp: str, *args) -> None:
    torch.set_num_threads(1)
    process_group.start("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    fn(rank, tmp, *args)
    process_group.end()


def layer_case(config: tuple, chunk_override: int | None = None):
    """The single-process layer, its input and output weights for one configuration (seeded)."""
    n_in, iterations, detach, chunk = config
    torch.manual_seed(n_in + iterations)
    layer = CapsLayer(n_in, 3, 4, 5, iterations, detach, chunk)
    layer.weight.data.normal_(0, 0.5)
    return layer, torch.randn(2, n_in, 3), torch.randn(2, 4, 5)


def run_layer(layer: torch.nn.Module, u: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    x = u.clone().requires_grad_()
    v = layer(x)
    (v * weights).sum().backward()
    return [v.detach(), x.grad, layer.weight.grad]


def layer_worker(rank: int, tmp: str) -> None:
    out = []
    for config in LAYER_CONFIGS:
        layer, u, weights = layer_case(config)
        sharded = ShardedCapsLayer.from_layer(layer)
        out.append(run_layer(sharded, u, weights) + [sharded.comm.bytes])
    torch.save(out, f"{tmp}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_layer_equals_one_process(tmp_path, world):
    spawn(layer_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for k, config in enumerate(LAYER_CONFIGS):
        want = run_layer(*layer_case(config))
        n_in, iterations, detach, _ = config
        for rank in range(world):
            v, du, dw, comm = results[rank][k]
            lo, hi = shard_bounds(n_in, world, rank)
            torch.testing.assert_close(v, want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(du, want[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dw, want[2][lo:hi], rtol=1e-5, atol=1e-6)
            rounds = iterations + (0 if detach else iterations - 1)  # s^t forward, g_V^t backward
            assert comm == rounds * 2 * 4 * 5 * 4 + 2 * n_in * 3 * 4  # plus u's gradient once


def test_shard_bounds_cover_uneven_counts():
    for n, world in [(13, 4), (3, 4), (1152, 2), (7, 3)]:
        bounds = [shard_bounds(n, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.rand(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4, 1), generator=gen)) for _ in range(steps)
    ]


def train(model: CapsNet, steps: int) -> list[float]:
    """A few Adam steps on fixed batches; the loss curve."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for x, labels in batches(steps):
        opt.zero_grad()
        total, _, _ = capsnet_loss(model(x, labels), labels, x.unsqueeze(1))
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses


def make_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(routing_chunk_size=50, **TINY)


def train_worker(rank: int, tmp: str, steps: int) -> None:
    model = shard_capsnet(make_model())
    losses = train(model, steps)
    state = full_state_dict(model)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, f"{tmp}/trained.pt")
    # resume: a fresh sharded model loads the full state and routes the same outputs
    fresh = shard_capsnet(make_model())
    load_full_state_dict(fresh, state)
    x, _ = batches(1)[0]
    torch.save(fresh(x).caps.detach(), f"{tmp}/resumed{rank}.pt")


def test_two_process_training_equals_one_process(tmp_path):
    steps = 3
    spawn(train_worker, 2, tmp_path, steps)
    got = torch.load(tmp_path / "trained.pt")
    model = make_model()
    want_losses = train(model, steps)
    assert got["losses"] == pytest.approx(want_losses, rel=1e-5)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-6, msg=name)
    # the gathered checkpoint is a plain CapsNet state: loads in one process, same outputs
    plain = CapsNet(**TINY)
    plain.load_state_dict(got["state"])
    x, _ = batches(1)[0]
    with torch.no_grad():
        want = model(x).caps
        torch.testing.assert_close(plain(x).caps, want, rtol=1e-4, atol=1e-6)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"resumed{rank}.pt"), want, rtol=1e-4, atol=1e-6)
