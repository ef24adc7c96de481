"""Reading a training checkpoint without Lightning: a plain ``CapsNet`` plus the settings it was trained with."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsdist import CapsdistError
from capsdist.model import CapsNet
from capsdist.sharded_checkpoint import read_full

MODEL_ARGS = tuple(inspect.signature(CapsNet).parameters)


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
    """Load a capsdist checkpoint safely (``weights_only=True``) into a plain CapsNet in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CapsdistError(f"no checkpoint at {path}. Fix: pass a .ckpt that training wrote (runs/NAME/checkpoints/).")
    try:
        checkpoint = read_full(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
        hparams = dict(checkpoint["hyper_parameters"])
        model = CapsNet(**{k: v for k, v in hparams.items() if k in MODEL_ARGS})
        weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, EOFError) as err:
        raise CapsdistError(
            f"{path} is not a readable capsdist checkpoint ({type(err).__name__}: {str(err)[:200]}). "
            "Fix: pass a checkpoint written by `python -m capsdist.train fit`; a truncated file must be rewritten."
        ) from err
    data = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    return Trained(model.eval().to(device), hparams, data, int(checkpoint.get("global_step", 0)))
