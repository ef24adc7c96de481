"""Tests for capsdist.data: batch format per source, geometry, seeds, resume, shards across ranks, corrupt input."""

from __future__ import annotations

import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from capsdist import data
from data_prep import mnist, multimnist

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "mnist"


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 600 images of the shipped MNIST test split."""
    images, labels = mnist.load(SHIPPED, "test")
    return torch.from_numpy(images[:600]), torch.from_numpy(labels[:600]).long()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 MultiMNIST test samples in uneven shards of 30, 30, 30, 10 (with manifest.json)."""
    out = tmp_path_factory.mktemp("shards")
    plan = {"split": "test", "per_digit": None, "num_samples": 100, "shard_size": 30, "seed": 1}
    multimnist.generate(SHIPPED, out, plan, workers=1)
    return out


def _u8(x: torch.Tensor) -> torch.Tensor:
    """Back to integer pixel values."""
    return (x * 255).round().to(torch.int16)


def _check_format(batch: dict[str, torch.Tensor], b: int, k: int, size: int) -> None:
    """The contract's batch dict: keys, shapes, dtypes, value range."""
    assert set(batch) == {"image", "labels", "recon"}
    assert batch["image"].shape == (b, 1, size, size) and batch["image"].dtype == torch.float32
    assert batch["labels"].shape == (b, k) and batch["labels"].dtype == torch.int64
    assert batch["recon"].shape == (b, k, 1, size, size) and batch["recon"].dtype == torch.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1 and batch["image"].max() > 0.9


def _check_multimnist(batch: dict[str, torch.Tensor]) -> None:
    """input = clip(digit0 + digit1), labels differ, each digit lies wholly inside the 36x36 canvas."""
    x, r = _u8(batch["image"][:, 0]), _u8(batch["recon"][:, :, 0])
    assert torch.equal(x, (r[:, 0] + r[:, 1]).clamp(max=255))
    assert (batch["labels"][:, 0] != batch["labels"][:, 1]).all()


def _contains_source(placed: torch.Tensor, digit: torch.Tensor, canvas: int) -> bool:
    """Whether ``placed`` is ``digit`` at some top-left offset of a zero canvas."""
    for r in range(canvas - 27):
        for c in range(canvas - 27):
            ref = torch.zeros(canvas, canvas, dtype=torch.int16)
            ref[r : r + 28, c : c + 28] = digit
            if torch.equal(placed, ref):
                return True
    return False


