"""Reading a sharded checkpoint directory without running anything from it or reading anything outside it.

torch.distributed.checkpoint's FileSystemReader unpickles ``.metadata`` with plain ``pickle.load``, and its
default planner loads "bytes" items with ``torch.load(weights_only=False)``: a planted ``NAME.ckpt/`` directory
would run code. :class:`SafeReader` accepts a directory only if it holds nothing but regular files of the names a
capsdist save writes (listed with lstat: no links, FIFOs or devices, and opened without following a link), reads
``.metadata`` whole within a size bound and checks every length its pickle declares before unpickling only DCP's
own metadata classes (an allow-list), and accepts the metadata only if every entry is a tensor (no bytes items)
stored inside the size of a file of the directory, declaring no more bytes than the files hold on disk (allocated
blocks: a sparse file holds what it really stores): nothing that can allocate more than the directory holds.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PosixPath
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from capsdist.compat.dcp import PRIVATE_METADATA_CLASSES
from capsdist.core.errors import CapsdistError
from capsdist.core.files import describe, no_follow_opener

META = "meta.pt"  # the rest of Lightning's checkpoint dict, beside DCP's files (capsdist.checkpoint.sharded)
# every name a capsdist save writes into the directory: DCP's metadata, DCP's data files (one per rank), meta.pt
FILES = re.compile(r"\.metadata|__\d+_\d+\.distcp|" + re.escape(META))
MAX_METADATA_BYTES = 64 << 20  # DCP's metadata of a capsdist model is a few KB (one entry per tensor)

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
        f"{path} is refused as a sharded checkpoint: {what}, which a capsdist save never writes, so the directory "
        "is damaged or planted; nothing in it was run and nothing outside it was read. Fix: resume or evaluate a "
        "NAME.ckpt directory that `python -m capsdist.train fit` wrote (or its single-file conversion)."
    )


def directory_files(folder: Path) -> dict[str, os.stat_result]:
    """The files of a sharded checkpoint directory with their lstat: refused unless every entry is a regular file
    of a name a capsdist save writes (no link, FIFO, device, folder or other file)."""
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise _refuse(folder, f"it cannot be listed ({err.strerror})") from None
    files = {}
    for entry in entries:
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(folder, f"it holds {entry.name}, {describe(Path(entry.path))}")
        if not FILES.fullmatch(entry.name):
            raise _refuse(folder, f"it holds the file {entry.name!r}")
        files[entry.name] = info
    return files


def _read_pickle(folder: Path, size: int) -> bytes:
    """``.metadata``'s bytes, read whole (opened without following a link) once its size is within the bound, and
    every length its pickle declares checked against them: unpickling from a file would allocate what a 14-byte
    pickle declares (2^60 bytes: MemoryError)."""
    if size > MAX_METADATA_BYTES:
        raise _refuse(folder, f"its DCP metadata is {size:,} bytes (a capsdist one is a few KB)")
    with open(folder / ".metadata", "rb", opener=no_follow_opener) as handle:
        data = handle.read(MAX_METADATA_BYTES + 1)
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError as err:  # a length past the end, an unknown opcode, no STOP
        raise _refuse(folder, f"its DCP metadata is not a whole pickle ({str(err)[:160]})") from None
    return data


class _Unpickler(pickle.Unpickler):
    """Builds only the allow-listed classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"names {module}.{name}")


class _NoLinkFileSystem(FileSystem):
    """DCP's local file system, opening the data files without following a link or blocking on a FIFO."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[IO[bytes]]:
        """``path`` opened as a regular file only (capsdist.core.files.no_follow_opener)."""
        with open(path, mode, opener=no_follow_opener) as stream:
            yield stream


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the checks of the module docstring."""

    def __init__(self, path: str | os.PathLike) -> None:
        """``path``: the sharded checkpoint directory."""
        super().__init__(path)
        self.fs = _NoLinkFileSystem()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The directory's metadata, unpickled with the allow-list and checked against the files present."""
        folder = Path(self.path)
        files = directory_files(folder)
        if ".metadata" not in files:
            raise _refuse(folder, "it has no DCP metadata (.metadata)")
        try:
            metadata = _Unpickler(io.BytesIO(_read_pickle(folder, files[".metadata"].st_size))).load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
            why = f"{type(err).__name__}: {str(err)[:160]}"
            raise _refuse(folder, f"its DCP metadata cannot be read safely ({why})") from None
        if not isinstance(metadata, Metadata):
            raise _refuse(folder, f"its DCP metadata is a {type(metadata).__name__}")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise _refuse(folder, f"its DCP metadata declares {key!r} as {type(entry).__name__}, not a tensor")
        data = {name: info for name, info in files.items() if name.endswith(".distcp")}
        for index, info in (metadata.storage_data or {}).items():
            name = str(getattr(info, "relative_path", ""))
            if name not in data or info.offset < 0 or info.length < 0 or info.offset + info.length > data[name].st_size:
                raise _refuse(folder, f"its DCP metadata points {index.fqn!r} outside the directory's files ({name!r})")
        held = sum(min(info.st_size, info.st_blocks * 512) for info in data.values())  # a sparse file: its blocks
        declared = sum(e.size.numel() * e.properties.dtype.itemsize for e in metadata.state_dict_metadata.values())
        if declared > 2 * held + (1 << 20):
            raise _refuse(folder, f"its DCP metadata declares {declared:,} bytes of tensors in {held:,} bytes that "
                          "its files hold on disk")  # fmt: skip
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
