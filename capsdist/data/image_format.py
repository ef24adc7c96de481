"""The image-shard format (``source: image_shards``): any labelled image dataset as WebDataset shards, one image and
one class label per sample, under the keys webdataset's own ``ShardWriter`` writes (docs/own-data.md).

Each sample ``KEY`` holds exactly one image, ``KEY.png``, ``KEY.jpg`` / ``KEY.jpeg`` or ``KEY.npy``, and its class,
``KEY.cls``: an ASCII integer (what ``ShardWriter`` writes for ``{"cls": 3}``); other members (``json``, ``txt``)
are ignored. Images keep the channels they are stored with: grey 1, grey + alpha 2, RGB 3, RGBA 4 (a palette
expands to RGB, or RGBA with transparency); 1- to 16-bit greys become 8-bit as the MultiMNIST decoder makes them
(16-bit values >> 8). A ``.npy`` is an H x W or H x W x C array of uint8 (or uint16, scaled the same), channels
last, its header checked before ``np.load(allow_pickle=False)`` reads it: the conventional way to store channels
that are not colours, such as smallNORB's two grey views (H x W x 2). Every image of the data has one square shape,
the first sample's or the configured one: another shape is refused naming the sample, never resized. A label at or
above the model's number of classes is refused; one that is not an integer >= 0 makes its sample corrupt (skipped
and counted, as any corrupt sample). Nothing is unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from capsdist.data.batch import Batch, DataError
from capsdist.data.settings import IMAGES, MAX_CHANNELS, MAX_IMAGE_SIDE
from capsdist.data.shard_format import MAX_MEMBER_BYTES, TooLarge, grey_pixels

IMAGE_KEYS = ("png", "jpg", "jpeg", "npy")
LABEL_KEY = "cls"
CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "PA": 4}
_Decoded = tuple[np.ndarray, int]  # uint8 pixels [H, W, C] and the class


class ImageFormat:
    """What an image-shard stream reads: the schema a shard's first sample must have, one image shape for all
    samples, labels below ``num_classes``; the decoder and the batch collation."""

    source, name = IMAGES, "image"
    expected = "one image (png, jpg, jpeg or npy) and its class (cls, an integer)"

    def __init__(self, shape: tuple[int, int] | None = None, num_classes: int | None = None, origin: str = "") -> None:
        """``shape``: (channels, size) every image must have (None: any square one, to learn it from a sample);
        ``num_classes``: labels must be below it (None: unchecked); ``origin``: where the shape came from, for the
        message refusing another."""
        self.shape, self.num_classes, self.origin = shape, num_classes, origin

    def fits(self, sample: dict[str, Any]) -> bool:
        """Whether ``sample`` has the schema's keys: exactly one image and a label."""
        return LABEL_KEY in sample and sum(key in sample for key in IMAGE_KEYS) == 1

    def decode(self, sample: dict[str, Any]) -> _Decoded:
        """One sample's pixels and class; ValueError/OSError for a corrupt sample, DataError for one that this data
        cannot hold (another shape, a label the model has no class for)."""
        if not self.fits(sample):
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"sample {sample.get('__key__')!r} holds {found}, not {self.expected}")
        key = next(k for k in IMAGE_KEYS if k in sample)
        big = [k for k in (key, LABEL_KEY) if isinstance(sample[k], TooLarge)]
        if big:
            raise ValueError(f"{sample['__key__']}.{big[0]} is {sample[big[0]].size:,} bytes, over the member cap "
                             f"of {MAX_MEMBER_BYTES:,} (skipped unread)")  # fmt: skip
        label = read_label(sample[LABEL_KEY], sample["__key__"])
        if self.num_classes is not None and label >= self.num_classes:
            raise DataError(
                f"{_where(sample)} has class {label}, and the model has {self.num_classes} classes (0 to "
                f"{self.num_classes - 1}). Fix: set --model.num_classes to the number of classes in the data (with "
                "--model.caps_layers, its last count), or write labels from 0 to num_classes - 1."
            )
        read = read_npy if key == "npy" else read_picture
        try:
            return read(sample[key], lambda hwc: self._check(hwc, sample)), label
        except DataError:
            raise
        except (ValueError, OSError) as err:  # a corrupt image: named by its member (the shard by the caller)
            raise type(err)(f"{sample['__key__']}.{key}: {err}") from None

    def _check(self, hwc: tuple[int, int, int], sample: dict[str, Any]) -> None:
        """Refuse an image of a shape this data cannot hold, from its header's (H, W, C) before any pixel is read."""
        (h, w, c), where = hwc, _where(sample)
        if h != w or h > MAX_IMAGE_SIDE or c > MAX_CHANNELS:
            raise DataError(
                f"{where} is a {c}-channel {w}x{h} image; image_shards takes square images of at most "
                f"{MAX_IMAGE_SIDE} pixels a side with 1 to {MAX_CHANNELS} channels (channels last: H x W x C), as "
                "CapsNet(in_channels, image_size) reads them. Fix: crop, pad or resize the images when writing the "
                "shards."
            )
        if self.shape is not None and (c, h) != self.shape:
            configured = self.origin.startswith("--data.")
            raise DataError(
                f"{where} is a {c}-channel {h}x{h} image, and this data's images are {self.shape[0]}-channel "
                f"{self.shape[1]}x{self.shape[1]} ({self.origin or 'the first sample'}): a batch holds images of one "
                "shape, and capsdist never resizes them or changes their channels. Fix: "
                + ("drop --data.image_size and --data.in_channels (the data sets them), or set them to the images'."
                   if configured else "write every image at one size and channel count.")
            )  # fmt: skip

    def collate(self, samples: list[_Decoded]) -> Batch:
        """The contract batch: images [B, C, H, W] in [0, 1], labels [B, 1], the image itself as the reconstruction
        target [B, 1, C, H, W]."""
        pixels = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2)
        image = pixels.contiguous().float().div_(255)
        return {"image": image, "labels": torch.tensor([[s[1]] for s in samples]), "recon": image.unsqueeze(1)}

    def writer(self) -> str:
        """What writes these shards, for messages."""
        return "webdataset's ShardWriter, as docs/own-data.md shows"

    def fix(self) -> str:
        """What to do about shards of no valid sample."""
        return f"rewrite them with {self.writer()}"


