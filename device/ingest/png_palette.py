"""A palette PNG's indices checked against its palette (PNG 1.2, 4.1.2: an index past the
palette's entries is an error). libpng shows such an index as black and OpenCV decodes on, so a
file whose indices run past its PLTE was analysed with black where colours belonged, or refused as
`blank_image` when every index did. The PNG is decoded once with its palette replaced by a ramp
(entry i = grey i), which gives the indices themselves; they are checked, then painted with the
file's own colours in place (no second copy of the frame).
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.device.ingest.errors import IngestError, RejectReason

logger = logging.getLogger(__name__)

_PALETTE_COLOUR_TYPE = 3


@dataclass(frozen=True)
class PngPalette:
    """A colour-type-3 PNG's palette (RGB triples) and the same file with a ramp in its place."""

    colours: np.ndarray  # entries x 3, RGB as stored
    ramp_png: bytes


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_palette(data: bytes) -> PngPalette | None:
    """The palette of a PNG whose chunks `headers.png_header` found whole, when its pixels are
    palette indices; None for other PNGs and for one without a usable PLTE before its pixel data
    (its decoder refuses it)."""
    if len(data) < 33 or data[25] != _PALETTE_COLOUR_TYPE:  # IHDR's colour type
        return None
    depth, pos = data[24], 8
    while pos + 12 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if ctype in (b"IDAT", b"IEND"):
            return None
        end = pos + 12 + length
        if ctype == b"PLTE":
            if length % 3 or not length:
                return None
            entries = min(length // 3, 1 << depth)  # libpng keeps no more than the depth can index
            colours = np.frombuffer(data[pos + 8 : pos + 8 + 3 * entries], np.uint8).reshape(-1, 3)
            ramp = np.repeat(np.arange(1 << depth, dtype=np.uint8), 3).tobytes()
            return PngPalette(colours, data[:pos] + _chunk(b"PLTE", ramp) + data[end:])
        pos = end
    return None


def paint(indices: np.ndarray, palette: PngPalette, name: str) -> np.ndarray:
    """The BGR(A) frame of a palette PNG decoded with its ramp (every colour sample its index,
    alpha from its tRNS): `corrupt` when an index lies past the palette, else its colours."""
    top = int(indices[..., 0].max())
    if top >= len(palette.colours):
        raise IngestError(RejectReason.CORRUPT, f"{name}: PNG palette index {top} beyond its "
                          f"{len(palette.colours)} colour(s)")
    lut = np.zeros((256, 1, indices.shape[2]), np.uint8)
    lut[: len(palette.colours), 0, :3] = palette.colours[:, ::-1]  # RGB as stored, BGR as decoded
    if indices.shape[2] == 4:
        lut[:, 0, 3] = np.arange(256)  # alpha as tRNS gave it
    return cv2.LUT(indices, lut, dst=indices)
