"""Reading a training checkpoint without Lightning: a plain ``CapsNet`` plus the settings it was trained with."""

from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsdist import CapsdistError
from capsdist.model import CapsNet
from capsdist.validate import MODEL_RULES, ConfigError, check

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


def read_weights_only(path: str | Path) -> dict[str, Any]:
    """A checkpoint file loaded memory-mapped with ``weights_only``; a file that this refuses (Python objects: maybe
    unsafe) or that is damaged is a one-paragraph error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _unreadable(path, err) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CapsdistError(
            f"{path} holds {f'the Python object {found[1]}' if found else 'Python objects'}, which a safe "
            "(weights_only) load refuses to build: the file may be unsafe, as capsdist checkpoints hold only tensors "
            "and plain values; nothing in it was run. Fix: use a checkpoint written by `python -m capsdist.train "
            "fit`; never load this one with weights_only=False unless you trust its source. To see what it would "
            f"run without running it: `python -m zipfile -e {path} /tmp/ckpt && python -m pickletools "
            "/tmp/ckpt/*/data.pkl`."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(checkpoint, dict):
        raise _unreadable(path, TypeError(f"it holds a {type(checkpoint).__name__}, not a checkpoint dict"))
    return checkpoint


def _unreadable(path: str | Path, err: Exception) -> CapsdistError:
    """The error for a damaged or foreign checkpoint file."""
    return CapsdistError(
        f"{path} is not a readable capsdist checkpoint ({type(err).__name__}: {' '.join(str(err).split())[:200]}). "
        "Fix: pass a checkpoint written by `python -m capsdist.train fit`; a truncated file must be rewritten."
    )


class ForgedSettings(CapsdistError):
    """A file's model settings that the CLI refuses or that do not describe the tensors it holds (the reason only:
    callers name the file and the fix)."""


def build_model(settings: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> CapsNet:
    """An (uninitialised) CapsNet of a file's model ``settings``, checked with the training CLI's rules and built
    only when its tensors have exactly the ``shapes`` the file holds: settings read from a file never allocate more
    memory than the file's own tensors."""
    try:
        check("model", settings, MODEL_RULES)
        with torch.device("meta"):  # shapes only, no memory
            model = CapsNet(**{k: v for k, v in settings.items() if k in MODEL_ARGS})
    except (ConfigError, ValueError, TypeError) as err:
        raise ForgedSettings(f"holds model settings the training CLI refuses: {err}") from None
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    held = {k: tuple(v) for k, v in shapes.items()}
    if wanted != held:
        name = min(set(wanted) ^ set(held) or {k for k in wanted if wanted[k] != held[k]})
        raise ForgedSettings(
            f"does not hold the tensors its model settings describe ({name}: settings {wanted.get(name, 'none')} vs "
            f"file {held.get(name, 'none')}; {sum(map(_numel, wanted.values())):,} parameters described, "
            f"{sum(map(_numel, held.values())):,} held), so no model was built"
        )
    return model.to_empty(device="cpu")


def _numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``."""
    return int(torch.Size(shape).numel())


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """Load a capsdist checkpoint safely (``weights_only=True``, settings checked before any model is built) into a
    plain CapsNet in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CapsdistError(f"no checkpoint at {path}. Fix: pass a .ckpt that training wrote (runs/NAME/checkpoints/).")
    checkpoint = read_weights_only(path)
    try:
        hparams, data = dict(checkpoint["hyper_parameters"]), dict(checkpoint.get("datamodule_hyper_parameters", {}))
        weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        step = checkpoint.get("global_step", 0)
        if not (type(step) is int and all(isinstance(v, torch.Tensor) for v in weights.values())):
            raise TypeError("global_step or state_dict of the wrong type")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _unreadable(path, err) from None
    try:
        model = build_model(hparams, {k: v.shape for k, v in weights.items()})
    except ForgedSettings as err:
        raise CapsdistError(
            f"{path} is refused: it {err}. Fix: pass a checkpoint written by `python -m capsdist.train fit`; this "
            "one is damaged or forged."
        ) from None
    model.load_state_dict(weights)
    return Trained(model.eval().to(device), hparams, data, step)
