"""Stage 1 (ingest): every hostile input gets its exact reason code; good inputs decode right."""

from __future__ import annotations

import io
import lzma
import os
import struct
import zlib
from pathlib import Path

import cv2
import hostile  # tests/ is on sys.path (pytest prepend import mode), as for conftest
import numpy as np
import pytest
import tifffile

from smearscope.service.ingest import (
    DecodedImage,
    IngestError,
    IngestLimits,
    OutsideFolders,
    RejectReason,
    load_image,
    read_image_file_within,
)

FILE_LEVEL = {"not_found", "not_a_file", "empty_file"}


# --- hostile inputs -------------------------------------------------------------------------


def test_reason_codes_are_stable_strings() -> None:
    assert {r.value for r in RejectReason} == {
        "not_found",
        "not_a_file",
        "unreadable",
        "empty_file",
        "file_too_large",
        "not_an_image",
        "unsupported_format",
        "corrupt",
        "truncated",
        "too_large_at_scale",
        "too_large_pixels",
        "absurd_aspect",
        "too_small",
        "bad_dtype",
        "bad_channels",
        "multi_frame",
        "blank_image",
    }
    assert {c.expected for c in hostile.CASES} <= {r.value for r in RejectReason}


@pytest.mark.parametrize("case", hostile.CASES, ids=[c.name for c in hostile.CASES])
def test_hostile_input_gets_its_reason_code(case: hostile.HostileCase, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    with pytest.raises(IngestError) as err:
        load_image(path, limits=IngestLimits(**case.limits))
    assert err.value.code == RejectReason(case.expected), err.value.message
    assert err.value.code.value == case.expected
    assert err.value.message


@pytest.mark.parametrize(
    "case",
    [c for c in hostile.CASES if c.expected not in FILE_LEVEL],
    ids=[c.name for c in hostile.CASES if c.expected not in FILE_LEVEL],
)
def test_same_code_from_bytes_as_from_path(case: hostile.HostileCase, tmp_path: Path) -> None:
    data = case.make(tmp_path).read_bytes()
    with pytest.raises(IngestError) as err:
        load_image(data, limits=IngestLimits(**case.limits), source_name="upload")
    assert err.value.code.value == case.expected
    assert err.value.message.startswith("upload")


def test_a_path_no_file_can_have_is_not_found_not_a_value_error() -> None:
    """A path holding a NUL character, or a lone surrogate that is no file name's byte (a string
    from JSON, a CSV of typed cells): `not_found`, as the decoder promises an IngestError for every
    bad input (os.stat raised ValueError, which escaped to the caller)."""
    for path in ("/tmp/a\x00b.png", "/tmp/\ud83d.png"):
        with pytest.raises(IngestError) as err:
            load_image(path)
        assert err.value.code is RejectReason.NOT_FOUND, path
        err.value.message.encode("utf-8")


def test_empty_bytes_and_wrong_argument_type() -> None:
    with pytest.raises(IngestError) as err:
        load_image(b"")
    assert err.value.code is RejectReason.EMPTY_FILE
    with pytest.raises(TypeError):
        load_image(np.zeros((100, 100, 3), np.uint8))  # type: ignore[arg-type]


def test_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoder called for a bomb")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    png = hostile.png_set_ihdr_size(
        hostile.encode(".png", hostile.smear_like(100, 100)), 9000, 9000
    )
    with pytest.raises(IngestError) as err:
        load_image(png)
    assert err.value.code is RejectReason.TOO_LARGE_PIXELS


def test_a_compressed_tiff_strip_is_never_inflated_past_its_size() -> None:
    """A 256 x 256 TIFF whose 64 kB deflate strip inflates to 64 MB, and a PackBits strip of runs
    that would decode 64-fold past the strip: refused, with memory of the order of the strip."""
    import tracemalloc

    cases = [(hostile.deflate_bomb(64), "inflates beyond"),
             # short enough to be a PackBits strip of 192 kB, runs of 128 from 2 bytes each
             (hostile.one_strip_tiff(b"\x81\x00" * 150_000, 32773), "inflates beyond"),
             (hostile.one_strip_tiff(b"\x80" * 500_000, 32773), "bytes of PackBits"),
             # exactly the strip's 196 608 bytes, then one byte more
             (hostile.one_strip_tiff(b"\x81\x00" * 1536 + b"\x00\x07", 32773), "inflates beyond")]
    for data, says in cases:
        tracemalloc.start()
        try:
            with pytest.raises(IngestError) as err:
                load_image(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err.value.code is RejectReason.CORRUPT and says in err.value.message
        assert peak < 8 * 2**20, peak  # the 64 MB are never allocated


def _tiled_tiff(rgb: np.ndarray, tile: int = 16, listed: int | None = None) -> bytes:
    """An 8-bit RGB TIFF of deflate tiles; its TileOffsets and TileByteCounts list `listed` tiles
    (the real ones over and over past their number): tifffile keeps what a tiled page lists."""
    h, w, _ = rgb.shape
    tiles = [zlib.compress(np.ascontiguousarray(rgb[y:y + tile, x:x + tile]).tobytes())
             for y in range(0, h, tile) for x in range(0, w, tile)]
    listed = len(tiles) if listed is None else listed
    out, offsets = bytearray(b"II*\0\0\0\0\0"), []
    for t in tiles:
        offsets.append(len(out))
        out += t + b"\0" * (len(t) & 1)
    offsets_at = len(out)
    out += struct.pack(f"<{listed}I", *(offsets[k % len(tiles)] for k in range(listed)))
    counts_at = len(out)
    out += struct.pack(f"<{listed}I", *(len(tiles[k % len(tiles)]) for k in range(listed)))
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 2), (277, 3, 1, 3),
            (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, listed, offsets_at), (325, 4, listed, counts_at)]
    struct.pack_into("<I", out, 4, len(out))  # the directory, after the arrays
    out += struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", t, ty, n, v) if ty == 4 else struct.pack("<HHIHH", t, ty, n, v, 0)
        for t, ty, n, v in tags)
    return bytes(out + b"\0" * 4)


def test_a_tiff_listing_more_tiles_than_its_geometry_holds_is_refused_before_any_is_inflated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """100 000 tiles listed for a frame of 96: refused as corrupt at once, not inflated tile by
    tile (a few hundred kilobytes of offsets would keep the station inflating for as long as the
    list is long; tifffile itself reads the frame's 96 and ignores the rest)."""
    from smearscope.device.ingest import tiff_segments

    inflated: list[int] = []
    real = tiff_segments._INFLATE["zlib"]
    monkeypatch.setitem(tiff_segments._INFLATE, "zlib", lambda data, limit: inflated.append(limit) or real(data, limit))
    bgr = hostile.smear_like(128, 192, seed=6)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    np.testing.assert_array_equal(load_image(_tiled_tiff(rgb)).pixels, bgr)  # a tiled TIFF reads
    assert inflated == [16 * 16 * 3] * 96  # each tile bounded by its size
    inflated.clear()
    with pytest.raises(IngestError) as err:
        load_image(_tiled_tiff(rgb, listed=100_000))
    assert err.value.code is RejectReason.CORRUPT
    assert "lists 100000 data segments where its geometry holds 96" in err.value.message
    assert not inflated


def test_deflate_and_lzma_strips_are_read_as_their_libraries_read_them() -> None:
    """The bounded inflaters tifffile is given read what zlib.decompress and lzma.decompress read:
    bytes after a deflate stream's end ignored, LZMA streams one after another joined, a stream
    cut short refused (`corrupt`), one byte past the strip's size a bomb."""
    bgr = hostile.smear_like(64, 64, seed=8)
    raw = np.ascontiguousarray(bgr[:, :, ::-1]).tobytes()  # one strip of 12 288 bytes
    first, second = lzma.compress(raw[:5000]), lzma.compress(raw[5000:])
    reads = [zlib.compress(raw) + b"after the stream", first + second, first + second + b"not a stream"]
    for strip, compression in zip(reads, (8, 34925, 34925)):
        np.testing.assert_array_equal(load_image(hostile.one_strip_tiff(strip, compression, 64, 64)).pixels, bgr)
    for strip, compression, says in ((zlib.compress(raw)[:-6], 8, "truncated stream"),
                                     (first + second[:-9], 34925, "end-of-stream marker"),
                                     (zlib.compress(raw + b"\0"), 8, "inflates beyond the 12288 bytes"),
                                     (first + lzma.compress(raw[5000:] + b"\0"), 34925, "inflates beyond")):
        with pytest.raises(IngestError) as err:
            load_image(hostile.one_strip_tiff(strip, compression, 64, 64))
        assert err.value.code is RejectReason.CORRUPT and says in err.value.message, err.value.message


