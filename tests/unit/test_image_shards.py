"""Labelled-image shards (``--data.source image_shards``, capsdist.data.image_format): every PNG colour type, JPEG
and ``.npy`` keeps its channels (RGB is never made grey), 16-bit greys scale as the MultiMNIST decoder scales them,
a forged ``.npy`` neither allocates nor unpickles, labels and shapes are checked, a shard of another schema is
refused naming the keys found and expected, and a training stream resumes exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from capsdist import data
from capsdist.data.image_format import ImageFormat
from capsdist.data.modules import CapsDataModule
from capsdist.training.images import reconstruction_sheet
from tests.conftest import epoch_batches, image_shards, same_batches
from tests.unit.test_png_decoding import CHANNELS, png


def decode(member: str, payload: bytes, label: bytes = b"1", fmt: ImageFormat | None = None) -> np.ndarray:
    """The pixels of a one-image sample."""
    sample = {"__key__": "000007", "__url__": "x.tar", member: payload, "cls": label}
    pixels, _ = (fmt or ImageFormat()).decode(sample)
    return pixels


def npy(array: np.ndarray) -> bytes:
    """``array`` as np.save writes it."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("colour", "depth"), [(0, 1), (0, 8), (0, 16), (4, 8), (4, 16), (2, 8), (2, 16), (6, 8), (3, 8)]
)
def test_every_png_keeps_its_channels(colour: int, depth: int) -> None:
    """Grey 1, grey + alpha 2, RGB 3, RGBA 4, a palette its RGB: each channel's 8-bit values, 16 bits scaled >> 8."""
    rng = np.random.default_rng(depth)
    values = rng.integers(0, 2**depth, size=(36, 36, CHANNELS[colour]))
    expected = values >> 8 if depth == 16 else values * (255 if depth == 1 else 1)
    if colour == 3:  # the test's palette: entry k is (3k, 3k + 1, 3k + 2) mod 256
        expected = np.stack([(3 * values[..., 0] + i) % 256 for i in range(3)], axis=-1)
    pixels = decode("png", png(values, depth, colour))
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, expected)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_keeps_its_channels(mode: str) -> None:
    picture = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(picture).convert(mode).save(buf, format="JPEG", quality=95)
    assert decode("jpg", buf.getvalue()).shape == (32, 32, len(mode))


