"""Every override of a private Lightning API, in one place.

Written for pytorch-lightning 2.6.6 (pyproject bounds it to >=2.4,<2.7). When upgrading Lightning, re-read each
overridden method below in the new release and adapt or drop it.
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


class PrivateOverrides(LightningCLI):
    """LightningCLI private methods capsdist overrides (mixed into capsdist.train.CapsCLI)."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI._parse_ckpt_path (Lightning 2.6.6) swaps in the hyperparameters a checkpoint was trained
        with. Keep the configured model instead: a checkpoint that does not fit the configured model is refused in
        CapsNetModule.on_load_checkpoint with the settings that differ."""
