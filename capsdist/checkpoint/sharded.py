"""Sharded checkpoints: a ``NAME.ckpt/`` directory that every rank writes its own rows of the split tensors into, in
parallel (torch.distributed.checkpoint, DCP), so no rank ever holds the whole model or its Adam moments.

Layout (docs: README "Training large capsule models"): DCP files for the flat keys ``state_dict/<name>`` and
``optimizer_states/<i>/state/<index>/<key>``, split tensors saved as blocks of rows (ShardedTensors built from
`capsdist.checkpoint.rows.RowSplit`) so DCP re-slices them for any other number of ranks, replicated ones written
once; and ``meta.pt``, the rest of Lightning's checkpoint dict (global_step, loops, callbacks, hyper-parameters,
optimizer param_groups, loader state), ``weights_only``-loadable. It is written into a temp directory beside the
target, meta.pt last, and renamed into place; the checkpoint it replaces stays findable as ``.NAME.ckpt.old``
until then (capsdist.training.resume looks for it). ``python -m capsdist.checkpoint convert DIR OUT.ckpt`` turns
it into a single-file checkpoint (one process, the whole model in memory). Every read checks the whole directory
first (capsdist.checkpoint.dcp_reader).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from capsdist.checkpoint.dcp_reader import META, SafeReader
from capsdist.checkpoint.rows import RowSplit
from capsdist.checkpoint.single import read_weights_only
from capsdist.compat.dcp import row_block_tensor
from capsdist.core.errors import CapsdistError
from capsdist.core.files import no_follow_opener

OLD = ".{}.old"  # the checkpoint a save replaces, kept beside it until the new one is in place
TENSOR_KEYS = ("state_dict", "optimizer_states")


class ShardedCheckpointError(CapsdistError):
    """A sharded checkpoint directory that cannot be read or does not fit the model."""


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (one with meta.pt, whatever it is: reading checks it)."""
    return Path(path).is_dir() and os.path.lexists(Path(path) / META)


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.pt of a sharded checkpoint: Lightning's checkpoint dict without the tensors of model and optimizer,
    once the whole directory passed SafeReader's checks (a damaged or planted one is refused before any use)."""
    if not is_sharded(path):
        raise ShardedCheckpointError(
            f"{path} is not a sharded checkpoint (no {META}); it was probably cut short during its save. Fix: pass a "
            "NAME.ckpt directory that training wrote completely (a .NAME.ckpt.tmp one is an unfinished save)."
        )
    SafeReader(str(path)).read_metadata()
    with open(Path(path) / META, "rb", opener=no_follow_opener) as handle:
        return read_weights_only(handle)


def saved_shapes(path: str | Path) -> dict[str, torch.Size]:
    """Every flat DCP key of a sharded checkpoint with the shape of its whole (unsplit) tensor."""
    metadata = SafeReader(str(path)).read_metadata()
    return {key: md.size for key, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}


