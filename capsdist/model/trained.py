"""Reading a training checkpoint without Lightning: a plain ``CapsNet`` plus the settings it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsdist.checkpoint.sharded import read_full
from capsdist.checkpoint.single import read_weights_only, unreadable
from capsdist.core.errors import CapsdistError
from capsdist.model.capsnet import CapsNet, ForgedSettings, build_model


@dataclass
class Trained:
    """A checkpoint's model (eval mode) with its training settings."""

    model: CapsNet
    hparams: dict[str, Any]  # the LightningModule's: CapsNet's arguments, num_targets, recon_weight, lr, ...
    data: dict[str, Any]  # the data module's saved settings (source, batch_size, ...); {} if none were saved
    global_step: int = 0  # optimizer steps taken when it was written

    @property
    def recon_weight(self) -> float:
        """Weight of the reconstruction term in the loss."""
        return float(self.hparams.get("recon_weight", 0.0005))

    def to(self, device: str | torch.device) -> Trained:
        """Move the model to ``device``; returns self."""
        self.model.to(device)
        return self


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """Load a capsdist checkpoint safely (``weights_only=True``, settings checked before any model is built) into a
    plain CapsNet in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CapsdistError(f"no checkpoint at {path}. Fix: pass a .ckpt that training wrote (runs/NAME/checkpoints/).")
    checkpoint = read_full(path) if path.is_dir() else read_weights_only(path)  # a sharded one: a directory
    try:
        hparams, data = dict(checkpoint["hyper_parameters"]), dict(checkpoint.get("datamodule_hyper_parameters", {}))
        weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        step = checkpoint.get("global_step", 0)
        if not (type(step) is int and all(isinstance(v, torch.Tensor) for v in weights.values())):
            raise TypeError("global_step or state_dict of the wrong type")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise unreadable(path, err) from None
    try:
        model = build_model(hparams, {k: v.shape for k, v in weights.items()})
    except ForgedSettings as err:
        raise CapsdistError(
            f"{path} is refused: it {err}. Fix: pass a checkpoint written by `python -m capsdist.train fit`; this "
            "one is damaged or forged."
        ) from None
    model.load_state_dict(weights)
    return Trained(model.eval().to(device), hparams, data, step)
