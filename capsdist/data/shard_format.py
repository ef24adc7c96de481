"""The MultiMNIST shard format, in one place: sample keys, image geometry, format version, encoder and decoder.

A shard is a ustar tar; each sample ``KEY`` holds ``KEY.input.png`` (36x36 overlay), ``KEY.digit0.png`` /
``KEY.digit1.png`` (each digit alone on its canvas, 8-bit grayscale PNG) and ``KEY.meta.json``
``{"labels": [l0, l1], "indices": [i0, i1], "offsets": [[r0, c0], [r1, c1]]}``, so
``input = clip(digit0 + digit1, 0, 255)`` exactly. PNG and JSON only: nothing decodes with pickle. Members carry
fixed metadata (mtime 0, uid/gid 0, mode 0644, sorted), so equal samples give byte-identical shards.
``manifest.json`` beside the shards records ``params.format`` = ``FORMAT``; the reader refuses any other value.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from capsdist.core.shipped import data_tool
from capsdist.data import recipe
from capsdist.data.batch import Batch, DataError, to_batch

FORMAT = "capsdist-multimnist-v1"
KNOWN_FORMATS = (FORMAT,)
MANIFEST = "manifest.json"
IMAGE_KEYS = ("input.png", "digit0.png", "digit1.png")
META_KEY = "meta.json"
CANVAS = recipe.CANVAS  # every PNG is CANVAS x CANVAS, 8-bit grayscale
MAX_MEMBER_BYTES = 1 << 20  # a sample's members are small (a 36x36 PNG: under 2 KB); larger ones are never read


@dataclass(frozen=True)
class TooLarge:
    """A tar member over MAX_MEMBER_BYTES, passed over unread: a sample that needs it is corrupt."""

    size: int

# ------------------------------------------------------------------------------------------------ manifest


def read_manifest(urls: Sequence[str]) -> dict[str, Any] | None:
    """The manifest.json beside local shards (format version checked), or None when there is none (URLs, pipes)."""
    path = Path(urls[0]).parent / MANIFEST if Path(urls[0]).is_file() else None
    if path is None or not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    found = manifest.get("params", {}).get("format")
    if found not in KNOWN_FORMATS:
        raise DataError(
            f"{path} says the shards are in format {found!r}, but this capsdist reads only {KNOWN_FORMATS}. "
            f"Fix: rewrite the shards with this version's `{data_tool('multimnist')} --out DIR ...`, or use "
            "the capsdist version that wrote them."
        )
    return manifest


def manifest_total(urls: Sequence[str]) -> int | None:
    """Total samples listed in the manifest.json beside local shards, or None when there is none."""
    manifest = read_manifest(urls)
    if manifest is None:
        return None
    names = {Path(u).name for u in urls}
    return sum(s["count"] for s in manifest["shards"] if s["name"] in names)


# ------------------------------------------------------------------------------------------------ encoder


@dataclass
class Shard:
    """One generated shard, in memory."""

    start: int
    overlay: torch.Tensor  # uint8 [n, 36, 36]
    placed: torch.Tensor  # uint8 [n, 2, 36, 36]
    indices: torch.Tensor  # long [n, 2]
    labels: torch.Tensor  # long [n, 2]
    offsets: torch.Tensor  # long [n, 2, 2]


def png(array: np.ndarray) -> bytes:
    """Encode an 8-bit grayscale array as PNG with fixed settings (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def samples(shard: Shard) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a shard, extensions sorted."""
    overlay, placed = shard.overlay.numpy(), shard.placed.numpy()
    for i in range(len(overlay)):
        meta = {
            "labels": shard.labels[i].tolist(),
            "indices": shard.indices[i].tolist(),
            "offsets": shard.offsets[i].tolist(),
        }
        yield (
            f"{shard.start + i:010d}",
            {
                "digit0.png": png(placed[i, 0]),
                "digit1.png": png(placed[i, 1]),
                "input.png": png(overlay[i]),
                META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
            },
        )


def tar_bytes(shard: Shard) -> bytes:
    """Serialise a shard as a tar with fixed member metadata (mtime 0, uid/gid 0, mode 0644, sorted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples(shard):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ decoder

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.pack(">IIBBBBB", CANVAS, CANVAS, 8, 0, 0, 0, 0)  # 8-bit grayscale, not interlaced
_IHDR_CHUNK = struct.pack(">I4s13sI", 13, b"IHDR", _IHDR, zlib.crc32(b"IHDR" + _IHDR))  # the only header we accept
_ROW = CANVAS + 1  # a PNG scanline: filter type byte + pixels
_ZERO_ROW = bytes(_ROW)
_Inflated = tuple[bytes, bytes, bytes, list[int]]  # filtered scanlines of input, digit0, digit1; the two labels


def inflate_png(data: bytes) -> bytes:
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
    inflate = zlib.decompressobj()
    raw = inflate.decompress(b"".join(idat), _ROW * CANVAS + 1)  # bounded by the image size: no zip bomb
    if len(raw) != _ROW * CANVAS or not inflate.eof or max(raw[::_ROW]) > 4:
        more = " or more" if inflate.unconsumed_tail else ""
        raise ValueError(f"PNG data of {len(raw)} bytes{more} or a filter type > 4, not 36 rows of 1 + 36 bytes")
    return raw


def _unfilter(raws: Sequence[bytes]) -> np.ndarray:
    """uint8 [N,36,36] from inflated PNG scanlines: one C pass (PIL's PNG row unfilter) over all N images at once.

    Each image follows an all-zero scanline, which is what PNG's first row sees as the row above.
    """
    stored = zlib.compress(_ZERO_ROW + _ZERO_ROW.join(raws), 0)  # level 0: framing only, no compression work
    canvas = Image.frombytes("L", (CANVAS, _ROW * len(raws)), stored, "zip", "L")
    return np.frombuffer(bytearray(canvas.tobytes()), np.uint8).reshape(len(raws), _ROW, CANVAS)[:, 1:]


def _pil_scanlines(data: bytes) -> bytes:
    """Scanlines (filter type 0) of any greyscale PNG PIL reads (other writers' choices: 1-16 bits, interlaced), as
    8-bit grey: 16-bit values scaled (>> 8; PIL's ``convert("L")`` clips them to white), 1-4 bits expanded by PIL.
    RGB and palette PNGs whose pixels are all grey are read as such; colour and alpha are refused with the mode,
    never silently made grey: MultiMNIST digits are grey (the image must still be CANVAS x CANVAS)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG" or im.size != (CANVAS, CANVAS):
            raise ValueError(f"expected a {CANVAS}x{CANVAS} PNG, got a {im.format} of {im.size}")
        pixels = grey_pixels(im)
        if pixels is None and im.mode in ("RGB", "P") and _is_grey(rgb := np.asarray(im.convert("RGB"))):
            pixels = rgb[..., 0]  # grey, in colour clothes
        if pixels is None:
            raise ValueError(
                f"a {im.mode} PNG with colour or alpha ({GREY_ONLY}); converting it to grey would silently change "
                "the data. Fix: write grey images, as capsdist-shards does, or train on colour images with "
                "--data.source image_shards"
            )
    return b"".join(b"\0" + row.tobytes() for row in pixels)


GREY_ONLY = "MultiMNIST shards hold 1- to 16-bit greyscale digits without alpha"


def grey_pixels(im: Image.Image) -> np.ndarray | None:
    """8-bit pixels [H, W] of a 1- to 16-bit greyscale PIL image (16-bit values scaled >> 8: PIL's ``convert("L")``
    clips them to white; 1-4 bits expanded by PIL); None for any other mode."""
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if im.mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B") or its 32-bit integer reading ("I")
        return (np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    return None


def _is_grey(rgb: np.ndarray) -> bool:
    """Whether every pixel of an [H, W, 3] image has equal channels (another writer's RGB or palette of greys)."""
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _scanlines(data: bytes) -> bytes:
    """The fast checked inflate for the writer's PNGs (8-bit grayscale 36x36); PIL for any other valid PNG."""
    try:
        return inflate_png(data)
    except ValueError as err:
        if data[:8] != _PNG_SIGNATURE or "expected a 36x36" not in str(err):
            raise
        return _pil_scanlines(data)


def check_labels(labels: Any, num_classes: int = 10) -> list[int]:
    """The two labels of a sample: distinct integers in [0, num_classes); anything else is a corrupt sample."""
    if not (isinstance(labels, list) and len(labels) == 2 and all(type(x) is int for x in labels)):
        raise ValueError(f"meta labels {labels!r} are not two digits")
    if not all(0 <= x < num_classes for x in labels) or labels[0] == labels[1]:
        raise ValueError(f"meta labels {labels!r} are not two different digits in 0..{num_classes - 1}")
    return labels


def inflate_sample(sample: dict[str, Any]) -> _Inflated:
    """Check and inflate one shard sample (PNG and JSON only; other extensions are ignored, nothing is unpickled)."""
    missing = [k for k in (*IMAGE_KEYS, META_KEY) if k not in sample]
    if missing:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {sample.get('__key__')!r} lacks {missing} (has {present})")
    big = [k for k in (*IMAGE_KEYS, META_KEY) if isinstance(sample[k], TooLarge)]
    if big:
        raise ValueError(f"{sample['__key__']}.{big[0]} is {sample[big[0]].size:,} bytes, over the member cap of "
                         f"{MAX_MEMBER_BYTES:,} (skipped unread)")  # fmt: skip
    labels = check_labels(json.loads(sample[META_KEY].decode())["labels"])  # UTF-8, as written
    images = []
    for key in IMAGE_KEYS:
        try:
            images.append(_scanlines(sample[key]))
        except (ValueError, OSError) as err:  # the message names the member: the shard is named by the caller
            raise type(err)(f"{sample.get('__key__')}.{key}: {err}") from None
    return (*images, labels)


def collate_inflated(samples: list[_Inflated]) -> Batch:
    """Contract batch from inflated samples: the whole batch is unfiltered in one pass and converted once."""
    pixels = torch.from_numpy(_unfilter([raw for s in samples for raw in s[:3]])).unflatten(0, (len(samples), 3))
    return to_batch(pixels[:, 0], torch.tensor([s[3] for s in samples]), pixels[:, 1:])




class MultiMnistFormat:
    """What a MultiMNIST shard stream reads (``ShardStream``'s default format): the schema a shard's first sample
    must have, the decoder, the batch collation and the fix its error messages name."""

    source, name = "multimnist_shards", "MultiMNIST"
    expected = "input.png, digit0.png, digit1.png and meta.json (MultiMNIST, as capsdist-shards writes them)"

    def fits(self, sample: dict[str, Any]) -> bool:
        """Whether ``sample`` has the schema's keys."""
        return all(key in sample for key in (*IMAGE_KEYS, META_KEY))

    def decode(self, sample: dict[str, Any]) -> _Inflated:
        """One checked, inflated sample (``inflate_sample``)."""
        return inflate_sample(sample)

    def collate(self, samples: list[_Inflated]) -> Batch:
        """The contract batch of inflated samples (``collate_inflated``)."""
        return collate_inflated(samples)

    def writer(self) -> str:
        """What writes these shards, for messages."""
        return f"`{data_tool('multimnist')} --out DIR ...`"

    def fix(self) -> str:
        """What to do about shards of no valid sample."""
        tool = data_tool("multimnist")
        return f"check that they are MultiMNIST shards (`{tool} verify DIR`) or rewrite them (`{tool} --out DIR ...`)"
