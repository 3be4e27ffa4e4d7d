"""Stage 1, step 3 (TIFF): which library decodes a page's pixel data, and its strips and tiles
bounded before either does.

tifffile's own decoders inflate each strip or tile in full before comparing it with the page, so
deflate and LZMA segments are inflated by decoders registered here (`use_bounded_inflate`) that
stop one byte past a whole strip or tile, and PackBits runs are counted before anything is
decoded (`check_tiff_inflation`): a few megabytes of deflate or PackBits that declare 256 x 256
pixels and inflate to gigabytes are refused (`corrupt`) with memory of the order of a strip.
OpenCV's libtiff decodes what tifffile cannot without optional packages (LZW, old-style JPEG) and, for grey and RGB first
pages, PackBits (device.ingest.packbits: in C, each strip stopped at its size; tifffile's route
costs a step of Python per run).
"""

from __future__ import annotations

import contextlib
import lzma
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tifffile

from smearscope.device.ingest.errors import IngestError, RejectReason
from smearscope.device.ingest.packbits import MAX_PACKBITS_RUNS, MIN_BYTES_PER_RUN, packbits_walk

PACKBITS = 32773
#: TIFF compressions tifffile decodes only with the optional imagecodecs package (LZW, the
#: commonest, and old-style JPEG): OpenCV's libtiff decodes them, for grey and RGB pages.
OPENCV_TIFF_COMPRESSIONS = frozenset({5, 7})


#: Compressions tifffile inflates in full whatever the page's size, and how far each inflates at most.
_BOUNDED_INFLATE = {8: "zlib", 32946: "zlib", 34925: "lzma", PACKBITS: "packbits"}
#: What tifffile decodes here: none, and the compressions whose inflation is bounded first
#: (`check_tiff_inflation`). Others it may decode (zstd on Python 3.14, anything with imagecodecs
#: installed) are inflated unbounded: refused, or decoded by OpenCV (OPENCV_TIFF_COMPRESSIONS).
TIFFFILE_COMPRESSIONS = frozenset({1, *_BOUNDED_INFLATE})


def tiff_decodable(page: tifffile.TiffPage) -> bool:
    """tifffile decodes this page's compression, and its inflation is bounded first."""
    if int(page.compression) not in TIFFFILE_COMPRESSIONS:
        return False
    try:
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except KeyError:
        return False
    return True


class SegmentOverflow(ValueError):
    """A strip or tile that inflates beyond the bytes its geometry holds (a decompression bomb)."""


def _overflow(limit: int) -> SegmentOverflow:
    return SegmentOverflow(f"TIFF segment inflates beyond the {limit} bytes its geometry holds (a decompression bomb)")


def _zlib_inflate(data: bytes, limit: int) -> bytes:
    """zlib.decompress(data) (trailing bytes after the stream ignored, a stream cut short an
    error), inflating no more than one byte past `limit`."""
    d = zlib.decompressobj()
    out = d.decompress(data, limit + 1)
    if len(out) > limit:
        raise _overflow(limit)
    if not d.eof:
        raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")
    return out


def _lzma_inflate(data: bytes, limit: int) -> bytes:
    """lzma.decompress(data) (concatenated streams joined, trailing bytes that are no stream
    ignored, a stream cut short an error), inflating no more than one byte past `limit`."""
    parts: list[bytes] = []
    size = 0
    while True:
        d = lzma.LZMADecompressor()
        try:
            part = d.decompress(data, max_length=limit + 1 - size)
        except lzma.LZMAError:
            if parts:
                break
            raise
        parts.append(part)
        size += len(part)
        if size > limit:
            raise _overflow(limit)
        if not d.eof:
            raise lzma.LZMAError("Compressed data ended before the end-of-stream marker was reached")
        data = d.unused_data
        if not data:
            break
    return b"".join(parts)


_INFLATE = {"zlib": _zlib_inflate, "lzma": _lzma_inflate}


