"""Reading a training checkpoint without Lightning: a plain ``CapsNet`` plus the settings it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsdist.model.capsnet import CapsNet, load_checkpoint


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
    model, state = load_checkpoint(path, device)
    return Trained(model, state.hparams, state.data, state.global_step)
