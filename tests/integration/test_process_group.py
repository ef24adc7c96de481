"""capsdist.parallel.process_group: ending the group joins gloo's threads, so no collective's tensor is dropped by them
while the interpreter finalizes (that aborted 1 exit in 6 of a 2-rank test)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capsdist.parallel import process_group


def _gloo_threads() -> int:
    return sum("gloo" in (task / "comm").read_text() for task in Path("/proc/self/task").iterdir())


def _rank(rank: int, tmp: str, via_capsdist: bool) -> None:
    store = dict(init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    process_group.start("gloo", **store) if via_capsdist else dist.init_process_group("gloo", **store)
    torch.optim.Adam(torch.nn.Linear(2, 2).parameters())  # the first optimizer imports torch._dynamo
    x = torch.ones(3)
    dist.all_reduce(x)
    before = _gloo_threads()
    process_group.end()
    Path(f"{tmp}/threads{rank}").write_text(f"{before} {_gloo_threads()}")


def threads_left(tmp_path: Path, via_capsdist: bool) -> list[list[int]]:
    tmp = tmp_path / str(via_capsdist)
    tmp.mkdir()
    mp.spawn(_rank, args=(str(tmp), via_capsdist), nprocs=2, join=True)
    return [[int(n) for n in (tmp / f"threads{r}").read_text().split()] for r in range(2)]


def test_end_joins_gloo_threads(tmp_path: Path) -> None:
    assert threads_left(tmp_path, True) == [[3, 0], [3, 0]]  # gloo's transport loop and its 2 work threads
    # the group started without capsdist.parallel.process_group outlives destroy_process_group: the threads stay
    assert threads_left(tmp_path, False) == [[3, 3], [3, 3]]