def segment_bytes(page: tifffile.TiffPage) -> int:
    """Bytes one whole strip or tile of the page holds."""
    return int(np.prod(page.chunks)) * page.dtype.itemsize


#: Compressions whose tifffile decoder is one of the bounded ones here (`use_bounded_inflate`).
_BOUNDED_BY_DECODER: set[int] = set()
#: The segment size of the page this thread is decoding (`bounded_segments`); unset, tifffile's own
#: decoder runs (another reader of TIFFs in this process).
_decoding = threading.local()


@contextlib.contextmanager
def bounded_segments(page: tifffile.TiffPage) -> Iterator[None]:
    """While this thread decodes `page` (with tifffile's maxworkers=1: its own threads would not see
    it), each deflate or LZMA segment inflates to at most a whole strip or tile of the page: a last
    strip may be coded at full height, of which tifffile keeps the rows the page has."""
    _decoding.segment_bytes = segment_bytes(page)
    try:
        yield
    finally:
        _decoding.segment_bytes = None


def _bounded_decoder(kind: str, original: Any) -> Any:
    def decode(data: bytes, /, *, out: Any = None, **kwargs: Any) -> bytes:
        limit = getattr(_decoding, "segment_bytes", None)
        if limit is None:
            return original(data, out=out, **kwargs)
        return _INFLATE[kind](data, limit)

    return decode


def use_bounded_inflate() -> None:
    """Make the bounded inflaters tifffile's decoders for deflate and LZMA while a page is decoded
    within `bounded_segments` (its codec table is filled lazily from `_codecs`, consulted first;
    without that table each segment is inflated once here, bounded, before tifffile inflates it
    again in full)."""
    codecs = getattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", None)
    if isinstance(codecs, dict):
        for compression, kind in _BOUNDED_INFLATE.items():
            if kind in _INFLATE and compression not in _BOUNDED_BY_DECODER:
                codecs[compression] = _bounded_decoder(kind, tifffile.TIFF.DECOMPRESSORS[compression])
                _BOUNDED_BY_DECODER.add(compression)


def _inflated_size(kind: str, raw: bytes, limit: int) -> int:
    """Bytes a compressed segment inflates to, at most `limit` of them produced."""
    if kind == "zlib":
        return len(zlib.decompressobj().decompress(raw, limit))
    return len(lzma.LZMADecompressor().decompress(raw, max_length=limit))


def check_tiff_inflation(data: bytes, page: tifffile.TiffPage, name: str, by_opencv: bool = False) -> None:
    """Refuse (`corrupt`) a page whose strips or tiles inflate beyond their segment's size, or that
    lists other than one segment per strip or tile its geometry holds, or one without data. Deflate and LZMA segments are bounded as tifffile
    inflates them (`use_bounded_inflate`; where that could not be set up, each is inflated here up
    to one byte past its size and no further, in C); PackBits runs are counted, at most
    MAX_PACKBITS_RUNS of them in the file or one per MIN_BYTES_PER_RUN bytes of its page: beyond
    that a page tifffile would decode is refused (`unsupported_format`: seconds of Python), and on
    one OpenCV decodes (`by_opencv`, which stops each strip at its size) the rest goes unchecked."""
    segments = int(np.prod(page.chunked))
    _check_segment_list(page, segments, name)
    kind = _BOUNDED_INFLATE.get(int(page.compression))
    if kind is None:
        return
    segment = segment_bytes(page)
    if int(page.compression) in _BOUNDED_BY_DECODER:
        return  # each segment bounded as tifffile inflates it
    runs_left = MAX_PACKBITS_RUNS if by_opencv else max(MAX_PACKBITS_RUNS, segment * segments // MIN_BYTES_PER_RUN)
    most = runs_left
    for k, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        raw = data[offset:offset + count]
        if kind == "packbits":
            if len(raw) > 2 * segment + 16:  # longer than any encoding of a segment
                raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF segment {k} holds {len(raw)} bytes of "
                                  f"PackBits for {segment} bytes of pixels")
            size, runs = packbits_walk(raw, segment, runs_left + 1)
            if runs > runs_left and by_opencv:
                return  # libtiff bounds the rest
            if runs > runs_left:
                raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: TIFF page of more than {most} "
                                  "PackBits runs (seconds to read; save the field uncompressed, deflate or LZW)")
            runs_left -= runs
            needed = needed_bytes(page, k, segment)
            if size < needed:  # libtiff would fill the rest of the strip with black
                raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF segment {k} decodes to {size} of the "
                                  f"{needed} bytes its rows hold (cut short)")
        else:
            size = _inflated_size(kind, raw, segment + 1)
        if size > segment:
            raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF segment {k} inflates beyond the "
                              f"{segment} bytes its geometry holds (a decompression bomb)")