def flatten(checkpoint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Lightning's checkpoint dict -> (flat DCP keys -> tensors of model and optimizer state, the rest: meta)."""
    tensors = {f"state_dict/{k}": v for k, v in checkpoint.get("state_dict", {}).items()}
    optimizers = []
    for i, opt in enumerate(checkpoint.get("optimizer_states", [])):
        rest: dict[Any, dict[str, Any]] = {}
        for index, entry in opt["state"].items():
            rest[index] = {k: v for k, v in entry.items() if not torch.is_tensor(v)}
            moments = {k: v for k, v in entry.items() if torch.is_tensor(v)}
            tensors.update({f"optimizer_states/{i}/state/{index}/{k}": v for k, v in moments.items()})
        optimizers.append({**opt, "state": rest})
    meta = {k: v for k, v in checkpoint.items() if k not in TENSOR_KEYS}
    return tensors, {**meta, "optimizer_states": optimizers}


def unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`: Lightning's checkpoint dict (tensors as given, e.g. whole ones)."""
    checkpoint = {**meta, "state_dict": {}}
    checkpoint["optimizer_states"] = [{**o, "state": {i: dict(e) for i, e in o["state"].items()}} for o in meta.get(
        "optimizer_states", [])]  # fmt: skip
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "state_dict":
            checkpoint["state_dict"][rest] = tensor
        else:
            i, _, index, name = rest.split("/", 3)
            checkpoint["optimizer_states"][int(i)]["state"].setdefault(int(index), {})[name] = tensor
    return checkpoint


def _rows(local: torch.Tensor, split: RowSplit) -> Any:
    """``local`` (this rank's rows of a split tensor) as a ShardedTensor of the whole, for DCP."""
    ranks = dist.get_process_group_ranks(split.group or dist.group.WORLD)  # global ranks of the capsule group
    return row_block_tensor(local, split.bounds, split.rank, ranks, split.rows)


def _dcp_dict(tensors: dict[str, torch.Tensor], splits: dict[str, RowSplit]) -> dict[str, Any]:
    return {k: _rows(v, splits[k]) if k in splits else v for k, v in tensors.items()}


@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that ShardedTensor (the row blocks) is deprecated for DTensor, whose uneven splits are torch.chunk's
    (not `shard_bounds`'), and that a process-less load is one: both expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Please use DTensor instead", FutureWarning)
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(checkpoint: dict[str, Any], path: str | Path, splits: dict[str, RowSplit]) -> None:
    """Write this rank's part of ``checkpoint`` (its rows of the tensors named in ``splits``, flat keys) into the
    sharded checkpoint directory ``path``; every rank calls it with the same path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        tmp.mkdir(parents=True)
    _barrier()
    tensors, meta = flatten(checkpoint)
    with _quiet():
        dcp.save(_dcp_dict(tensors, splits), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    if _rank0():  # dcp.save returns once every rank's files and the DCP metadata are written
        with open(tmp / META, "wb") as handle:
            torch.save(meta, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _replace(tmp, path)
    _barrier()


def _remove(path: Path) -> None:
    """Remove a checkpoint file or directory, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` directory to ``path``, moving an older checkpoint (file or directory) aside as
    ``.NAME.old`` first: a kill between the two renames leaves it there, where a resume finds it. A ``.NAME.old``
    left by such a kill while ``path`` is missing is the only copy, kept until the new one is in place."""
    old = path.with_name(OLD.format(path.name))
    if os.path.lexists(path):
        _remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, targets: dict[str, torch.Tensor], splits: dict[str, RowSplit]) -> None:
    """Fill ``targets`` (flat keys -> this rank's tensors, e.g. the parameters themselves) in place from the
    sharded checkpoint ``path``, whatever number of ranks wrote it; refuses keys or shapes that differ."""
    saved = saved_shapes(path)
    wanted = {k: torch.Size([splits[k].rows, *v.shape[1:]]) if k in splits else v.shape for k, v in targets.items()}
    wrong = sorted(f"{k}: saved {tuple(saved[k]) if k in saved else 'none'} vs {tuple(v)}" for k, v in wanted.items()
                   if saved.get(k) != v)  # fmt: skip
    if wrong:
        raise ShardedCheckpointError(
            f"the sharded checkpoint {path} does not fit the configured model ({'; '.join(wrong[:3])}). Fix: resume "
            "with the model settings of the run that wrote it (its config.yaml), or start a fresh run."
        )
    with _quiet():
        dcp.load(_dcp_dict(targets, splits), storage_reader=SafeReader(str(path)))


def read_full(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint as Lightning's single-file dict, read in one process (no process group needed)."""
    meta = read_meta(path)  # first: the whole directory checked
    metadata = SafeReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in metadata.items() if hasattr(md, "size")}
    with _quiet():
        dcp.load(tensors, storage_reader=SafeReader(str(path)), no_dist=True)
    return unflatten(tensors, meta)
