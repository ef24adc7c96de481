"""The pretrained-weights format: a safetensors file of a CapsNet's state dict (fp16, loaded back as fp32) whose
metadata holds ``capsnet_config`` (the ``CapsNet(**kwargs)`` arguments as JSON) plus how it was trained and what it
scored. Reading it never unpickles or executes anything; building the model from it is capsdist.model's part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from capsdist.core.errors import CapsdistError
from capsdist.core.files import umask
from capsdist.core.shipped import WEIGHTS

CONFIG_KEY = "capsnet_config"
FOLDER_WEIGHTS = "model.safetensors"  # the weights file in a folder written by CapsNet.save_pretrained
# metadata loading uses (num_targets: digits per image, 2 for MultiMNIST)
METADATA_TYPES = {"global_step": (int, "an integer"), "data_source": (str, "a string"), "num_targets": (int, "an int")}
STORE_DTYPE = torch.float16


def bad_file(path: Path, why: str) -> CapsdistError:
    """The one error for an unreadable weights file (one paragraph: the reason's line breaks are folded)."""
    why = " ".join(why.split())
    return CapsdistError(
        f"{path} is not a capsdist weights file ({why}). Fix: pass a .safetensors written by "
        "`python -m capsdist.pretrained export` (e.g. pretrained/capsnet-mnist.safetensors), or a training "
        "checkpoint with --ckpt instead."
    )


def write_weights(
    state: dict[str, torch.Tensor], config: dict[str, Any], path: str | Path, metadata: dict[str, Any]
) -> Path:
    """Write ``state`` in fp16 with its model ``config`` and ``metadata`` (JSON-encoded values) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", STORE_DTYPE).contiguous() for k, v in state.items()}
    meta = {CONFIG_KEY: json.dumps(config), **{k: json.dumps(v) for k, v in metadata.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o666 & ~umask())  # safetensors creates 0600 files: teammates on a shared filesystem could not read them
    tmp.replace(path)
    return path


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """A weights file's JSON-decoded, type-checked metadata and its tensors' shapes, without reading any tensor."""
    if not path.is_file():
        raise CapsdistError(
            f"no weights file at {path}. Fix: pass the path of a .safetensors file, or the name of shipped "
            f"weights ({', '.join(WEIGHTS)})."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError) as err:
        raise bad_file(path, f"{type(err).__name__}: {str(err)[:160]}") from err
    if CONFIG_KEY not in raw:
        raise bad_file(path, f"no {CONFIG_KEY!r} metadata")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            raise bad_file(path, f"its metadata {key!r} is not JSON: {value[:80]!r}") from None
    for key, (kind, name) in METADATA_TYPES.items():
        if key in meta and type(meta[key]) is not kind:
            raise bad_file(path, f"its metadata {key} {meta[key]!r} is not {name}")
    return meta, shapes


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors as float32."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise bad_file(path, f"{type(err).__name__}: {str(err)[:160]}") from err
    return {k: v.float() for k, v in tensors.items()}