@pytest.mark.parametrize("compression", ["zlib", "lzma"])
def test_a_last_strip_coded_at_full_height_reads_as_the_rows_the_page_has(compression: str) -> None:
    """Some writers code the last strip at full RowsPerStrip height: the page reads as its 150 rows
    (the strip is bounded by a whole strip, not by the rows left: it was refused as a bomb), and
    another reader of TIFFs in this process (tifffile itself) reads it as before."""
    bgr = hostile.smear_like(192, 128, seed=9)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(bgr[:, :, ::-1]), photometric="rgb", compression=compression,
                     rowsperstrip=64, metadata=None)
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags[257]  # ImageLength: 192 -> 150, the last strip still codes 64 rows
        struct.pack_into("<H" if int(tag.dtype) == 3 else "<I", data, tag.valueoffset, 150)
    np.testing.assert_array_equal(load_image(bytes(data)).pixels, bgr[:150])
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(bytes(data)))[:, :, ::-1], bgr[:150])


def test_an_lzma_tiff_decodes_and_an_lzma_bomb_is_refused_unexpanded(field: np.ndarray) -> None:
    """LZMA is one of the TIFF compressions read here (bounded like deflate): a frame reads
    exactly, and a strip of 10 kB that inflates to 64 MB is refused as a bomb, never expanded."""
    import lzma
    import tracemalloc

    buf = io.BytesIO()
    tifffile.imwrite(buf, field[:, :, ::-1], photometric="rgb", compression="lzma")
    with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tif:
        assert int(tif.pages[0].compression) == 34925
    img = load_image(buf.getvalue())
    np.testing.assert_array_equal(img.pixels, field)
    assert (img.format, img.original_channels) == ("tiff", 3)

    squeeze = lzma.LZMACompressor(preset=0)
    strip = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(64)) + squeeze.flush()
    bomb = hostile.one_strip_tiff(strip, 34925)  # 256 x 256 RGB: 192 kB fit
    tracemalloc.start()
    try:
        with pytest.raises(IngestError) as err:
            load_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code is RejectReason.CORRUPT and "inflates beyond" in err.value.message
    assert peak < 8 * 2**20, peak  # the 64 MB are never allocated


def test_a_tiff_compression_whose_inflation_is_not_bounded_is_refused() -> None:
    """zstd (tifffile lists a decoder for it, which inflates in full: unbounded with Python 3.14's
    zstd) or any codec imagecodecs would add: refused as a format, never handed to that decoder."""
    assert 50000 in tifffile.TIFF.DECOMPRESSORS
    zstd = bytearray(hostile.one_strip_tiff(b"\0" * 64, 8))
    struct.pack_into("<H", zstd, zstd.index(struct.pack("<HHIHH", 259, 3, 1, 8, 0)) + 8, 50000)
    with pytest.raises(IngestError) as err:
        load_image(bytes(zstd))
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    progressive = hostile.encode(".jpg", hostile.smear_like(200, 300), [int(cv2.IMWRITE_JPEG_PROGRESSIVE), 1])
    assert 2 <= progressive.count(b"\xff\xda") <= 20
    assert load_image(progressive).pixels.shape == (200, 300, 3)  # a progressive JPEG reads
    first = progressive.index(b"\xff\xda")
    end = progressive.rindex(b"\xff\xd9")
    scan = progressive[first:progressive.index(b"\xff\xda", first + 2)]
    many = progressive[:first] + scan * 101 + progressive[first:end] + b"\xff\xd9"

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoder called")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(IngestError) as err:
        load_image(many)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT and "scans" in err.value.message


def _progressive_jpeg(scans: int, blocks: np.ndarray) -> bytes:
    """A valid progressive grey JPEG of `scans` scans (64 to 126) whose 8 x 8 blocks are flat at
    `blocks` + 128: a DC scan, one scan per AC coefficient (each zero everywhere), and as many of
    those coefficients as the count needs sent in two bit planes (a first scan and a refinement)."""
    assert 64 <= scans <= 126
    refined = scans - 64

    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    def entropy(bits: str) -> bytes:
        bits += "1" * (-len(bits) % 8)
        return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")

    def sos(ss: int, se: int, ah: int, al: int) -> bytes:
        return segment(0xDA, bytes([1, 1, 0x00, ss, se, ah << 4 | al]))

    dc, prev = [], 0
    for value in blocks.ravel().tolist():
        diff, prev = value - prev, value
        size = abs(diff).bit_length()
        dc.append(format(size, "04b") + (format(diff if diff >= 0 else diff + (1 << size) - 1, f"0{size}b")
                                         if size else ""))
    rows, cols = blocks.shape
    out = b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([8] * 64))  # every quantiser 8: DC = mean - 128
    out += segment(0xC2, struct.pack(">BHHBBBB", 8, rows * 8, cols * 8, 1, 1, 0x11, 0))
    out += segment(0xC4, b"\x00" + bytes([0, 0, 0, 12] + [0] * 12) + bytes(range(12)))  # DC sizes: 4-bit codes
    out += segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")  # AC: only end-of-band, code "0"
    out += sos(0, 0, 0, 0) + entropy("".join(dc))
    end_of_band = entropy("0" * blocks.size)
    for k in range(1, 64):
        out += sos(k, k, 0, 1 if k <= refined else 0) + end_of_band
    for k in range(1, refined + 1):
        out += sos(k, k, 1, 0) + end_of_band
    return out + b"\xff\xd9"


def test_a_jpeg_of_exactly_the_most_scans_read_decodes_and_one_more_is_refused() -> None:
    """The scan limit is inclusive: a valid progressive JPEG of MAX_JPEG_SCANS scans decodes to
    its pixels; the same picture in one scan more (as valid: OpenCV reads it) is refused."""
    from smearscope.device.ingest.headers import MAX_JPEG_SCANS

    blocks = np.arange(64).reshape(8, 8) * 2 - 88
    expected = np.kron(blocks + 128, np.ones((8, 8), int))
    at_limit, over = _progressive_jpeg(MAX_JPEG_SCANS, blocks), _progressive_jpeg(MAX_JPEG_SCANS + 1, blocks)
    assert (at_limit.count(b"\xff\xda"), over.count(b"\xff\xda")) == (MAX_JPEG_SCANS, MAX_JPEG_SCANS + 1)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(over, np.uint8), cv2.IMREAD_GRAYSCALE), expected)
    img = load_image(at_limit)
    assert (img.format, img.original_channels) == ("jpeg", 1)
    for c in range(3):
        np.testing.assert_array_equal(img.pixels[:, :, c], expected)
    with pytest.raises(IngestError) as err:
        load_image(over)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert f"JPEG of {MAX_JPEG_SCANS + 1} scans" in err.value.message


