"""capsdist: distributed training of capsule networks (Sabour, Frosst & Hinton 2017)."""

from __future__ import annotations

import sys

from capsdist.core.errors import CapsdistError

__version__ = "0.1.0"
__all__ = ["CapsdistError", "__version__"]


def _is_training_cli() -> bool:
    """Whether this process is `python -m capsdist.train` or the `capsdist-train` script."""
    argv = getattr(sys, "orig_argv", [])
    as_module = any(a == "-m" and b == "capsdist.train" for a, b in zip(argv, argv[1:], strict=False))
    return as_module or sys.argv[0].rsplit("/", 1)[-1].startswith("capsdist-train")


if _is_training_cli():  # before the seconds of torch/Lightning imports: a stop then is recorded, not fatal
    from capsdist.cluster import signals

    signals.install(for_process=True)
