"""Every capsdist benchmark behind `python -m capsdist.bench` (cli): model (models), data paths (data), timing.

The names below resolve on first use, so that `python -m capsdist.bench.memory` (and each process it spawns to
measure one size) imports only the model, not the CLI's Lightning-backed data modules: seconds per process.
"""

from capsdist.core.lazy import lazy_exports

_EXPORTS = {
    "WHATS": ".cli",
    "all_rows": ".cli",
    "main": ".cli",
    "parse_args": ".cli",
    "decode_rate": ".data",
    "shard_benchmark": ".data",
    "measure": ".models",
    "saved_activation_bytes": ".models",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
