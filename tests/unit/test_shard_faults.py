"""The shard reader on input it did not write or that went bad: other writers' tars, gzip, shards with no valid
sample, bad labels, manifests that disagree, skip counts over workers, rate-limited logging, stalled hosts."""

from __future__ import annotations

import gc
import io
import json
import logging
import shutil
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from capsdist import data
from capsdist.cluster import signals
from capsdist.data import shard_format
from capsdist.data.shards import NO_SAMPLE_DEADLINES
from tests.conftest import Dripping, check_multimnist, same_batches

DEADLINE = 1.0  # seconds a shard may go without a complete sample in these tests (--data.shard_deadline_s)


def _val(spec: str | Path, batch: int = 10, workers: int = 0, **kw: object) -> tuple[list[dict], data.ShardStream]:
    """All validation batches of ``spec`` and the stream (for its skip count)."""
    stream = data.ShardStream(data.expand_shards(str(spec)), batch, train=False, **kw)
    return list(data.ResumableLoader(stream, workers)), stream


def _rewrite_meta(src: Path, dest: Path, labels: dict[int, list[int]]) -> None:
    """Copy a shard, giving sample ``i`` (by position) the labels ``labels[i]``."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            payload = tin.extractfile(m).read()
            i = int(m.name.split(".")[0]) - int(tin.getnames()[0].split(".")[0])
            if m.name.endswith("meta.json") and i in labels:
                payload = json.dumps({**json.loads(payload), "labels": labels[i]}).encode()
            m.size = len(payload)
            tout.addfile(m, io.BytesIO(payload))


@pytest.mark.parametrize("compress", [False, True])
def test_tarwriter_and_gzip_shards_read(shards: Path, tmp_path: Path, compress: bool) -> None:
    """A shard written by webdataset.TarWriter (pax headers, its own PNG encoder; gzip: .tar.gz) gives exactly the
    batches of the data_prep shard it was copied from (it used to give 0 samples)."""
    src = shards / "test-000000.tar"
    dest = tmp_path / ("copy.tar.gz" if compress else "copy.tar")
    with wds.TarWriter(str(dest), compress=compress) as writer:
        for s in wds.WebDataset(str(src), shardshuffle=False).decode("l8"):
            writer.write({k: s[k] for k in ("__key__", "input.png", "digit0.png", "digit1.png", "meta.json")})
    theirs, stream = _val(tmp_path)
    ours, _ = _val(src)
    assert stream.skipped.count == 0 and same_batches(theirs, ours)
    check_multimnist(theirs[0])


def test_rgb_png_is_read_as_grayscale(shards: Path) -> None:
    """Another writer's PNG flavour (RGB) decodes through PIL to the same pixels."""
    sample = next(iter(wds.WebDataset(str(shards / "test-000000.tar"), shardshuffle=False)))
    rgb = {k: _png_rgb(sample[k]) for k in shard_format.IMAGE_KEYS}
    ref = shard_format.collate_inflated([shard_format.inflate_sample(sample)])
    got = shard_format.collate_inflated([shard_format.inflate_sample({**sample, **rgb})])
    assert torch.equal(ref["image"], got["image"]) and torch.equal(ref["recon"], got["recon"])


def _png_rgb(png: bytes) -> bytes:
    """The same picture as an RGB PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_no_valid_sample_stops_with_the_shards_named(tmp_path: Path, workers: int) -> None:
    """Random bytes and an empty file: training stops with a DataError naming them (it used to loop forever)."""
    (tmp_path / "junk.tar").write_bytes(np.random.default_rng(0).bytes(30000))
    (tmp_path / "empty.tar").write_bytes(b"")
    stream = data.ShardStream(data.expand_shards(str(tmp_path)), 4, train=True, num_batches=3)
    with pytest.raises(data.DataError, match=r"no valid sample in \d+ shard reads in a row .*empty.tar, .*junk.tar"):
        list(data.ResumableLoader(stream, workers))
    with pytest.raises(data.DataError, match=r"no valid sample in one pass over 2 shard\(s\)"):
        _val(tmp_path, workers=workers)


def test_bad_labels_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    """Labels out of range (42, -1) or equal ([3, 3]) are corrupt samples: skipped and counted, never trained on."""
    _rewrite_meta(shards / "test-000000.tar", tmp_path / "a.tar", {0: [42, 1], 1: [-1, 2], 2: [3, 3]})
    batches, stream = _val(tmp_path)
    assert stream.skipped.count == 3 and sum(len(b["labels"]) for b in batches) == 27
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.min() >= 0 and labels.max() <= 9 and (labels[:, 0] != labels[:, 1]).all()


def test_skips_summed_over_workers_and_logged_at_a_bounded_rate(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two loader workers each skip samples: the main process sees the sum (it used to see 0); few log lines."""
    for i in range(2):
        _rewrite_meta(shards / f"test-00000{i}.tar", tmp_path / f"s{i}.tar", {j: [5, 5] for j in range(12)})
    batches, stream = _val(tmp_path, workers=2)
    assert stream.skipped.count == 24 and sum(len(b["labels"]) for b in batches) == 36
    with caplog.at_level(logging.WARNING, logger="capsdist.data"):
        _val(tmp_path, workers=0)  # workers log to their own stderr; the same limiter runs in this process
    assert caplog.text.count("skipped") == 3 and "s0.tar: ValueError: meta labels [5, 5]" in caplog.text


