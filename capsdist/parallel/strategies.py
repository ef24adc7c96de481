"""Scale-out helpers: FSDP that shards CapsNet's routed capsule layers and decoder
(the signal policy is capsdist.training.stop).

DDP needs nothing from here: it is Lightning's choice for several devices (configs/strategy/ddp.yaml spells it
out). FSDP is picked in YAML with ``trainer.strategy: {class_path: capsdist.parallel.CapsFSDPStrategy}``
(configs/strategy/fsdp.yaml); it wraps each routed capsule layer (its W_ij tensor is most of a large CapsNet's
parameters) and the decoder as separate FSDP units, so each is gathered only while it computes.
:class:`capsdist.training.stop.GracefulStop` replaces Lightning's SIGUSR1/SIGTERM handlers, which run collectives inside
the signal handler and can deadlock a multi-rank job
(see capsdist.training.stop); the training CLI adds it to every run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    OptimStateKeyType,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from capsdist.checkpoint import sharded
from capsdist.compat.lightning import PrivateDDPOverrides, PrivateFSDPOverrides, plain_optimizer
from capsdist.core.errors import CapsdistError
from capsdist.model.capsnet import CapsLayer, Decoder
from capsdist.parallel import sharded_state
from capsdist.parallel.capsule_parallel import (
    ShardedCapsLayer,
    full_optimizer_state,
    full_state_dict,
    load_full_state_dict,
    optimizer_splits,
    row_splits,
    shard_capsnet,
)

__all__ = ["CapsFSDPStrategy", "CapsuleParallelStrategy", "ShardedCapsLayer", "capsnet_wrap_policy"]


def capsnet_wrap_policy() -> ModuleWrapPolicy:
    """FSDP units for CapsNet: every routed CapsLayer (holding W_ij) and the Decoder; the convs stay in the root."""
    return ModuleWrapPolicy({CapsLayer, Decoder})


class CapsFSDPStrategy(PrivateFSDPOverrides):
    """Lightning's FSDPStrategy with CapsNet's wrap policy and single-file (full) checkpoints, on GPUs and CPUs.

    On CUDA this is FSDPStrategy with other defaults. On CPU (gloo) it fills three gaps of Lightning 2.6 / torch
    FSDP1: Lightning rejects FSDP on CPU (its check matches the exact FSDPStrategy type, so this subclass passes);
    it hands FSDP ``device_id=None``, which FSDP refuses without an accelerator, so the model is wrapped with the
    CPU device (in ``capsdist.compat.lightning.PrivateFSDPOverrides``); and its full state-dict context offloads
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
        optimizer = plain_optimizer(optimizer)
        with context:
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


class GroupSizeError(CapsdistError):
    """The capsule group size does not divide the job's world size."""


