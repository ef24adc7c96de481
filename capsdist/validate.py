"""Range checks of the settings, at config time: a bad number is a one-line error naming the flag and the valid
range, instead of a traceback deep in training or a silently wrong run. Called from the model's and the data
modules' ``__init__`` and, for the trainer-level settings, from the training CLI."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from capsdist import CapsdistError


class ConfigError(CapsdistError):
    """A setting outside its valid range."""


def _int(low: int, high: int | None = None) -> tuple[Callable[[Any], bool], str]:
    """An integer in [low, high]."""
    valid = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    return (lambda v: type(v) is int and v >= low and (high is None or v <= high)), valid


def _real(test: Callable[[float], bool], valid: str) -> tuple[Callable[[Any], bool], str]:
    """A finite real number passing ``test``."""
    return (lambda v: isinstance(v, int | float) and abs(v) < float("inf") and test(float(v))), valid


MODEL_RULES = {
    "num_targets": _int(1),
    "recon_weight": _real(lambda v: v >= 0, "a number >= 0 (paper: 0.0005; 0 turns the term off)"),
    "lr": _real(lambda v: v > 0, "a number > 0 (paper: 0.001)"),
    "lr_decay": _real(lambda v: 0 < v <= 1, "a number in (0, 1] (paper: 0.96; 1 keeps lr constant)"),
    "lr_decay_steps": _int(1),
    "min_lr": _real(lambda v: v >= 0, "a number >= 0"),
    "log_images_every_n_steps": _int(0),
    "routing_iterations": _int(1),
    "image_size": _int(1),
    "num_classes": _int(2),
    "in_channels": _int(1),
}
DATA_RULES = {
    "batch_size": _int(1),
    "num_workers": _int(0),
    "shuffle_buffer": _int(1),
    "train_batches_per_epoch": _int(1),
    "val_batches": _int(1),
    "train_samples": _int(1),
    "val_samples": _int(1),
    "max_shift": _int(0, 4),  # MNIST: the paper shifts by 2; more pushes strokes off the 28x28 canvas
}


def check(section: str, settings: Mapping[str, Any], rules: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise ConfigError for the first setting outside its rule (None means "unset" and always passes)."""
    for name, (ok, valid) in rules.items():
        value = settings.get(name)
        if value is not None and not ok(value):
            raise ConfigError(f"--{section}.{name} {value!r} is out of range: it must be {valid}.")


def check_run(config: Mapping[str, Any]) -> None:
    """Trainer-level settings of a `fit`/`validate`/`test` config: precision on the device, ``ckpt_path``."""
    trainer = config.get("trainer") or {}
    precision, accelerator = str(trainer.get("precision")), trainer.get("accelerator") or "auto"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision.startswith("16"):
        raise ConfigError(
            f"--trainer.precision {precision} needs a GPU, and this run is on the CPU. "
            "Fix: use --trainer.precision bf16-mixed or 32 on the CPU."
        )
    ckpt = config.get("ckpt_path")
    special = ckpt in (None, "last", "best", "auto", "hpc") or str(ckpt).startswith("registry") or "://" in str(ckpt)
    if not special and not Path(ckpt).is_file():
        raise ConfigError(
            f"--ckpt_path {ckpt}: no such file. Fix: pass a .ckpt that training wrote "
            "(runs/NAME/checkpoints/), `last` or `best`, or leave it out to start a fresh run."
        )


LINKED = {"model.image_size": "image size", "model.num_targets": "number of digits per image"}


def check_argv(argv: list[str]) -> None:
    """Refuse flags the data module sets (jsonargparse's own message names a `--data.*` flag that does not exist)."""
    for arg in argv:
        key = arg.removeprefix("--").split("=", 1)[0]
        if key in LINKED:
            raise ConfigError(
                f"--{key} is not a setting: the {LINKED[key]} comes from the data (MNIST: 28x28, one digit; "
                "MultiMNIST: 36x36, two digits). Fix: drop the flag and choose the data with --data.source."
            )