def _check_segment_list(page: tifffile.TiffPage, segments: int, name: str) -> None:
    """One strip or tile listed per segment the geometry holds, each with bytes at a place (`corrupt`
    otherwise): tifffile takes a segment missing from the lists, or at offset 0, or of 0 bytes, for
    absent (a sparse file) and fills it with zeros, a band of the field black that was analysed as such."""
    listed = len(page.dataoffsets)
    if listed != segments or len(page.databytecounts) != segments:
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF lists {listed} data segments where its geometry "
                          f"holds {segments} ({len(page.databytecounts)} byte counts)")
    empty = next((k for k, (o, n) in enumerate(zip(page.dataoffsets, page.databytecounts)) if o == 0 or n == 0), None)
    if empty is not None:
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF strip or tile {empty} has no data (offset 0 or "
                          "0 bytes): it would be read as black")


def needed_bytes(page: tifffile.TiffPage, k: int, segment: int) -> int:
    """Bytes segment `k` must decode to (`segment`: `segment_bytes(page)`): a tile its whole size, a
    strip its rows (the last of each plane holds the rows left); libtiff decodes no more of it."""
    if page.is_tiled:
        return segment
    rows_per, rows = int(page.chunks[0]), int(page.imagelength)
    first_row = k % -(-rows // rows_per) * rows_per
    return segment // rows_per * min(rows_per, rows - first_row)


def opencv_tiff(page: tifffile.TiffPage) -> bool:
    """The page is decoded by OpenCV instead: its compression needs a package not installed, or it
    is PackBits of 8- or 16-bit grey or RGB samples (black is zero), interleaved, without a
    predictor. Only the file's first directory (the one OpenCV decodes, so the
    size checked is the size it allocates) and only grey or RGB without alpha (OpenCV
    premultiplies 8-bit alpha)."""
    if page.index != 0 or int(page.samplesperpixel) not in (1, 3):
        return False
    if int(page.compression) == PACKBITS:
        return (int(page.photometric) in (1, 2) and page.dtype in (np.uint8, np.uint16)
                and int(page.planarconfig) == 1 and int(page.predictor) == 1)  # libtiff ignores a predictor
    return not tiff_decodable(page) and int(page.compression) in OPENCV_TIFF_COMPRESSIONS


def orientation_cleared(data: bytes, page: tifffile.TiffPage) -> bytes:
    """The file with its first page's Orientation entry set to 1 (or as it is without one):
    OpenCV's TIFF decoder turns a page by the tag whatever the flags (and scrambles tiled 8-bit
    pages turned 2, 3, 6 or 7), so it is given the page as stored and the tag applied after, once,
    as for every other image. A copy of the file only when the tag turns the page."""
    tag = page.tags.get(274)
    if tag is None or tag.value == 1 or int(tag.dtype) not in (3, 4):  # SHORT or LONG, as tifffile read it
        return data
    patched = bytearray(data)
    struct.pack_into(page.parent.byteorder + ("H" if int(tag.dtype) == 3 else "I"), patched, tag.valueoffset, 1)
    return bytes(patched)
