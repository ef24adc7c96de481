"""Scale-out helpers: FSDP that shards CapsNet's routed capsule layers and decoder, and a preemption-safe requeue.

DDP needs nothing from here: it is Lightning's choice for several devices (configs/strategy/ddp.yaml spells it
out). FSDP is picked in YAML with ``trainer.strategy: {class_path: capsdist.parallel.CapsFSDPStrategy}``
(configs/strategy/fsdp.yaml); it wraps each routed capsule layer (its W_ij tensor is most of a large CapsNet's
parameters) and the decoder as separate FSDP units, so each is gathered only while it computes.
:class:`SlurmRequeue` replaces Lightning's SIGUSR1 handler, which checkpoints inside the signal handler and can
deadlock a multi-rank job (see its docstring); the training CLI adds it to every run (inert outside SLURM).
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import AbstractContextManager
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities.rank_zero import rank_zero_info
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

__all__ = ["CapsFSDPStrategy", "ShardedCapsLayer", "SlurmRequeue", "capsnet_wrap_policy"]


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


class SlurmRequeue(pl.Callback):
    """On SIGUSR1 under SLURM: every rank saves ``hpc_ckpt_N.ckpt`` at the same step boundary, then rank 0 requeues.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) calls ``trainer.save_checkpoint`` inside the
    signal handler, i.e. wherever each rank happens to be; that save starts collectives (a barrier; FSDP gathers),
    so a rank interrupted in its forward pass waits in the barrier while another sits in the backward all-reduce:
    the job hangs until its time limit and is never requeued (reproduced with 2 gloo ranks). Here the handler only
    sets a flag; after each training batch the ranks agree (one all-reduce of a flag) and, if any was signalled,
    all save together, rank 0 runs ``scontrol requeue`` and training stops. Because this callback installs its
    handler first (``setup`` runs before Lightning registers signals), Lightning leaves SIGUSR1 alone; on restart
    Lightning resumes from the newest ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` as usual. Inert outside SLURM.
    """

    def __init__(self, signum: int = signal.SIGUSR1.value) -> None:
        """``signum``: the signal of ``#SBATCH --signal=<sig>@<seconds>`` (SIGUSR1 by default)."""
        self.signum = signal.Signals(signum)
        self.requested = False
        self.installed = False
        self._previous: Any = None

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the flag-setting handler when fitting under SLURM."""
        if stage == "fit" and SLURMEnvironment.detect() and not self.installed:
            self._previous = signal.signal(self.signum, self._request)
            self.installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the handler that was there before."""
        if self.installed:
            signal.signal(self.signum, self._previous)
            self.installed = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """If any rank was signalled: save the hpc checkpoint on all ranks, requeue from rank 0, stop."""
        if not self.installed or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        for logger in trainer.loggers:  # flush metrics first, as Lightning's handler does
            logger.finalize("finished")
        # Lightning's own naming (hpc_ckpt_<max+1>.ckpt) so its automatic resume finds the file; rank 0 names it
        # for everyone (a rank that looked after rank 0 had written would pick the next number).
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path)  # returns on every rank only once the file is complete
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            rank_zero_info(
                f"SlurmRequeue: saved {path} at step {trainer.global_step}; `scontrol requeue {job}` -> "
                f"{result.returncode} {result.stderr.strip()}"
            )
        trainer.should_stop = True
        self.requested = False
