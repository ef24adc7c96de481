"""Reading a sharded checkpoint directory without running anything from it.

torch.distributed.checkpoint's FileSystemReader unpickles ``.metadata`` with plain ``pickle.load``, and its
default planner loads "bytes" items with ``torch.load(weights_only=False)``: a planted ``NAME.ckpt/`` directory
would run code. :class:`SafeReader` unpickles only DCP's own metadata classes (an allow-list), and accepts the
metadata only if every entry is a tensor (no bytes items) stored in a plain file of the directory, inside that
file's size: what a capsdist save writes, and nothing that can allocate more than the directory holds.
"""

from __future__ import annotations

import pickle
from pathlib import Path, PosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from capsdist.compat.dcp import PRIVATE_METADATA_CLASSES
from capsdist.core.errors import CapsdistError

# (module, name) that DCP's metadata pickle may name (torch 2.13); torch dtypes are checked by value below
ALLOWED = {
    ("pathlib", "PosixPath"): PosixPath,
    ("torch", "Size"): torch.Size,
    **{
        ("torch.distributed.checkpoint.metadata", name): getattr(torch.distributed.checkpoint.metadata, name)
        for name in (
            "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
            "TensorStorageMetadata",
        )
    },  # fmt: skip
    **PRIVATE_METADATA_CLASSES,
}


class UnsafeCheckpointError(CapsdistError):
    """A sharded checkpoint whose metadata names anything a capsdist save does not write."""


def _refuse(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} is refused as a sharded checkpoint: its DCP metadata {what}, which a capsdist save never writes, "
        "so the directory is damaged or planted; nothing in it was run. Fix: resume or evaluate a NAME.ckpt "
        "directory that `python -m capsdist.train fit` wrote (or its single-file conversion)."
    )


class _Unpickler(pickle.Unpickler):
    """Builds only the allow-listed classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"names {module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the checks of the module docstring."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The directory's metadata, unpickled with the allow-list and checked against the files present."""
        folder = Path(self.path)
        try:
            with open(folder / ".metadata", "rb") as handle:
                metadata = _Unpickler(handle).load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
            raise _refuse(folder, f"cannot be read safely ({type(err).__name__}: {str(err)[:160]})") from None
        if not isinstance(metadata, Metadata):
            raise _refuse(folder, f"is a {type(metadata).__name__}")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise _refuse(folder, f"declares {key!r} as {type(entry).__name__}, not a tensor")
        sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        for index, info in (metadata.storage_data or {}).items():
            name = str(getattr(info, "relative_path", ""))
            if name not in sizes or info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[name]:
                raise _refuse(folder, f"points {index.fqn!r} outside the directory's files ({name!r})")
        held = sum(sizes.values())
        declared = sum(e.size.numel() * e.properties.dtype.itemsize for e in metadata.state_dict_metadata.values())
        if declared > 2 * held + (1 << 20):
            raise _refuse(folder, f"declares {declared:,} bytes of tensors in {held:,} bytes of files")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
