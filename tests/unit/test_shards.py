"""capsdist.data shards: format version, reading across ranks and workers, decoding, corrupt input, pipes."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from capsdist import data
from capsdist.data import shard_format
from capsdist.data import shards as shard_reader
from tests.conftest import check_format, check_multimnist, epoch_batches, same_batches, u8


def test_shard_batches_format(shards: Path) -> None:
    """Decoded shard batches follow the contract and the recipe."""
    stream = data.ShardStream(data.expand_shards(str(shards)), 25, train=False)
    batches = list(data.ResumableLoader(stream))
    assert [len(b["labels"]) for b in batches] == [25, 25, 25, 25]
    for b in batches:
        check_multimnist(b)
    check_format(batches[0], 25, 2, 36)


def test_val_shards_disjoint_per_rank(shards: Path) -> None:
    """Validation with world size 2: ranks read disjoint shards that together cover everything once."""
    urls = data.expand_shards(f"{shards}/test-{{000000..000003}}.tar")
    seen = []
    for rank in (0, 1):
        stream = data.ShardStream(urls, 8, train=False, rank=rank, world_size=2)
        seen.append({u8(x[0]).numpy().tobytes() for b in data.ResumableLoader(stream, 2) for x in b["image"]})
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == 100


@pytest.mark.parametrize("workers", [0, 2])
def test_train_shards_equal_batches_per_rank(shards: Path, workers: int) -> None:
    """Uneven shards (30/30/30/10, or one shard for two ranks): every rank gets exactly the fixed batch count."""
    for urls in (data.expand_shards(str(shards)), [str(shards / "test-000003.tar")]):
        counts = []
        for rank in (0, 1):
            stream = data.ShardStream(urls, 8, True, seed=3, rank=rank, world_size=2, shuffle_buffer=20, num_batches=6)
            batches = list(data.ResumableLoader(stream, workers))
            counts.append(len(batches))
            assert all(len(b["labels"]) == 8 for b in batches)
        assert counts == [6, 6]


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_resume_same_epoch_seeds(shards: Path, workers: int) -> None:
    """Shard streams resume at the right epoch with the right seeds: resumed == tail (same worker count; with 0,
    the shards' reader threads read ahead of the batches handed out, which the resume position does not count)."""
    urls = data.expand_shards(str(shards))

    def loader() -> data.ResumableLoader:
        return data.ResumableLoader(data.ShardStream(urls, 8, True, seed=3, shuffle_buffer=20, num_batches=7), workers)

    full = epoch_batches(loader(), 1)
    assert same_batches(epoch_batches(loader(), 2, {"epoch": 2, "batches": 3}), epoch_batches(loader(), 2)[3:])
    assert same_batches(epoch_batches(loader(), 1, {"epoch": 1, "batches": 4}), full[4:])
    assert not same_batches(full, epoch_batches(loader(), 2))


def _rewrite(src: Path, dest: Path, damage: str) -> None:
    """Copy a shard, replacing the member named ``damage`` with bytes that are not a PNG."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            payload = b"not a png" if m.name == damage else tin.extractfile(m).read()
            m.size = len(payload)
            tout.addfile(m, io.BytesIO(payload))


def test_corrupt_sample_skipped_and_counted(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bad PNG and a truncated tar are skipped, counted and logged; the rest still streams."""
    _rewrite(shards / "test-000000.tar", tmp_path / "a.tar", "0000000004.input.png")
    cut = (shards / "test-000001.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(cut[: len(cut) // 2 + 100])
    stream = data.ShardStream(data.expand_shards(str(tmp_path)), 10, train=False)
    with caplog.at_level(logging.WARNING, logger="capsdist.data"):
        n = sum(len(b["labels"]) for b in data.ResumableLoader(stream))
    assert stream.skipped.count == 2
    assert 29 + 10 <= n < 29 + 30
    assert "(1 so far on rank 0 worker 0): " in caplog.text and "a.tar: UnidentifiedImageError" in caplog.text
    assert "(2 so far on rank 0 worker 0): " in caplog.text and "b.tar: ValueError: truncated or empty" in caplog.text
    assert "KeyError" not in caplog.text  # a cut shard is named as such, not as a missing meta.json


def _chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_every_filter(pixels: np.ndarray, bit_depth: int = 8) -> bytes:
    """A 36x36 grayscale PNG whose row r uses PNG filter type r % 5 (PIL's writer never picks type 3 here)."""
    rows, up = [], np.zeros(36, np.int16)
    for r, row in enumerate(pixels.astype(np.int16)):
        left, upleft = np.r_[0, row[:-1]], np.r_[0, up[:-1]]
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        pred = (0 * row, left, up, (left + up) // 2, paeth)[r % 5]
        rows.append(bytes([r % 5]) + ((row - pred) % 256).astype(np.uint8).tobytes())
        up = row
    header = struct.pack(">IIBBBBB", 36, 36, bit_depth, 0, 0, 0, 0)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _pil(png: bytes) -> np.ndarray:
    """The straightforward decode: PIL."""
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im)


def test_batch_decode_equals_pil(shards: Path) -> None:
    """The lean tar reader and the batched PNG decode give exactly webdataset's samples and PIL's pixels."""
    url = str(shards / "test-000003.tar")
    with open(url, "rb") as stream:
        ours = list(shard_reader.tar_samples(url, shard_reader._Tap(stream, hashing=False)))
    assert ours == list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 36, 36), dtype=np.uint8)
    crafted = {k: _png_every_filter(p) for k, p in zip(("input.png", "digit0.png", "digit1.png"), pixels, strict=True)}
    samples = [*ours, {**crafted, "meta.json": b'{"labels": [3, 4]}'}]
    batch = shard_format.collate_inflated([shard_format.inflate_sample(s) for s in samples])
    ref = np.stack([[_pil(s[k]) for k in ("input.png", "digit0.png", "digit1.png")] for s in samples])
    assert np.array_equal(ref[-1], pixels)
    assert torch.equal(u8(batch["image"][:, 0]), torch.from_numpy(ref[:, 0]).short())
    assert torch.equal(u8(batch["recon"][:, :, 0]), torch.from_numpy(ref[:, 1:]).short())
    assert batch["labels"].tolist()[-1] == [3, 4] and batch["labels"].shape == (11, 2)