def test_mnist_stream_shift_and_format(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Training MNIST: contract batches, recon = input, each image its digit shifted by at most 2 px."""
    images, labels = test_split
    stream = data.MnistStream(images, labels, 32, train=True, seed=5)
    assert len(stream) == 600 // 32
    batch = stream.make_batch(0, 0)
    _check_format(batch, 32, 1, 28)
    assert torch.equal(batch["recon"][:, 0], batch["image"])
    order = stream._rank_order(0)[:32]
    assert torch.equal(batch["labels"][:, 0], labels[order])
    shifted = 0
    for i in range(8):
        big = torch.nn.functional.pad(images[order[i]].to(torch.int16), (2, 2, 2, 2))
        crops = {
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(big[dy : dy + 28, dx : dx + 28], _u8(batch["image"][i, 0]))
        }
        assert crops, f"sample {i} is not a shift of its digit by <= 2 px"
        shifted += (2, 2) not in crops
    assert shifted > 0
    val = data.MnistStream(images, labels, 32, train=False)
    assert len(val) == 19 and torch.equal(_u8(val.make_batch(0, 0)["image"][:, 0]), images[:32].to(torch.int16))


def test_onthefly_geometry(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """On-the-fly MultiMNIST: same recipe as the shards, exact against the source digits."""
    images, labels = test_split
    batch = data.OnTheFlyMultiMnist(images, labels, 16, 4, seed=2).make_batch(0, 3)
    _check_format(batch, 16, 2, 36)
    _check_multimnist(batch)
    for i in range(4):
        for k in range(2):
            label = int(batch["labels"][i, k])
            candidates = (labels == label).nonzero()[:, 0]
            placed = _u8(batch["recon"][i, k, 0])
            assert any(
                _contains_source(placed, images[j].to(torch.int16), 36)
                for j in candidates[:80].tolist()
                if images[j].sum() == placed.sum()
            )


def test_device_generator_matches_cpu_stream(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Draw-only batches composed by DeviceMultiMnist equal the CPU stream; its own batches are well-formed."""
    images, labels = test_split
    cpu = data.OnTheFlyMultiMnist(images, labels, 64, 2, seed=9).make_batch(1, 1)
    draws = data.OnTheFlyMultiMnist(images, labels, 64, 2, seed=9, draw_only=True).make_batch(1, 1)
    gen = data.DeviceMultiMnist(images, labels, "cpu", seed=9)
    assert all(torch.equal(cpu[k], v) for k, v in gen.compose(draws).items())
    batch = gen.batch(256, epoch=0, step=0)
    _check_format(batch, 256, 2, 36)
    _check_multimnist(batch)
    assert not torch.equal(batch["labels"], gen.batch(256, epoch=0, step=1)["labels"])


def _epoch(loader: data.ResumableLoader, epoch: int, state: dict[str, int] | None = None) -> list[dict]:
    """All batches of one epoch, optionally resumed from a loader state."""
    loader.set_epoch(epoch)
    if state:
        loader.load_state_dict(state)
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> bool:
    """Batch lists equal tensor for tensor."""
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("kind", ["mnist", "onthefly"])
def test_resume_mid_epoch_equals_tail(kind: str, test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A resumed loader yields exactly the rest of the epoch, with 0 or 2 workers (and the same stream for both)."""
    images, labels = test_split

    def stream() -> data.BatchStream:
        if kind == "mnist":
            return data.MnistStream(images, labels, 50, train=True, seed=4)
        return data.OnTheFlyMultiMnist(images, labels, 20, 12, seed=4)

    full = _epoch(data.ResumableLoader(stream()), 2)
    assert len(full) == 12
    for workers in (0, 2):
        loader = data.ResumableLoader(stream(), num_workers=workers)
        assert _same(_epoch(loader, 2), full)
        it = iter(loader)
        for _ in range(5):
            next(it)
        state = loader.state_dict()
        assert state == {"epoch": 2, "batches": 5}
        resumed = data.ResumableLoader(stream(), num_workers=workers)
        assert _same(_epoch(resumed, 2, state), full[5:])
        assert resumed.state_dict() == {"epoch": 2, "batches": 12}
        assert _same(_epoch(resumed, 2), full)  # the resume state is used once
    stale = data.ResumableLoader(stream())
    assert _same(_epoch(stale, 3, {"epoch": 2, "batches": 5}), _epoch(data.ResumableLoader(stream()), 3))


def test_streams_differ_by_epoch_and_rank(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Seeds are per (epoch, rank, batch): no two ranks, epochs or batches repeat a stream."""
    images, labels = test_split
    r0 = data.OnTheFlyMultiMnist(images, labels, 32, 2, seed=0, rank=0, world_size=2)
    r1 = data.OnTheFlyMultiMnist(images, labels, 32, 2, seed=0, rank=1, world_size=2)
    outs = [s.make_batch(e, j)["labels"] for s in (r0, r1) for e in (0, 1) for j in (0, 1)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    m0 = data.MnistStream(images, labels, 32, train=True, rank=0, world_size=2)
    m1 = data.MnistStream(images, labels, 32, train=True, rank=1, world_size=2)
    a, b = m0._rank_order(0), m1._rank_order(0)
    assert len(a) == len(b) == 300 and not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(a, m0._rank_order(1))


def test_shard_batches_format(shards: Path) -> None:
    """Decoded shard batches follow the contract and the recipe."""
    stream = data.ShardStream(data.expand_shards(str(shards)), 25, train=False)
    batches = list(data.ResumableLoader(stream))
    assert [len(b["labels"]) for b in batches] == [25, 25, 25, 25]
    for b in batches:
        _check_multimnist(b)
    _check_format(batches[0], 25, 2, 36)


def test_val_shards_disjoint_per_rank(shards: Path) -> None:
    """Validation with world size 2: ranks read disjoint shards that together cover everything once."""
    urls = data.expand_shards(f"{shards}/test-{{000000..000003}}.tar")
    seen = []
    for rank in (0, 1):
        stream = data.ShardStream(urls, 8, train=False, rank=rank, world_size=2)
        seen.append({_u8(x[0]).numpy().tobytes() for b in data.ResumableLoader(stream, 2) for x in b["image"]})
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


def test_shard_resume_same_epoch_seeds(shards: Path) -> None:
    """Shard streams resume at the right epoch with the right seeds: resumed == tail (same worker count)."""
    urls = data.expand_shards(str(shards))

    def loader() -> data.ResumableLoader:
        return data.ResumableLoader(data.ShardStream(urls, 8, True, seed=3, shuffle_buffer=20, num_batches=7), 2)

    full = _epoch(loader(), 1)
    assert _same(_epoch(loader(), 2, {"epoch": 2, "batches": 3}), _epoch(loader(), 2)[3:])
    assert _same(_epoch(loader(), 1, {"epoch": 1, "batches": 4}), full[4:])
    assert not _same(full, _epoch(loader(), 2))


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
    assert "skipped corrupt sample (1 so far on rank 0 worker 0): UnidentifiedImageError" in caplog.text
    assert "skipped corrupt sample (2 so far on rank 0 worker 0): KeyError: 'meta.json'" in caplog.text


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
        ours = list(data._shard_samples(iter([{"url": url, "stream": stream}]), data.SkipCounter()))
    assert ours == list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 36, 36), dtype=np.uint8)
    crafted = {k: _png_every_filter(p) for k, p in zip(("input.png", "digit0.png", "digit1.png"), pixels, strict=True)}
    samples = [*ours, {**crafted, "meta.json": b'{"labels": [3, 4]}'}]
    batch = data._collate_inflated([data._inflate_sample(s) for s in samples])
    ref = np.stack([[_pil(s[k]) for k in ("input.png", "digit0.png", "digit1.png")] for s in samples])
    assert np.array_equal(ref[-1], pixels)
    assert torch.equal(_u8(batch["image"][:, 0]), torch.from_numpy(ref[:, 0]).short())
    assert torch.equal(_u8(batch["recon"][:, :, 0]), torch.from_numpy(ref[:, 1:]).short())
    assert batch["labels"].tolist()[-1] == [3, 4] and batch["labels"].shape == (11, 2)


def test_png_checks() -> None:
    """Not a PNG, a 16-bit PNG, a bad CRC and a bad filter type are all errors, never silently decoded."""
    png = _png_every_filter(np.zeros((36, 36), np.uint8))
    with pytest.raises(UnidentifiedImageError):
        data._inflate_png(b"not a png")
    with pytest.raises(ValueError, match="36x36 8-bit grayscale"):
        data._inflate_png(_png_every_filter(np.zeros((36, 36), np.uint8), bit_depth=16))
    with pytest.raises(ValueError, match="bad CRC"):
        data._inflate_png(png[:40] + bytes([png[40] ^ 1]) + png[41:])
    idat = zlib.compress(bytes([5]) + bytes(36 * 37 - 1))
    bad = png[:33] + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    with pytest.raises(ValueError, match="filter type"):
        data._inflate_png(bad)


def test_pipe_stream(shards: Path) -> None:
    """`pipe:` URLs stream through the same pipeline."""
    stream = data.ShardStream(data.expand_shards(f"pipe:cat {shards}/test-000003.tar"), 10, train=False)
    assert [len(b["labels"]) for b in data.ResumableLoader(stream)] == [10]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], r"no shards in \[\].*python -m data_prep.multimnist"),
        ("nowhere/x-{0..3}.tar", r"'nowhere/x-0.tar'.*does not exist. Fix"),
    ],
)
def test_missing_shards_named_error(spec: object, message: str) -> None:
    """An empty shard list or files that do not exist give a DataError naming the fix."""
    with pytest.raises(data.DataError, match=message):
        data.expand_shards(spec)