class CapsuleParallelStrategy(PrivateDDPOverrides):
    """Capsule parallelism inside groups of ``group_size`` ranks, DDP across the groups.

    World W = G x N: ranks g*N .. g*N+N-1 form capsule group g; its PrimaryCaps maps and routed CapsLayers are
    split among them (capsdist.parallel.capsule_parallel) and
    they all train on the same batches. Ranks {k, N+k, 2N+k, ...}
    form data-parallel group k, and DDP all-reduces gradients only there: replicated parameters already get
    identical gradients across a capsule group (same batch; Conv1's summed over the group), and split slice k lives
    in data-parallel group k only.
    Checkpoints (``state_dict_type``): "sharded" (default) writes a ``NAME.ckpt/`` directory, each rank its own rows
    in parallel (capsdist.checkpoint.sharded), resumable on any number of ranks; "full" gathers whole weights and
    Adam moments into one file (loads in one process; needs them all in one rank's memory).
    """

    def __init__(self, group_size: int | None = None, state_dict_type: str = "sharded", **kwargs: Any) -> None:
        """``group_size``: ranks per capsule group (default: the whole job); ``state_dict_type``: "sharded" or
        "full" checkpoints; other arguments are DDPStrategy's."""
        super().__init__(**kwargs)
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(f"state_dict_type must be 'sharded' or 'full', got {state_dict_type!r}")
        self.group_size, self.state_dict_type = group_size, state_dict_type
        self._capsule_group: dist.ProcessGroup | None = None
        self._dp_group: dist.ProcessGroup | None = None
        self._sharded_resume: Path | None = None  # a sharded checkpoint being resumed: loaded after the split

    @property
    def _size(self) -> int:
        return self.group_size or self.world_size

    @property
    def data_parallel_rank(self) -> int:
        """This rank's place among the data streams (the index of its capsule group)."""
        return self.global_rank // self._size

    @property
    def data_parallel_size(self) -> int:
        """The number of distinct data streams (capsule groups)."""
        return self.world_size // self._size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Plain DataLoaders are split across capsule groups, not ranks."""
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    def setup_distributed(self) -> None:
        """The world's process group, then every capsule group and every data-parallel group."""
        super().setup_distributed()
        world, size = self.world_size, self._size
        if size < 1 or world % size:
            raise GroupSizeError(
                f"capsule group size {size} does not divide the {world} ranks of this job. Fix: set "
                f"trainer.strategy.init_args.group_size to a divisor of {world} (or leave it unset: one group)."
            )
        # new_group is a collective over the world: every rank creates every group, in the same order
        capsule = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]
        data = [dist.new_group(list(range(k, world, size))) for k in range(size)]
        self._capsule_group, self._dp_group = capsule[self.global_rank // size], data[self.global_rank % size]

    def _split(self) -> bool:
        return bool(row_splits(self.lightning_module))

    def setup(self, trainer: Any) -> None:
        """Split the module's CapsNet (once; a restored full checkpoint is already in it, a sharded one is loaded
        into the split model) before DDP wraps it."""
        if not self._split():
            model = self.lightning_module.model.to(self.root_device)
            if model.primary.channels < self._size:
                raise GroupSizeError(
                    f"a capsule group of {self._size} ranks cannot split {model.primary.channels} PrimaryCaps maps "
                    "(each rank computes whole maps). Fix: set trainer.strategy.init_args.group_size to at most "
                    f"{model.primary.channels}, or widen model.primary_channels."
                )
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)  # one initialisation on every rank, whatever each rank's seed
            shard_capsnet(model, self._capsule_group)
            if self._sharded_resume is not None:
                sharded_state.load_module(self._sharded_resume, self.lightning_module)
        super().setup(trainer)

    def ddp_group(self) -> dist.ProcessGroup | None:
        """DDP runs over this rank's data-parallel group only."""
        return self._dp_group

    def full_weights(self) -> dict[str, Any]:
        """The whole weights in the unsplit layout on every rank, whatever ``state_dict_type`` (a collective: the
        end-of-fit figures draw with a plain CapsNet)."""
        return full_state_dict(self.lightning_module)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's weights (sharded checkpoints) or the whole weights gathered from the capsule group (full)."""
        if self.state_dict_type == "sharded":
            return self.lightning_module.state_dict()
        return full_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """This rank's optimizer state (sharded) or one with the whole moments of every split tensor (full)."""
        optimizer = plain_optimizer(optimizer)
        if self.state_dict_type == "sharded":
            return optimizer.state_dict()
        return full_optimizer_state(self.lightning_module, optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Sharded: every rank writes its rows into the ``filepath`` directory (a collective). Full: one file."""
        if self.state_dict_type == "full":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        optimizers = [plain_optimizer(o) for o in self.optimizers]
        path = self.broadcast(str(filepath))  # every rank writes into rank 0's directory
        sharded.save(checkpoint, path, sharded_state.split_keys(self.lightning_module, optimizers))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A single file as Lightning reads it; a sharded directory's meta.pt, its tensors loaded once the model is
        split (`setup`, `load_optimizer_state_dict`). Its "state_dict" holds meta tensors of the saved shapes, for
        the module's model check."""
        if not sharded.is_sharded(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        self._sharded_resume = Path(checkpoint_path)
        shapes = sharded.saved_shapes(checkpoint_path)
        state = {k.removeprefix("state_dict/"): torch.empty(v, device="meta") for k, v in shapes.items()
                 if k.startswith("state_dict/")}  # fmt: skip
        return {**sharded.read_meta(checkpoint_path), "state_dict": state}

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Full weights into the split model (each rank takes its rows); a sharded checkpoint loads in `setup`."""
        if self._sharded_resume is not None:
            if self._split():
                sharded_state.load_module(self._sharded_resume, self.lightning_module)
            return
        if not self._split():
            return super().load_model_state_dict(checkpoint, strict=strict)
        load_full_state_dict(self.lightning_module, checkpoint["state_dict"])

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """This rank's rows of the moments of every split tensor, from a sharded directory or a full file."""
        if self._sharded_resume is not None:
            optimizers = [plain_optimizer(o) for o in self.optimizers]
            sharded_state.load_optimizers(self._sharded_resume, self.lightning_module, optimizers)
            return
        states = []
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=False):
            state = {**state, "state": dict(state["state"])}
            for index, split in optimizer_splits(self.lightning_module, optimizer).items():
                full = (split.rows, *split.param.shape[1:])
                if index in state["state"]:
                    state["state"][index] = {
                        k: v[split.lo : split.hi] if torch.is_tensor(v) and v.shape == full else v
                        for k, v in state["state"][index].items()
                    }
            states.append(state)
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})
