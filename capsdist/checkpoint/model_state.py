"""A training checkpoint's model part, read safely from either format (a single ``.ckpt`` file or capsdist's sharded
``.ckpt/`` directory): the module's hyper-parameters, the model's weights, the data settings and the step. Building a
model from them is capsdist.model's part; nothing here imports Lightning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsdist.checkpoint.single import read_weights_only, unreadable
from capsdist.core.errors import CapsdistError

MODEL_PREFIX = "model."  # CapsNetModule keeps its CapsNet as `self.model`


@dataclass
class ModelState:
    """What a checkpoint holds of its model."""

    hparams: dict[str, Any]  # the LightningModule's: CapsNet's arguments, num_targets, recon_weight, lr, ...
    weights: dict[str, torch.Tensor]  # the CapsNet's state dict (the module's ``model.`` prefix removed)
    data: dict[str, Any]  # the data module's saved settings (source, batch_size, ...); {} if none were saved
    global_step: int  # optimizer steps taken when it was written


def read_model_state(path: str | Path) -> ModelState:
    """The model part of a checkpoint written by a ``CapsNetModule`` (the training CLI or one's own Trainer), read
    with ``weights_only`` (nothing in the file runs); a damaged or foreign file is a one-paragraph error."""
    path = Path(path)
    if not path.exists():
        raise CapsdistError(f"no checkpoint at {path}. Fix: pass a .ckpt that training wrote (runs/NAME/checkpoints/).")
    if path.is_dir():
        from capsdist.checkpoint.sharded import read_full  # DCP: 0.7 s of imports, only a sharded checkpoint needs it

        checkpoint = read_full(path)
    else:
        checkpoint = read_weights_only(path)
    try:
        hparams, data = dict(checkpoint["hyper_parameters"]), dict(checkpoint.get("datamodule_hyper_parameters", {}))
        state = checkpoint["state_dict"]
        weights = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
        if not weights:
            raise KeyError("no CapsNet weights (state_dict keys model.*): not a CapsNetModule's checkpoint")
        step = checkpoint.get("global_step", 0)
        if not (type(step) is int and all(isinstance(v, torch.Tensor) for v in weights.values())):
            raise TypeError("global_step or state_dict of the wrong type")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise unreadable(path, err) from None
    return ModelState(hparams, weights, data, step)