@pytest.mark.parametrize(
    ("source", "size", "k"), [("mnist", 28, 1), ("multimnist_onthefly", 36, 2), ("multimnist_shards", 36, 2)]
)
def test_datamodule_sources(source: str, size: int, k: int, shards: Path) -> None:
    """Each source: image_size/num_targets known before setup, contract batches, fixed epoch lengths."""
    dm = data.CapsDataModule(
        source=source,
        mnist_dir=str(SHIPPED),
        train_shards=str(shards),
        val_shards=str(shards),
        batch_size=16,
        num_workers=0,
        shuffle_buffer=20,
        train_samples=96,
        val_samples=64,
        seed=1,
    )
    assert (dm.image_size, dm.num_targets) == (size, k)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 6
    _check_format(next(iter(train)), 16, k, size)
    _check_format(next(iter(dm.val_dataloader())), 16, k, size)


def test_datamodule_generate_on_device() -> None:
    """generate_on_device: workers ship draws, on_after_batch_transfer composes (here on CPU) the same batch."""
    kw = {"source": "multimnist_onthefly", "mnist_dir": str(SHIPPED), "batch_size": 8, "num_workers": 0}
    dev, cpu = data.CapsDataModule(generate_on_device=True, **kw), data.CapsDataModule(**kw)
    dev.setup("fit")
    cpu.setup("fit")
    draws = next(iter(dev.train_dataloader()))
    assert set(draws) == {"indices", "offsets"}
    composed = dev.on_after_batch_transfer(draws, 0)
    assert all(torch.equal(v, next(iter(cpu.train_dataloader()))[k]) for k, v in composed.items())


