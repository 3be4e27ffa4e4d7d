"""Stage 1 (ingest): files a sloppy or hostile lab writes whose damage a lenient decoder would paint
over (black strips, a half-listed TIFF, a cut TIFF directory) get a reason code, not an analysis."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import hostile  # tests/ is on sys.path (pytest prepend import mode), as for conftest
import numpy as np
import pytest
import tifffile

from smearscope.service.ingest import IngestError, IngestLimits, load_image


def _code(data: bytes) -> str:
    with pytest.raises(IngestError) as err:
        load_image(data)
    return err.value.code.value


def _tiff(bgr: np.ndarray, **kwargs: object) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, bgr[..., ::-1], photometric="rgb", **kwargs)
    return out.getvalue()


def _with_segment_values(data: bytes, tag_code: int, values: list[int]) -> bytes:
    """The TIFF with its first page's StripOffsets/StripByteCounts (or tile) entry's values replaced
    (same count, written where the tag keeps them)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tag = tif.pages[0].tags[tag_code]
        size = {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        where = tag.valueoffset
    out = bytearray(data)
    struct.pack_into("<" + size * len(values), out, where, *values)
    return bytes(out)


def _segments(data: bytes) -> tuple[list[int], list[int]]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        return list(page.dataoffsets), list(page.databytecounts)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("tiled", [False, True], ids=["strips", "tiles"])
@pytest.mark.parametrize("which", ["offset", "bytecount"])
def test_a_tiff_strip_or_tile_listed_without_data_is_corrupt_not_decoded_black(
        compression: str | None, tiled: bool, which: str) -> None:
    """tifffile reads a segment at offset 0 or of 0 bytes as absent (a sparse file) and fills it with
    zeros: a band of the field black, which was analysed as such."""
    field = hostile.smear_like(300, 400)
    data = _tiff(field, compression=compression, **({"tile": (64, 64)} if tiled else {"rowsperstrip": 32}))
    assert np.array_equal(load_image(data).pixels, field)
    offsets, counts = _segments(data)
    tag = (324 if tiled else 273) if which == "offset" else (325 if tiled else 279)
    values = offsets if which == "offset" else counts
    for k in (0, 3, len(values) - 1):
        emptied = values.copy()
        emptied[k] = 0
        assert _code(_with_segment_values(data, tag, emptied)) == "corrupt", (k, which)


def test_a_tiff_listing_fewer_strips_than_its_rows_hold_is_corrupt_not_half_black() -> None:
    """StripOffsets and StripByteCounts of 5 entries where the rows need 10: tifffile warns and
    fills the rows no strip holds with zeros (140 of 300 rows black)."""
    field = hostile.smear_like(300, 400)
    data = bytearray(_tiff(field, rowsperstrip=32))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        entries = [tif.pages[0].tags[code].offset for code in (273, 279)]
    for entry in entries:
        struct.pack_into("<I", data, entry + 4, 5)  # the entry's count: 5 of the 10 values
    assert _code(bytes(data)) == "corrupt"


@pytest.mark.parametrize("major, compatible", [
    (b"hevc", b"mif1msf1heic"),  # an HEIF image sequence (burst, live photo)
    (b"heim", b"mif1heim"), (b"heis", b"msf1heis"), (b"hevx", b"msf1hevx"),
    (b"avis", b"avifmsf1"),  # an AVIF sequence
    (b"mif2", b"mif2heic"), (b"MiHE", b"MiHEmiafheic"), (b"isom", b"mif1heic"),
])
def test_every_heif_and_avif_file_is_unsupported_format_not_an_unknown_file(major: bytes, compatible: bytes) -> None:
    """HEIF/AVIF told by its ftyp box's major brand or a compatible one, as the others (heic, mif1,
    avif) were: a phone's or a camera's HEIF is a known format refused, not `not_an_image`."""
    box = major + b"\x00\x00\x00\x00" + compatible
    data = struct.pack(">I", 8 + len(box)) + b"ftyp" + box + b"\x00\x00\x00\x08free" + bytes(200)
    with pytest.raises(IngestError) as err:
        load_image(data)
    assert err.value.code.value == "unsupported_format"
    assert "HEIF/AVIF" in err.value.message


def test_an_mp4_video_is_still_not_an_image() -> None:
    data = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(200)
    assert _code(data) == "not_an_image"


def _lzw_tiff(img: np.ndarray) -> tuple[bytes, list[int], list[int]]:
    """The field as OpenCV writes a TIFF (libtiff's LZW, horizontal predictor), and its strips."""
    data = hostile.encode(".tif", img)
    offsets, counts = _segments(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert int(tif.pages[0].compression) == 5
    return data, offsets, counts


@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_an_8bit_lzw_tiff_with_a_damaged_strip_is_corrupt_not_decoded_with_wrong_rows(grey: bool) -> None:
    """OpenCV reads 8-bit TIFFs through libtiff's RGBA interface, which logs a bad LZW code and goes
    on: the strip's rows came back wrong and the field was analysed (16-bit pages were refused)."""
    field = hostile.smear_like(301, 397)
    img = field[..., 1] if grey else field
    data, offsets, counts = _lzw_tiff(img)
    decoded = load_image(data).pixels
    assert np.array_equal(decoded[..., 1] if grey else decoded, img)
    rng = np.random.default_rng(3)
    for k in (0, len(offsets) // 2, len(offsets) - 1):
        start, count = offsets[k], counts[k]
        garbage, cut = bytearray(data), bytearray(data)
        garbage[start + count // 3 : start + count] = rng.integers(0, 256, count - count // 3, dtype=np.uint8).tobytes()
        cut[start + count // 2 : start + count] = bytes(count - count // 2)  # a writer that stopped: zeros
        for damaged in (garbage, cut):
            assert _code(bytes(damaged)) == "corrupt", k


def _fill_order_2(data: bytes) -> bytes:
    """The little-endian TIFF with FillOrder 2 (each byte's bits least significant first): its
    PlanarConfiguration entry (1, the default) made a FillOrder entry of 2, the entries kept in tag
    order, and every strip's bytes bit-reversed, as such a writer stores them."""
    out = bytearray(data)
    (at,) = struct.unpack_from("<I", out, 4)
    (n,) = struct.unpack_from("<H", out, at)
    entries = [bytes(out[at + 2 + 12 * i : at + 14 + 12 * i]) for i in range(n)]
    entries = [struct.pack("<HHIHH", 266, 3, 1, 2, 0) if e[:2] == struct.pack("<H", 284) else e for e in entries]
    out[at + 2 : at + 2 + 12 * n] = b"".join(sorted(entries, key=lambda e: struct.unpack_from("<H", e)[0]))
    reversed_bits = np.array([int(f"{v:08b}"[::-1], 2) for v in range(256)], np.uint8)
    for start, count in zip(*_segments(bytes(out))):
        out[start : start + count] = reversed_bits[np.frombuffer(out, np.uint8, count, start)].tobytes()
    return bytes(out)


@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_an_lzw_tiff_of_fill_order_2_reads_as_libtiff_decodes_it(grey: bool) -> None:
    """FillOrder 2 stores each byte's bits the other way round; libtiff reverses them before its LZW
    decoder reads the codes, so the strips are walked reversed too: such a file was refused `corrupt`
    ('holds a code past its table after 1 of the ... bytes'), though OpenCV decodes it exactly."""
    field = hostile.smear_like(301, 397)
    img = field[..., 1] if grey else field
    data = _fill_order_2(_lzw_tiff(img)[0])
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert int(tif.pages[0].fillorder) == 2
    decoded = load_image(data).pixels
    assert np.array_equal(decoded[..., 1] if grey else decoded, img)
    offsets, counts = _segments(data)
    damaged = bytearray(data)
    start = offsets[len(offsets) // 2] + counts[len(offsets) // 2] // 2
    damaged[start : start + counts[len(offsets) // 2] // 4] = bytes(counts[len(offsets) // 2] // 4)
    assert _code(bytes(damaged)) == "corrupt"  # a damaged strip of such a file is still found


@pytest.mark.parametrize("content", ["noise", "flat", "gradient", "grey_noise"])
def test_8bit_lzw_tiffs_libtiff_writes_read_whole(content: str) -> None:
    """The strips' codes are walked as libtiff reads them (widths 9 to 12 bits, Clear codes): files of
    long strings, of none and of a full table each read as OpenCV decodes them."""
    rng = np.random.default_rng(5)
    img = {"noise": rng.integers(0, 256, (700, 900, 3), dtype=np.uint8),
           "flat": np.full((300, 400, 3), 200, np.uint8),
           "gradient": np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (300, 2, 3)),
           "grey_noise": rng.integers(0, 256, (900, 700), dtype=np.uint8)}[content]
    data, _, _ = _lzw_tiff(img)
    if content == "flat":
        assert _code(data) == "blank_image"
        return
    decoded = load_image(data).pixels
    assert np.array_equal(decoded[..., 0] if img.ndim == 2 else decoded, img)


@pytest.mark.parametrize("bigtiff", [False, True], ids=["tiff", "bigtiff"])
def test_a_tiff_cut_inside_its_directory_is_truncated_not_corrupt_or_bad_dtype(bigtiff: bool) -> None:
    """A writer that puts the directory first (tifffile does) and stops early: cut among the entries the
    file was `corrupt`, cut in the BitsPerSample values tifffile took one bit and said `bad_dtype`."""
    data = _tiff(hostile.smear_like(120, 160), bigtiff=bigtiff)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        pixels_at = min(tif.pages[0].dataoffsets)
    codes = {cut: _code(data[:cut]) for cut in range(9, pixels_at)}
    assert {code for code in codes.values()} == {"truncated"}, {c: v for c, v in codes.items() if v != "truncated"}


def test_a_palette_tiff_is_expanded_into_one_frame_not_copied_three_times() -> None:
    """A 16 MP palette TIFF (a few hundred kB of deflate) costs no more beside its 16-bit BGR frame than
    the conversion to 8 bits needs: expanded as RGB planes, transposed, copied contiguous and turned
    to BGR it held about three frames at once (64 MP, 335 kB: 1.15 GB peak RSS, now 0.64 GB)."""
    import tracemalloc

    height, width = 4000, 4000
    rng = np.random.default_rng(9)
    colormap = rng.integers(0, 65536, (3, 256), dtype=np.uint16)
    indices = (np.arange(height * width, dtype=np.uint32) % 251).astype(np.uint8).reshape(height, width)
    out = io.BytesIO()
    tifffile.imwrite(out, indices, photometric="palette", colormap=colormap, compression="zlib")
    data = out.getvalue()
    frame = height * width * 3 * 2  # the 16-bit BGR frame the colormap gives
    tracemalloc.start()
    try:
        decoded = load_image(data).pixels
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = colormap[::-1, indices[:2, :3]].transpose(1, 2, 0) / 65535 * 255  # BGR at 8 bits, as before
    assert np.array_equal(decoded[:2, :3], np.rint(expected).astype(np.uint8))
    assert peak < 2.5 * frame, f"{peak / 2**20:.0f} MiB traced for a {frame / 2**20:.0f} MiB frame"


def test_a_tiff_whose_first_page_is_a_thumbnail_is_analysed_at_its_full_resolution_page() -> None:
    """A TIFF that starts with a reduced-resolution page (NewSubfileType bit 0, a writer's preview)
    and holds the field after it: the 160x120 preview was analysed as the field, at five times the
    field's microns per pixel, the field itself never read."""
    field = hostile.smear_like(600, 800)
    thumbnail = field[::5, ::5]
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tif:
        tif.write(thumbnail[..., ::-1], photometric="rgb", subfiletype=1)
        tif.write(field[..., ::-1], photometric="rgb")
    assert np.array_equal(load_image(out.getvalue()).pixels, field)
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tif:  # no page marked: the first is read, as it always was
        tif.write(thumbnail[..., ::-1], photometric="rgb")
        tif.write(field[..., ::-1], photometric="rgb")
    assert np.array_equal(load_image(out.getvalue()).pixels, thumbnail)


@pytest.mark.parametrize("bigtiff", [False, True], ids=["tiff", "bigtiff"])
def test_a_tiff_cut_after_its_preview_page_is_truncated_not_the_preview_analysed(bigtiff: bool) -> None:
    """A preview page first (NewSubfileType bit 0), the field's directory after it, and the file cut at
    or inside that directory: cut at its start the preview was analysed as the field (at five times
    its microns per pixel), cut among its entries the file was `corrupt`, in its BitsPerSample values
    `bad_dtype`; a file of one page marked as a preview and nothing after it is read as before."""
    field = hostile.smear_like(600, 800)
    out = io.BytesIO()
    with tifffile.TiffWriter(out, bigtiff=bigtiff) as tif:
        tif.write(field[::5, ::5, ::-1], photometric="rgb", subfiletype=1)
        tif.write(field[..., ::-1], photometric="rgb")
    data = out.getvalue()
    assert np.array_equal(load_image(data).pixels, field)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        second, pixels_at = tif.pages[1].offset, min(tif.pages[1].dataoffsets)
    codes = {cut: _code(data[:cut]) for cut in range(second, pixels_at + 1)}
    assert set(codes.values()) == {"truncated"}, {c: v for c, v in codes.items() if v != "truncated"}
    out = io.BytesIO()
    with tifffile.TiffWriter(out, bigtiff=bigtiff) as tif:
        tif.write(field[::5, ::5, ::-1], photometric="rgb", subfiletype=1)
    assert np.array_equal(load_image(out.getvalue()).pixels, field[::5, ::5])


def _lzw_codes(codes: list[int], width: int = 9) -> bytes:
    """Codes of one width packed most significant bit first, as TIFF's LZW stores them."""
    return _lzw_bits("".join(format(code, f"0{width}b") for code in codes))


def _lzw_literals(values: bytes) -> bytes:
    """Clear, then each byte as a code of its own at the width libtiff reads it (the table grows by
    one entry per code from the second on: 9 bits up to the 254th, 10 to the 766th, 11 to the
    1790th), then EndOfInformation."""
    widths = [9 if i <= 253 else 10 if i <= 765 else 11 if i <= 1789 else 12 for i in range(len(values) + 1)]
    return _lzw_bits(format(256, "09b") + "".join(format(v, f"0{w}b") for v, w in zip([*values, 257], widths)))


def _lzw_bits(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def test_an_lzw_strip_of_clear_codes_alone_is_refused_without_walking_each() -> None:
    """20 kB of Clear codes (17 777 of them) where 192 kB of pixels belong: walked run by run, each a
    step of Python (a 256 MB file of them: minutes); encoders clear a full table or every 10 000 bytes,
    so more than one Clear per 2048 bytes of pixels is refused before the walk goes on."""
    strip = _lzw_codes([256] * 17_777)
    tiff = hostile.one_strip_tiff(strip, 5)
    with pytest.raises(IngestError) as err:
        load_image(tiff)
    assert err.value.code.value == "unsupported_format"
    assert "clears its code table more often than once per 2048 bytes" in err.value.message
    values = (np.arange(64 * 64) * 7 % 256).astype(np.uint8)
    data = hostile.one_strip_tiff(_lzw_literals(values.tobytes()), 5, width=64, height=64, photometric=1)
    assert np.array_equal(load_image(data).pixels[..., 0].ravel(), values)  # 4096 codes of 9 to 12 bits, read


def test_an_8bit_lzw_page_of_more_strips_than_are_walked_is_refused_before_the_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each strip or tile is walked apart (about 0.3 ms): a 64 MP page of 16 x 16 tiles (250 000) would
    take over a minute; 16 384 are walked (a 64 MP field of one-row strips has 8000)."""
    from smearscope.device.ingest import tiff_lzw

    field = hostile.smear_like(300, 400)
    data, offsets, _ = _lzw_tiff(field)
    monkeypatch.setattr(tiff_lzw, "MAX_LZW_SEGMENTS", len(offsets) - 1)
    assert _code(data) == "unsupported_format"
    monkeypatch.setattr(tiff_lzw, "MAX_LZW_SEGMENTS", len(offsets))
    assert np.array_equal(load_image(data).pixels, field)


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _rgb_png(width: int, height: int, rows: np.ndarray, *, level: int = 6) -> bytes:
    """An 8-bit RGB PNG made by hand: IHDR declares `width` x `height`, its IDAT holds every row of
    `rows` (RGB, filter type 0), however many there are; every CRC correct."""
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, level))
            + _png_chunk(b"IEND", b""))


def test_a_png_whose_pixel_data_holds_more_rows_than_its_header_is_corrupt_not_cut_to_the_header() -> None:
    """IHDR height 10, IDAT 12 rows: libpng read the first 10, warned on stderr and the rest was
    dropped; so was a field of 80 rows declared 64 (its lower part another image's). The same rows
    under a header that declares them all are read as they are."""
    rows = hostile.smear_like(12, 64)[..., ::-1]  # RGB as stored
    small = IngestLimits(min_side=8)
    assert np.array_equal(load_image(_rgb_png(64, 12, rows), limits=small).pixels, rows[..., ::-1])
    assert np.array_equal(load_image(_rgb_png(64, 10, rows[:10]), limits=small).pixels, rows[:10, :, ::-1])
    with pytest.raises(IngestError) as err:
        load_image(_rgb_png(64, 10, rows), limits=small)
    assert err.value.code.value == "corrupt"
    assert err.value.message == "<bytes>: PNG pixel data holds more than the 64x10 its header declares"
    field = hostile.smear_like(80, 96)[..., ::-1]
    assert _code(_rgb_png(96, 64, field)) == "corrupt"
    # one byte more than the rows: no row, but data the header does not account for either
    raw = b"".join(b"\x00" + row.tobytes() for row in field[:64]) + b"\x00"
    ihdr = struct.pack(">IIBBBBB", 96, 64, 8, 2, 0, 0, 0)
    one_more = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
                + _png_chunk(b"IEND", b""))
    assert _code(one_more) == "corrupt"


def _adam7(rgb: np.ndarray) -> bytes:
    """The image's scanlines as Adam7 lays them out (seven passes, filter type 0)."""
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        raw += b"".join(b"\x00" + row.tobytes() for row in rgb[y0::dy, x0::dx] if row.size)
    return raw


def test_an_interlaced_or_palette_png_of_more_rows_than_its_header_is_corrupt() -> None:
    """An Adam7 PNG of 64 rows whose stream runs on for 16 rows more, and a palette PNG of 80 rows
    under a header of 64: each read to its header's rows before, every CRC correct."""
    rgb = hostile.smear_like(64, 96)[..., ::-1]
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 96, 64, 8, 2, 0, 0, 1))

    def interlaced(raw: bytes) -> bytes:
        return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")

    assert np.array_equal(load_image(interlaced(_adam7(rgb))).pixels, rgb[..., ::-1])
    assert _code(interlaced(_adam7(rgb) + (b"\x00" + rgb[0].tobytes()) * 16)) == "corrupt"
    palette = hostile.palette_png(np.arange(80 * 96).reshape(80, 96) % 2, [(200, 30, 40), (20, 220, 90)])
    assert load_image(palette).pixels.shape == (80, 96, 3)
    assert _code(hostile.png_set_ihdr_size(palette, 96, 64)) == "corrupt"


def test_pixel_data_far_past_the_header_is_counted_in_bounded_pieces() -> None:
    """64 MB of rows under a header of 64 x 64 grey (a deflate bomb behind a small header): refused
    `corrupt` with no more than a few MiB traced at the peak, the stream inflated one piece past the
    declared rows, not whole."""
    field = b"".join(b"\x00" + bytes(range(k, k + 64)) for k in range(64))  # the 64 rows declared: a ramp
    rows = field + (b"\x00" + bytes(64)) * (64 * 1024 * 1024 // 65)
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
            + _png_chunk(b"IEND", b""))
    del rows
    tracemalloc.start()
    try:
        assert _code(bomb) == "corrupt"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak
