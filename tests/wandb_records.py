"""Read back an offline W&B run (`run-*.wandb`): the records W&B would upload, for tests of what was logged.

The file is a LevelDB-style log: a 7-byte W&B header, then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); chunks join into protobuf
`wandb_internal_pb2.Record`s.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32 * 1024, 7


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a .wandb file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        parts.append(data[pos + HEADER : pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
        elif kind == 0:
            break


def history(path: Path) -> list[dict[str, object]]:
    """The logged history rows as {key: JSON-decoded value}; a media or table value's fields arrive as nested
    keys and are gathered back into one dict under the logged key."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in record.history.item:
            value = json.loads(item.value_json)
            if item.key or len(item.nested_key) == 1:
                row[item.key or item.nested_key[0]] = value
            else:
                *outer, field = item.nested_key
                row.setdefault("/".join(outer), {})[field] = value  # type: ignore[index]
        rows.append(row)
    return rows


def run_file(root: Path) -> Path:
    """The single offline run file under a run folder's wandb/ directory."""
    (found,) = root.glob("wandb/offline-run-*/run-*.wandb")
    return found