def test_a_large_jpeg_may_have_fewer_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scans times pixels are bounded too (each scan is a pass over every pixel): a JPEG declaring
    8000 x 8000 pixels in 13 scans is refused unread (at most 12 at 64 MP), one of 12 goes on to
    the decoder, one of 10 000 x 10 000 in 10 scans is refused for its size. With the budget at 80 scans of its size, a valid 64 x 64 progressive
    JPEG of 80 scans decodes and one of 81 is refused."""
    from smearscope.device.ingest import headers

    progressive = hostile.encode(".jpg", hostile.smear_like(200, 304), [int(cv2.IMWRITE_JPEG_PROGRESSIVE), 1])
    sof = progressive.index(b"\xff\xc2")
    large = progressive[:sof + 5] + struct.pack(">HH", 8000, 8000) + progressive[sof + 9:]
    first, end = large.index(b"\xff\xda"), large.rindex(b"\xff\xd9")
    scan = large[first:large.index(b"\xff\xda", first + 2)]

    def with_scans(n: int) -> bytes:
        return large[:first] + scan * (n - large.count(b"\xff\xda")) + large[first:end] + b"\xff\xd9"

    with pytest.raises(IngestError) as err:
        load_image(with_scans(13))
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert "JPEG of 13 scans over 8000x8000 pixels (at most 12" in err.value.message
    with pytest.raises(IngestError) as err:  # past the scan limit: the decoder finds its data short
        load_image(with_scans(12))
    assert err.value.code is RejectReason.CORRUPT and "JPEG decoder" in err.value.message
    too_large = progressive[:sof + 5] + struct.pack(">HH", 10000, 10000) + progressive[sof + 9:]
    with pytest.raises(IngestError) as err:  # over the pixel limit: refused for its size, whatever its scans
        load_image(too_large)
    assert err.value.code is RejectReason.TOO_LARGE_PIXELS

    monkeypatch.setattr(headers, "MAX_JPEG_SCAN_PIXELS", 80 * 64 * 64)
    blocks = np.arange(64).reshape(8, 8) * 2 - 88
    assert load_image(_progressive_jpeg(80, blocks)).pixels.shape == (64, 64, 3)
    with pytest.raises(IngestError) as err:
        load_image(_progressive_jpeg(81, blocks))
    assert "JPEG of 81 scans over 64x64 pixels (at most 80 are read at that size)" in err.value.message


def test_a_packbits_tiff_decodes() -> None:
    bgr = hostile.smear_like(256, 256, seed=4)
    img = load_image(hostile.one_strip_tiff(hostile.packbits(np.ascontiguousarray(bgr[:, :, ::-1]).tobytes()), 32773))
    np.testing.assert_array_equal(img.pixels, bgr)



def test_packbits_decodes_as_tifffiles_own_decoder_into_one_buffer() -> None:
    """The PackBits decoder tifffile is given decodes every stream as tifffile's own decoder does
    (literal and repeat runs, no-op bytes, runs cut short by the end), and stops at the size
    tifffile asks for; a PackBits TIFF decodes with memory of the order of its pixels (tifffile's
    own decoder holds a Python int per byte: 34.7 against 9.0 MB here)."""
    import tracemalloc

    from tifffile._imagecodecs import packbits_decode as tifffiles

    from smearscope.device.ingest.packbits import packbits_decode, packbits_walk

    assert tifffile.TIFF.DECOMPRESSORS[32773] is packbits_decode  # registered by the decoder's import
    rng = np.random.default_rng(11)
    streams = [b"\x02abc\xfe", b"\x05ab", b"\x80\xfdz\x80"]  # ends: a repeat without its byte, a short literal
    # and random ones: headers drawn over all 256 values, the no-op 0x80 among them
    for stream in [*streams, *(bytes(rng.integers(0, 256, int(n), np.uint8)) for n in rng.integers(0, 3000, 200))]:
        whole = tifffiles(stream)
        assert bytes(packbits_decode(stream)) == whole
        assert bytes(packbits_decode(stream, out=len(whole))) == whole
        assert bytes(packbits_decode(stream, out=len(whole) + 5)) == whole  # a strip cut short: what there is
        cut = int(rng.integers(0, len(whole) + 1))
        assert bytes(packbits_decode(stream, out=cut)) == whole[:cut]
        assert packbits_walk(stream, 1 << 40, 1 << 40)[0] == len(whole)  # runs cut short counted as decoded
    rgb = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), np.uint8)
    data = hostile.one_strip_tiff(hostile.packbits(rgb.tobytes()), 32773, 1000, 1000)
    tracemalloc.start()
    try:
        img = load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(img.pixels, rgb[:, :, ::-1])
    assert peak < 4 * rgb.nbytes, peak


def test_a_packbits_page_of_far_more_runs_than_any_encoder_writes_is_refused_unread() -> None:
    """A PackBits page tifffile decodes (here grey, black as 255) whose strip of one-byte literal runs
    (a step of Python each: 30 to 40 s for a 256 MB file) passes MAX_PACKBITS_RUNS runs, and one
    per MIN_BYTES_PER_RUN bytes of its pixels, is refused as a format; one run fewer in the same
    geometry reads."""
    from smearscope.device.ingest.packbits import MAX_PACKBITS_RUNS, MIN_BYTES_PER_RUN

    width, height = 1000, MAX_PACKBITS_RUNS // 1000 + 1  # room for every run's one byte
    assert width * height // MIN_BYTES_PER_RUN < MAX_PACKBITS_RUNS
    over = hostile.one_strip_tiff(b"\x00\x07" * (MAX_PACKBITS_RUNS + 1), 32773, width, height, photometric=0)
    with pytest.raises(IngestError) as err:
        load_image(over)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert f"more than {MAX_PACKBITS_RUNS} PackBits runs" in err.value.message
    # The limit itself: one-byte literals, then runs repeating a byte 128 times, the last fewer.
    pixels = width * height
    repeats = -(-(pixels - MAX_PACKBITS_RUNS) // 127)
    singles = MAX_PACKBITS_RUNS - repeats
    last = pixels - singles - 128 * (repeats - 1)
    assert 1 <= last <= 128 and singles + repeats == MAX_PACKBITS_RUNS
    strip = b"\x00\x07" * singles + b"\x81\xc8" * (repeats - 1) + bytes([257 - last, 200])
    img = load_image(hostile.one_strip_tiff(strip, 32773, width, height, photometric=0))
    assert img.pixels.shape == (height, width, 3) and img.pixels[0, 0, 0] == 255 - 7
    assert img.pixels[-1, -1, 0] == 255 - 200


def test_a_packbits_page_tifffile_decodes_may_have_one_run_per_8_bytes_of_pixels(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    """Beyond MAX_PACKBITS_RUNS (here lowered to 500) a large page may hold one run per
    MIN_BYTES_PER_RUN bytes of its pixels: a 300 x 400 grey page (black as 255) of 10 000 runs of
    12 bytes reads, one of 15 001 runs is refused."""
    from smearscope.device.ingest import tiff_segments

    monkeypatch.setattr(tiff_segments, "MAX_PACKBITS_RUNS", 500)
    runs = bytes([257 - 12, 40, 257 - 12, 160]) * 5000
    img = load_image(hostile.one_strip_tiff(runs, 32773, 400, 300, photometric=0))
    assert img.pixels[0, :24, 0].tolist() == [215] * 12 + [95] * 12
    with pytest.raises(IngestError) as err:
        load_image(hostile.one_strip_tiff(b"\x00\x07" * 15_001, 32773, 400, 300, photometric=0))
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT and "more than 15000 PackBits runs" in err.value.message


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_page_opencv_decodes_is_turned_by_its_orientation_once(orientation: int) -> None:
    """OpenCV's TIFF decoder turns a page by its Orientation tag whatever the flags; an LZW and a
    PackBits page (both decoded by OpenCV) read as the same page uncompressed (tifffile) does:
    turned once."""
    from smearscope.device.ingest.decode import _apply_orientation

    bgr = hostile.smear_like(70, 90, seed=5)
    expected = _apply_orientation(bgr, orientation)
    plain = hostile.one_strip_tiff(np.ascontiguousarray(bgr[:, :, ::-1]).tobytes(), 1, 90, 70)
    np.testing.assert_array_equal(load_image(hostile.with_short_tags(plain, {274: orientation})).pixels, expected)
    for compression in (5, 32773):
        ok, buf = cv2.imencode(".tiff", bgr, [cv2.IMWRITE_TIFF_COMPRESSION, compression])
        assert ok and tifffile.TiffFile(io.BytesIO(buf.tobytes())).pages[0].compression == compression
        turned = load_image(hostile.with_short_tags(buf.tobytes(), {274: orientation}))
        np.testing.assert_array_equal(turned.pixels, expected)
        assert turned.exif_orientation_applied is (orientation != 1)


def test_opencv_is_given_a_tiff_page_as_stored_and_the_orientation_is_applied_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV's TIFF decoder turns a page by its Orientation tag whatever the flags (and scrambles
    tiled 8-bit pages turned 2, 3, 6 or 7): it gets the file with the tag set to 1, in classic and
    BigTIFF files (only those two bytes differ), the file itself when nothing is to be cleared."""
    from smearscope.device.ingest.tiff_segments import orientation_cleared

    bgr = hostile.smear_like(70, 90, seed=5)
    ok, buf = cv2.imencode(".tiff", bgr, [cv2.IMWRITE_TIFF_COMPRESSION, 5])
    assert ok
    turned = hostile.with_short_tags(buf.tobytes(), {274: 6})
    given: list[bytes] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flags: given.append(bytes(data)) or real(data, flags))
    np.testing.assert_array_equal(load_image(turned).pixels, cv2.rotate(bgr, cv2.ROTATE_90_CLOCKWISE))
    (seen,) = given
    assert tifffile.TiffFile(io.BytesIO(seen)).pages[0].tags[274].value == 1
    assert sum(a != b for a, b in zip(seen, turned)) == 1 and len(seen) == len(turned)
    plain = buf.tobytes()
    assert orientation_cleared(plain, tifffile.TiffFile(io.BytesIO(plain)).pages[0]) is plain
    big = io.BytesIO()
    tifffile.imwrite(big, bgr[:, :, ::-1], photometric="rgb", bigtiff=True, extratags=[(274, "H", 1, 8, True)])
    big_page = tifffile.TiffFile(io.BytesIO(big.getvalue())).pages[0]
    assert big_page.tags[274].value == 8
    cleared = orientation_cleared(big.getvalue(), big_page)
    assert tifffile.TiffFile(io.BytesIO(cleared)).pages[0].tags[274].value == 1
    assert sum(a != b for a, b in zip(cleared, big.getvalue())) == 1


