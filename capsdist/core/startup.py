"""A program's start: its seconds of imports (torch, Lightning, W&B) run with the cyclic garbage collector paused,
and what they made is then frozen out of every later collection.

Those imports leave ~375,000 objects that live as long as the process. With the collector on, the imports set off
collections that walk them again and again: ~1 CPU-s of a 5 s start (`python -m capsdist.train`, 2-core Xeon),
paid by every run, rank and restart. ``gc.freeze()`` moves them to the permanent generation, so the run's own full
collections skip them too. The ~10,000 objects the imports left as cyclic garbage (~4 MB) stay: collecting them
would cost a third of the gain. Only programs do this: importing capsdist as a library leaves the collector alone.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block (a program's imports) without cyclic collections, then freeze every object alive."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def program(module: str) -> Callable[[list[str] | None], None]:
    """The ``main(argv)`` of an entry point whose program is ``module.main``, imported when it is called, with the
    collector paused (``python -m`` and the console script run the same function)."""

    def main(argv: list[str] | None = None) -> None:
        with collector_paused():
            run = importlib.import_module(module).main
        run(argv)

    main.__doc__ = f"Run {module}.main, its imports made with the collector paused (capsdist.core.startup)."
    return main
