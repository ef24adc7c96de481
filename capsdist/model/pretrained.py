"""Pretrained CapsNets: a model's weights into and out of the safetensors format (capsdist.checkpoint.weights),
fine-tuning from a file, and a file as evaluate/figures take a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capsdist.checkpoint.weights import CONFIG_KEY, read_header, read_tensors, write_weights
from capsdist.core.errors import CapsdistError
from capsdist.core.shipped import weights_path
from capsdist.model.capsnet import MODEL_ARGS, CapsNet, load_weights, plain_config
from capsdist.model.trained import Trained


def model_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """The `CapsNet(**kwargs)` arguments among a module's saved hyperparameters, as plain JSON values."""
    return plain_config({k: v for k, v in hparams.items() if k in MODEL_ARGS})


def save_weights(model: CapsNet, config: dict[str, Any], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights with its ``config`` and ``metadata`` (capsdist.checkpoint.weights' format)."""
    return write_weights(model.state_dict(), config, path, metadata)


def init_from(model: CapsNet, path: str | Path) -> None:
    """Copy a weights file into `model` (fine-tuning); a file of another shape is refused with both settings."""
    path = weights_path(path)
    meta, _ = read_header(path)
    try:
        model.load_state_dict(read_tensors(path))
    except RuntimeError as err:
        raise CapsdistError(
            f"the weights in {path} do not fit the configured model ({' '.join(str(err).split())[:240]}). "
            f"Fix: configure the model as the file was trained, --model.* = {json.dumps(meta[CONFIG_KEY])}."
        ) from err


def load_as_trained(path: str | Path, device: str = "cpu") -> Trained:
    """A weights file as `evaluate`/`figures` take a checkpoint: the model, its settings and its data source."""
    model, meta = load_weights(path, device)
    data = {"source": meta["data_source"]} if meta.get("data_source") else {}
    hparams = {**meta[CONFIG_KEY], "num_targets": int(meta.get("num_targets", 1))}
    return Trained(model, hparams, data, int(meta.get("global_step", 0)))
