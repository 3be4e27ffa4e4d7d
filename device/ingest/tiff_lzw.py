"""Stage 1, step 5 (TIFF): the LZW strips and tiles of an 8-bit page checked before OpenCV decodes it.

OpenCV's libtiff decodes an 8-bit page through its RGBA interface, which logs a damaged LZW segment
("Using code not yet in table", "Not enough data") and goes on: the rows of a strip holding garbage
came back wrong and were analysed. So each segment's codes are walked here as libtiff's decoder reads
them (9 to 12 bits, most significant first, the width growing one code early, Clear 256 and
EndOfInformation 257) until they give the bytes the segment's rows hold: a code past the table, a
first code after Clear that is no byte, or codes that end before those bytes make the page `corrupt`.
A page of FillOrder 2 (each byte's bits least significant first) has its bytes reversed first, as libtiff does.
Between two Clear codes the width of every code is known beforehand, so each such run is read and
its strings' lengths summed with numpy, not code by code in Python.
"""

from __future__ import annotations

import numpy as np
import tifffile

from smearscope.device.ingest.errors import IngestError, RejectReason
from smearscope.device.ingest.tiff_segments import needed_bytes, segment_bytes

LZW = 5
_CLEAR, _EOI, _FIRST = 256, 257, 258
#: Codes after a Clear that libtiff's table holds (its CSIZE, 4096 + 1024 for encoders that overflow).
_RUN = 5119 - _FIRST + 1
#: The width of the i-th code after a Clear: the table grows by one entry per code from the second on,
#: and the width one code before the table reaches 511, 1023 and 2047 entries (TIFF 6.0's early change).
_WIDTH = np.select([np.arange(_RUN) <= 253, np.arange(_RUN) <= 765, np.arange(_RUN) <= 1789], [9, 10, 11], 12)
_START = np.concatenate(([0], np.cumsum(_WIDTH)))  # bits before the i-th code of a run
#: The largest code the i-th code of a run may be: a byte first, then up to the entry it adds itself.
_LIMIT = np.concatenate(([_CLEAR - 1], np.arange(1, _RUN) + _FIRST - 1))
#: Bytes of pixels per run between Clear codes at least, on average over a segment: encoders clear a
#: full table (3837 codes or more, each a byte or more) or, as libtiff's, when the ratio falls, checked
#: every 10 000 bytes; a segment of Clear codes alone would cost a step of Python per code.
MIN_BYTES_PER_RUN = 2048
_TOO_MANY_RUNS = "too many runs"
#: Strips or tiles of an 8-bit LZW page walked at most (about 0.3 ms each): a 64 MP field in strips of
#: one row has 8000, in tiles of 256 x 256 about 1000; in tiles of 16 x 16 it would have 250 000.
MAX_LZW_SEGMENTS = 16384
#: Each byte with its bits in the other order (FillOrder 2).
_REVERSED_BITS = np.array([int(f"{v:08b}"[::-1], 2) for v in range(256)], np.uint8)


def check_lzw_segments(data: bytes, page: tifffile.TiffPage, name: str) -> None:
    """Refuse (`corrupt`) an LZW page one of whose segments libtiff would decode with an error."""
    if int(page.compression) != LZW:
        return
    if len(page.dataoffsets) > MAX_LZW_SEGMENTS:
        raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: 8-bit LZW TIFF of {len(page.dataoffsets)} strips "
                          f"or tiles (at most {MAX_LZW_SEGMENTS} are read: each is walked apart)")
    segment = segment_bytes(page)
    reverse = int(page.fillorder) == 2  # bits least significant first: libtiff reverses them before decoding
    for k, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        raw = data[offset : offset + count]
        if reverse:
            raw = _REVERSED_BITS[np.frombuffer(raw, np.uint8)].tobytes()
        if raw[:1] == b"\x00" and len(raw) > 1 and raw[1] & 1:
            continue  # the LZW of TIFF 5.0 (least significant bit first), which libtiff reads apart: not walked
        needed = needed_bytes(page, k, segment)
        problem = lzw_problem(raw, needed, 2 + needed // MIN_BYTES_PER_RUN)
        if problem == _TOO_MANY_RUNS:
            raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: TIFF LZW segment {k} clears its code "
                              f"table more often than once per {MIN_BYTES_PER_RUN} bytes (each a step of Python)")
        if problem:
            raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF LZW segment {k} {problem}")


def lzw_problem(raw: bytes, needed: int, most_runs: int) -> str | None:
    """What libtiff's LZW decoder would find wrong before giving `needed` bytes of `raw`, or None;
    `_TOO_MANY_RUNS` past `most_runs` runs between Clear codes."""
    padded = np.frombuffer(raw + b"\x00\x00\x00", np.uint8).astype(np.uint32)
    bits, pos, out, first = 8 * len(raw), 0, 0, 1  # a strip starts as after a Clear, its first code read
    for _ in range(most_runs):
        fits = int(np.searchsorted(_START, bits - pos + _START[first], side="right")) - first - 1
        n = min(fits, _RUN - first, needed - out)  # each code a byte or more: no more are read
        at = pos + _START[first : first + n] - _START[first]
        width = _WIDTH[first : first + n]
        byte = at >> 3
        word = (padded[byte] << 16) | (padded[byte + 1] << 8) | padded[byte + 2]
        codes = (word >> (24 - (at & 7) - width)) & ((1 << width) - 1)
        stops = np.flatnonzero((codes == _CLEAR) | (codes == _EOI))
        stop = int(stops[0]) if stops.size else n
        bad = np.flatnonzero(codes[:stop] > _LIMIT[first : first + stop])
        end = int(bad[0]) if bad.size else stop
        lengths = _string_lengths(codes[:end], first)
        total = out + np.cumsum(lengths)
        if total.size and total[-1] >= needed:
            return None
        out = int(total[-1]) if total.size else out
        if bad.size:
            return f"holds a code past its table after {out} of the {needed} bytes its rows hold"
        if stop == n:  # (n cut to the bytes still needed gave them, returned above)
            if n == _RUN - first:
                return f"fills its code table without a Clear code after {out} of {needed} bytes"
            return f"ends after {out} of the {needed} bytes its rows hold"
        if codes[stop] == _EOI:
            return f"ends (EndOfInformation) after {out} of the {needed} bytes its rows hold"
        pos, first = int(at[stop] + width[stop]), 0
    return _TOO_MANY_RUNS


def _string_lengths(codes: np.ndarray, first: int) -> np.ndarray:
    """The length of the string each code of a run stands for: a byte 1, entry e one more than the string
    of the code before the one that added it (the code at run index e - 258), found by pointer jumping
    (a root's parent is an extra element of depth 0, its own parent)."""
    n = first + len(codes)
    parent = np.empty(n + 1, np.int64)
    parent[:first] = n  # a strip's start: a byte read before it
    parent[first:n] = np.where(codes >= _FIRST, codes.astype(np.int64) - _FIRST, n)
    parent[n] = n
    depth = (parent != n).astype(np.int64)
    while (parent[:n] != n).any():
        depth += depth[parent]
        parent = parent[parent]
    return depth[first:n] + 1
