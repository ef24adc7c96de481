"""A module's and its optimizers' state in a sharded checkpoint: which flat keys are split (the capsule-parallel
parameters and their Adam moments) and loading them in place, each rank its own rows."""

from __future__ import annotations

from pathlib import Path

import torch

from capsdist.checkpoint.dcp_reader import SafeReader
from capsdist.checkpoint.rows import RowSplit
from capsdist.checkpoint.sharded import load, read_meta, unflatten
from capsdist.parallel.capsule_parallel import row_splits


def _params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]  # torch's state-dict numbering


def split_keys(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, RowSplit]:
    """Flat keys of the split tensors in a checkpoint of ``module`` and ``optimizers``: the split parameters and
    their optimizer moments (state tensors shaped like the parameter)."""
    splits = row_splits(module)
    keys = {f"state_dict/{k}": s for k, s in splits.items()}
    by_param = {id(s.param): s for s in splits.values()}
    for i, optimizer in enumerate(optimizers):
        for index, param in enumerate(_params(optimizer)):
            for name, value in optimizer.state.get(param, {}).items() if id(param) in by_param else ():
                if torch.is_tensor(value) and value.shape == param.shape:
                    keys[f"optimizer_states/{i}/state/{index}/{name}"] = by_param[id(param)]
    return keys


def load_module(path: str | Path, module: torch.nn.Module) -> None:
    """Load the model state of a sharded checkpoint into ``module`` (split or not) in place."""
    splits = {f"state_dict/{k}": s for k, s in row_splits(module).items()}
    load(path, {f"state_dict/{k}": v for k, v in module.state_dict().items()}, splits)


def load_optimizers(path: str | Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Load the optimizer states of a sharded checkpoint into the optimizers of ``module`` (this rank's rows of
    the moments of split parameters)."""
    metadata = SafeReader(str(path)).read_metadata().state_dict_metadata
    meta = read_meta(path)
    by_param = {id(s.param): s for s in row_splits(module).values()}
    for i, optimizer in enumerate(optimizers):
        params, prefix = _params(optimizer), f"optimizer_states/{i}/state/"
        targets, splits = {}, {}
        for key, md in metadata.items():
            index, _, name = key.removeprefix(prefix).partition("/")
            if not key.startswith(prefix) or int(index) >= len(params):
                continue  # another optimizer's, or one more parameter than configured: refused by load_state_dict
            param = params[int(index)]
            split = by_param.get(id(param))
            if split is not None and md.size == torch.Size([split.rows, *param.shape[1:]]):
                targets[key], splits[key] = torch.empty_like(param, dtype=md.properties.dtype), split
            else:
                targets[key] = torch.empty(md.size, dtype=md.properties.dtype, device=param.device)
        load(path, targets, splits)
        optimizer.load_state_dict(unflatten(targets, meta)["optimizer_states"][i])
