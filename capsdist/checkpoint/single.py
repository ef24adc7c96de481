"""Single-file training checkpoints, read safely: ``weights_only`` and memory-mapped, so nothing in the file runs
and a damaged or foreign file is a one-paragraph error instead of a traceback."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from capsdist.core.errors import CapsdistError


def read_weights_only(source: str | Path | BinaryIO) -> dict[str, Any]:
    """A checkpoint file (a path: memory-mapped; or an open file) loaded with ``weights_only``; a file that this
    refuses (Python objects: maybe unsafe) or that is damaged is a one-paragraph error."""
    by_name = isinstance(source, str | Path)
    path = source if by_name else source.name
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=by_name)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise unreadable(path, err) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CapsdistError(
            f"{path} holds {f'the Python object {found[1]}' if found else 'Python objects'}, which a safe "
            "(weights_only) load refuses to build: the file may be unsafe, as capsdist checkpoints hold only tensors "
            "and plain values; nothing in it was run. Fix: use a checkpoint written by `python -m capsdist.train "
            "fit`; never load this one with weights_only=False unless you trust its source. To see what it would "
            f"run without running it: `python -m zipfile -e {path} /tmp/ckpt && python -m pickletools "
            "/tmp/ckpt/*/data.pkl`."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise unreadable(path, err) from None
    if not isinstance(checkpoint, dict):
        raise unreadable(path, TypeError(f"it holds a {type(checkpoint).__name__}, not a checkpoint dict"))
    return checkpoint


def unreadable(path: str | Path, err: Exception) -> CapsdistError:
    """The error for a damaged or foreign checkpoint file."""
    return CapsdistError(
        f"{path} is not a readable capsdist checkpoint ({type(err).__name__}: {' '.join(str(err).split())[:200]}). "
        "Fix: pass a checkpoint written by `python -m capsdist.train fit`; a truncated file must be rewritten."
    )
