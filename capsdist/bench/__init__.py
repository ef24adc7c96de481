"""Every capsdist benchmark behind `python -m capsdist.bench` (cli): model (models), data paths (data), timing."""

from capsdist.bench.cli import WHATS, all_rows, main, parse_args
from capsdist.bench.data import decode_rate, shard_benchmark
from capsdist.bench.models import measure, saved_activation_bytes

__all__ = [
    "WHATS",
    "all_rows",
    "decode_rate",
    "main",
    "measure",
    "parse_args",
    "saved_activation_bytes",
    "shard_benchmark",
]