@pytest.mark.parametrize("shape", [(36, 36), (36, 36, 2), (36, 36, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_npy_is_read_channels_last_16_bit_scaled(shape: tuple[int, ...], dtype: type) -> None:
    values = np.random.default_rng(1).integers(0, np.iinfo(dtype).max + 1, size=shape).astype(dtype)
    expected = (values >> 8 if dtype == np.uint16 else values).reshape(36, 36, -1)
    assert np.array_equal(decode("npy", npy(values)), expected)


class _Planted:
    """Pickled, it would create a file when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_npy_forged_or_pickled_or_not_pixels_is_a_corrupt_sample(tmp_path: Path) -> None:
    """A header claiming 30 GB over 4 bytes is refused before anything is allocated; an object array is never
    unpickled; floats are not pixels."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (100000, 100000, 3)})
    pickled = io.BytesIO()
    np.save(pickled, np.array([_Planted(tmp_path / "ran")], dtype=object), allow_pickle=True)
    cases = [(b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"abcd", "cut or forged"),
             (pickled.getvalue(), "not an H x W or H x W x C array of uint8"),
             (npy(np.zeros((8, 8), np.float32)), "float32")]  # fmt: skip
    for payload, reason in cases:
        with pytest.raises(ValueError, match=f"000007.npy: .*{reason}"):
            decode("npy", payload)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(data.DataError, match="a 36-channel 36x2 image; image_shards takes square images"):
        decode("npy", npy(np.zeros((2, 36, 36), np.uint8)))  # channels first


@pytest.mark.parametrize("label", [b"cat", b"-1", b"\xff", b"", b"1.5"])
def test_unreadable_label_is_a_corrupt_sample(label: bytes) -> None:
    with pytest.raises(ValueError, match="000007.cls holds .* not a class number"):
        decode("npy", npy(np.zeros((4, 4), np.uint8)), label)


def test_label_beyond_the_models_classes_and_another_shape_are_refused() -> None:
    """Refusals (DataError: the run stops) name the sample, the shard and the fix."""
    fmt = ImageFormat((3, 32), num_classes=4, origin="the first sample of a.tar")
    with pytest.raises(data.DataError, match=r"sample '000007' of x.tar has class 7, and the model has 4 classes"):
        decode("npy", npy(np.zeros((32, 32, 3), np.uint8)), b"7\n", fmt)
    assert decode("npy", npy(np.zeros((32, 32, 3), np.uint8)), b" 3\n", fmt).shape == (32, 32, 3)
    with pytest.raises(data.DataError, match=r"'000007' of x.tar is a 1-channel 32x32 image, and this data's images "
                                             r"are 3-channel 32x32 \(the first sample of a.tar\)"):  # fmt: skip
        decode("png", _png(np.zeros((32, 32), np.uint8)), fmt=fmt)
    with pytest.raises(data.DataError, match=r"is a 3-channel 36x36 image, and this data's images are 3-channel 32x32"):
        decode("png", _png(np.zeros((36, 36, 3), np.uint8)), fmt=fmt)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, samples: list[dict]) -> Path:
    """Samples written by webdataset's TarWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def test_a_shard_of_another_schema_is_refused_naming_the_keys(tmp_path: Path) -> None:
    """jpg + json only, MultiMNIST shards given to image_shards, image shards given to multimnist_shards: one
    paragraph each (before: every sample skipped, then advice to verify MultiMNIST shards)."""
    _tar(tmp_path / "captions" / "a.tar", [{"__key__": "k0", "jpg": b"x", "json": b"{}"}])
    mm = {"__key__": "k0", "input.png": b"", "digit0.png": b"", "digit1.png": b"", "meta.json": b"{}"}
    _tar(tmp_path / "mm" / "a.tar", [mm])
    expected = r"each sample of --data.source image_shards holds one image \(png, jpg, jpeg or npy\) and its class"
    with pytest.raises(data.DataError, match=rf"a.tar does not hold image shards: its first sample 'k0' holds jpg, "
                                             rf"json, and {expected}.*Fix: point the shard setting at image shards"):
        CapsDataModule(source="image_shards", train_shards=str(tmp_path / "captions"))
    with pytest.raises(data.DataError, match="holds digit0.png, digit1.png, input.png, meta.json, .* these are "
                                             "MultiMNIST shards: read them with --data.source multimnist_shards"):
        CapsDataModule(source="image_shards", train_shards=str(tmp_path / "mm"))
    images = image_shards(tmp_path / "images", 28, 1, 4)
    with pytest.raises(data.DataError, match="holds cls, png, and each sample of --data.source multimnist_shards "
                                             "holds input.png.* read them with --data.source image_shards"):
        list(data.ResumableLoader(data.ShardStream(data.expand_shards(str(images)), 2, train=False)))


def test_shape_from_the_first_sample_mixed_shapes_refused_corrupt_skipped(tmp_path: Path) -> None:
    """The module learns 32x32 RGB from the first sample; in a pass a bad PNG is skipped and counted, a grey
    image refused naming it; a configured size that is not the data's is refused at once."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    samples = [{"__key__": f"{i:06d}", "png": rgb, "cls": i % 4} for i in range(6)]
    samples[2]["png"] = b"\x89PNG broken"
    _tar(tmp_path / "a.tar", samples[:4])
    module = CapsDataModule(source="image_shards", val_shards=str(tmp_path), batch_size=4, num_workers=0)
    assert (module.image_size, module.in_channels, module.num_targets) == (32, 3, 1)
    loader = module.val_dataloader()
    assert [tuple(b["image"].shape) for b in loader] == [(3, 3, 32, 32)] and loader.dataset.skipped.count == 1
    _tar(tmp_path / "b.tar", [{"__key__": "000009", "png": rgb[..., 0], "cls": 1}])
    with pytest.raises(data.DataError, match=r"sample '000009' of .*b.tar is a 1-channel 32x32 image"):
        list(module.val_dataloader())
    with pytest.raises(data.DataError, match=r"--data.in_channels is 1, and the first sample of .*a.tar is a "
                                             r"3-channel 32x32 image"):  # fmt: skip
        CapsDataModule(source="image_shards", val_shards=str(tmp_path), in_channels=1)


def test_training_stream_resumes_exactly(tmp_path: Path) -> None:
    """The shard stream's exact resume holds for image shards: resumed == the uninterrupted epoch's tail."""
    urls = data.expand_shards(str(image_shards(tmp_path, 32, 3, 40, per_shard=10)))

    def loader() -> data.ResumableLoader:
        stream = data.ShardStream(urls, 4, True, seed=3, shuffle_buffer=10, num_batches=6,
                                  sample_format=ImageFormat((3, 32), num_classes=4))  # fmt: skip
        return data.ResumableLoader(stream)

    full = epoch_batches(loader(), 1)
    assert same_batches(epoch_batches(loader(), 1, {"epoch": 1, "batches": 2}), full[2:])
    assert full[0]["image"].shape == (4, 3, 32, 32) and torch.equal(full[0]["recon"][:, 0], full[0]["image"])


def test_two_channel_reconstructions_are_drawn_in_false_colour() -> None:
    images, labels = torch.rand(2, 2, 8, 8), torch.tensor([[0], [1]])
    picture, rows = reconstruction_sheet(images, images.unsqueeze(1), labels, torch.rand(2, 4), scale=1)
    assert picture.mode == "RGB" and rows[1].startswith("label 1")
