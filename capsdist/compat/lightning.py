"""Every use of a private Lightning API, in one place: the attributes capsdist reads and the methods it overrides.

Written for pytorch-lightning 2.6.6 (pyproject bounds it to >=2.6,<2.7). When upgrading Lightning, run
tests/unit/test_compat.py (a canary per attribute below, naming the version it was written against), re-read each
overridden method in the new release and adapt or drop it. No other capsdist module touches a ``_name`` of
Lightning's.
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ThroughputMonitor
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.loops.fit_loop import _FitLoop
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel

WRITTEN_FOR = "2.6.6"


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether this step's values are written by the loggers (``log_every_n_steps``, or a step a stop makes the
    last): ``trainer._logger_connector.should_update_logs``."""
    return trainer._logger_connector.should_update_logs


def log_step_values(trainer: pl.Trainer) -> None:
    """Hand this step's logged values to the loggers now, as the training loop does after the step's
    ``on_train_batch_end`` hooks (``_logger_connector.on_batch_end``, ``update_train_step_metrics``)."""
    trainer._logger_connector.on_batch_end()
    trainer._logger_connector.update_train_step_metrics()


def skip_flat_hparams(obj: pl.LightningModule | pl.LightningDataModule) -> None:
    """Keep Lightning from logging ``obj``'s hyper-parameters flat (``_log_hyperparams``): capsdist logs the whole
    config once, nested."""
    obj._log_hyperparams = False


def experiment_started(logger: pl.loggers.Logger) -> bool:
    """Whether a logger's experiment (a W&B run) exists, without starting it (``_experiment``)."""
    return getattr(logger, "_experiment", None) is not None


def stops_mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit ends after this batch before its epoch does: max_steps, or a stop (max_time, early stopping)
    that the loop honours now (``fit_loop._can_stop_early``, ``epoch_loop._num_ready_batches_reached``)."""
    stops = 0 <= trainer.max_steps <= trainer.global_step
    stops = stops or (trainer.should_stop and trainer.fit_loop._can_stop_early)
    return stops and not trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def loops_state(trainer: pl.Trainer) -> dict[str, Any]:
    """A copy of the loops' state as a checkpoint holds it (``_checkpoint_connector._get_loops_state_dict``)."""
    return copy.deepcopy(trainer._checkpoint_connector._get_loops_state_dict())


def hpc_save_path(trainer: pl.Trainer, folder: str) -> str:
    """The next ``hpc_ckpt_N.ckpt`` path in ``folder``, as Lightning names SLURM checkpoints."""
    return trainer._checkpoint_connector.hpc_save_path(folder)


class _FitLoopRedoingValidation(_FitLoop):
    """``_FitLoop`` whose ``done`` (Lightning 2.6.6: true once max_steps is reached, checked before the epoch loop
    runs) waits for a validation pass the checkpoint was saved in the middle of."""

    @property
    def done(self) -> bool:
        progress, val_loop = self.epoch_loop.val_loop.batch_progress.total, self.epoch_loop.val_loop
        mid_validation = val_loop.restarting and progress.ready == progress.started == progress.processed + 1
        return super().done and not (mid_validation and progress.completed == progress.processed)


def redo_final_validation(trainer: pl.Trainer) -> None:
    """Let a fit resumed from a checkpoint saved during its last validation (at max_steps) go back into that pass
    as it does for any other: Lightning's fit loop would end at once (``_FitLoop.done``)."""
    if type(trainer.fit_loop) is _FitLoop:
        trainer.fit_loop.__class__ = _FitLoopRedoingValidation


def plain_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a LightningOptimizer (``_optimizer``), or ``optimizer`` itself."""
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


class LoggingStepThroughput(ThroughputMonitor):
    """ThroughputMonitor whose private ``_update`` (Lightning 2.6.6) does its work on logging steps only and counts
    the other steps' samples and batches on the host (``_samples``, ``_batches``): Lightning's reads the device
    clock every step. ``flops_since`` carries a model's FLOPs across the steps it skipped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flops_since: dict[Any, int] = {}

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        flops = getattr(pl_module, "flops_per_batch", None)
        self.flops_since[stage] = self.flops_since.get(stage, 0) + (flops or 0)
        if not is_logging_step(trainer):
            self._samples[stage] += self.batch_size_fn(batch)
            self._batches[stage] += 1
            return
        if flops is not None:  # Lightning's Throughput takes the FLOPs since its last update
            pl_module.flops_per_batch = self.flops_since[stage]
        super()._update(trainer, pl_module, batch, iter_num)
        if flops is not None:
            pl_module.flops_per_batch = flops
        self.flops_since[stage] = 0


class PrivateOverrides(LightningCLI):
    """LightningCLI private methods capsdist overrides (mixed into capsdist.training.cli.CapsCLI)."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI._parse_ckpt_path (Lightning 2.6.6) swaps in the hyperparameters a checkpoint was trained
        with. Keep the configured model instead: a checkpoint that does not fit the configured model is refused in
        CapsNetModule.on_load_checkpoint with the settings that differ."""


class PrivateFSDPOverrides(FSDPStrategy):
    """FSDPStrategy private methods capsdist overrides (the base of capsdist.parallel.strategies.CapsFSDPStrategy).

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


class PrivateDDPOverrides(DDPStrategy):
    """DDPStrategy private methods capsdist overrides (the base of capsdist.parallel.CapsuleParallelStrategy).

    DDPStrategy._setup_model (Lightning 2.6.6) wraps DDP over the whole world; capsule parallelism needs it over a
    subgroup (``ddp_group``). The CLI fills ``_ddp_kwargs`` with every DDP argument (jsonargparse follows
    ``**kwargs``), ``process_group=None`` too, so the group is set here last.
    """

    def ddp_group(self) -> torch.distributed.ProcessGroup | None:
        """The process group DDP averages gradients over (None: the whole world)."""
        return None

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        kwargs = {**self._ddp_kwargs, "process_group": self.ddp_group()}
        return DistributedDataParallel(model, device_ids=self.determine_ddp_device_ids(), **kwargs)
