"""All runtime data for capsdist: MNIST, MultiMNIST on the fly or on the device, WebDataset shards, DataModules.

One job per module, imported in one direction (``data_prep`` imports these, never the other way round):

  - ``batch``: the batch contract every loader yields, ``DataError``, seed namespaces, worker placement.
  - ``mnist``: find, download, verify and read the four official IDX files.
  - ``recipe``: the MultiMNIST overlay and the MNIST shift, as device-agnostic batched torch ops.
  - ``streams``: in-memory streams (MNIST, MultiMNIST on the fly); ``device``: MultiMNIST composed on a GPU.
  - ``shard_format``: the MultiMNIST shard format (keys, geometry, version, encoder, decoder); ``image_format``:
    the labelled-image shard format (one png/jpg/npy and a cls per sample); ``shard_plan``: which samples
    a shard holds; ``shard_urls``: what a shard setting opens (expanded, bounded, checked); ``shards``: the
    shard reader (these two import webdataset).
  - ``loader``: ``ResumableLoader`` and its checked resume state; ``modules``: one LightningDataModule per source.

Names are exported lazily, so ``import capsdist.data.mnist`` pulls in neither Lightning nor webdataset.
"""

from __future__ import annotations

from capsdist.core.lazy import lazy_exports

_EXPORTS = {
    "Batch": ".batch",
    "DataError": ".batch",
    "to_batch": ".batch",
    "BatchStream": ".streams",
    "MnistStream": ".streams",
    "OnTheFlyMultiMnist": ".streams",
    "FixedMultiMnist": ".streams",
    "DeviceMultiMnist": ".device",
    "ResumableLoader": ".loader",
    "ShardStream": ".shards",
    "SkipCounter": ".shards",
    "expand_shards": ".shard_urls",
    "manifest_total": ".shard_format",
    "BaseData": ".modules",
    "MnistData": ".modules",
    "OnTheFlyData": ".modules",
    "ShardData": ".modules",
    "ImageShardData": ".modules",
    "ImageFormat": ".image_format",
    "CapsDataModule": ".modules",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
