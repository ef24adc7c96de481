"""Reading MultiMNIST shards: URL expansion, a lean tar reader, corrupt-sample skipping and the shard stream.

Training uses ``wds.ResampledShards`` (each rank/worker draws shards with its own seed, so uneven or few shards
never starve a rank), a seeded shuffle buffer, decoding and batching inside the workers, and a fixed number of
batches per rank per epoch, so DDP never hangs. Validation is one exact pass, shards split by rank then worker.
Corrupt samples are skipped, counted and logged (``SkipCounter``), never fatal. Worker streams are seeded by
(seed, epoch, rank, logical worker): a resume is exact only for the same ``num_workers`` and world size
(``ResumableLoader`` refuses any other). This is the only module that imports webdataset.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import url_opener

from capsdist.data import recipe
from capsdist.data.batch import SHARDS, SHUFFLE, Batch, DataError, worker
from capsdist.data.shard_format import collate_inflated, inflate_sample, read_manifest

log = logging.getLogger(__name__)
_TAR_BLOCK = 512
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped like webdataset does


def expand_shards(spec: str | Sequence[str] | None) -> list[str]:
    """Shard URLs from paths, directories (their *.tar), brace patterns, URLs and ``pipe:`` commands."""
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    urls: list[str] = []
    for s in specs:
        for url in wds.shardlists.expand_urls(str(s)):
            if url.startswith("pipe:") or "://" in url:
                urls.append(url)
            elif Path(url).is_dir():
                urls.extend(sorted(str(p) for p in Path(url).glob("*.tar")))
            elif Path(url).is_file():
                urls.append(url)
            else:
                raise DataError(
                    f"shard {url!r} (from {s!r}) does not exist. Fix: point train_shards/val_shards at shards "
                    "written by `python -m data_prep.multimnist --out DIR` (a directory, a brace pattern such as "
                    "DIR/train-{000000..000059}.tar, a URL or a pipe: command)."
                )
    if not urls:
        raise DataError(
            f"no shards in {spec!r}. Fix: set train_shards/val_shards to shard files, a directory of them or a "
            "brace pattern; create them with `python -m data_prep.multimnist --split train --out DIR ...`."
        )
    return urls



class SkipCounter:
    """A webdataset handler that skips, counts and logs corrupt samples instead of stopping the run."""

    def __init__(self, rank: int = 0) -> None:
        """Start at zero skips; ``rank`` only labels the log lines."""
        self.count, self.rank = 0, rank

    def __call__(self, exn: Exception) -> bool:
        """Count and log one failure; True tells webdataset to continue."""
        self.count += 1
        where = f"rank {self.rank} worker {worker()[0]}"
        log.warning("skipped corrupt sample (%d so far on %s): %s: %s", self.count, where, type(exn).__name__, exn)
        return True


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a ustar stream, checksums verified; a lean stand-in for ``tarfile``.

    Like ``tarfile``'s stream mode, a missing or cut end-of-archive header ends the archive quietly; cut member
    data is an error. Pax and GNU long-name extensions are errors (the shard writer uses neither).
    """
    while True:
        header = stream.read(_TAR_BLOCK)
        if len(header) < _TAR_BLOCK or not header.strip(b"\0"):
            return
        # the checksum counts its own field as spaces; dropping zero bytes first makes the sum 3x cheaper
        if int(header[148:156].strip(b"\0 "), 8) != sum(header.translate(None, b"\0")) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"bad tar header checksum: {header[:100].rstrip(bytes(1))!r}")
        size, kind = int(header[124:136].strip(b"\0 ") or b"0", 8), header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise ValueError(f"unsupported tar extension header {kind!r}")
        data = stream.read(size + -size % _TAR_BLOCK)
        if len(data) < size:
            raise ValueError("unexpected end of data in a tar member")
        if kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            yield name, data[:size]


def _shard_samples(sources: Iterator[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's tar expansion + grouping by key, leaner: {"__key__", "__url__", suffix: bytes} per sample."""
    for source in sources:
        sample: dict[str, Any] | None = None
        try:
            for name, data in _tar_members(source["stream"]):
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                if dot <= slash or _TAR_META.match(name):
                    continue
                key, suffix = name[:dot], name[dot + 1 :].lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": source["url"]}
                if suffix in sample:
                    raise ValueError(f"{name}: duplicate file name in a tar sample")
                sample[suffix] = data
        except Exception as exn:
            exn.args = (*exn.args, source["url"])
            if not handler(exn):
                raise
        if sample is not None:
            yield sample


class ShardStream(IterableDataset):
    """MultiMNIST batches from WebDataset shards; train = resampled and infinite (the loader cuts epochs)."""

    resume_needs_same_workers = True  # worker streams are seeded per logical worker

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 2000,
        num_batches: int | None = None,
    ) -> None:
        """``num_batches``: batches per rank per epoch (required for training; caps validation)."""
        if train and not num_batches:
            raise DataError("training on shards needs a fixed epoch length. Fix: set train_batches_per_epoch.")
        self.urls, self.batch_size, self.train = list(urls), batch_size, train
        read_manifest(self.urls)  # refuses shards of an unknown format version
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.num_batches = shuffle_buffer, num_batches
        self.skipped = SkipCounter(rank)
        self.epoch, self.start = 0, 0  # set by ResumableLoader before each iter()

    def __len__(self) -> int:
        """Batches per epoch; validation without a cap has no length."""
        if self.num_batches is None:
            raise TypeError("uncapped validation shard stream has no length")
        return self.num_batches

    def rank_shards(self) -> list[str]:
        """Validation shards of this rank (node split; workers split further)."""
        return self.urls[self.rank :: self.world_size]

    def pipeline(self, logical_worker: int) -> wds.DataPipeline:
        """The webdataset pipeline of one worker: shards -> samples -> (shuffle) -> decode -> batches."""
        keys = (self.seed, SHARDS, self.epoch, self.rank, logical_worker)
        if self.train:
            source = [wds.ResampledShards(self.urls, worker_seed=lambda: recipe.mix_seed(*keys), deterministic=True)]
            rng = random.Random(recipe.mix_seed(*keys, SHUFFLE))
            mixing = [wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)]
        else:
            source, mixing = [wds.SimpleShardList(self.rank_shards()), wds.split_by_worker], []
        return wds.DataPipeline(
            *source,
            partial(url_opener, handler=self.skipped),
            partial(_shard_samples, handler=self.skipped),
            *mixing,
            wds.map(inflate_sample, handler=self.skipped),
            wds.batched(self.batch_size, collation_fn=collate_inflated, partial=not self.train),
        )

    def __iter__(self) -> Iterator[Batch]:
        """This worker's batches; on resume, worker ``w`` plays logical worker ``(w + start) % W`` and skips ahead."""
        w, n = worker()
        logical = (w + self.start) % n
        done = len(range(logical, self.start, n))  # batches this logical worker handed out before the resume point
        return islice(iter(self.pipeline(logical)), done, None)