def test_packbits_pages_with_a_predictor_or_strips_cut_short() -> None:
    """A PackBits page with horizontal differencing (libtiff ignores the predictor: tifffile decodes
    it) reads to its pixels; a strip that decodes to fewer bytes than its rows hold is refused as
    corrupt (libtiff would fill the rest with black), one that runs past the file's end as
    truncated, and a last strip holding only the rows left reads."""
    grey = np.random.default_rng(0).integers(0, 256, (64, 96), dtype=np.uint8)
    differences = np.diff(grey.astype(np.int16), axis=1, prepend=0).astype(np.uint8)
    predicted = hostile.with_short_tags(
        hostile.one_strip_tiff(hostile.packbits(differences.tobytes()), 32773, 96, 64, photometric=1), {317: 2})
    np.testing.assert_array_equal(load_image(predicted).pixels, np.dstack([grey] * 3))
    strip = hostile.packbits(grey.tobytes())
    with pytest.raises(IngestError) as err:
        load_image(hostile.one_strip_tiff(strip[:len(strip) // 2], 32773, 96, 64, photometric=1))
    assert err.value.code is RejectReason.CORRUPT and "cut short" in err.value.message
    past_the_end = hostile.with_short_tags(hostile.one_strip_tiff(strip, 32773, 96, 64, photometric=1),
                                           {279: len(strip) + 1000})  # its StripByteCounts
    with pytest.raises(IngestError) as err:
        load_image(past_the_end)
    assert err.value.code is RejectReason.TRUNCATED and "past end of file" in err.value.message
    rows = [grey[:40].tobytes(), grey[40:].tobytes()]  # 40 rows a strip: the last holds 24
    np.testing.assert_array_equal(
        load_image(hostile.strips_tiff([hostile.packbits(r) for r in rows], 32773, 96, 64, 40)).pixels,
        np.dstack([grey] * 3))
    with pytest.raises(IngestError) as err:  # the last strip short of its 24 rows
        load_image(hostile.strips_tiff([hostile.packbits(rows[0]), hostile.packbits(rows[1][:-96])], 32773, 96, 64, 40))
    assert "segment 1 decodes to 2208 of the 2304 bytes" in err.value.message


def test_a_grey_or_rgb_packbits_field_of_many_short_runs_reads_through_libtiff(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    """libtiff's PackBits encoder writes a repeat run wherever three bytes are equal: a flat grey
    field has one run per 14 bytes (a 30 MP one passes MAX_PACKBITS_RUNS). A grey or RGB first page
    is decoded by OpenCV's libtiff, in C, each strip stopped at its size: with the runs counted
    only up to the limit (here lowered to 500) it reads to the same pixels; a bomb within the limit
    is still refused."""
    from smearscope.device.ingest import tiff_segments

    monkeypatch.setattr(tiff_segments, "MAX_PACKBITS_RUNS", 500)
    rng = np.random.default_rng(3)
    for field in (hostile.smear_like(300, 400, seed=2), np.repeat(rng.integers(0, 4, (300, 100), np.uint8) * 60, 4, 1)):
        ok, buf = cv2.imencode(".tiff", field, [cv2.IMWRITE_TIFF_COMPRESSION, 32773])
        assert ok and tifffile.TiffFile(io.BytesIO(buf.tobytes())).pages[0].compression == 32773
        img = load_image(buf.tobytes())
        expected = field if field.ndim == 3 else np.dstack([field] * 3)
        np.testing.assert_array_equal(img.pixels, expected)
    with pytest.raises(IngestError) as err:  # 97 runs of 128 zeros in a 64 x 64 RGB strip: 12 416 of 12 288 bytes
        load_image(hostile.one_strip_tiff(b"\x81\x00" * 97, 32773, 64, 64))
    assert err.value.code is RejectReason.CORRUPT and "inflates beyond" in err.value.message


# --- good inputs ----------------------------------------------------------------------------


@pytest.fixture
def field() -> np.ndarray:
    return hostile.smear_like(120, 200, seed=3)


def _load(tmp_path: Path, name: str, data: bytes) -> DecodedImage:
    path = tmp_path / name
    path.write_bytes(data)
    return load_image(path)


def test_png_8bit_is_exact(tmp_path: Path, field: np.ndarray) -> None:
    img = _load(tmp_path, "a.png", hostile.encode(".png", field))
    np.testing.assert_array_equal(img.pixels, field)
    assert (img.width, img.height, img.format) == (200, 120, "png")
    assert (img.original_bit_depth, img.significant_bits, img.original_channels) == (8, 8, 3)
    assert img.pixels.dtype == np.uint8 and img.pixels.flags.c_contiguous
    assert not img.exif_orientation_applied
    assert img.source == str(tmp_path / "a.png")


def test_png_16bit_full_range(tmp_path: Path, field: np.ndarray) -> None:
    img = _load(tmp_path, "a.png", hostile.encode(".png", field.astype(np.uint16) * 257))
    np.testing.assert_array_equal(img.pixels, field)
    assert (img.original_bit_depth, img.significant_bits) == (16, 16)


def test_png_12bit_in_16bit_container_is_not_darkened(tmp_path: Path, field: np.ndarray) -> None:
    twelve = np.rint(field.astype(np.float64) * 4095 / 255).astype(np.uint16)
    img = _load(tmp_path, "a.png", hostile.encode(".png", twelve))
    assert img.significant_bits == 12
    assert np.abs(img.pixels.astype(int) - field).max() <= 1  # not field / 16 as >> 8 would give


def _with_sbit(png: bytes, bits: int) -> bytes:
    body = bytes([bits] * 3)
    chunk = struct.pack(">I", len(body)) + b"sBIT" + body
    chunk += struct.pack(">I", zlib.crc32(b"sBIT" + body))
    return png[:33] + chunk + png[33:]  # right after IHDR


def test_png_sbit_declared_depth_wins_over_inference(tmp_path: Path, field: np.ndarray) -> None:
    dark = field.astype(np.uint16) * 4  # max 1020: inference alone would call it 10-bit
    img = _load(tmp_path, "a.png", _with_sbit(hostile.encode(".png", dark), 12))
    assert img.significant_bits == 12
    expected = np.rint(dark.astype(np.float64) * 255 / 4095)
    assert np.abs(img.pixels.astype(int) - expected).max() <= 1


def test_png_sbit_of_a_file_scaled_to_16_bits_as_the_spec_says(tmp_path: Path, field: np.ndarray) -> None:
    """PNG's sBIT records the source's precision; the samples themselves span 16 bits (12-bit
    values shifted up with bit replication). Read as 12-bit maxima, the frame was all white."""
    twelve = np.rint(field.astype(np.float64) * 4095 / 255).astype(np.uint16)
    scaled = (twelve << 4) | (twelve >> 8)
    img = _load(tmp_path, "a.png", _with_sbit(hostile.encode(".png", scaled), 12))
    assert img.significant_bits == 16
    assert np.abs(img.pixels.astype(int) - field).max() <= 1


def test_16bit_rgba_converted_in_row_blocks_as_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        field: np.ndarray) -> None:
    """The 8-bit conversion runs in row blocks (bounded memory on 64 MP frames): the same pixels."""
    from smearscope.device.ingest import decode

    rgba = np.dstack([field.astype(np.uint16) * 257, np.linspace(0, 65535, field.size // 3).reshape(
        field.shape[:2]).astype(np.uint16)])
    data = hostile.encode(".png", rgba)
    whole = _load(tmp_path, "a.png", data).pixels
    monkeypatch.setattr(decode, "_CONVERT_SAMPLES", 7 * field.shape[1] * 3)  # 7 rows a block, an odd last one
    np.testing.assert_array_equal(_load(tmp_path, "b.png", data).pixels, whole)


def test_an_animated_png_of_one_frame_is_its_image(field: np.ndarray) -> None:
    """acTL declaring one frame: a still image in an APNG container, read as any PNG (several frames
    are `multi_frame`, tests/hostile.py)."""
    np.testing.assert_array_equal(load_image(hostile.apng(field, 1)).pixels, field)


def test_png_grayscale(tmp_path: Path, field: np.ndarray) -> None:
    grey = field[:, :, 1]
    img = _load(tmp_path, "g.png", hostile.encode(".png", grey))
    assert img.original_channels == 1 and img.pixels.shape == (120, 200, 3)
    for c in range(3):
        np.testing.assert_array_equal(img.pixels[:, :, c], grey)


def test_a_fully_transparent_frame_is_blank_and_says_it_is_transparent(field: np.ndarray) -> None:
    """PNG and TIFF, 8 and 16 bit, alpha 0 everywhere over a real field: blank_image (white over
    white), and the message says why ('all samples within 2 of 255' sent the lab to the lens cap)."""
    rgba = np.dstack([field, np.zeros(field.shape[:2], np.uint8)])
    buf = io.BytesIO()
    tifffile.imwrite(buf, (rgba[..., [2, 1, 0, 3]].astype(np.uint16) * 257), photometric="rgb",
                     extrasamples=["unassalpha"])
    for data in (hostile.encode(".png", rgba), buf.getvalue()):
        with pytest.raises(IngestError) as err:
            load_image(data)
        assert err.value.code is RejectReason.BLANK_IMAGE and "fully transparent" in err.value.message, err.value
    with pytest.raises(IngestError) as err:
        load_image(hostile.encode(".png", np.zeros((100, 100, 3), np.uint8)))
    assert err.value.code is RejectReason.BLANK_IMAGE and "all samples within 2 of 0" in err.value.message


def test_png_rgba_composited_over_white(tmp_path: Path, field: np.ndarray) -> None:
    bgra = np.dstack([field, np.full(field.shape[:2], 255, np.uint8)])
    bgra[:, :50, 3] = 0
    bgra[:, 50:100, 3] = 128
    img = _load(tmp_path, "a.png", hostile.encode(".png", bgra))
    assert img.original_channels == 4
    np.testing.assert_array_equal(img.pixels[:, 100:], field[:, 100:])
    assert (img.pixels[:, :50] == 255).all()
    half = np.rint(field[:, 50:100] * (128 / 255) + 255 * (127 / 255))
    assert np.abs(img.pixels[:, 50:100].astype(int) - half).max() <= 1


def test_extension_is_not_trusted(tmp_path: Path, field: np.ndarray) -> None:
    img = _load(tmp_path, "really_a_png.jpg", hostile.encode(".png", field))
    assert img.format == "png"
    np.testing.assert_array_equal(img.pixels, field)


def test_bytes_input(field: np.ndarray) -> None:
    img = load_image(hostile.encode(".png", field))
    assert img.source == "<bytes>"
    np.testing.assert_array_equal(img.pixels, field)


def test_tiff_8bit_rgb(tmp_path: Path, field: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "a.tif", field[:, :, ::-1], photometric="rgb")
    img = load_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(img.pixels, field)  # RGB on disk -> BGR in memory
    assert (img.format, img.original_bit_depth, img.original_channels) == ("tiff", 8, 3)


def test_tiff_16bit_rgb_planar_and_compressed(tmp_path: Path, field: np.ndarray) -> None:
    rgb16 = field[:, :, ::-1].astype(np.uint16) * 257
    tifffile.imwrite(
        tmp_path / "a.tif",
        np.moveaxis(rgb16, 2, 0),
        photometric="rgb",
        planarconfig="separate",
        compression="zlib",
    )
    img = load_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(img.pixels, field)
    assert (img.original_bit_depth, img.significant_bits) == (16, 16)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_lzw_the_commonest_compression_decodes(tmp_path: Path, field: np.ndarray, channels: int,
                                                   dtype: type) -> None:
    """LZW (OpenCV's and many microscope programs' default) needs a package tifffile does not
    have here: OpenCV's libtiff decodes it, to the same pixels."""
    pixels = (field if channels == 3 else field[:, :, 1]).astype(dtype) * (257 if dtype == np.uint16 else 1)
    path = tmp_path / "lzw.tif"
    assert cv2.imwrite(str(path), pixels)  # OpenCV writes LZW
    assert int(tifffile.TiffFile(path).pages[0].compression) == 5
    img = load_image(path)
    expected = field if channels == 3 else np.repeat(field[:, :, 1:2], 3, axis=2)
    np.testing.assert_array_equal(img.pixels, expected)


def test_tiff_lzw_only_through_opencv_where_opencv_decodes_what_was_checked(tmp_path: Path, field: np.ndarray) -> None:
    """OpenCV decodes a file's first directory whatever it is, and premultiplies 8-bit alpha: an
    LZW page that is not the first (its size checked, a huge first page allocated) or that has
    alpha is refused, not decoded wrong or unbounded."""
    rgba = np.dstack([field, np.full(field.shape[:2], 128, np.uint8)])
    path = tmp_path / "alpha.tif"
    assert cv2.imwrite(str(path), rgba)  # LZW with alpha
    with pytest.raises(IngestError) as exc:
        load_image(path)
    assert exc.value.code.value == "unsupported_format"
    # an OME-TIFF whose image is its second directory, tagged LZW; the first is larger
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="200" SizeY="120" '
           'SizeC="3" SizeZ="1" SizeT="1"><Channel ID="Channel:0" SamplesPerPixel="3"/><TiffData IFD="1" '
           'PlaneCount="1"/></Pixels></Image></OME>')
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(np.zeros((900, 900, 3), np.uint8), photometric="rgb", compression="zlib", description=xml,
                 metadata=None)
        tw.write(field[:, :, ::-1], photometric="rgb", metadata=None, description="x")
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as t:
        assert t.series[0].pages[0].index == 1
        struct.pack_into("<H", data, t.pages[1].tags[259].offset + 8, 5)  # its Compression: LZW
    with pytest.raises(IngestError) as exc:
        load_image(bytes(data))
    assert exc.value.code.value == "unsupported_format"


def test_tiff_12bit_grey_in_16bit(tmp_path: Path, field: np.ndarray) -> None:
    grey12 = field[:, :, 0].astype(np.uint16) * 16  # max 4080 < 4096
    tifffile.imwrite(tmp_path / "g.tif", grey12, photometric="minisblack")
    img = load_image(tmp_path / "g.tif")
    assert (img.original_channels, img.significant_bits) == (1, 12)
    assert np.abs(img.pixels[:, :, 2].astype(int) - field[:, :, 0]).max() <= 1


def test_tiff_miniswhite_is_inverted(tmp_path: Path, field: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "w.tif", 255 - field[:, :, 1], photometric="miniswhite")
    img = load_image(tmp_path / "w.tif")
    np.testing.assert_array_equal(img.pixels[:, :, 0], field[:, :, 1])


def test_tiff_grey_alpha_and_rgba(tmp_path: Path, field: np.ndarray) -> None:
    alpha = np.full(field.shape[:2], 255, np.uint8)
    alpha[:, :40] = 0
    ga = np.dstack([field[:, :, 1], alpha])
    tifffile.imwrite(tmp_path / "ga.tif", ga, photometric="minisblack", extrasamples=["unassalpha"])
    img = load_image(tmp_path / "ga.tif")
    assert img.original_channels == 2
    assert (img.pixels[:, :40] == 255).all()
    np.testing.assert_array_equal(img.pixels[:, 40:, 1], field[:, 40:, 1])

    rgba = np.dstack([field[:, :, ::-1], alpha])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    img = load_image(tmp_path / "rgba.tif")
    assert img.original_channels == 4
    np.testing.assert_array_equal(img.pixels[:, 40:], field[:, 40:])


def test_tiff_palette(tmp_path: Path) -> None:
    index = (np.arange(120 * 200).reshape(120, 200) % 4).astype(np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]).T * 257
    tifffile.imwrite(tmp_path / "p.tif", index, photometric="palette", colormap=cmap)
    img = load_image(tmp_path / "p.tif")
    assert img.pixels[0, 0].tolist() == [0, 0, 255]  # palette red, in BGR
    assert img.pixels[0, 3].tolist() == [30, 20, 10]


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_a_palette_png_decodes_to_its_colours_as_opencv_shows_them(depth: int) -> None:
    """Indices within the palette (at every depth, with and without tRNS) give the colours OpenCV
    decodes from the file itself: decoding the indices to check them changes nothing else."""
    rng = np.random.default_rng(depth)
    entries = min(1 << depth, 5)
    palette = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(entries)]
    indices = rng.integers(0, entries, (90, 110))
    for trns in (None, [255, 0, 128][: min(entries, 3)]):
        png = hostile.palette_png(indices, palette, depth, trns)
        shown = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        img = load_image(png)
        if trns is None:
            np.testing.assert_array_equal(img.pixels, shown)
        else:  # over white, as every frame with alpha
            alpha = shown[..., 3:].astype(np.float64) / 255
            over = np.round(shown[..., :3] * alpha + 255 * (1 - alpha))
            assert np.abs(img.pixels.astype(int) - over).max() <= 1


