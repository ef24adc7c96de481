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
import torch.distributed as dist
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import DDPStrategy
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    OptimStateKeyType,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel

from capsdist import CapsdistError
from capsdist.capsule_parallel import (  # capsule parallelism lives in its own pure-torch module
    ShardedCapsLayer,
    full_state_dict,
    load_full_state_dict,
    shard_capsnet,
)
from capsdist.lightning_compat import PrivateFSDPOverrides
from capsdist.model import CapsLayer, Decoder

__all__ = ["CapsFSDPStrategy", "CapsuleParallelStrategy", "ShardedCapsLayer", "capsnet_wrap_policy"]


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


class GroupSizeError(CapsdistError):
    """The capsule group size does not divide the job's world size."""


class CapsuleParallelStrategy(DDPStrategy):
    """Capsule parallelism inside groups of ``group_size`` ranks, DDP across the groups.

    World W = G x N: ranks g*N .. g*N+N-1 form capsule group g; each routed CapsLayer is split among them by input
    capsules (capsdist.capsule_parallel) and they all train on the same batches. Ranks {k, N+k, 2N+k, ...} form
    data-parallel group k, and DDP all-reduces gradients only there: replicated parameters already get identical
    gradients across a capsule group (same batch, full dL/du), and W slice k lives in data-parallel group k only.
    Checkpoints hold full weights and full Adam moments (they load in one process; resume re-slices them).
    """

    def __init__(self, group_size: int | None = None, **kwargs: Any) -> None:
        """``group_size``: ranks per capsule group (default: the whole job); other arguments are DDPStrategy's."""
        super().__init__(**kwargs)
        self.group_size = group_size
        self._capsule_group: dist.ProcessGroup | None = None
        self._dp_group: dist.ProcessGroup | None = None

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

    def _sharded(self) -> list[ShardedCapsLayer]:
        return [m for m in self.lightning_module.modules() if isinstance(m, ShardedCapsLayer)]

    def setup(self, trainer: Any) -> None:
        """Shard the module's CapsNet (once; a restored checkpoint is already in it, full) before DDP wraps it."""
        if not self._sharded():
            model = self.lightning_module.model.to(self.root_device)
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)  # one initialisation on every rank, whatever each rank's seed
            shard_capsnet(model, self._capsule_group)
        super().setup(trainer)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        """DDP over this rank's data-parallel group only."""
        # the CLI fills _ddp_kwargs with every DDP argument (jsonargparse follows **kwargs), process_group=None too
        kwargs = {**self._ddp_kwargs, "process_group": self._dp_group}
        return DistributedDataParallel(model, device_ids=self.determine_ddp_device_ids(), **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full weights, W gathered from the capsule group (a collective: every rank saves)."""
        return full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Full weights into the sharded model: each rank takes its W slice."""
        if not self._sharded():
            return super().load_model_state_dict(checkpoint, strict=strict)
        load_full_state_dict(self.lightning_module, checkpoint["state_dict"])

    def _sharded_params(self, optimizer: torch.optim.Optimizer) -> dict[int, ShardedCapsLayer]:
        """Optimizer state index (torch's numbering over param_groups) -> the sharded layer owning that W."""
        owner = {id(layer.weight): layer for layer in self._sharded()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state with full moments of every sharded W (a collective), like a one-process run's."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state = optimizer.state_dict()
        for index, layer in self._sharded_params(optimizer).items():
            if index in state["state"]:  # new dicts: the packed state shares its entries with the live optimizer
                state["state"][index] = {
                    k: layer.gather_rows(v) if torch.is_tensor(v) and v.shape == layer.weight.shape else v
                    for k, v in state["state"][index].items()
                }
        return state

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Slice the full moments of every sharded W back to this rank's rows."""
        states = []
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=False):
            state = {**state, "state": dict(state["state"])}
            for index, layer in self._sharded_params(optimizer).items():
                full = (layer.n_in, *layer.weight.shape[1:])
                if index in state["state"]:
                    state["state"][index] = {
                        k: v[layer.lo : layer.hi] if torch.is_tensor(v) and v.shape == full else v
                        for k, v in state["state"][index].items()
                    }
            states.append(state)
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})