def _where(sample: dict[str, Any]) -> str:
    """A sample, named by its shard and key."""
    return f"sample {sample.get('__key__')!r} of {sample.get('__url__', 'a shard')}"


def read_label(raw: bytes, key: str) -> int:
    """The class of a ``cls`` member: an ASCII integer >= 0 (surrounding whitespace allowed); else ValueError."""
    text = raw.decode("ascii", "replace").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise ValueError(f"{key}.cls holds {raw[:20]!r}, not a class number (an integer >= 0)")
    return int(text)


def read_picture(data: bytes, check: Callable[[tuple[int, int, int]], None]) -> np.ndarray:
    """uint8 pixels [H, W, C] of a PNG or JPEG, the channels as stored; ``check((H, W, C))`` sees the header's shape
    before any pixel is decoded (so a decompression bomb is refused unread)."""
    with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
        channels = (4 if "transparency" in im.info else 3) if im.mode == "P" else CHANNELS.get(im.mode)
        if channels is None:
            raise ValueError(f"a {im.mode} {im.format}: capsdist reads grey, grey + alpha, RGB and RGBA images")
        if im.format == "PNG" and data[25] == 4 and im.mode == "RGBA":  # PIL reads 16-bit grey + alpha as RGBA
            channels = 2
        check((im.height, im.width, channels))
        grey = grey_pixels(im)
        if grey is not None:
            return grey[..., None]
        pixels = np.asarray(im.convert("RGBA" if channels == 4 else "RGB") if im.mode in ("P", "PA") else im)
        return pixels[..., [0, 3]] if channels == 2 and pixels.shape[2] == 4 else pixels


def read_npy(data: bytes, check: Callable[[tuple[int, int, int]], None]) -> np.ndarray:
    """uint8 pixels [H, W, C] of a ``.npy`` image (H x W or H x W x C, uint8 or uint16 scaled >> 8), its header
    checked first (by ``check`` too): a forged shape never allocates, nothing is unpickled."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"an .npy of format version {version}, not 1.0 or 2.0 (what np.save writes)")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.kind != "u" or dtype.itemsize not in (1, 2) or len(shape) not in (2, 3):
        raise ValueError(f"an .npy of {dtype} {list(shape)}, not an H x W or H x W x C array of uint8 or uint16")
    if int(np.prod(shape)) * dtype.itemsize != len(data) - stream.tell():
        raise ValueError(f"an .npy whose data is not the {list(shape)} {dtype} its header says (cut or forged)")
    check((*shape, 1) if len(shape) == 2 else shape)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    array = array if array.ndim == 3 else array[..., None]
    return np.ascontiguousarray(array if dtype.itemsize == 1 else (array >> 8).astype(np.uint8))
