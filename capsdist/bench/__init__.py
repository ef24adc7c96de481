"""Every capsdist benchmark behind `python -m capsdist.bench` (cli): model (models), data paths (data), timing.

The names below resolve on first use, so that `python -m capsdist.bench.memory` (and each process it spawns to
measure one size) imports only the model, not the CLI's Lightning-backed data modules: seconds per process.
"""

from importlib import import_module
from typing import Any

WHERE = {
    "WHATS": "cli",
    "all_rows": "cli",
    "main": "cli",
    "parse_args": "cli",
    "decode_rate": "data",
    "shard_benchmark": "data",
    "measure": "models",
    "saved_activation_bytes": "models",
}
__all__ = sorted(WHERE)


def __getattr__(name: str) -> Any:
    """A benchmark's public name, from its module (imported now)."""
    if name in WHERE:
        return getattr(import_module(f"capsdist.bench.{WHERE[name]}"), name)
    raise AttributeError(f"module 'capsdist.bench' has no attribute {name!r}")