def test_manifest_sha256_and_counts_checked(shards: Path, tmp_path: Path) -> None:
    """A valid shard that is not the one manifest.json lists (another run's) stops the read unless verify is off;
    a truncated shard's lost samples are counted from the manifest (it used to count 1 and blame meta.json)."""
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shutil.copy(copy / "test-000000.tar", copy / "test-000001.tar")
    with pytest.raises(data.DataError, match=r"test-000001.tar does not match the sha256 in its manifest.json"):
        _val(copy)
    assert sum(len(b["labels"]) for b in _val(copy, verify=False)[0]) == 100
    cut = (shards / "test-000001.tar").read_bytes()
    (copy / "test-000001.tar").write_bytes(cut[: len(cut) // 3])
    batches, stream = _val(copy)
    read = sum(len(b["labels"]) for b in batches)
    assert (read, stream.skipped.count) == (80, 20)  # 10 of the cut shard's 30 samples survive
    assert "test-000001.tar: ValueError: truncated" in stream.skipped.last


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stalled_shard_is_skipped_and_counted(shards: Path, dripping: Dripping, workers: int) -> None:
    """A host that drips bytes (every read succeeds, no sample ever completes) is given up after the deadline and
    counted as skipped, and the epoch goes on from the good shard, with or without loader workers (with 0 it hung
    the run for good; with 1 it stopped the run after 120 s). A slow step between batches is not time a source
    failed: only reading counts towards the no-sample stop (3 deadlines)."""
    urls = [str(shards / "test-000000.tar"), dripping.url("stalled.tar")]
    stream = data.ShardStream(urls, 10, train=True, num_batches=6, shuffle_buffer=1, deadline_s=DEADLINE)
    started, batches = time.monotonic(), []
    for batch in data.ResumableLoader(stream, workers):
        batches.append(batch)
        if len(batches) == 1:
            time.sleep(2 * DEADLINE)  # a slow training step, inside the good shard's samples
    took, stalls = time.monotonic() - started, len(dripping.requests)
    assert len(batches) == 6 and all(len(b["labels"]) == 10 for b in batches)
    assert stalls >= 1 and 1 <= stream.skipped.count <= stalls  # a draw still waiting at the epoch's end: uncounted
    assert took < stalls * (DEADLINE + 1) + 2 * DEADLINE + 10, took
    if workers == 0:  # (a worker's last reason stays in the worker)
        assert stream.skipped.last.endswith("stalled.tar: no complete sample in 1 s (stalled; --data.shard_deadline_s)")


def test_stalled_sources_stop_the_run_with_the_shards_named(dripping: Dripping) -> None:
    """Every source stalls: training stops after NO_SAMPLE_DEADLINES deadlines without a sample, naming the shards,
    and a validation pass ends with its one-pass error (both used to wait forever)."""
    urls = [dripping.url("a.tar"), dripping.url("b.tar")]
    started = time.monotonic()
    with pytest.raises(data.DataError, match=r"no valid sample in 3 shard reads in a row \(\d s\) from 2 shard\(s\): "
                       r"\S+/a.tar, \S+/b.tar; last reason: \S+ no complete sample in 1 s \(stalled"):  # fmt: skip
        list(data.ResumableLoader(data.ShardStream(urls, 4, train=True, num_batches=3, deadline_s=DEADLINE)))
    assert time.monotonic() - started < NO_SAMPLE_DEADLINES * (DEADLINE + 1) + 3
    with pytest.raises(data.DataError, match=r"no valid sample in one pass over 2 shard\(s\)"):
        _val("::".join(urls), deadline_s=DEADLINE)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stop_is_honoured_while_a_read_blocks(
    dripping: Dripping, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """A stop recorded while the only shard's read blocks (deadline far off) ends the wait within a second or two
    with the stop's exit code, and a worker stuck in that read is killed, not waited for (torch's shutdown took
    10 s: a join, a SIGTERM the workers ignore, a join)."""
    monkeypatch.setitem(signals._state, "request", 0)  # restored after the test
    loader = data.ResumableLoader(data.ShardStream([dripping.url("s.tar")], 4, True, num_batches=3), workers)
    requested: list[float] = []

    def stop_once_reading() -> None:
        if dripping.requested.wait(60):
            requested.append(time.monotonic())
            signals.raise_request(signals.TERMINATE)

    threading.Thread(target=stop_once_reading, daemon=True).start()
    with pytest.raises(signals.StopRequested) as stop:
        list(loader)
    assert stop.value.code == 143 and time.monotonic() - requested[0] < 3
    started = time.monotonic()
    del stop  # the last reference to the abandoned iterator, which shuts its workers down
    gc.collect()
    assert time.monotonic() - started < 3
