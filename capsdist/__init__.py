"""capsdist: distributed training of capsule networks (Sabour, Frosst & Hinton 2017).

The public API (docs/api.md): ``from capsdist import CapsNet, CapsNetModule, MnistData, ...``. The names resolve on
first use (PEP 562), so ``import capsdist`` stays cheap and imports neither torch nor Lightning: the training CLI
installs its signal handlers below before those seconds of imports, and the model names never load Lightning.
"""

from __future__ import annotations

import sys

from capsdist.core.errors import CapsdistError
from capsdist.core.lazy import lazy_exports

__version__ = "0.1.0"
_EXPORTS = {  # name -> the module that defines it
    "CapsNet": "capsdist.model.capsnet",  # the model, pure torch
    "CapsLayer": "capsdist.model.capsnet",
    "CapsOutput": "capsdist.model.capsnet",
    "dynamic_routing": "capsdist.model.routing",
    "squash": "capsdist.model.routing",
    "load_trained": "capsdist.model.trained",  # a checkpoint's model with its training and data settings
    "Trained": "capsdist.model.trained",
    "CapsNetModule": "capsdist.training.module",  # the pytorch_lightning LightningModule
    "CapsDataModule": "capsdist.data.modules",  # the LightningDataModules
    "MnistData": "capsdist.data.modules",
    "OnTheFlyData": "capsdist.data.modules",
    "ShardData": "capsdist.data.modules",
    "ImageShardData": "capsdist.data.modules",
}
__all__ = ["CapsdistError", "__version__", *_EXPORTS]

__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    """The module's names with the lazily imported public ones (tab completion, ``dir(capsdist)``)."""
    return sorted({*globals(), *__all__})


def _is_training_cli() -> bool:
    """Whether this process is `python -m capsdist.train` or the `capsdist-train` script."""
    argv = getattr(sys, "orig_argv", [])
    as_module = any(a == "-m" and b == "capsdist.train" for a, b in zip(argv, argv[1:], strict=False))
    return as_module or sys.argv[0].rsplit("/", 1)[-1].startswith("capsdist-train")


if _is_training_cli():  # before the seconds of torch/Lightning imports: a stop then is recorded, not fatal
    from capsdist.cluster import signals

    signals.install(for_process=True)