def test_png_checks() -> None:
    """Not a PNG, a 16-bit PNG, a bad CRC and a bad filter type are all errors, never silently decoded."""
    png = _png_every_filter(np.zeros((36, 36), np.uint8))
    with pytest.raises(UnidentifiedImageError):
        shard_format.inflate_png(b"not a png")
    with pytest.raises(ValueError, match="36x36 8-bit grayscale"):
        shard_format.inflate_png(_png_every_filter(np.zeros((36, 36), np.uint8), bit_depth=16))
    with pytest.raises(ValueError, match="bad CRC"):
        shard_format.inflate_png(png[:40] + bytes([png[40] ^ 1]) + png[41:])
    idat = zlib.compress(bytes([5]) + bytes(36 * 37 - 1))
    bad = png[:33] + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    with pytest.raises(ValueError, match="filter type"):
        shard_format.inflate_png(bad)


def test_pipe_stream(shards: Path) -> None:
    """`pipe:` URLs stream through the same pipeline."""
    stream = data.ShardStream(data.expand_shards(f"pipe:cat {shards}/test-000003.tar"), 10, train=False)
    assert [len(b["labels"]) for b in data.ResumableLoader(stream)] == [10]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], r"no shards in \[\].*python -m data_prep.multimnist"),
        (None, r"no shard setting was given. Fix: set train_shards/val_shards"),
        ("nowhere/x-{0..3}.tar", r"'nowhere/x-0.tar'.*does not exist. Fix"),
    ],
)
def test_missing_shards_named_error(spec: object, message: str) -> None:
    """An empty shard list or files that do not exist give a DataError naming the fix."""
    with pytest.raises(data.DataError, match=message):
        data.expand_shards(spec)


def test_unknown_format_version_refused(shards: Path, tmp_path: Path) -> None:
    """The reader checks manifest.json's format version and names the fix for one it does not know."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for tar in shards.glob("*.tar"):
        (copy / tar.name).write_bytes(tar.read_bytes())
    manifest = json.loads((shards / shard_format.MANIFEST).read_text())
    assert manifest["params"]["format"] == shard_format.FORMAT  # the writer records the version the reader checks
    manifest["params"]["format"] = "capsdist-multimnist-v99"
    (copy / shard_format.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(data.DataError, match=r"(?s)format 'capsdist-multimnist-v99'.*Fix: rewrite the shards"):
        data.ShardStream(data.expand_shards(str(copy)), 8, train=False)
    with pytest.raises(data.DataError, match="capsdist-multimnist-v99"):
        shard_format.manifest_total(data.expand_shards(str(copy)))
