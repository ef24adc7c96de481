"""Every override of a private Lightning API, in one place.

Written for pytorch-lightning 2.6.6 (pyproject bounds it to >=2.4,<2.7). When upgrading Lightning, re-read each
overridden method below in the new release and adapt or drop it.
"""

from __future__ import annotations

import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


class PrivateOverrides(LightningCLI):
    """LightningCLI private methods capsdist overrides (mixed into capsdist.train.CapsCLI)."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI._parse_ckpt_path (Lightning 2.6.6) swaps in the hyperparameters a checkpoint was trained
        with. Keep the configured model instead: a checkpoint that does not fit the configured model is refused in
        CapsNetModule.on_load_checkpoint with the settings that differ."""


class PrivateFSDPOverrides(FSDPStrategy):
    """FSDPStrategy private methods capsdist overrides (the base of capsdist.parallel.CapsFSDPStrategy).

    FSDPStrategy._setup_model (Lightning 2.6.6) hands FSDP ``device_id=None``, which FSDP refuses on CPU.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """On CPU, wrap with an explicit CPU ``device_id``; Lightning then keeps the already-wrapped model."""
        if self.root_device.type == "cpu" and not isinstance(model, FSDP):
            model = FSDP(
                model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied; Lightning would warn it is ignored
        return super()._setup_model(model)
