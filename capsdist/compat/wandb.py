"""wandb's private API, in one place:
  - where its service launcher looks up the wandb-core binary (``get_core_path``), which
    capsdist.cluster.wandb_shield redirects through a signal-shielding shim;
  - ``Run._detect_and_apply_job_inputs``, W&B Launch's step in every ``wandb.init``, skipped where nothing can have
    staged a job input (``skip_unstaged_launch_inputs``).

Written for wandb 0.31 (pyproject bounds it below 0.32): there ``wandb.sdk.lib.service.service_process`` imports
``get_core_path`` from ``wandb.util`` by name, so both places are patched. Canaries in tests/unit/test_compat.py
fail when the launcher no longer takes the path from there (the shield would then silently do nothing), and when
the Launch step or the module holding its staged inputs moves.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import wandb.sdk.wandb_run
import wandb.util

WRITTEN_FOR = "0.31.0"
LAUNCHER = "wandb.sdk.lib.service.service_process"  # the module that starts wandb-core (private)
LAUNCH_INPUTS = "wandb.sdk.launch.inputs.internal"  # holds the job inputs W&B Launch stages (private)
LAUNCH_STEP = "_detect_and_apply_job_inputs"  # wandb.sdk.wandb_run.Run's method applying them at init (private)


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


def skip_unstaged_launch_inputs() -> None:
    """Make ``wandb.init`` skip W&B Launch's job-input step where no input can be staged. The step imports
    wandb.sdk.launch (about 1 CPU-s in a process holding Lightning: pydantic scans every loaded module for docstrings
    on Python < 3.13) to apply the inputs that ``wandb.sdk.launch.manage_config_file`` and
    ``manage_wandb_config`` stage in LAUNCH_INPUTS; with that module never imported there are none, and the step
    would do nothing."""
    run = wandb.sdk.wandb_run.Run
    real = getattr(run, LAUNCH_STEP)
    if getattr(real, "capsdist_skip", False):
        return

    def apply_staged_inputs(self: wandb.sdk.wandb_run.Run) -> None:
        """W&B Launch's step, where a job input may have been staged (see skip_unstaged_launch_inputs)."""
        if LAUNCH_INPUTS in sys.modules:
            real(self)

    apply_staged_inputs.capsdist_skip = True  # type: ignore[attr-defined]
    apply_staged_inputs.__wrapped__ = real  # type: ignore[attr-defined]
    setattr(run, LAUNCH_STEP, apply_staged_inputs)
