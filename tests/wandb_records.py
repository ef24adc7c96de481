"""Read back what a run logged to W&B offline: the records of a ``run-<id>.wandb`` file, for tests.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); a block
tail too short for a chunk header is zero padding. Joined chunks are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the block's zero-padded tail
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item: Any) -> str:
    """An item's key, nested keys joined with '/'."""
    return item.key or "/".join(item.nested_key)


def read_run(path: Path, finished: bool = False) -> dict[str, Any]:
    """The parts tests look at: run (id, name, project, entity, group), config (nested dicts), history (one dict of
    logged keys per row), summary (last update's values) and metric (name -> MetricRecord: define_metric).
    ``finished``: wait for the run's exit record first (a run finished in this process: its service may still be
    writing the file; the file can even hold only its header yet)."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "metric": {}}
    for record in finished_records(Path(path).parent) if finished else records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run["run"] = {"id": r.run_id, "name": r.display_name, "project": r.project, "entity": r.entity}
            run["run"]["group"] = r.run_group
        elif kind == "config":
            run["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "metric":
            run["metric"][record.metric.name] = record.metric
    return run


def finished_records(run_dir: Path, timeout: float = 60.0) -> list[Any]:
    """Every Record of the offline run in ``run_dir`` (an ``offline-run-*`` folder), once its exit record is there:
    W&B's service may still be writing the file after ``finish()`` returned."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(next(Path(run_dir).glob("run-*.wandb"))))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row (logged key -> JSON-decoded value; a media or table value's fields as 'key/field') of the
    finished offline run in ``run_dir``."""
    return [
        {_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in finished_records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_files(folder: Path) -> list[Path]:
    """Every offline run file under `folder`, oldest run first."""
    return sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
