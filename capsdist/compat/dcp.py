"""torch.distributed.checkpoint's private API, in one place: the classes its metadata pickle names (for the safe
reader's allow-list) and the ShardedTensor that lays a rank's block of rows into a checkpoint.

Written for torch 2.13. ShardedTensor is deprecated for DTensor, whose uneven splits are ``torch.chunk``'s, not
the row blocks capsule parallelism computes with (capsdist.checkpoint.rows); a DTensor layout would also change
the files of checkpoints already written. Canaries: tests/unit/test_compat.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

WRITTEN_FOR = "2.13.0"
# (module, name) -> the object DCP's metadata pickle may name, beyond DCP's public metadata classes
PRIVATE_METADATA_CLASSES: dict[tuple[str, str], Any] = {
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
}


def row_block_tensor(
    local: torch.Tensor, bounds: list[tuple[int, int]], rank: int, ranks: list[int], rows: int
) -> ShardedTensor:
    """``local`` (rows ``bounds[rank]`` of a tensor of ``rows`` rows) as a ShardedTensor of the whole, whose shard r
    lives on global rank ``ranks[r]``: DCP writes each rank's block and re-slices them for any other split."""
    tail = list(local.shape[1:])
    shards = [
        ShardMetadata([lo, *[0] * len(tail)], [hi - lo, *tail], f"rank:{ranks[r]}/{local.device}")
        for r, (lo, hi) in enumerate(bounds)
    ]
    props = TensorProperties(dtype=local.dtype, requires_grad=False)
    whole = ShardedTensorMetadata(shards, torch.Size([rows, *tail]), props)
    return ShardedTensor._init_from_local_shards_and_global_metadata([Shard(local, shards[rank])], whole)
