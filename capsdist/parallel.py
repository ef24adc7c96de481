"""Scale-out helpers: FSDP that shards CapsNet's routed capsule layers and decoder (the signal policy is capsdist.stop).

DDP needs nothing from here: it is Lightning's choice for several devices (configs/strategy/ddp.yaml spells it
out). FSDP is picked in YAML with ``trainer.strategy: {class_path: capsdist.parallel.CapsFSDPStrategy}``
(configs/strategy/fsdp.yaml); it wraps each routed capsule layer (its W_ij tensor is most of a large CapsNet's
parameters) and the decoder as separate FSDP units, so each is gathered only while it computes.
:class:`capsdist.stop.GracefulStop` replaces Lightning's SIGUSR1/SIGTERM handlers, which run collectives inside
the signal handler and can deadlock a multi-rank job (see capsdist.stop); the training CLI adds it to every run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    OptimStateKeyType,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from capsdist.capsule_parallel import ShardedCapsLayer  # capsule parallelism lives in its own pure-torch module
from capsdist.lightning_compat import PrivateFSDPOverrides
from capsdist.model import CapsLayer, Decoder

__all__ = ["CapsFSDPStrategy", "ShardedCapsLayer", "capsnet_wrap_policy"]


def capsnet_wrap_policy() -> ModuleWrapPolicy:
    """FSDP units for CapsNet: every routed CapsLayer (holding W_ij) and the Decoder; the convs stay in the root."""
    return ModuleWrapPolicy({CapsLayer, Decoder})


class CapsFSDPStrategy(PrivateFSDPOverrides):
    """Lightning's FSDPStrategy with CapsNet's wrap policy and single-file (full) checkpoints, on GPUs and CPUs.

    On CUDA this is FSDPStrategy with other defaults. On CPU (gloo) it fills three gaps of Lightning 2.6 / torch
    FSDP1: Lightning rejects FSDP on CPU (its check matches the exact FSDPStrategy type, so this subclass passes);
    it hands FSDP ``device_id=None``, which FSDP refuses without an accelerator, so the model is wrapped with the
    CPU device (in ``capsdist.lightning_compat.PrivateFSDPOverrides``); and its full state-dict context offloads
    to CPU, which on a CPU device frees the storage the returned tensors point to (a segfault while cloning), so
    checkpoints are gathered without offload.
    Mixed precision on CPU: Lightning's FSDP precision autocasts on CUDA only, so use ``precision: 32`` there.
    """

    def __init__(self, auto_wrap_policy: Any = None, state_dict_type: str = "full", **kwargs: Any) -> None:
        """``auto_wrap_policy`` defaults to :func:`capsnet_wrap_policy`; other arguments are FSDPStrategy's."""
        super().__init__(
            auto_wrap_policy=auto_wrap_policy or capsnet_wrap_policy(), state_dict_type=state_dict_type, **kwargs
        )

    def _cpu_full_state_dict(self) -> AbstractContextManager[Any] | None:
        """A full (rank-0) state-dict context without CPU offload when running on CPU, else None."""
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return None
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full model state on rank 0 (gathered without the CPU offload that breaks on CPU devices)."""
        context = self._cpu_full_state_dict()
        if context is None:
            return super().lightning_module_state_dict()
        with context:
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Full optimizer state on rank 0, keyed by parameter id like a plain (unsharded) optimizer's."""
        context = self._cpu_full_state_dict()
        if context is None:
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with context:
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