def test_tiff_first_series_of_several(tmp_path: Path, field: np.ndarray) -> None:
    with tifffile.TiffWriter(tmp_path / "s.tif") as writer:
        writer.write(field[:, :, ::-1], photometric="rgb")
        writer.write(field[::4, ::4, ::-1], photometric="rgb")  # a thumbnail after the frame
    np.testing.assert_array_equal(load_image(tmp_path / "s.tif").pixels, field)


def test_tiff_orientation_tag(tmp_path: Path, field: np.ndarray) -> None:
    tifffile.imwrite(
        tmp_path / "o.tif", field[:, :, ::-1], photometric="rgb", extratags=[(274, "H", 1, 6, True)]
    )
    img = load_image(tmp_path / "o.tif")
    assert img.exif_orientation_applied
    np.testing.assert_array_equal(img.pixels, cv2.rotate(field, cv2.ROTATE_90_CLOCKWISE))


def _marked(height: int = 120, width: int = 200) -> np.ndarray:
    """A frame whose corners can be told apart: red top-left, blue bottom-left (BGR)."""
    img = hostile.smear_like(height, width, seed=5)
    img[:30, :40] = (0, 0, 255)
    img[-30:, :40] = (255, 0, 0)
    return img


def test_jpeg_exif_orientation_6_is_rotated(tmp_path: Path) -> None:
    img = _load(tmp_path, "r.jpg", hostile.jpeg_with_exif(_marked(), 6))
    assert img.exif_orientation_applied
    assert (img.height, img.width) == (200, 120)  # stored landscape, shown portrait
    # 90 degrees clockwise: the stored top-left (red) is now top-right, bottom-left (blue) top-left
    b, g, r = img.pixels[10, -10].astype(int)
    assert r > 200 and b < 60 and g < 60
    b, g, r = img.pixels[10, 10].astype(int)
    assert b > 200 and r < 60 and g < 60


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("big_endian", [True, False])
def test_jpeg_exif_orientations_match_opencv(orientation: int, big_endian: bool) -> None:
    """OpenCV's IMREAD_COLOR applies EXIF orientation itself: an independent reference."""
    jpeg = hostile.encode(".jpg", _marked(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    jpeg = jpeg[:2] + hostile.exif_app1(orientation, big_endian) + jpeg[2:]
    img = load_image(jpeg)
    expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(img.pixels, expected)
    assert img.exif_orientation_applied == (orientation != 1)


def test_png_exif_chunk_orientation(field: np.ndarray) -> None:
    png = hostile.encode(".png", field)
    exif = hostile.exif_app1(8)[10:]  # the TIFF block, without marker, length and "Exif\0\0"
    chunk = (
        struct.pack(">I", len(exif))
        + b"eXIf"
        + exif
        + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    )
    img = load_image(png[:33] + chunk + png[33:])
    assert img.exif_orientation_applied
    np.testing.assert_array_equal(img.pixels, cv2.rotate(field, cv2.ROTATE_90_COUNTERCLOCKWISE))


def test_jpeg_broken_exif_still_loads_unrotated(caplog: pytest.LogCaptureFixture) -> None:
    jpeg = hostile.encode(".jpg", _marked())
    junk = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\x00"  # IFD offset far beyond the block
    app1 = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    img = load_image(jpeg[:2] + app1 + jpeg[2:])
    assert not img.exif_orientation_applied and (img.height, img.width) == (120, 200)
    assert "EXIF" in caplog.text


def test_jpeg_grey_progressive_and_trailer(field: np.ndarray) -> None:
    grey = hostile.encode(".jpg", field[:, :, 1], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    img = load_image(grey + b"camera trailer after EOI")
    assert (img.format, img.original_channels) == ("jpeg", 1)
    assert np.abs(img.pixels[:, :, 0].astype(int) - field[:, :, 1]).mean() < 3


def test_limits_are_configurable(field: np.ndarray) -> None:
    png = hostile.encode(".png", field)  # 200 x 120
    assert load_image(png, limits=IngestLimits(min_side=120)).height == 120
    with pytest.raises(IngestError) as err:
        load_image(png, limits=IngestLimits(min_side=121))
    assert err.value.code is RejectReason.TOO_SMALL
    with pytest.raises(IngestError) as err:
        load_image(png, limits=IngestLimits(max_aspect=1.5))
    assert err.value.code is RejectReason.ABSURD_ASPECT


def test_mutated_files_fail_only_with_ingest_errors(field: np.ndarray) -> None:
    """Deterministic fuzz: flipped, cut and inserted bytes never escape as another exception."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, field[:, :, ::-1], photometric="rgb", compression="zlib")
    seeds = [
        hostile.encode(".png", field),
        hostile.encode(".png", field.astype(np.uint16) * 257),
        hostile.jpeg_with_exif(field, 6),
        buf.getvalue(),
    ]
    rng = np.random.default_rng(0)
    outcomes: set[str] = set()
    for data in seeds:
        for _ in range(60):
            mutated = bytearray(data)
            mode = int(rng.integers(0, 3))
            if mode == 0:  # flip bytes, mostly in the headers
                for _ in range(int(rng.integers(1, 8))):
                    mutated[int(rng.integers(0, min(len(mutated), 300)))] = int(
                        rng.integers(0, 256)
                    )
            elif mode == 1:  # cut
                mutated = mutated[: int(rng.integers(1, len(mutated)))]
            else:  # insert junk
                at = int(rng.integers(0, len(mutated)))
                mutated[at:at] = rng.integers(0, 256, int(rng.integers(1, 50)), np.uint8).tobytes()
            try:
                load_image(bytes(mutated))
                outcomes.add("ok")
            except IngestError as exc:
                outcomes.add(exc.code.value)
    assert {"corrupt", "truncated"} <= outcomes  # the fuzz really reached the error paths


def test_os_read_error_is_unreadable(
    tmp_path: Path, field: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chmod 000 does not stop root, so the OS refusal is simulated at the `open` call."""
    path = tmp_path / "a.png"
    path.write_bytes(hostile.encode(".png", field))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(IngestError) as err:
        load_image(path)
    assert err.value.code is RejectReason.UNREADABLE


def test_a_file_swapped_for_a_device_after_its_stat_is_not_read(
    tmp_path: Path, field: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever writes a folder can replace a file between the decoder's stat (a regular file) and
    its open: a link to /dev/zero is refused `not_a_file` from the opened file's own fstat, unread
    (it was read up to the size limit and refused as `file_too_large`: 256 MiB of zeros in memory at
    the default; a FIFO would have blocked the reader for ever)."""
    path = tmp_path / "a.png"
    path.write_bytes(hostile.encode(".png", field))
    real_stat, swapped = os.stat, []

    def stat_then_swap(target: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(target, *args, **kwargs)  # type: ignore[arg-type]
        if os.fspath(target) == str(path) and not swapped:  # type: ignore[arg-type]
            path.unlink()
            path.symlink_to("/dev/zero")
            swapped.append(True)
        return st

    monkeypatch.setattr(os, "stat", stat_then_swap)
    with pytest.raises(IngestError) as err:
        load_image(path, limits=IngestLimits(max_file_bytes=100_000))
    assert swapped and err.value.code is RejectReason.NOT_A_FILE, err.value.message


def test_a_file_read_within_folders_keeps_the_decoders_limits_and_judges_the_file_opened(
    tmp_path: Path, field: np.ndarray
) -> None:
    """`read_image_file_within` (the station's analyze_file with [commands] analyze_file_folders):
    a file in the folders reads as from its path, and the decoder's step 1 holds (a FIFO is
    not_a_file without blocking, a file over the size limit file_too_large); a link in the folder
    to a device outside is refused `OutsideFolders` from the opened descriptor, never read."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = folder / "a.png"
    good.write_bytes(hostile.encode(".png", field))
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    folders = (str(folder),)
    data = read_image_file_within(str(good), folders, 256 * 1024 * 1024, "a.png")
    assert data == good.read_bytes()
    assert np.array_equal(load_image(data).pixels, load_image(good).pixels)
    with pytest.raises(IngestError) as err:
        read_image_file_within(str(good), folders, len(data) - 1, "a.png")
    assert err.value.code is RejectReason.FILE_TOO_LARGE
    with pytest.raises(IngestError) as err:
        read_image_file_within(str(folder / "pipe.png"), folders, 1000, "pipe.png")
    assert err.value.code is RejectReason.NOT_A_FILE
    with pytest.raises(OutsideFolders, match="/dev/zero"):
        read_image_file_within(str(folder / "zero.png"), folders, 1000, "zero.png")
    with pytest.raises(IngestError) as err:
        read_image_file_within(str(folder / "none.png"), folders, 1000, "none.png")
    assert err.value.code is RejectReason.NOT_FOUND


# --- PNG pixel data: cut short or damaged inside whole chunks -----------------------------------


def _png_with_idat(transform) -> bytes:
    """A field PNG re-chunked with its joined IDAT data passed through `transform`, every CRC
    valid: the damage is only in the deflate stream."""
    png = hostile.encode(".png", hostile.smear_like(240, 320, seed=4))
    chunks, pos = [], 8
    while pos < len(png):
        length, ctype = struct.unpack(">I4s", png[pos : pos + 8])
        chunks.append((ctype, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    idat = transform(b"".join(body for ctype, body in chunks if ctype == b"IDAT"))
    out, placed = bytearray(png[:8]), False
    for ctype, body in chunks:
        if ctype == b"IDAT":
            if placed:
                continue
            body, placed = idat, True
        out += struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))
    return bytes(out)


def _png_from_rows(width: int, height: int, raw: bytes, interlace: int = 0, grey: bool = False,
                   ended: bool = True) -> bytes:
    """An 8-bit RGB (or grey) PNG of `raw` (filtered scanlines, as IHDR's interlace method lays them
    out) in one IDAT: every chunk complete, and the deflate stream too unless `ended` is False
    (then it stops after `raw`, flushed, without its end)."""
    def chunk(ctype: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0 if grey else 2, 0, 0, interlace)
    deflate = zlib.compressobj()
    body = deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if ended else zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _adam7_rows(width: int, height: int, filter_byte: int = 0) -> bytes:
    """Every Adam7 pass's rows of a width x height RGB image, each row a filter byte and a ramp."""
    out = bytearray()
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            out += (bytes([filter_byte]) + (bytes(range(256)) * (3 * w // 256 + 1))[: 3 * w]) * h
    return bytes(out)


def test_a_png_whose_deflate_stream_stops_is_truncated_and_one_that_disagrees_with_its_header_corrupt() -> None:
    w, h = 333, 250  # not multiples of 8: Adam7's passes are uneven
    row = b"\x00" + bytes(range(256)) * (3 * w // 256) + bytes(3 * w % 256)
    plain, adam7 = row * h, _adam7_rows(w, h)
    assert load_image(_png_from_rows(w, h, plain)).pixels.shape == (h, w, 3)
    assert load_image(_png_from_rows(w, h, adam7, interlace=1)).pixels.shape == (h, w, 3)

    def stream_cut(png: bytes, keep: int | None = None) -> bytes:
        """The IDAT's deflate stream cut (at half, or at `keep`), its chunk whole."""
        start, iend = png.index(b"IDAT") + 4, png.index(b"IEND") - 4  # IDAT's data, IEND's chunk
        stream = png[start : iend - 4]
        body = stream[: len(stream) // 2 if keep is None else keep]
        return (png[: start - 8] + struct.pack(">I", len(body)) + b"IDAT" + body
                + struct.pack(">I", zlib.crc32(b"IDAT" + body)) + png[iend:])

    cases = {RejectReason.TRUNCATED: (stream_cut(_png_from_rows(w, h, plain)),
                                      stream_cut(_png_from_rows(w, h, adam7, interlace=1))),
             # a complete stream of fewer rows than IHDR declares: the header and the data disagree
             RejectReason.CORRUPT: (_png_from_rows(w, h, row * 200), _png_from_rows(w, h, adam7[:-50], interlace=1),
                                    # every byte there, but rows of an undefined filter type (9)
                                    _png_from_rows(w, h, (b"\x09" + row[1:]) * h),
                                    _png_from_rows(w, h, _adam7_rows(w, h, 9), interlace=1),
                                    # every declared row there, only the stream's checksum missing:
                                    # inflating stops at the declared rows (a bomb cannot run on)
                                    stream_cut(_png_from_rows(w, h, plain), keep=-4))}
    # interlaced rows cut between the byte count of plain rows and that of Adam7's passes (more
    # filter bytes): still short of what IHDR declares; and a large grey frame, every row there,
    # only the stream's end missing, its rows inflating to more than one piece
    cases[RejectReason.TRUNCATED] += (_png_from_rows(w, h, adam7[: len(plain) + 40], interlace=1, ended=False),)
    assert len(plain) + 40 < len(adam7)
    big = bytes(range(256)) * 8
    big_rows = (b"\x00" + big[:1054]) * 994  # 1 MB of rows: inflated in two pieces
    cases[RejectReason.CORRUPT] += (_png_from_rows(1054, 994, big_rows, grey=True, ended=False),
                                    stream_cut(_png_from_rows(1054, 994, big_rows, grey=True), keep=-4))
    for code, pngs in cases.items():
        for png in pngs:
            with pytest.raises(IngestError) as exc:
                load_image(png)
            assert exc.value.code is code


def test_a_png_whose_pixel_data_stops_early_is_truncated_and_a_damaged_one_corrupt() -> None:
    assert load_image(_png_with_idat(lambda d: d)).pixels.shape == (240, 320, 3)
    # a writer that closed the file early: the deflate stream stops, every chunk is whole
    with pytest.raises(IngestError) as exc:
        load_image(_png_with_idat(lambda d: d[: len(d) // 2]))
    assert exc.value.code is RejectReason.TRUNCATED
    # the same length of data, but noise after its first bytes: damage that the inflater reports
    noise = np.random.default_rng(5).integers(0, 256, 1 << 16, np.uint8).tobytes()
    with pytest.raises(IngestError) as exc:
        load_image(_png_with_idat(lambda d: d[:100] + noise[: len(d) - 100]))
    assert exc.value.code is RejectReason.CORRUPT


# --- damaged JPEG streams (issue 18, item 11) -------------------------------------------------


def _field_jpeg() -> bytes:
    return hostile.encode(".jpg", hostile.smear_like(480, 640, seed=3), [cv2.IMWRITE_JPEG_QUALITY, 90])


def test_a_truncated_jpeg_with_an_end_marker_appended_is_corrupt() -> None:
    data = _field_jpeg()
    cut = data[: len(data) // 2] + b"\xff\xd9"  # libjpeg: "premature end of data segment"
    with pytest.raises(IngestError) as exc:
        load_image(cut)
    assert exc.value.code is RejectReason.CORRUPT


def test_a_whole_jpeg_with_garbage_inside_its_scan_is_corrupt_not_truncated() -> None:
    """Random bytes, or one stray SOI or TEM marker, written into the entropy-coded data of a file
    that still ends with its end-of-image marker: damage (`corrupt`), not a copy cut short, which
    would send a technician to copy the file again (the marker walk read garbage as segment
    lengths and ran past the end)."""
    data = _field_jpeg()
    start = data.index(b"\xff\xda") + 300
    rng = np.random.default_rng(0)
    damaged = [data[:start] + rng.integers(0, 256, 400, np.uint8).tobytes() + data[start + 400:] for _ in range(8)]
    damaged += [data[:start] + stray + data[start:] for stray in (b"\xff\xd8", b"\xff\x01")]
    for bad in damaged:
        assert bad.endswith(b"\xff\xd9")
        with pytest.raises(IngestError) as exc:
            load_image(bad)
        assert exc.value.code is RejectReason.CORRUPT, exc.value.message
    with pytest.raises(IngestError) as exc:  # cut short, no end marker: truncated as before
        load_image(damaged[0][: len(data) * 3 // 4])
    assert exc.value.code is RejectReason.TRUNCATED


def test_a_jpeg_with_zeroed_entropy_data_is_corrupt() -> None:
    data = bytearray(_field_jpeg())
    start = data.index(b"\xff\xda") + 200  # inside the entropy-coded scan
    data[start : start + 2000] = bytes(2000)
    with pytest.raises(IngestError) as exc:
        load_image(bytes(data))
    assert exc.value.code is RejectReason.CORRUPT


def test_an_intact_jpeg_decodes_to_opencvs_pixels() -> None:
    data = _field_jpeg()
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(load_image(data).pixels, expected)


def test_a_refusal_never_repeats_the_files_content(tmp_path: Path) -> None:
    """The message goes back over MQTT (analyze_file) and into reason files: a secret the service
    can read (its broker password) must not leak through it, not even its first bytes."""
    secret = tmp_path / "mqtt-password"
    secret.write_bytes(b"s3cret-password\n")
    with pytest.raises(IngestError) as err:
        load_image(secret)
    assert err.value.code == RejectReason.NOT_AN_IMAGE
    assert "s3c" not in err.value.message and "cret" not in err.value.message and str(secret) in err.value.message


def _with_segment_after_first_scan(jpeg: bytes, marker: int, body: bytes, copies: int = 1) -> bytes:
    """`jpeg` with `copies` segments (`marker`, `body`) between its first and second scans."""
    second = jpeg.index(b"\xff\xda", jpeg.index(b"\xff\xda") + 2)
    segment = struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body
    return jpeg[:second] + segment * copies + jpeg[second:]


def test_scan_and_end_markers_inside_a_comment_between_scans_are_not_read_as_such() -> None:
    """A comment segment between two scans may hold any bytes: 150 FF DA pairs in one are no
    scans (the file is read, as OpenCV reads it), and an FF D9 pair in one is no end of the image
    (the scans after it still count: one over the limit is refused)."""
    from smearscope.device.ingest.headers import MAX_JPEG_SCANS

    blocks = np.arange(64).reshape(8, 8) * 2 - 88
    expected = np.kron(blocks + 128, np.ones((8, 8), int))
    commented = _with_segment_after_first_scan(_progressive_jpeg(MAX_JPEG_SCANS, blocks), 0xFE, b"\xff\xda" * 150)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(commented, np.uint8), cv2.IMREAD_GRAYSCALE), expected)
    img = load_image(commented)
    np.testing.assert_array_equal(img.pixels[:, :, 0], expected)
    early_end = _with_segment_after_first_scan(_progressive_jpeg(MAX_JPEG_SCANS + 1, blocks), 0xFE, b"\xff\xd9")
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(early_end, np.uint8), cv2.IMREAD_GRAYSCALE), expected)
    with pytest.raises(IngestError) as err:
        load_image(early_end)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert f"JPEG of {MAX_JPEG_SCANS + 1} scans" in err.value.message


def test_a_jpeg_of_too_many_segments_between_scans_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of tiny comment segments between two scans (each read one at a time) are refused
    as soon as the walk passes MAX_JPEG_MARKERS, with that reason; as many as the limit allows are read."""
    from smearscope.device.ingest.headers import MAX_JPEG_MARKERS

    base = _progressive_jpeg(64, np.arange(64).reshape(8, 8) * 2 - 88)
    segments_in_base = 64 + 1  # 64 scans and the end-of-image marker, no table between them
    allowed = _with_segment_after_first_scan(base, 0xFE, b"", MAX_JPEG_MARKERS - segments_in_base)
    assert load_image(allowed).pixels.shape == (64, 64, 3)
    too_many = _with_segment_after_first_scan(base, 0xFE, b"", MAX_JPEG_MARKERS - segments_in_base + 1)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoder called")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(IngestError) as err:
        load_image(too_many)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert f"more than {MAX_JPEG_MARKERS} markers after its first scan header" in err.value.message


def test_a_jpeg_of_millions_of_tiny_segments_or_fill_bytes_before_its_scan_is_refused_at_once() -> None:
    """32 MB of empty comment segments (8 million) before the first scan are refused after
    MAX_JPEG_MARKERS of them (read one by one they took 15 s of CPU); 32 MB of fill bytes before
    a camera's segments are skipped as one run, and the file reads."""
    from smearscope.device.ingest.headers import MAX_JPEG_MARKERS

    comments = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 8_000_000 + b"\xff\xd9"
    with pytest.raises(IngestError) as err:
        load_image(comments)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert f"more than {MAX_JPEG_MARKERS} markers before its first scan" in err.value.message
    fill = _field_jpeg()
    fill = fill[:2] + b"\xff" * 32_000_000 + fill[2:]
    assert load_image(fill).pixels.shape == load_image(_field_jpeg()).pixels.shape  # fill bytes are allowed


def test_a_jpeg_scan_of_thousands_of_fill_runs_is_refused_for_its_markers_not_as_truncated() -> None:
    """Runs of fill bytes before restart markers inside a scan's entropy-coded data (no encoder
    writes any) count toward MAX_JPEG_MARKERS like segments do: over it, the file is refused for
    its markers, not read as one without an end-of-image marker (it has one)."""
    from smearscope.device.ingest.headers import MAX_JPEG_MARKERS

    jpeg = _field_jpeg()
    sos = jpeg.index(b"\xff\xda")
    data_at = sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]
    hostile_scan = jpeg[:data_at] + b"\xff\xff\xd0" * (MAX_JPEG_MARKERS + 1) + jpeg[data_at:]
    with pytest.raises(IngestError) as err:
        load_image(hostile_scan)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT
    assert f"more than {MAX_JPEG_MARKERS} markers inside a scan's entropy-coded data" in err.value.message


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _in_image_chunks_of(png: bytes, size: int) -> bytes:
    """`png` (IDAT chunks consecutive, IEND last) with its image data in IDAT chunks of `size` bytes."""
    stream, pos = b"", 8
    while pos < len(png):
        (length,), ctype = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        if ctype == b"IDAT":
            stream += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    first, last = png.index(b"IDAT") - 4, png.index(b"IEND") - 4
    return png[:first] + b"".join(_png_chunk(b"IDAT", stream[i:i + size])
                                  for i in range(0, len(stream), size)) + png[last:]


def test_a_png_of_millions_of_tiny_chunks_is_refused_unread_and_small_image_chunks_read() -> None:
    """2.7 million empty ancillary chunks (32 MB: 6.8 s of CRCs and decoding) are refused after
    4096 plus one per KiB of file; the same picture with its image data in 1 KiB chunks (8 times
    smaller than libpng's) reads to the same pixels, at any size (each chunk is over a KiB)."""
    bgr = hostile.smear_like(120, 160)
    png = hostile.encode(".png", bgr)
    first = png.index(b"IDAT") - 4
    tiny = png[:first] + _png_chunk(b"aaAa", b"") * 2_700_000 + png[first:]
    with pytest.raises(IngestError) as err:
        load_image(tiny)
    assert err.value.code is RejectReason.UNSUPPORTED_FORMAT and "PNG of more than" in err.value.message
    small = _in_image_chunks_of(png, 1024)
    assert small.count(b"IDAT") > 20
    np.testing.assert_array_equal(load_image(small).pixels, load_image(png).pixels)


def _tiff_with_directories(field: np.ndarray, pages: int = 0, subifds: int = 0) -> bytes:
    """`field` as the first page, then `pages` one-pixel pages or `subifds` one-pixel SubIFDs."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(field, photometric="rgb", metadata=None, subifds=subifds or None)
        for _ in range(subifds):
            tw.write(field[:1, :1], photometric="rgb", metadata=None, subfiletype=1)
        for _ in range(pages):
            tw.write(field[:1, :1], photometric="rgb", contiguous=False, metadata=None)
    return buf.getvalue()


def test_a_tiff_of_more_image_directories_than_read_is_refused_before_its_series_are_made(field: np.ndarray) -> None:
    """A field with 63 more pages or 63 SubIFDs reads to its first page (64 directories); one
    more of either is refused as multi_frame before tifffile groups them into series (which took
    two minutes for a 4.5 MB file of 20 000 one-pixel pages)."""
    from smearscope.device.ingest.headers import MAX_TIFF_DIRECTORIES

    rgb = np.ascontiguousarray(field[:, :, ::-1])
    for extra in ("pages", "subifds"):
        ok = load_image(_tiff_with_directories(rgb, **{extra: MAX_TIFF_DIRECTORIES - 1}))
        np.testing.assert_array_equal(ok.pixels, field)
        with pytest.raises(IngestError) as err:
            load_image(_tiff_with_directories(rgb, **{extra: MAX_TIFF_DIRECTORIES}))
        assert err.value.code is RejectReason.MULTI_FRAME
        assert f"more than {MAX_TIFF_DIRECTORIES} image directories" in err.value.message


def test_only_a_jpegs_first_exif_block_is_read_as_opencv_reads_it() -> None:
    """Two EXIF blocks (orientation 6, then 3): the first is applied, as OpenCV's reader does, and
    a later one is not parsed (4000 of them, 5400 entries each, took 8.6 s); a first block without
    an orientation, or a broken one, gives way to the next (OpenCV reads that one too)."""
    jpeg = hostile.encode(".jpg", _marked(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    body = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010F, 2, 4, 0)
    no_tag = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    broken = b"\xff\xe1" + struct.pack(">H", 10) + b"Exif\x00\x00XX"
    six = load_image(jpeg[:2] + hostile.exif_app1(6) + jpeg[2:]).pixels
    for blocks in (hostile.exif_app1(6) + hostile.exif_app1(3), no_tag + hostile.exif_app1(6),
                   broken + hostile.exif_app1(6) + hostile.exif_app1(3)):
        data = jpeg[:2] + blocks + jpeg[2:]
        img = load_image(data)
        np.testing.assert_array_equal(img.pixels, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
        np.testing.assert_array_equal(img.pixels, six)


def test_a_tiff_whose_directory_chain_loops_back_reads_its_first_page(field: np.ndarray) -> None:
    """A one-page TIFF whose next-directory offset points back at its own directory is one image
    (tifffile cuts the loop short), not 65 directories refused as multi_frame."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(field[:, :, ::-1]), photometric="rgb", metadata=None)
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    (first,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, first)
    struct.pack_into("<I", data, first + 2 + 12 * count, first)  # the next directory: itself
    np.testing.assert_array_equal(load_image(bytes(data)).pixels, field)


def test_a_large_png_in_1_kib_image_chunks_reads_and_a_jpeg_with_fill_bytes_between_scans_too() -> None:
    """A 6.8 MB PNG of a noisy 1500 x 1500 field with its image data in 1 KiB chunks (6600 of them,
    over 4096 + one per 4 KiB of file) reads to the same pixels; so does a progressive JPEG with
    a megabyte of fill bytes before its second scan (libjpeg skips them; the walk skips the run whole)."""
    noisy = np.random.default_rng(5).integers(0, 256, (1500, 1500, 3), np.uint8)
    png = hostile.encode(".png", noisy, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    small = _in_image_chunks_of(png, 1024)
    assert small.count(b"IDAT") > 4096 + len(small) // 4096
    np.testing.assert_array_equal(load_image(small).pixels, noisy)
    jpeg = hostile.encode(".jpg", hostile.smear_like(200, 300), [int(cv2.IMWRITE_JPEG_PROGRESSIVE), 1])
    second = jpeg.index(b"\xff\xda", jpeg.index(b"\xff\xda") + 2)
    filled = jpeg[:second] + b"\xff" * 1_000_000 + jpeg[second:]
    np.testing.assert_array_equal(load_image(filled).pixels, load_image(jpeg).pixels)
