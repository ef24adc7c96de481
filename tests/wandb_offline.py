"""Read an offline W&B run back in tests: the history rows of its ``run-*.wandb`` file.

The file is a 7-byte header then LevelDB-log framing (32 KiB blocks; each chunk has a 7-byte header: crc32,
little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) of ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row (logged key -> JSON-decoded value) of the offline run in ``run_dir``."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    pos, payload, rows = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's zero-filled tail
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + HEADER])
        payload += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a whole record is assembled
            record = Record.FromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows
