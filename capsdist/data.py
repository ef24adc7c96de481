"""All runtime data for capsdist: MNIST, MultiMNIST on the fly or on the device, WebDataset shards, the DataModule.

Every loader yields the contract's batch dict ``{"image": f32 [B,1,H,W], "labels": i64 [B,K], "recon": f32
[B,K,1,H,W]}`` (values in [0, 1]); MultiMNIST geometry comes from ``data_prep.recipe`` (one implementation for
shards, on-the-fly and device generation).

Sources (``CapsDataModule(source=...)``):
  - ``mnist``: the IDX arrays in memory, the paper's augmentation (shift of up to ``max_shift`` px, zero padded);
    recon = the shifted image. Validation = the official 10k test split, unshifted.
  - ``multimnist_onthefly``: pairs drawn from the MNIST train split (validation: a fixed stream from the test
    split); ``generate_on_device=True`` makes workers ship only indices/offsets and composes on the GPU in
    ``on_after_batch_transfer`` (same samples, no CPU image work).
  - ``multimnist_shards``: WebDataset tar shards (paths, directories, brace patterns, URLs, ``pipe:``). Training
    uses ``wds.ResampledShards`` (each rank/worker draws shards with its own seed, so uneven or few shards never
    starve a rank), a seeded shuffle buffer, decoding and batching inside the workers, and a fixed number of batches
    per rank per epoch, so DDP never hangs. Validation is one exact pass, shards split by rank then worker.
    Corrupt samples are skipped, counted and logged (``SkipCounter``), never fatal.

Determinism and resume:
  - Batch ``j`` of epoch ``e`` on rank ``r`` is a pure function of (seed, e, r, j) for the in-memory and on-the-fly
    sources: worker ``w`` of ``W`` produces batches ``start + w, start + w + W, ...``, which torch's in-order
    loader interleaves back into ``start, start + 1, ...``. The stream does not depend on the number of workers,
    and no two workers or ranks share a seed.
  - For shards, worker streams are seeded by (seed, e, r, logical worker); resume is exact for an unchanged
    ``num_workers`` (the skipped batches are decoded and dropped by their worker).
  - ``ResumableLoader`` implements ``state_dict()/load_state_dict()`` = ``{"epoch", "batches"}`` (batches handed
    out this epoch). Lightning 2.6 stores it in checkpoints (``fit_loop.on_save_checkpoint`` ->
    ``CombinedLoader._state_dicts``) and on restart calls ``load_state_dict`` in ``FitLoop.setup_data`` *before*
    ``iter()``; the next ``iter()`` then starts at batch ``batches`` if the epoch matches, else at 0.
  - The epoch is read at ``iter()`` time from the trainer (``trainer.current_epoch``, restored from the checkpoint),
    not counted from iterators; workers are not persistent, so each epoch's seeds reach fresh workers.
  The train loader has a length, so Lightning does not prefetch past the batch it trains on: ``batches`` is
  exactly the number of batches trained on when the checkpoint was written.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import url_opener

from capsdist import CapsdistError
from data_prep import mnist, recipe

Source = Literal["mnist", "multimnist_shards", "multimnist_onthefly"]
Batch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

# seed-key namespaces, so no two random streams share a seed
_PERM, _SHIFT, _ONTHEFLY, _ONTHEFLY_VAL, _SHARDS, _SHUFFLE = range(11, 17)


class DataError(CapsdistError, ValueError):
    """Bad data configuration (no shards, missing files, impossible epoch length); the message names the fix."""


def to_batch(image: torch.Tensor, labels: torch.Tensor, recon: torch.Tensor) -> Batch:
    """Contract batch dict from uint8 images [B,H,W], long labels [B,K] and uint8 recon targets [B,K,H,W]."""
    return {
        "image": image.unsqueeze(1).float().div_(255),
        "labels": labels.long(),
        "recon": recon.unsqueeze(2).float().div_(255),
    }


def multimnist_from_draw(
    images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
) -> Batch:
    """Compose drawn pairs into a MultiMNIST batch on the device ``images`` live on."""
    overlay, placed = recipe.compose(images, indices, offsets)
    return to_batch(overlay, labels[indices], placed)


def multimnist_batch(images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator) -> Batch:
    """A fresh MultiMNIST batch, drawn and composed entirely on the generator's device (CPU or GPU)."""
    first = torch.randint(len(labels), (batch_size,), generator=gen, device=labels.device)
    indices, offsets = recipe.draw(labels, first, gen)
    return multimnist_from_draw(images, labels, indices, offsets)


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader process, (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class BatchStream(IterableDataset):
    """Base of the in-memory streams: batch ``j`` of an epoch is ``make_batch(epoch, j)``, a pure function."""

    def __init__(self, num_batches: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        """Stream of ``num_batches`` batches per epoch for ``rank`` of ``world_size``."""
        if num_batches <= 0:
            raise DataError(f"{type(self).__name__}: 0 batches per epoch. Fix: lower batch_size or add samples.")
        self.num_batches, self.seed, self.rank, self.world_size = num_batches, seed, rank, world_size
        self.epoch, self.start = 0, 0  # set by ResumableLoader before each iter()

    def __len__(self) -> int:
        """Batches per epoch (full epoch, also when resuming mid-epoch)."""
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        """This worker's share of batches ``start..num_batches-1``, round-robin from worker 0."""
        w, n = _worker()
        for j in range(self.start + w, self.num_batches, n):
            yield self.make_batch(self.epoch, j)

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j`` of ``epoch`` (subclasses)."""
        raise NotImplementedError


class MnistStream(BatchStream):
    """MNIST from memory; training shuffles per epoch and shifts by up to ``max_shift`` px, validation does neither."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_shift: int = 2,
        num_batches: int | None = None,
    ) -> None:
        """Train: equal per-rank shares, full batches only; val: every sample once, split across ranks."""
        self.images, self.labels, self.batch_size = images, labels.long(), batch_size
        self.train, self.max_shift = train, max_shift
        share = len(labels) // world_size if train else len(range(rank, len(labels), world_size))
        full = share // batch_size if train else math.ceil(share / batch_size)
        if num_batches is not None and num_batches > full:
            raise DataError(f"train_batches_per_epoch={num_batches} > {full} available on MNIST for this rank.")
        self.share = share
        self._order: tuple[int, torch.Tensor] | None = None
        super().__init__(num_batches or full, seed, rank, world_size)

    def _rank_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for an epoch (cached per worker)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.labels)
            perm = torch.randperm(n, generator=recipe.generator("cpu", self.seed, _PERM, epoch)) if self.train else None
            order = (perm if perm is not None else torch.arange(n))[self.rank :: self.world_size][: self.share]
            self._order = (epoch, order)
        return self._order[1]

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j``: the ``j``-th slice of this rank's order, shifted when training."""
        idx = self._rank_order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        images = self.images[idx]
        if self.train and self.max_shift:
            gen = recipe.generator("cpu", self.seed, _SHIFT, epoch, self.rank, j)
            offsets = torch.randint(2 * self.max_shift + 1, (len(idx), 2), generator=gen)
            images = recipe.shift(images, offsets, self.max_shift)
        return to_batch(images, self.labels[idx, None], images[:, None])


