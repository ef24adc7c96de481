"""wandb's private API, in one place: where its service launcher looks up the wandb-core binary
(``get_core_path``), which capsdist.cluster.wandb_shield redirects through a signal-shielding shim.

Written for wandb 0.31 (pyproject bounds it below 0.32): there ``wandb.sdk.lib.service.service_process`` imports
``get_core_path`` from ``wandb.util`` by name, so both places are patched. Canary: tests/unit/test_compat.py fails
when the launcher no longer takes the path from there (the shield would then silently do nothing).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import wandb.util

WRITTEN_FOR = "0.31.0"
LAUNCHER = "wandb.sdk.lib.service.service_process"  # the module that starts wandb-core (private)


def core_path_getter() -> Callable[[], str]:
    """The function wandb calls for wandb-core's path (its own, or a redirect installed earlier)."""
    return wandb.util.get_core_path


def redirect_core_path(replacement: Callable[[], str]) -> bool:
    """Make wandb's service launcher start ``replacement()`` instead of wandb-core; False where no launcher takes
    its path from ``get_core_path`` (nothing changed)."""
    real = wandb.util.get_core_path
    try:
        launcher = importlib.import_module(LAUNCHER)
    except ImportError:
        return False
    if getattr(launcher, "get_core_path", None) is not real:
        return False
    wandb.util.get_core_path = replacement
    launcher.get_core_path = replacement
    return True
