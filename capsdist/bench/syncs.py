"""Count device->host reads per training step: the ops that make the host wait for the device on CUDA.

On CPU tensors the same ops run (they just do not wait), so a CPU run counts what a GPU run would sync on:
``.item()``/``float()``/``bool()`` (``aten._local_scalar_dense``), ops whose output size depends on the data
(``nonzero``, ``masked_select``, ``unique``, ``equal``) and copies to the host (``.cpu()``, ``.tolist()``,
``.numpy()``). ``SyncCounter`` is a callback: it counts from one training batch's start to the next one's.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READ_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default, aten.masked_select.default}
READ_OPS |= {aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}


class _Reads(TorchDispatchMode):
    """Counts the reading aten ops (and where they came from, for the failure message of a test)."""

    def __init__(self, record: list[str]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in READ_OPS:
            self.record.append(f"{func}: {_caller()}")
        return func(*args, **(kwargs or {}))


class _Copies(TorchFunctionMode):
    """Counts host copies made from Python (``.cpu()``, ``.tolist()``, ``.numpy()``, ``.to("cpu")``)."""

    def __init__(self, record: list[str]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.to and args[0].device.type != "cpu"
        to_host = to_host and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))
        if func in HOST_COPIES or to_host:
            self.record.append(f"{getattr(func, '__name__', func)}: {_caller()}")
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frames outside torch and this file: who asked for the read."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "syncs" not in f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-1:-6:-1])


class SyncCounter(pl.Callback):
    """Records, per training step (one batch start to the next), every device->host read made in this process's
    main thread: ``steps[global_step]`` lists the reads of the step that ended at that global step."""

    def __init__(self) -> None:
        self.steps: dict[int, list[str]] = {}
        self._modes: list[Any] = []

    def _close(self) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Close the previous step's window and open this one's."""
        self._close()
        record = self.steps.setdefault(trainer.global_step + 1, [])
        self._modes = [_Copies(record), _Reads(record)]
        for mode in self._modes:
            mode.__enter__()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop counting."""
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Stop counting."""
        self._close()
