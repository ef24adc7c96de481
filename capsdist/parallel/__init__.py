"""Scale-out: Lightning strategies (FSDP, capsule parallel), capsule parallelism itself, the process group.

``capsdist.parallel.CapsuleParallelStrategy`` and ``CapsFSDPStrategy`` (the class paths configs name, also in runs
saved before the package layout) resolve to capsdist.parallel.strategies on first use, so the pure-torch capsule
parallelism (capsdist.parallel.capsule_parallel) imports without Lightning.
"""

from typing import Any

STRATEGIES = ("CapsFSDPStrategy", "CapsuleParallelStrategy", "capsnet_wrap_policy")


def __getattr__(name: str) -> Any:
    """The strategies by their short class paths."""
    if name in STRATEGIES:
        from capsdist.parallel import strategies  # Lightning: heavy, only when a strategy is asked for

        return getattr(strategies, name)
    raise AttributeError(f"module 'capsdist.parallel' has no attribute {name!r}")
