"""Reading shards: URL expansion, a lean tar reader, corrupt-sample skipping and the shard stream, for either format:
MultiMNIST (``shard_format.MultiMnistFormat``, the default) or labelled images (``image_format.ImageFormat``).

Any WebDataset tar of the format's sample schema is read: data_prep's shards, ``webdataset.TarWriter``'s and
``ShardWriter``'s (pax headers), GNU long names, gzip-compressed ``.tar.gz``. A shard whose first sample lacks the
schema's keys holds another kind of data: the read stops with a ``DataError`` naming the keys found and expected
(and the source that reads them), instead of skipping every sample. The lean reader is kept because a same-run
measurement put it at 2.7x webdataset's own tar expansion feeding the same PNG decode (docs/benchmarks.md).

Training uses ``wds.ResampledShards`` (each rank/worker draws shards with its own seed, so uneven or few shards
never starve a rank), a seeded shuffle buffer, decoding and batching inside the workers, and a fixed number of
batches per rank per epoch, so DDP never hangs. Validation is one exact pass, shards split by rank then worker.
Corrupt samples are skipped, counted (over all workers) and logged at a bounded rate with the shard and reason
(``SkipCounter``); but a worker that reads ``no_sample_limit`` shards in a row, or spends ``NO_SAMPLE_DEADLINES``
shard deadlines reading, without one valid sample stops the run with a ``DataError`` naming the shards. A
``DataError`` from a format's decoder (an image of another shape, a label the model has no class for) stops the run
too.

Local shards are checked against the ``manifest.json`` beside them as they are read (sha256 and sample count;
``verify=False`` skips the hash).

Every shard has a deadline, whatever the worker count: a daemon thread reads it and hands its samples over a bounded
queue (``_Handoff``), on which the consumer (a loader worker, or with 0 workers the training process's main thread)
waits in short slices. A shard that delivers no complete sample for ``deadline_s`` (a host that drips bytes or never
answers, a stalled ``pipe:`` command, a FIFO) is given up, the rest of it counted as skipped, and a stop recorded in
the training process is honoured while the read blocks (``check_stop``). The thread reads ahead within its shard
only: the samples and batches handed out, and so the loader's resume position, are those of a read without it.

Worker streams are seeded by (seed, epoch, rank, logical worker): a resume is exact only for the same
``num_workers`` and world size (``ResumableLoader`` refuses any other). This module and ``shard_urls`` (what a
setting opens) are the only importers of webdataset.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from capsdist.core.shipped import data_tool
from capsdist.data import recipe
from capsdist.data.batch import SHARDS, SHUFFLE, Batch, DataError, check_stop, worker
from capsdist.data.image_format import ImageFormat
from capsdist.data.settings import SETTINGS
from capsdist.data.shard_format import MAX_MEMBER_BYTES, MultiMnistFormat, TooLarge, read_manifest
from capsdist.data.shard_urls import URL_TIMEOUT, open_shard
from capsdist.data.shard_urls import expand_shards as expand_shards  # its home until this round; bench imports it here

log = logging.getLogger(__name__)
_TAR_BLOCK = 512
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped like webdataset does
_GZIP = b"\x1f\x8b"
NO_SAMPLE_DEADLINES = 3  # a worker with no valid sample for this many shard deadlines stops the run
READ_AHEAD = 64  # samples a shard's reader thread may hold ahead of the consumer
WAIT_SLICE_S = 0.5  # a wait for a sample checks the deadline and a stop request this often
LOG_EVERY_S = 10.0  # after the first few, skip warnings are logged at most this often per process


class _GivenUp(Exception):
    """The consumer gave the shard up (its deadline passed, or it needs no more samples): the reader stops."""


class _Tap:
    """A read-only stream that hashes every byte read from the underlying one, can put bytes back in front, and
    stops reading once ``cancelled`` is set (it reads with ``read1`` where the stream has it, so a stream that
    drips bytes is noticed between two of them)."""

    def __init__(self, stream: Any, hashing: bool, cancelled: threading.Event | None = None) -> None:
        """``hashing``: keep a sha256 of the raw bytes (the manifest's digest is of the file)."""
        self.stream, self.sha, self.front = stream, hashlib.sha256() if hashing else None, b""
        self.cancelled, self._read1 = cancelled or threading.Event(), getattr(stream, "read1", stream.read)

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (all with -1), fewer only at the end of the stream, front bytes first."""
        front, self.front = self.front, b""
        if size >= 0 and len(front) >= size:
            self.front = front[size:]
            return front[:size]
        chunks, left = [front], size - len(front)
        while left:
            if self.cancelled.is_set():
                raise _GivenUp
            chunk = self._read1(1 << 16 if left < 0 else left)
            if not chunk:
                break
            if self.sha is not None:
                self.sha.update(chunk)
            chunks.append(chunk)
            left = left - len(chunk) if left > 0 else left
        return b"".join(chunks)

    def drain(self) -> None:
        """Read to the end (tar padding after the end-of-archive blocks), so the digest covers the whole file."""
        while self.read(1 << 16):
            pass


def _pax_path(records: bytes) -> bytes | None:
    """The ``path`` of a pax extended header (records ``"LEN key=value\\n"``), if it sets one."""
    pos = 0
    while pos < len(records):
        length = int(records[pos : records.index(b" ", pos)])
        key, _, value = records[records.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value
        pos += length
    return None


def _pass_over(stream: Any, size: int, header: bytes) -> None:
    """Read and drop ``size`` bytes in 64 KiB blocks (a stream may be a pipe: no seek); short is a truncated shard."""
    while size and (chunk := stream.read(min(size, 1 << 16))):
        size -= len(chunk)
    if size:
        raise ValueError(f"truncated shard: member {header[:100].split(bytes(1))[0]!r} is cut short")


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes | TooLarge]]:
    """(name, data) of the regular files of a tar stream (ustar, pax, GNU long names), checksums verified; a member
    over ``MAX_MEMBER_BYTES`` is passed over unread and its data is a ``TooLarge``.

    A lean stand-in for ``tarfile``'s stream mode; member data or a header cut short, or a stream ending without
    the end-of-archive blocks, is a truncated shard (an error), never a quiet end.
    """
    long_name: bytes | None = None
    while True:
        header = stream.read(_TAR_BLOCK)
        if len(header) < _TAR_BLOCK:
            where = "inside a tar header" if header else "before the tar end"
            raise ValueError(f"truncated or empty shard: it ends {where}")
        if not header.strip(b"\0"):
            return
        # the checksum counts its own field as spaces; dropping zero bytes first makes the sum 3x cheaper
        if not header[148:156].strip(b"\0 ").isdigit():
            raise ValueError(f"not a tar shard: bad header {header[:32]!r}")
        if int(header[148:156].strip(b"\0 "), 8) != sum(header.translate(None, b"\0")) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"bad tar header checksum: {header[:100].rstrip(bytes(1))!r}")
        size, kind = int(header[124:136].strip(b"\0 ") or b"0", 8), header[156:157]
        if size > MAX_MEMBER_BYTES:  # passed over in blocks, never held whole; a sample that needs it is corrupt
            if kind not in (b"0", b"\0", b"7"):
                raise ValueError(f"a tar header member of {size:,} bytes (a hostile or broken shard)")
            _pass_over(stream, size + -size % _TAR_BLOCK, header)
            data = TooLarge(size)
        else:
            data = stream.read(size + -size % _TAR_BLOCK)[:size]
            if len(data) < size:
                raise ValueError(f"truncated shard: member {header[:100].split(bytes(1))[0]!r} is cut short")
        if kind in (b"x", b"L"):  # the next member's long name (pax "path" record, GNU ././@LongLink)
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0")
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name = long_name or (prefix + b"/" + name if prefix else name)
            long_name = None
            yield name.decode("utf-8", "surrogateescape"), data


def tar_samples(url: str, stream: Any) -> Iterator[dict[str, Any]]:
    """webdataset's tar expansion + grouping by key, leaner: {"__key__", "__url__", suffix: bytes} per sample.

    A gzip-compressed shard is recognised by its magic bytes, whatever its name.
    """
    head = stream.read(2)
    stream.front = head  # a _Tap: put the magic bytes back
    tar = gzip.GzipFile(fileobj=stream) if head == _GZIP else stream
    sample: dict[str, Any] | None = None
    for name, data in _tar_members(tar):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash or _TAR_META.match(name):
            continue
        key, suffix = name[:dot], name[dot + 1 :].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in a tar sample")
        sample[suffix] = data
    if sample is not None:
        yield sample


class SkipCounter:
    """Counts skipped samples over all loader workers (a shared-memory slot per worker) and logs each skip with
    its shard and reason: the first few, then at most once per ``LOG_EVERY_S`` per process, with the running count."""

    def __init__(self, rank: int = 0) -> None:
        """Start at zero skips; ``rank`` only labels the log lines."""
        self.rank, self.last = rank, ""
        self._slots = torch.zeros(64, dtype=torch.int64).share_memory_()  # shared with forked/spawned workers
        self._logged, self._last_log = 0, 0.0

    @property
    def count(self) -> int:
        """Samples skipped so far, all workers of this rank together."""
        return int(self._slots.sum())

    def add(self, n: int, reason: str) -> None:
        """Count ``n`` skipped samples for ``reason`` (which names the shard) and log it, rate-limited."""
        self._slots[worker()[0] % len(self._slots)] += n
        self.last = reason
        now = time.monotonic()
        if self._logged < 3 or now - self._last_log >= LOG_EVERY_S:
            self._logged, self._last_log = self._logged + 1, now
            where = f"rank {self.rank} worker {worker()[0]}"
            log.warning("skipped %d corrupt sample(s) (%d so far on %s): %s", n, self.count, where, reason)


class _NoSampleWatch:
    """Stops a worker that reads shard after shard without one valid sample (random bytes, empty files, a dead
    host, stalled sources): the resampler would otherwise retry them forever."""

    def __init__(self, limit: int, seconds: float, skipped: SkipCounter, fix: str) -> None:
        """``limit``: shard reads in a row, ``seconds``: time spent in them, without a valid sample before giving
        up (the time spent reading, not training: with 0 loader workers the steps run between two reads); ``fix``:
        the data's own fix."""
        self.limit, self.seconds, self.skipped, self.fix = limit, seconds, skipped, fix
        self.failed: list[str] = []
        self.spent = 0.0

    def ok(self) -> None:
        """A valid sample arrived."""
        self.failed.clear()
        self.spent = 0.0

    def empty(self, url: str, seconds: float) -> None:
        """A shard read ended without a valid sample after ``seconds``; raise once the limit (reads or seconds) is
        reached."""
        self.failed.append(url)
        self.spent += seconds
        if len(self.failed) >= self.limit or self.spent >= self.seconds:
            names = sorted(set(self.failed))
            raise DataError(
                f"no valid sample in {len(self.failed)} shard reads in a row ({self.spent:.0f} s) from "
                f"{len(names)} shard(s): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; last reason: "
                f"{self.skipped.last or 'the shard holds no samples'}. Fix: check that they are readable and "
                f"reachable in time (a shard that delivers no sample within --data.shard_deadline_s is given up); "
                f"{self.fix}."
            )


_END = object()  # a shard's reader thread is done


class _Handoff:
    """One shard's samples, from its reader thread to the consumer: a bounded queue; ``cancelled``, set when the
    consumer gives the shard up (the thread then stops at its next read or hand-over); ``read``, the samples the
    thread has taken from the shard; ``last``, when it last handed one over (or started)."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue(READ_AHEAD)
        self.cancelled = threading.Event()
        self.read, self.last = 0, time.monotonic()

    def put(self, item: Any) -> None:
        """Hand ``item`` over (a sample, an error or ``_END``), waiting while the queue is full; raise ``_GivenUp``
        once the consumer gives the shard up."""
        while not self.cancelled.is_set():
            try:
                self.queue.put(item, timeout=WAIT_SLICE_S)
                self.last = time.monotonic()
                return
            except queue.Full:
                pass
        raise _GivenUp



SampleFormat = MultiMnistFormat | ImageFormat
FORMATS = (MultiMnistFormat(), ImageFormat())  # every format a shard stream reads, to name the one a shard fits


def check_schema(url: str, sample: dict[str, Any], sample_format: SampleFormat) -> None:
    """Refuse shard ``url`` if its first ``sample`` lacks the keys of ``sample_format``: it holds another kind of
    data (one paragraph: the keys found and expected, and the source that reads them if one does)."""
    if sample_format.fits(sample):
        return
    found = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "no files"
    other = next((f for f in FORMATS if f.source != sample_format.source and f.fits(sample)), None)
    fix = (f"these are {other.name} shards: read them with --data.source {other.source}" if other
           else f"point the shard setting at {sample_format.name} shards, or {sample_format.fix()}")  # fmt: skip
    raise DataError(
        f"{url} does not hold {sample_format.name} shards: its first sample {sample.get('__key__')!r} holds {found}, "
        f"and each sample of --data.source {sample_format.source} holds {sample_format.expected}. Fix: {fix}."
    )


class ShardStream(IterableDataset):
    """Batches from WebDataset shards of one format (MultiMNIST by default, or labelled images); train = resampled
    and infinite (the loader cuts epochs)."""

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
        verify: bool = True,
        sample_format: SampleFormat | None = None,
        deadline_s: float = SETTINGS["shard_deadline_s"].default,
    ) -> None:
        """``num_batches``: batches per rank per epoch (required for training; caps validation); ``verify``: check
        each local shard's sha256 against manifest.json as it is read (sample counts are checked either way);
        ``sample_format``: what the samples are and how they decode (default: MultiMNIST); ``deadline_s``: seconds
        a shard may go without delivering a complete sample before it is given up."""
        if train and not num_batches:
            raise DataError("training on shards needs a fixed epoch length. Fix: set train_batches_per_epoch.")
        self.urls, self.batch_size, self.train = list(urls), batch_size, train
        manifest = read_manifest(self.urls)  # refuses shards of an unknown format version
        folder = Path(self.urls[0]).parent
        listed = {str(folder / s["name"]): s for s in (manifest or {}).get("shards", [])}
        self.expected = {u: listed[u] for u in self.urls if u in listed}  # local shards the manifest describes
        self.seed, self.rank, self.world_size, self.verify = seed, rank, world_size, verify
        self.shuffle_buffer, self.num_batches = shuffle_buffer, num_batches
        self.no_sample_limit = max(8, 2 * len(self.urls))
        self.deadline_s = deadline_s
        # seconds a loader worker may take for one batch before the run stops: past the worker's own no-sample stop
        self.loader_timeout = (NO_SAMPLE_DEADLINES + 1) * deadline_s + URL_TIMEOUT
        self.skipped = SkipCounter(rank)
        self.format = sample_format or MultiMnistFormat()
        self.epoch, self.start = 0, 0  # set by ResumableLoader before each iter()

    def __len__(self) -> int:
        """Batches per epoch; validation without a cap has no length."""
        if self.num_batches is None:
            raise TypeError("uncapped validation shard stream has no length")
        return self.num_batches

    def samples(self) -> int | None:
        """Samples one validation pass of this rank yields (for progress), where manifest.json lists every shard it
        reads; None where it does not, and in training (resampled)."""
        counts = [self.expected[u]["count"] for u in self.rank_shards() if u in self.expected]
        if self.train or len(counts) < len(self.rank_shards()):
            return None
        return sum(counts) if self.num_batches is None else min(sum(counts), self.num_batches * self.batch_size)

    def describe(self) -> str:
        """The shards, for error messages."""
        return f"{len(self.urls)} shard(s): {', '.join(self.urls[:3])}{' ...' if len(self.urls) > 3 else ''}"

    def expects_samples(self) -> bool:
        """Whether a pass should yield samples: always in training; in validation, if this rank has shards."""
        return self.train or bool(self.rank_shards())

    def fix(self) -> str:
        """What to do about shards of no valid sample (the format's advice)."""
        return self.format.fix()

    def first_sample(self) -> Any:
        """The first valid sample of the first shard, decoded here (no worker; its schema checked as in a stream):
        what the data looks like. None if the shard holds none."""
        samples = self._shard(self.urls[0])
        try:
            return next(samples, None)
        finally:
            samples.close()

    def rank_shards(self) -> list[str]:
        """Validation shards of this rank (node split; workers split further)."""
        return self.urls[self.rank :: self.world_size]

    def _shard(self, url: str) -> Iterator[Any]:
        """The checked, decoded samples of one shard, read by a daemon thread (module docstring): a shard that
        delivers no complete sample for ``deadline_s`` is given up, the rest of it counted as skipped."""
        handoff = _Handoff()
        threading.Thread(target=self._read, args=(url, handoff), name="capsdist-shard", daemon=True).start()
        try:
            while True:
                try:
                    item = handoff.queue.get(timeout=WAIT_SLICE_S)
                except queue.Empty:
                    check_stop()
                    if time.monotonic() - handoff.last >= self.deadline_s:
                        handoff.cancelled.set()
                        entry = self.expected.get(url)
                        reason = f"no complete sample in {self.deadline_s:g} s (stalled; --data.shard_deadline_s)"
                        self.skipped.add(max(1, entry["count"] - handoff.read) if entry else 1, f"{url}: {reason}")
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            handoff.cancelled.set()

    def _read(self, url: str, handoff: _Handoff) -> None:
        """A shard's reader thread: its checked, decoded samples into ``handoff``, then ``_END`` (or the error
        that ended the read); corrupt ones are skipped and counted with the shard named. It stops at its next read
        or hand-over once the consumer gives the shard up."""
        with contextlib.suppress(_GivenUp):  # given up: a hand-over raises it again at once
            try:
                self._checked(url, handoff)
            except Exception as exn:  # raised by the consumer, in the process that reads
                handoff.put(exn)
                return
            handoff.put(_END)

    def _checked(self, url: str, handoff: _Handoff) -> None:
        """Hand over the valid samples of one shard, skip and count the corrupt ones, then check the shard
        against its manifest.json entry (count, sha256)."""
        entry = self.expected.get(url)
        good = bad = 0
        try:
            tap = _Tap(open_shard(url), self.verify and entry is not None, handoff.cancelled)
            try:
                for sample in tar_samples(url, tap):
                    handoff.read += 1
                    if good + bad == 0:
                        check_schema(url, sample, self.format)
                    try:
                        decoded = self.format.decode(sample)
                    except DataError:  # data this run cannot hold (the format says why): stop
                        raise
                    except Exception as exn:  # a corrupt sample: skip it, the shard goes on
                        bad += 1
                        self.skipped.add(1, f"{url}: {type(exn).__name__}: {exn}")
                        continue
                    good += 1
                    handoff.put(decoded)
                tap.drain()
            finally:
                getattr(tap.stream, "close", lambda: None)()
        except (DataError, _GivenUp):
            raise
        except Exception as exn:  # an unreadable shard (cut, not a tar, unreachable): the rest of it is lost
            if not handoff.cancelled.is_set():  # (a shard given up is counted by the consumer)
                lost = max(1, entry["count"] - good - bad) if entry else 1
                self.skipped.add(lost, f"{url}: {type(exn).__name__}: {exn}")
            return
        if entry and good + bad < entry["count"]:
            self.skipped.add(entry["count"] - good - bad, f"{url}: {good + bad} samples, manifest.json says "
                             f"{entry['count']}")  # fmt: skip
        if tap.sha is not None and tap.sha.hexdigest() != entry["sha256"]:
            raise DataError(
                f"{url} does not match the sha256 in its manifest.json (changed or rewritten after the manifest). "
                f"Fix: rewrite the shards with `{data_tool('multimnist')} --out DIR ...` (check them with "
                f"`{data_tool('multimnist')} verify DIR`), or pass --data.verify_shards false to skip the check."
            )

    def _decoded(self, sources: Iterator[dict[str, Any]]) -> Iterator[Any]:
        """Inflated samples of each shard URL in turn; stops the run if shard after shard yields none."""
        watch = _NoSampleWatch(self.no_sample_limit, NO_SAMPLE_DEADLINES * self.deadline_s, self.skipped, self.fix())
        for source in sources:
            empty, started = True, time.monotonic()
            for sample in self._shard(source["url"]):
                if empty:
                    watch.ok()
                    empty = False
                yield sample
            if empty:
                watch.empty(source["url"], time.monotonic() - started)

    def pipeline(self, logical_worker: int) -> wds.DataPipeline:
        """The webdataset pipeline of one worker: shards -> checked samples -> (shuffle) -> batches."""
        keys = (self.seed, SHARDS, self.epoch, self.rank, logical_worker)
        if self.train:
            source = [wds.ResampledShards(self.urls, worker_seed=lambda: recipe.mix_seed(*keys), deterministic=True)]
            rng = random.Random(recipe.mix_seed(*keys, SHUFFLE))
            mixing = [wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)]
        else:
            source, mixing = [wds.SimpleShardList(self.rank_shards()), wds.split_by_worker], []
        return wds.DataPipeline(
            *source,
            self._decoded,
            *mixing,
            wds.batched(self.batch_size, collation_fn=self.format.collate, partial=not self.train),
        )

    def __iter__(self) -> Iterator[Batch]:
        """This worker's batches; on resume, worker ``w`` plays logical worker ``(w + start) % W`` and skips ahead."""
        w, n = worker()
        logical = (w + self.start) % n
        done = len(range(logical, self.start, n))  # batches this logical worker handed out before the resume point
        return islice(iter(self.pipeline(logical)), done, None)
