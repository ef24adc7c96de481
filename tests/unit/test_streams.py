"""capsdist.data streams and loader: batch format, geometry, seeds, exact mid-epoch resume and its checks."""

from __future__ import annotations

import importlib.machinery
import os
import signal
import time
import types
from pathlib import Path

import pytest
import torch

from capsdist import data
from capsdist.data.workers import main_imports
from tests.conftest import check_format, check_multimnist, child_pids, epoch_batches, same_batches, u8


def _contains_source(placed: torch.Tensor, digit: torch.Tensor, canvas: int) -> bool:
    """Whether ``placed`` is ``digit`` at some top-left offset of a zero canvas."""
    for r in range(canvas - 27):
        for c in range(canvas - 27):
            ref = torch.zeros(canvas, canvas, dtype=torch.int16)
            ref[r : r + 28, c : c + 28] = digit
            if torch.equal(placed, ref):
                return True
    return False


def test_mnist_stream_shift_and_format(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Training MNIST: contract batches, recon = input, each image its digit shifted by at most 2 px."""
    images, labels = test_split
    stream = data.MnistStream(images, labels, 32, train=True, seed=5)
    assert len(stream) == 600 // 32
    batch = stream.make_batch(0, 0)
    check_format(batch, 32, 1, 28)
    assert torch.equal(batch["recon"][:, 0], batch["image"])
    order = stream._rank_order(0)[:32]
    assert torch.equal(batch["labels"][:, 0], labels[order])
    shifted = 0
    for i in range(8):
        big = torch.nn.functional.pad(images[order[i]].to(torch.int16), (2, 2, 2, 2))
        crops = {
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(big[dy : dy + 28, dx : dx + 28], u8(batch["image"][i, 0]))
        }
        assert crops, f"sample {i} is not a shift of its digit by <= 2 px"
        shifted += (2, 2) not in crops
    assert shifted > 0
    val = data.MnistStream(images, labels, 32, train=False)
    assert len(val) == 19 and torch.equal(u8(val.make_batch(0, 0)["image"][:, 0]), images[:32].to(torch.int16))


def test_onthefly_geometry(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """On-the-fly MultiMNIST: same recipe as the shards, exact against the source digits."""
    images, labels = test_split
    batch = data.OnTheFlyMultiMnist(images, labels, 16, 4, seed=2).make_batch(0, 3)
    check_format(batch, 16, 2, 36)
    check_multimnist(batch)
    for i in range(4):
        for k in range(2):
            label = int(batch["labels"][i, k])
            candidates = (labels == label).nonzero()[:, 0]
            placed = u8(batch["recon"][i, k, 0])
            assert any(
                _contains_source(placed, images[j].to(torch.int16), 36)
                for j in candidates[:80].tolist()
                if images[j].sum() == placed.sum()
            )


def test_device_generator_matches_cpu_stream(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Draw-only batches composed by DeviceMultiMnist equal the CPU stream; its own batches are well-formed."""
    images, labels = test_split
    cpu = data.OnTheFlyMultiMnist(images, labels, 64, 2, seed=9).make_batch(1, 1)
    draws = data.OnTheFlyMultiMnist(images, labels, 64, 2, seed=9, draw_only=True).make_batch(1, 1)
    gen = data.DeviceMultiMnist(images, labels, "cpu", seed=9)
    assert all(torch.equal(cpu[k], v) for k, v in gen.compose(draws).items())
    batch = gen.batch(256, epoch=0, step=0)
    check_format(batch, 256, 2, 36)
    check_multimnist(batch)
    assert not torch.equal(batch["labels"], gen.batch(256, epoch=0, step=1)["labels"])


@pytest.mark.parametrize("kind", ["mnist", "onthefly"])
def test_resume_mid_epoch_equals_tail(kind: str, test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A resumed loader yields exactly the rest of the epoch, with 0 or 2 workers (and the same stream for both)."""
    images, labels = test_split

    def stream() -> data.BatchStream:
        if kind == "mnist":
            return data.MnistStream(images, labels, 50, train=True, seed=4)
        return data.OnTheFlyMultiMnist(images, labels, 20, 12, seed=4)

    full = epoch_batches(data.ResumableLoader(stream()), 2)
    assert len(full) == 12
    for workers in (0, 2):
        loader = data.ResumableLoader(stream(), num_workers=workers)
        assert same_batches(epoch_batches(loader, 2), full)
        it = iter(loader)
        for _ in range(5):
            next(it)
        state = loader.state_dict()
        assert state == {"version": 1, "epoch": 2, "batches": 5, "world_size": 1, "num_workers": workers}
        resumed = data.ResumableLoader(stream(), num_workers=workers)
        assert same_batches(epoch_batches(resumed, 2, state), full[5:])
        assert resumed.state_dict() | {"num_workers": 0} == {**state, "batches": 12, "num_workers": 0}
        assert same_batches(epoch_batches(resumed, 2), full)  # the resume state is used once
    stale = data.ResumableLoader(stream())
    fresh = epoch_batches(data.ResumableLoader(stream()), 3)
    assert same_batches(epoch_batches(stale, 3, {"epoch": 2, "batches": 5}), fresh)  # unversioned: unchecked


def fork_servers(wait_s: float = 10.0) -> list[int]:
    """This process's loader fork servers, once one shows its command line: right after the fork, before its exec,
    a child still shows this process's (seen under load: no server found)."""
    deadline = time.monotonic() + wait_s
    while True:
        servers = [c for c in child_pids(os.getpid()) if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
        if servers or time.monotonic() > deadline:
            return servers
        time.sleep(0.05)


def test_workers_start_from_a_server_ignoring_job_signals(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Workers are not forked from this (threaded) process but from one fork server (capsdist.data.workers); the
    SIGTERM and SIGUSR1 slurmstepd sends every process of a step leave the server and workers serving the epoch."""
    images, labels = test_split
    full = epoch_batches(data.ResumableLoader(data.MnistStream(images, labels, 50, train=True)), 0)
    loader = data.ResumableLoader(data.MnistStream(images, labels, 50, train=True), num_workers=2)
    (server,) = fork_servers()
    earlier = set(child_pids(server))  # workers of earlier loaders in this process may not have ended yet
    batches = iter(loader)
    first = [next(batches)]
    workers = set(child_pids(server)) - earlier
    assert len(workers) == 2 and not workers & set(child_pids(os.getpid()))
    for pid in (server, *workers):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            os.kill(pid, sig)
    time.sleep(0.5)
    assert same_batches(first + list(batches), full)


def test_streams_differ_by_epoch_and_rank(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Seeds are per (epoch, rank, batch): no two ranks, epochs or batches repeat a stream."""
    images, labels = test_split
    r0 = data.OnTheFlyMultiMnist(images, labels, 32, 2, seed=0, rank=0, world_size=2)
    r1 = data.OnTheFlyMultiMnist(images, labels, 32, 2, seed=0, rank=1, world_size=2)
    outs = [s.make_batch(e, j)["labels"] for s in (r0, r1) for e in (0, 1) for j in (0, 1)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    m0 = data.MnistStream(images, labels, 32, train=True, rank=0, world_size=2)
    m1 = data.MnistStream(images, labels, 32, train=True, rank=1, world_size=2)
    a, b = m0._rank_order(0), m1._rank_order(0)
    assert len(a) == len(b) == 300 and not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(a, m0._rank_order(1))


def test_resume_refused_when_not_exact(test_split: tuple[torch.Tensor, torch.Tensor], shards: Path) -> None:
    """Shard streams resume only with the same num_workers; every stream only at the same world size."""
    urls = data.expand_shards(str(shards))

    def shard_loader(workers: int, world: int = 1) -> data.ResumableLoader:
        stream = data.ShardStream(urls, 8, True, world_size=world, shuffle_buffer=20, num_batches=4)
        return data.ResumableLoader(stream, num_workers=workers)

    state = shard_loader(2).state_dict()
    assert state == {"version": 1, "epoch": 0, "batches": 0, "world_size": 1, "num_workers": 2}
    shard_loader(2).load_state_dict(state)  # the same placement: fine
    with pytest.raises(data.DataError, match=r"(?s)num_workers=2 .*=0.*Fix: resume with --data.num_workers 2"):
        shard_loader(0).load_state_dict(state)
    with pytest.raises(data.DataError, match=r"(?s)world size 1 and this run has 2.*Fix: resume with 1 processes"):
        shard_loader(2, world=2).load_state_dict(state)
    with pytest.raises(data.DataError, match="version 7"):
        shard_loader(2).load_state_dict({**state, "version": 7})

    images, labels = test_split
    mnist_state = {**state, "num_workers": 0, "batches": 3}
    loader = data.ResumableLoader(data.MnistStream(images, labels, 50, train=True), num_workers=2)
    loader.load_state_dict(mnist_state)  # in-memory streams are exact for any worker count
    with pytest.raises(data.DataError, match="world size"):
        stream = data.MnistStream(images, labels, 50, train=True, rank=0, world_size=2)
        data.ResumableLoader(stream).load_state_dict(mnist_state)



def test_fixed_test_overlays_do_not_depend_on_batch_size_or_ranks(
    test_split: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """The fixed MultiMNIST test stream is exactly ``samples`` overlays, the same ones (in order) for any batch
    size, split across ranks without overlap or loss, and a shorter stream is the start of a longer one."""
    images, labels = test_split

    def stream(batch_size: int, samples: int = 1100, rank: int = 0, world: int = 1) -> data.FixedMultiMnist:
        return data.FixedMultiMnist(images, labels, batch_size, samples, seed=3, rank=rank, world_size=world)

    def overlays(fixed: data.FixedMultiMnist) -> dict[str, torch.Tensor]:
        batches = epoch_batches(data.ResumableLoader(fixed), 0)
        assert fixed.samples() == sum(len(b["labels"]) for b in batches)
        return {k: torch.cat([b[k] for b in batches]) for k in ("image", "labels", "recon")}

    whole = overlays(stream(64))
    assert len(whole["labels"]) == 1100  # 17 full batches and one of 12; two draw blocks
    check_multimnist(whole)
    for other in (overlays(stream(100)), overlays(stream(7, samples=150))):
        assert all(torch.equal(other[k], whole[k][: len(other[k])]) for k in whole)
    draws = stream(64)
    for r in range(3):
        part = stream(64, rank=r, world=3)
        assert torch.equal(part.indices, draws.indices[r::3]) and torch.equal(part.offsets, draws.offsets[r::3])
    assert torch.equal(stream(64, rank=2, world=3).make_batch(5, 1)["image"], whole["image"][2::3][64:128])
    assert len(data.FixedMultiMnist(images, labels, 64, 1100, num_batches=2)) == 2  # val_batches caps a rank
    assert not torch.equal(data.FixedMultiMnist(images, labels, 64, 1100, seed=4).indices, draws.indices)


def test_the_fork_server_preloads_what_a_worker_runs_again() -> None:
    """capsdist's own programs preload nothing of Lightning (a worker runs only their thin shim again); a user's
    module is preloaded by name and a user's script with the capsdist modules it imported."""
    def program(name: str | None = None, **names: object) -> types.ModuleType:
        module = types.ModuleType("__main__")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None) if name else None
        module.__dict__.update(names)
        return module

    assert main_imports(program("capsdist.train"), "/x/capsdist/train.py") == []
    assert main_imports(program("mypkg.__main__"), "/x/mypkg/__main__.py") == []
    assert main_imports(program("mylab.train"), "/x/mylab/train.py") == ["mylab.train"]
    assert main_imports(program(main=data.ResumableLoader.__init__), "/venv/bin/capsdist-train") == []
    assert main_imports(program(), None) == []  # python -c
    script = main_imports(program(), "/home/me/train.py")
    assert "capsdist.data.workers" in script and all(name.split(".")[0] == "capsdist" for name in script)