def test_datamodule_bad_config() -> None:
    """Unknown sources and shard epochs that cannot be sized fail with the fix named."""
    with pytest.raises(data.DataError, match="unknown source"):
        data.CapsDataModule(source="cifar")  # type: ignore[arg-type]
    with pytest.raises(data.DataError, match="Fix: set train_batches_per_epoch"):
        data.ShardStream(["x.tar"], 8, train=True)


class _Linear(pl.LightningModule):
    """A linear classifier: the smallest model whose weights record every batch it saw, in order."""

    def __init__(self, pixels: int) -> None:
        """One linear layer."""
        super().__init__()
        self.net = torch.nn.Linear(pixels, 10)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the first label."""
        return torch.nn.functional.cross_entropy(self.net(batch["image"].flatten(1)), batch["labels"][:, 0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("source", "workers"), [("multimnist_onthefly", 0), ("multimnist_shards", 2)])
def test_trainer_resume_mid_epoch_exact(source: str, workers: int, shards: Path, tmp_path: Path) -> None:
    """Through Lightning: stop at step 8 (epoch 1, batch 2 of 6), resume, end with the uninterrupted weights."""

    def run(root: str, ckpt: str | None = None, **kw: object) -> torch.Tensor:
        pl.seed_everything(0)
        model = _Linear(36 * 36)
        dm = data.CapsDataModule(
            source=source,
            mnist_dir=str(SHIPPED),
            train_shards=str(shards),
            batch_size=16,
            num_workers=workers,
            shuffle_buffer=20,
            train_samples=96,
            seed=3,
        )
        trainer = pl.Trainer(
            default_root_dir=str(tmp_path / root),
            max_epochs=2,
            deterministic=True,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            **kw,
        )
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model.net.weight.detach().clone()

    full = run("full")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=8, filename="s")
    run("cut", callbacks=[ckpt], max_steps=8)
    state = torch.load(tmp_path / "ck" / "s.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert torch.equal(run("resumed", str(tmp_path / "ck" / "s.ckpt")), full)
