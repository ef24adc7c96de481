"""Every PNG colour type and bit depth the shard decoder can meet: greys of 1, 2, 4, 8 and 16 bits decode to the
right 8-bit values (16-bit scaled, not clipped to white), colour, palette and alpha PNGs are refused with their
mode and the sample named, never silently made grey."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from capsdist.data.recipe import CANVAS
from capsdist.data.shard_format import _pil_scanlines, inflate_sample

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(values: np.ndarray, depth: int, colour: int) -> bytes:
    """A CANVAS x CANVAS PNG of ``values`` ([H, W, channels], ints below 2**depth), written byte by byte."""
    rows = []
    for row in values.reshape(CANVAS, -1):
        if depth < 8:  # pack several samples into each byte, most significant first
            bits = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :].reshape(-1)
            rows.append(b"\0" + np.packbits(bits).tobytes())
        else:
            rows.append(b"\0" + row.astype(">u2" if depth == 16 else np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", CANVAS, CANVAS, depth, colour, 0, 0, 0)
    palette = _chunk(b"PLTE", bytes(i % 256 for i in range(3 * 2**depth))) if colour == 3 else b""
    body = _chunk(b"IHDR", header) + palette + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _decoded(data: bytes) -> np.ndarray:
    raw = np.frombuffer(_pil_scanlines(data), np.uint8).reshape(CANVAS, CANVAS + 1)
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:]


@pytest.mark.parametrize("depth", [1, 2, 4, 8, 16])
def test_grey_of_every_depth_decodes_to_its_8_bit_value(depth: int) -> None:
    rng = np.random.default_rng(depth)
    values = rng.integers(0, 2**depth, size=(CANVAS, CANVAS, 1))
    expected = values[..., 0] >> 8 if depth == 16 else values[..., 0] * 255 // (2**depth - 1)
    assert np.array_equal(_decoded(png(values, depth, 0)), expected)


def test_16_bit_grey_is_scaled_not_clipped_to_white() -> None:
    values = np.full((CANVAS, CANVAS, 1), 0x4000)  # a quarter of full scale
    assert np.all(_decoded(png(values, 16, 0)) == 0x40)


@pytest.mark.parametrize(
    ("colour", "depth", "mode"),
    [(2, 8, "RGB"), (2, 16, "RGB"), (6, 8, "RGBA"), (6, 16, "RGBA"), (4, 8, "LA"), (4, 16, "RGBA"), (3, 1, "P"),
     (3, 2, "P"), (3, 4, "P"), (3, 8, "P")],
)  # fmt: skip  (PIL reads a 16-bit grey+alpha PNG as RGBA)
def test_colour_palette_and_alpha_are_refused_with_the_sample_named(colour: int, depth: int, mode: str) -> None:
    values = np.zeros((CANVAS, CANVAS, CHANNELS[colour]), dtype=np.int64)
    values[..., 0] = 256 if depth == 16 else 1  # a colour (palette entry 1 is (3, 4, 5)), or an alpha of 1
    sample = {"__key__": "000042", "input.png": png(values, depth, colour), "digit0.png": b"", "digit1.png": b"",
              "meta.json": b'{"labels": [1, 2]}'}  # fmt: skip
    refused = rf"000042\.input\.png: a {mode}\S* PNG with colour or alpha \(MultiMNIST shards hold"
    with pytest.raises(ValueError, match=refused):
        inflate_sample(sample)


@pytest.mark.parametrize("colour", [2, 3])
def test_rgb_and_palette_pngs_of_greys_are_read_as_grey(colour: int) -> None:
    """Another writer's RGB (R = G = B) or palette of grey entries: the same pixels as the grey PNG."""
    grey = np.random.default_rng(colour).integers(0, 256, size=(CANVAS, CANVAS, 1))
    if colour == 2:
        data = png(np.repeat(grey, 3, axis=2), 8, 2)
    else:  # the grey values as palette indices, with a palette whose entry k is (k, k, k)
        data = png(grey, 8, 3).replace(_chunk(b"PLTE", bytes(i % 256 for i in range(3 * 256))),
                                       _chunk(b"PLTE", bytes(k for k in range(256) for _ in range(3))))  # fmt: skip
    assert np.array_equal(_decoded(data), grey[..., 0])