class OnTheFlyMultiMnist(BatchStream):
    """MultiMNIST drawn from MNIST arrays in memory, the same recipe as the shards; optionally draws only."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        draw_only: bool = False,
    ) -> None:
        """``draw_only``: yield {"indices", "offsets"} and leave composing to ``DeviceMultiMnist.compose``."""
        self.images, self.labels, self.batch_size = images, labels.long(), batch_size
        self.tag, self.draw_only = (_ONTHEFLY if train else _ONTHEFLY_VAL), draw_only
        super().__init__(num_batches, seed, rank, world_size)

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j`` of ``epoch``: pairs of different classes at offsets 0..8 (validation ignores the epoch)."""
        epoch = epoch if self.tag == _ONTHEFLY else 0
        gen = recipe.generator("cpu", self.seed, self.tag, epoch, self.rank, j)
        first = torch.randint(len(self.labels), (self.batch_size,), generator=gen)
        indices, offsets = recipe.draw(self.labels, first, gen)
        if self.draw_only:
            return {"indices": indices, "offsets": offsets}
        return multimnist_from_draw(self.images, self.labels, indices, offsets)


class DeviceMultiMnist:
    """MultiMNIST generated on a device (index gather + shifted add), for when CPU workers would starve a GPU."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str, seed: int = 0) -> None:
        """Copy the MNIST split (uint8 [N,28,28], labels [N]) to ``device`` once."""
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels).long().to(device)
        self.seed = seed

    def batch(self, batch_size: int, epoch: int = 0, step: int = 0, rank: int = 0) -> Batch:
        """A batch drawn with a device generator seeded by (seed, epoch, rank, step)."""
        gen = recipe.generator(self.images.device, self.seed, _ONTHEFLY, epoch, rank, step)
        return multimnist_batch(self.images, self.labels, batch_size, gen)

    def compose(self, draws: Batch) -> Batch:
        """Compose a ``draw_only`` batch ({"indices", "offsets"} on this device) into a contract batch."""
        return multimnist_from_draw(self.images, self.labels, draws["indices"], draws["offsets"])


# ------------------------------------------------------------------------------------------------ shards


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


def manifest_total(urls: Sequence[str]) -> int | None:
    """Total samples listed in the manifest.json beside local shards, or None when there is none."""
    path = Path(urls[0]).parent / "manifest.json" if Path(urls[0]).is_file() else None
    if path is None or not path.is_file():
        return None
    names = {Path(u).name for u in urls}
    return sum(s["count"] for s in json.loads(path.read_text())["shards"] if s["name"] in names)


class SkipCounter:
    """A webdataset handler that skips, counts and logs corrupt samples instead of stopping the run."""

    def __init__(self, rank: int = 0) -> None:
        """Start at zero skips; ``rank`` only labels the log lines."""
        self.count, self.rank = 0, rank

    def __call__(self, exn: Exception) -> bool:
        """Count and log one failure; True tells webdataset to continue."""
        self.count += 1
        where = f"rank {self.rank} worker {_worker()[0]}"
        log.warning("skipped corrupt sample (%d so far on %s): %s: %s", self.count, where, type(exn).__name__, exn)
        return True


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.pack(">IIBBBBB", recipe.CANVAS, recipe.CANVAS, 8, 0, 0, 0, 0)  # 8-bit grayscale, not interlaced
_IHDR_CHUNK = struct.pack(">I4s13sI", 13, b"IHDR", _IHDR, zlib.crc32(b"IHDR" + _IHDR))  # the only header we accept
_ROW = recipe.CANVAS + 1  # a PNG scanline: filter type byte + pixels
_ZERO_ROW = bytes(_ROW)
_TAR_BLOCK = 512
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped like webdataset does
_Inflated = tuple[bytes, bytes, bytes, list[int]]  # filtered scanlines of input, digit0, digit1; the two labels


def _inflate_png(data: bytes) -> bytes:
    """Checked, inflated scanlines of a 36x36 8-bit grayscale PNG (CRCs, header, size, filter types); else an error."""
    if data[:8] != _PNG_SIGNATURE:
        raise UnidentifiedImageError(f"not a PNG (starts with {data[:8]!r})")
    if data[8:33] != _IHDR_CHUNK:
        raise ValueError(f"expected a 36x36 8-bit grayscale non-interlaced PNG, got header {data[8:33]!r}")
    pos, idat = 33, []
    while True:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            raise ValueError(f"truncated PNG or bad CRC in its {kind!r} chunk")
        if kind == b"IDAT":
            idat.append(data[pos + 8 : end])
        elif kind == b"IEND":
            break
        elif not kind[0] & 32:  # an unknown critical chunk (PLTE, a second IHDR) changes the meaning
            raise ValueError(f"unexpected critical PNG chunk {kind!r}")
        pos = end + 4
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != _ROW * recipe.CANVAS or max(raw[::_ROW]) > 4:
        raise ValueError(f"PNG data of {len(raw)} bytes or a filter type > 4, not 36 rows of 1 + 36 bytes")
    return raw


def _unfilter(raws: Sequence[bytes]) -> np.ndarray:
    """uint8 [N,36,36] from inflated PNG scanlines: one C pass (PIL's PNG row unfilter) over all N images at once.

    Each image follows an all-zero scanline, which is what PNG's first row sees as the row above.
    """
    stored = zlib.compress(_ZERO_ROW + _ZERO_ROW.join(raws), 0)  # level 0: framing only, no compression work
    canvas = Image.frombytes("L", (recipe.CANVAS, _ROW * len(raws)), stored, "zip", "L")
    return np.frombuffer(bytearray(canvas.tobytes()), np.uint8).reshape(len(raws), _ROW, recipe.CANVAS)[:, 1:]


def _inflate_sample(sample: dict[str, Any]) -> _Inflated:
    """Check and inflate one shard sample (PNG and JSON only; other extensions are ignored, nothing is unpickled)."""
    labels = json.loads(sample["meta.json"].decode())["labels"]  # UTF-8, as written; skips encoding sniffing
    if not (isinstance(labels, list) and len(labels) == 2 and all(type(x) is int for x in labels)):
        raise ValueError(f"{sample.get('__key__')}: meta labels {labels!r} are not two digits")
    return (*(_inflate_png(sample[k]) for k in ("input.png", "digit0.png", "digit1.png")), labels)


def _collate_inflated(samples: list[_Inflated]) -> Batch:
    """Contract batch from inflated samples: the whole batch is unfiltered in one pass and converted once."""
    pixels = torch.from_numpy(_unfilter([raw for s in samples for raw in s[:3]])).unflatten(0, (len(samples), 3))
    return to_batch(pixels[:, 0], torch.tensor([s[3] for s in samples]), pixels[:, 1:])


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
        keys = (self.seed, _SHARDS, self.epoch, self.rank, logical_worker)
        if self.train:
            source = [wds.ResampledShards(self.urls, worker_seed=lambda: recipe.mix_seed(*keys), deterministic=True)]
            rng = random.Random(recipe.mix_seed(*keys, _SHUFFLE))
            mixing = [wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)]
        else:
            source, mixing = [wds.SimpleShardList(self.rank_shards()), wds.split_by_worker], []
        return wds.DataPipeline(
            *source,
            partial(url_opener, handler=self.skipped),
            partial(_shard_samples, handler=self.skipped),
            *mixing,
            wds.map(_inflate_sample, handler=self.skipped),
            wds.batched(self.batch_size, collation_fn=_collate_inflated, partial=not self.train),
        )

    def __iter__(self) -> Iterator[Batch]:
        """This worker's batches; on resume, worker ``w`` plays logical worker ``(w + start) % W`` and skips ahead."""
        w, n = _worker()
        logical = (w + self.start) % n
        done = len(range(logical, self.start, n))  # batches this logical worker handed out before the resume point
        return islice(iter(self.pipeline(logical)), done, None)


Stream = BatchStream | ShardStream


class ResumableLoader(DataLoader):
    """DataLoader over a stream: batching in the stream, epoch from a callback, mid-epoch resumable state."""

    def __init__(
        self, dataset: Stream, num_workers: int = 0, epoch_fn: Callable[[], int] | None = None, pin_memory: bool = False
    ) -> None:
        """``epoch_fn`` (e.g. the trainer's current_epoch) is read at every ``iter()``; default ``set_epoch`` value."""
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.epoch_fn, self.epoch, self.batches = epoch_fn, 0, 0
        self._pending: dict[str, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Epoch to use when no ``epoch_fn`` is given."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        """Iterate the epoch, starting after the batches recorded by ``load_state_dict`` if it is the same epoch."""
        epoch = self.epoch_fn() if self.epoch_fn else self.epoch
        pending, self._pending = self._pending, None
        start = pending["batches"] if pending and pending["epoch"] == epoch else 0
        self.dataset.epoch, self.dataset.start = epoch, start
        self.epoch, self.batches = epoch, start
        total = getattr(self.dataset, "num_batches", None)
        for batch in islice(super().__iter__(), None if total is None else max(0, total - start)):
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: {"epoch", "batches" handed out}."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state`` at the next ``iter()``."""
        self._pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def decode_rate(urls: Sequence[str], num_workers: int = 1, batch_size: int = 128) -> float:
    """Samples/s of one pass over shards through the validation pipeline (PNG decode + batching), after warm-up."""
    batches = iter(ResumableLoader(ShardStream(expand_shards(urls), batch_size, train=False), num_workers=num_workers))
    next(batches)  # worker start-up is not decoding
    t0 = time.perf_counter()
    count = sum(len(b["labels"]) for b in batches)
    return count / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ DataModule


class CapsDataModule(pl.LightningDataModule):
    """MNIST / MultiMNIST for CapsNet training; every init argument is plain and typed for LightningCLI."""

    def __init__(
        self,
        source: Source = "mnist",
        mnist_dir: str | None = None,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        train_batches_per_epoch: int | None = None,
        val_batches: int | None = None,
        train_samples: int | None = None,
        val_samples: int | None = None,
        max_shift: int = 2,
        seed: int = 0,
        generate_on_device: bool = False,
        pin_memory: bool = False,
    ) -> None:
        """Data for one run.

        Args:
            source: "mnist", "multimnist_shards" or "multimnist_onthefly".
            mnist_dir: MNIST folder (default: $CAPSDIST_MNIST_DIR, the repo's data/mnist, then a download).
            train_shards: shards for "multimnist_shards" (paths, directories, brace patterns, URLs, pipe:).
            val_shards: validation shards for "multimnist_shards".
            batch_size: samples per batch per rank.
            num_workers: DataLoader worker processes per rank.
            shuffle_buffer: samples in each shard worker's shuffle buffer.
            train_batches_per_epoch: batches per rank per epoch (default: derived from the data size).
            val_batches: cap on validation batches per rank.
            train_samples: mnist: use only the first N training images; streams: N samples per epoch (all ranks).
            val_samples: mnist: first N test images; on-the-fly: N validation samples (default 10000).
            max_shift: MNIST augmentation, random shift of up to this many pixels (paper: 2; 0 disables).
            seed: base seed of every random stream (combined with epoch, rank and batch/worker).
            generate_on_device: on-the-fly only: workers draw indices/offsets, the images are composed on the GPU.
            pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        """
        super().__init__()
        if source not in ("mnist", "multimnist_shards", "multimnist_onthefly"):
            raise DataError(f"unknown source {source!r}. Fix: mnist, multimnist_shards or multimnist_onthefly.")
        if generate_on_device and source != "multimnist_onthefly":
            raise DataError("generate_on_device needs source=multimnist_onthefly.")
        self.save_hyperparameters()
        self.source, self.mnist_dir = source, mnist_dir
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.train_batches_per_epoch, self.val_batches = train_batches_per_epoch, val_batches
        self.train_samples, self.val_samples = train_samples, val_samples
        self.max_shift, self.seed = max_shift, seed
        self.generate_on_device, self.pin_memory = generate_on_device, pin_memory
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._device_gen: DeviceMultiMnist | None = None

    @property
    def image_size(self) -> int:
        """Input height/width: 28 for MNIST, 36 for MultiMNIST (known before setup, for link_arguments)."""
        return recipe.DIGIT if self.source == "mnist" else recipe.CANVAS

    @property
    def num_targets(self) -> int:
        """Digits per image (K): 1 for MNIST, 2 for MultiMNIST."""
        return 1 if self.source == "mnist" else 2

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) from the trainer, (0, 1) without one."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _stream_args(self) -> dict[str, int]:
        """Seed and rank placement shared by every stream of this module."""
        rank, world = self._rank()
        return {"seed": self.seed, "rank": rank, "world_size": world}

    def _epoch(self) -> int:
        """The trainer's current epoch (restored on resume), 0 without a trainer."""
        return self.trainer.current_epoch if self.trainer else 0

    def setup(self, stage: str | None = None) -> None:
        """Load the MNIST splits the source needs (shards need none)."""
        if self.source == "multimnist_shards" or self._splits:
            return
        folder = mnist.resolve_dir(self.mnist_dir)
        for split, cap in (("train", self.train_samples if self.source == "mnist" else None), ("test", None)):
            images, labels = mnist.load(folder, split)
            self._splits[split] = (torch.from_numpy(images[:cap]), torch.from_numpy(labels[:cap]).long())

    def _stream_batches(self, samples: int | None, default: int, rank_batches: int | None) -> int:
        """Batches per rank per epoch: explicit, else samples / (world * batch)."""
        if rank_batches:
            return rank_batches
        return (samples or default) // (self._rank()[1] * self.batch_size)

    def _loader(self, dataset: Stream, epoch_fn: Callable[[], int] | None) -> ResumableLoader:
        """A ResumableLoader with this module's worker settings."""
        return ResumableLoader(dataset, self.num_workers, epoch_fn, self.pin_memory)

    def train_dataloader(self) -> ResumableLoader:
        """The training stream of this rank (fixed length, resumable)."""
        common = self._stream_args()
        if self.source == "multimnist_shards":
            urls = expand_shards(self.train_shards)
            total = self.train_samples or manifest_total(urls)
            if not (self.train_batches_per_epoch or total):
                raise DataError(
                    "cannot size a shard epoch: no manifest.json beside the shards. "
                    "Fix: set train_batches_per_epoch (or train_samples)."
                )
            n = self._stream_batches(total, 0, self.train_batches_per_epoch)
            stream: Stream = ShardStream(
                urls, self.batch_size, True, shuffle_buffer=self.shuffle_buffer, num_batches=n, **common
            )
        elif self.source == "mnist":
            images, labels = self._splits["train"]
            stream = MnistStream(
                images,
                labels,
                self.batch_size,
                True,
                max_shift=self.max_shift,
                num_batches=self.train_batches_per_epoch,
                **common,
            )
        else:
            images, labels = self._splits["train"]
            n = self._stream_batches(self.train_samples, len(labels), self.train_batches_per_epoch)
            stream = OnTheFlyMultiMnist(images, labels, self.batch_size, n, draw_only=self.generate_on_device, **common)
        return self._loader(stream, self._epoch)

    def val_dataloader(self) -> ResumableLoader:
        """The validation stream of this rank (the same samples every epoch)."""
        common = self._stream_args()
        if self.source == "multimnist_shards":
            stream: Stream = ShardStream(
                expand_shards(self.val_shards), self.batch_size, False, num_batches=self.val_batches, **common
            )
        elif self.source == "mnist":
            images, labels = self._splits["test"]
            cap = slice(None, self.val_samples)
            stream = MnistStream(
                images[cap], labels[cap], self.batch_size, False, num_batches=self.val_batches, **common
            )
        else:
            images, labels = self._splits["test"]
            n = self._stream_batches(self.val_samples, 10000, self.val_batches)
            stream = OnTheFlyMultiMnist(images, labels, self.batch_size, n, train=False, **common)
        return self._loader(stream, None)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """With generate_on_device, compose drawn training pairs on the batch's device (validation comes composed)."""
        if "indices" not in batch:
            return batch
        device = batch["indices"].device
        if self._device_gen is None or self._device_gen.images.device != device:
            self._device_gen = DeviceMultiMnist(*self._splits["train"], device, self.seed)
        return self._device_gen.compose(batch)
