"""PackBits (TIFF compression 32773) read in bounded time and memory.

tifffile's own PackBits decoder is pure Python and gathers the output as a list of Python ints
(8 bytes per decoded byte: about 1.5 GB for a 64 MP RGB field) before joining it. Here a
segment is decoded straight into one buffer of the size tifffile asks for (`packbits_decode`,
registered as tifffile's decoder for PackBits by `use_bounded_packbits`), and before anything is
decoded each segment's runs are walked to count what it decodes to (`packbits_walk`: nothing
allocated), so that a bomb is refused, and a page of far more runs than any encoder writes (a
Python step each: 30 to 40 s for 256 MB of one-byte runs) is refused unread
(device.ingest.tiff_segments). Grey and RGB first pages are decoded by OpenCV's libtiff instead,
in C.
"""

from __future__ import annotations

from typing import Any

import tifffile

#: Runs (a header byte and its literal or repeated bytes) counted in a TIFF's PackBits segments:
#: walking them costs about 0.3 us each, decoding them in Python 1 us. A page may have this many
#: or one per MIN_BYTES_PER_RUN bytes of pixels (libtiff's encoder writes 14 to 58 on rendered
#: fields, flat grey ones the fewest; one run per byte is a file built to stall the reader).
MAX_PACKBITS_RUNS = 1 << 21
MIN_BYTES_PER_RUN = 8


def packbits_walk(raw: bytes, limit: int, max_runs: int) -> tuple[int, int]:
    """(bytes decoded, runs read) of a PackBits segment, its runs counted (nothing allocated) until
    more than `limit` bytes or `max_runs` runs; a run cut short by the segment's end counts what
    there is of it, as `packbits_decode` decodes it."""
    i, n, out, runs = 0, len(raw), 0, 0
    while i < n and out <= limit and runs < max_runs:
        h = raw[i]
        if h < 128:
            out, i = out + min(h + 1, n - i - 1), i + h + 2
        elif h > 128:
            out, i = out + (257 - h if i + 1 < n else 0), i + 2
        else:
            i += 1
        runs += 1
    return out, runs


def packbits_decode(encoded: bytes, /, *, out: Any = None, **_: Any) -> bytearray:
    """A PackBits segment decoded as tifffile's decoder does (a literal or repeat run cut short by
    the segment's end gives what there is), into one buffer; `out`, the segment's size in bytes
    as tifffile passes it, stops the decoding there."""
    size = out if isinstance(out, int) else packbits_walk(encoded, 1 << 62, 1 << 62)[0]
    buf = bytearray(size)
    i, n, o = 0, len(encoded), 0
    while i < n and o < size:
        h = encoded[i]
        if h < 128:
            part = encoded[i + 1 : i + h + 2][: size - o]
            buf[o : o + len(part)] = part
            o, i = o + len(part), i + h + 2
        elif h > 128:
            k = min(257 - h, size - o) if i + 1 < n else 0
            buf[o : o + k] = encoded[i + 1 : i + 2] * k
            o, i = o + k, i + 2
        else:
            i += 1
    del buf[o:]
    return buf


def use_bounded_packbits() -> None:
    """Make `packbits_decode` tifffile's decoder for PackBits (its codec table is filled lazily from
    `_codecs`, which is consulted first; without that table tifffile's own decoder stays, the
    runs still capped by the walk)."""
    codecs = getattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", None)
    if isinstance(codecs, dict):
        codecs[32773] = packbits_decode
