"""The default process group's start and end, where capsdist owns them (the training CLI's end, spawned workers).

An exit with the group alive can abort the process (``terminate called without an active exception``, seen in CI
on 1 run in 6 of a 2-rank test): gloo's worker threads drop their last collective's tensors after the collective
has returned, and when a tensor still has its Python object, dropping it needs the GIL. If the interpreter is
already finalizing, that thread is torn down by pthread_exit inside a C++ destructor, which calls std::terminate.
Destroying the group first joins those threads while the interpreter is alive (torch releases the GIL for it).
It only works if nothing else holds the group: ``torch.distributed.nn.functional`` takes ``group.WORLD`` as a
default argument when imported, and torch._dynamo (which the first optimizer imports) imports it; imported
after the group exists, it keeps the group, and its threads, alive past ``destroy_process_group``. So
``start`` imports it first.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def start(backend: str, **kwargs: Any) -> None:
    """``dist.init_process_group(backend, **kwargs)``, such that :func:`end` can really destroy the group."""
    import torch.distributed.nn.functional  # noqa: F401  (before the group exists: module docstring)

    dist.init_process_group(backend, **kwargs)


def end() -> None:
    """On every rank after its last collective: wait for the other ranks, then destroy the default group (and
    every other), joining gloo's threads. A no-op without a group. Not for error paths: the barrier would wait for
    ranks that may never come."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
