"""Read an offline W&B run back in tests: the records of its ``run-*.wandb`` file, and its history rows.

The file is a 7-byte header then LevelDB-log framing (32 KiB blocks; each chunk has a 7-byte header: crc32,
little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) of ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7


def records(run_dir: Path, timeout: float = 60.0) -> list[Any]:
    """Every ``wandb_internal_pb2.Record`` of the offline run in ``run_dir``, in order, once the run's exit record
    is there (W&B's service may still be writing the file after ``finish()`` returned)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(_parse(next(run_dir.glob("run-*.wandb")).read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _parse(data: bytes) -> Iterator[Any]:
    """The complete records of a .wandb file's bytes."""
    from wandb.proto.wandb_internal_pb2 import Record

    pos, payload = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's zero-filled tail
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + HEADER])
        payload += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a whole record is assembled
            yield Record.FromString(payload)
            payload = b""


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row (logged key -> JSON-decoded value) of the offline run in ``run_dir``."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]
