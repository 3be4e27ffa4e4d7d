"""Generators of broken and hostile input files, each paired with the reason code ingest owes it.

Everything is made from code (numpy, OpenCV, tifffile, byte surgery) into a caller's directory;
no dataset image is ever copied. Expected codes are plain strings, so this file does not depend
on the module it tests.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile


def smear_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A plausible, non-blank BGR field: pale background, darker pink/purple discs, noise."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), (225, 215, 235), np.float32)
    for _ in range(max(1, height * width // 3000)):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(5, 15))
        colour = (180, 120, 200) if rng.random() < 0.9 else (150, 60, 110)
        cv2.circle(img, (int(cx), int(cy)), r, colour, -1)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def png_set_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite IHDR's width/height and fix its CRC, so only the declared size lies."""
    b = bytearray(png)
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def jpeg_set_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the baseline frame header's (SOF0) dimensions."""
    b = bytearray(jpeg)
    sof = b.index(b"\xff\xc0")
    b[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(b)


def jpeg_set_precision(jpeg: bytes, bits: int) -> bytes:
    """Rewrite the frame header's sample precision (12-bit JPEG: medical and scientific cameras)."""
    b = bytearray(jpeg)
    b[b.index(b"\xff\xc0") + 4] = bits
    return bytes(b)


def exif_app1(orientation: int, big_endian: bool = True) -> bytes:
    """A minimal APP1 EXIF segment whose IFD0 holds only the Orientation tag (0x0112)."""
    o = ">" if big_endian else "<"
    tiff = (b"MM\x00\x2a" if big_endian else b"II\x2a\x00") + struct.pack(o + "I", 8)
    tiff += struct.pack(o + "H", 1) + struct.pack(o + "HHI", 0x0112, 3, 1)
    tiff += struct.pack(o + "HH", orientation, 0) + struct.pack(o + "I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def jpeg_with_exif(img: np.ndarray, orientation: int) -> bytes:
    """A JPEG of `img` (stored as given) that tells viewers to display it with `orientation`."""
    jpeg = encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return jpeg[:2] + exif_app1(orientation) + jpeg[2:]


def apng(img: np.ndarray, frames: int) -> bytes:
    """A PNG of `img` made an animated PNG that declares `frames` frames (acTL) with `img` as the first
    (fcTL before IDAT), its other frames' fdAT chunks left out: a decoder that knows no APNG reads
    `img`, as it would with them."""
    png = encode(".png", img)
    ihdr_end = 8 + 25

    def chunk(ctype: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))

    h, w = img.shape[:2]
    actl = chunk(b"acTL", struct.pack(">II", frames, 0))
    fctl = chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, w, h, 0, 0, 1, 10, 0, 0))
    return png[:ihdr_end] + actl + fctl + png[ihdr_end:]


def palette_png(indices: np.ndarray, palette: list[tuple[int, int, int]], depth: int = 8,
                trns: list[int] | None = None) -> bytes:
    """A PNG of colour type 3 (what OpenCV cannot write): `indices` at `depth` bits into `palette`
    (RGB triples), with a tRNS chunk of per-entry alpha if given."""
    def chunk(ctype: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))

    h, w = indices.shape
    per = 8 // depth
    rows = b""
    for row in indices:
        packed = bytearray((w * depth + 7) // 8)
        for x, v in enumerate(row):
            packed[x // per] |= int(v) << (8 - depth * (x % per + 1))
        rows += b"\x00" + bytes(packed)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 3, 0, 0, 0))
    png += chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
    if trns is not None:
        png += chunk(b"tRNS", bytes(trns))
    return png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tiff_patch_tag(path: Path, tag_name: str, value: int) -> None:
    """Overwrite one inline tag value of the first page in place (e.g. to lie about its size)."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[tag_name]
        offset, code = tag.valueoffset, {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        order = tif.byteorder
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(order + code, value))


@dataclass(frozen=True)
class HostileCase:
    name: str
    expected: str
    make: Callable[[Path], Path]
    #: IngestLimits overrides for this case (e.g. a tiny byte limit).
    limits: dict[str, int] = field(default_factory=dict)


def _write(directory: Path, filename: str, data: bytes) -> Path:
    path = directory / filename
    path.write_bytes(data)
    return path


def _tiff(directory: Path, filename: str, arr: np.ndarray, **kwargs: object) -> Path:
    path = directory / filename
    tifffile.imwrite(path, arr, **kwargs)
    return path


def _missing(d: Path) -> Path:
    return d / "no_such_frame.jpg"


def _directory(d: Path) -> Path:
    path = d / "frame_dir.png"
    path.mkdir()
    return path


def _fifo(d: Path) -> Path:
    path = d / "frame_fifo.jpg"
    os.mkfifo(path)  # reading it would block forever: ingest must refuse before opening
    return path


def _random_bytes(d: Path) -> Path:
    data = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert not data.startswith((b"\xff\xd8", b"\x89PNG", b"II", b"MM", b"GIF", b"BM", b"RIFF"))
    return _write(d, "noise.tif", data)


def _png_truncated(d: Path) -> Path:
    png = encode(".png", smear_like(200, 300))
    return _write(d, "half.png", png[: len(png) // 2])


def _png_no_iend(d: Path) -> Path:
    return _write(d, "no_iend.png", encode(".png", smear_like(200, 300))[:-12])


def _png_bad_crc(d: Path) -> Path:
    b = bytearray(encode(".png", smear_like(200, 300)))
    idat = b.index(b"IDAT")
    b[idat + 40] ^= 0xFF
    return _write(d, "bad_crc.png", bytes(b))


def _jpeg_truncated(d: Path) -> Path:
    jpeg = encode(".jpg", smear_like(200, 300))
    return _write(d, "half.jpg", jpeg[: len(jpeg) // 2])


def _tiff_truncated(d: Path) -> Path:
    path = _tiff(d, "cut.tif", smear_like(200, 300), photometric="rgb")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    return path


def _tiff_ifd_past_end(d: Path) -> Path:
    b = bytearray(_tiff(d, "ifd.tif", smear_like(100, 100), photometric="rgb").read_bytes())
    b[4:8] = struct.pack("<I", len(b) + 100)
    return _write(d, "ifd.tif", bytes(b))


def _tiff_bomb(d: Path) -> Path:
    path = _tiff(d, "bomb.tif", smear_like(100, 100), photometric="rgb")
    tiff_patch_tag(path, "ImageWidth", 60000)
    tiff_patch_tag(path, "ImageLength", 60000)
    return path


def one_strip_tiff(strip: bytes, compression: int, width: int = 256, height: int = 256,
                   photometric: int = 2) -> bytes:
    """A baseline 8-bit RGB TIFF of one strip holding `strip` as stored (compressed) bytes:
    8 deflate, 32773 PackBits, 1 none; grey (one sample) with `photometric` 0 or 1."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, compression), (262, 3, photometric),
            (273, 4, 8), (277, 3, 3 if photometric == 2 else 1), (278, 4, height), (279, 4, len(strip))]
    pad = len(strip) & 1
    entries = b"".join(struct.pack("<HHII", t, ty, 1, v) if ty == 4 else struct.pack("<HHIHH", t, ty, 1, v, 0)
                       for t, ty, v in tags)
    return (b"II*\0" + struct.pack("<I", 8 + len(strip) + pad) + strip + b"\0" * pad
            + struct.pack("<H", len(tags)) + entries + b"\0" * 4)


def with_short_tags(tiff: bytes, tags: dict[int, int]) -> bytes:
    """`tiff` with SHORT tags added to (or replaced in) its first directory, written anew at the
    file's end (values inline; the next-directory pointer kept)."""
    order = "<" if tiff[:2] == b"II" else ">"
    (first,) = struct.unpack(order + "I", tiff[4:8])
    (n,) = struct.unpack(order + "H", tiff[first:first + 2])
    entries = {struct.unpack(order + "H", tiff[first + 2 + 12 * k:first + 4 + 12 * k])[0]:
               tiff[first + 2 + 12 * k:first + 14 + 12 * k] for k in range(n)}
    following = tiff[first + 2 + 12 * n:first + 6 + 12 * n]
    for tag, value in tags.items():
        entries[tag] = struct.pack(order + "HHIHH", tag, 3, 1, value, 0)
    body = tiff + b"\0" * (len(tiff) & 1)
    return (body[:4] + struct.pack(order + "I", len(body)) + body[8:] + struct.pack(order + "H", len(entries))
            + b"".join(entries[t] for t in sorted(entries)) + following)


def strips_tiff(strips: list[bytes], compression: int, width: int, height: int, rows_per_strip: int) -> bytes:
    """An 8-bit grey (black is zero) TIFF of several strips, each as stored (compressed) bytes."""
    data = b"".join(strips)
    offsets = [8 + sum(len(s) for s in strips[:k]) for k in range(len(strips))]
    arrays = struct.pack(f"<{len(strips)}I", *offsets) + struct.pack(f"<{len(strips)}I", *map(len, strips))
    at = 8 + len(data)
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, compression), (262, 3, 1, 1),
            (273, 4, len(strips), at), (277, 3, 1, 1), (278, 4, 1, rows_per_strip),
            (279, 4, len(strips), at + 4 * len(strips))]
    entries = b"".join(struct.pack("<HHII", t, ty, c, v) if ty == 4 else struct.pack("<HHIHH", t, ty, c, v, 0)
                       for t, ty, c, v in tags)
    return b"II*\0" + struct.pack("<I", at + len(arrays)) + data + arrays + struct.pack("<H", len(tags)) + entries + b"\0" * 4


def packbits(data: bytes) -> bytes:
    """PackBits of `data` as literal runs of up to 128 bytes (what an encoder that finds no
    repeats writes)."""
    return b"".join(bytes([len(part) - 1]) + part for part in (data[i:i + 128] for i in range(0, len(data), 128)))


def deflate_bomb(inflated_mb: int) -> bytes:
    """A 256 x 256 RGB TIFF whose one deflate strip inflates to `inflated_mb` MB (192 kB fit)."""
    squeeze = zlib.compressobj(9)
    strip = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(inflated_mb)) + squeeze.flush()
    return one_strip_tiff(strip, 8)


def _tiff_unknown_compression(d: Path) -> Path:
    path = _tiff(d, "weird_codec.tif", smear_like(100, 100), photometric="rgb")
    tiff_patch_tag(path, "Compression", 60123)
    return path


def _tiff_multipage(d: Path) -> Path:
    """Three same-sized pages written one by one, without tifffile's shape metadata."""
    path = d / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        for seed in range(3):
            writer.write(smear_like(100, 100, seed), photometric="rgb", metadata=None)
    return path


def _tiff_cmyk(d: Path) -> Path:
    arr = np.random.default_rng(1).integers(0, 255, (100, 100, 4), dtype=np.uint8)
    return _tiff(d, "cmyk.tif", arr, photometric="separated")


CASES: list[HostileCase] = [
    HostileCase("missing_file", "not_found", _missing),
    HostileCase("directory", "not_a_file", _directory),
    *([HostileCase("fifo", "not_a_file", _fifo)] if hasattr(os, "mkfifo") else []),
    HostileCase("zero_bytes", "empty_file", lambda d: _write(d, "empty.jpg", b"")),
    HostileCase(
        "over_byte_limit",
        "file_too_large",
        lambda d: _write(d, "big.png", encode(".png", smear_like(200, 300))),
        {"max_file_bytes": 1000},
    ),
    HostileCase(
        "text_named_jpg", "not_an_image", lambda d: _write(d, "notes.jpg", b"white cells: 7\n" * 40)
    ),
    HostileCase(
        "html_page",
        "not_an_image",
        lambda d: _write(d, "page.png", b"<!DOCTYPE html><html><body>404</body></html>\n" * 20),
    ),
    HostileCase("random_bytes", "not_an_image", _random_bytes),
    HostileCase(
        "gif",
        "unsupported_format",
        lambda d: _write(d, "a.gif", encode(".gif", smear_like(100, 100))),
    ),
    HostileCase(
        "bmp_named_jpg",
        "unsupported_format",
        lambda d: _write(d, "a.jpg", encode(".bmp", smear_like(100, 100))),
    ),
    HostileCase(
        "webp",
        "unsupported_format",
        lambda d: _write(d, "a.webp", encode(".webp", smear_like(100, 100))),
    ),
    HostileCase("tiff_cmyk", "unsupported_format", _tiff_cmyk),
    HostileCase("tiff_unknown_compression", "unsupported_format", _tiff_unknown_compression),
    HostileCase(
        "jpeg_12bit",
        "unsupported_format",
        lambda d: _write(d, "twelve.jpg", jpeg_set_precision(encode(".jpg", smear_like(100, 100)), 12)),
    ),
    HostileCase("jpeg_truncated", "truncated", _jpeg_truncated),
    HostileCase(
        "jpeg_no_eoi",
        "truncated",
        lambda d: _write(d, "no_eoi.jpg", encode(".jpg", smear_like(200, 300))[:-2]),
    ),
    HostileCase("png_truncated", "truncated", _png_truncated),
    HostileCase("png_no_iend", "truncated", _png_no_iend),
    HostileCase("tiff_truncated", "truncated", _tiff_truncated),
    HostileCase("tiff_ifd_past_end", "truncated", _tiff_ifd_past_end),
    HostileCase("png_bad_crc", "corrupt", _png_bad_crc),
    HostileCase(  # libpng shows an index past the palette as black: all of them, a blank frame
        "png_palette_indices_past_its_palette",
        "corrupt",
        lambda d: _write(d, "past.png", palette_png(np.full((100, 120), 5), [(200, 30, 40), (20, 220, 90)])),
    ),
    HostileCase(  # some of them: black cells where the writer meant colours, analysed as such
        "png_some_palette_indices_past_its_palette",
        "corrupt",
        lambda d: _write(d, "some.png", palette_png(
            np.random.default_rng(3).integers(0, 3, (100, 120)), [(200, 30, 40), (20, 220, 90)])),
    ),
    HostileCase(
        "png_declares_more_than_it_holds",
        "corrupt",
        lambda d: _write(
            d, "liar.png", png_set_ihdr_size(encode(".png", smear_like(100, 100)), 3000, 3000)
        ),
    ),
    HostileCase(
        "jpeg_header_then_garbage",
        "corrupt",
        lambda d: _write(d, "garbage.jpg", b"\xff\xd8" + b"\x00garbage" * 50),
    ),
    HostileCase(
        "png_bomb",
        "too_large_pixels",
        lambda d: _write(
            d, "bomb.png", png_set_ihdr_size(encode(".png", smear_like(100, 100)), 100000, 100000)
        ),
    ),
    HostileCase(
        "jpeg_bomb",
        "too_large_pixels",
        lambda d: _write(
            d, "bomb.jpg", jpeg_set_sof_size(encode(".jpg", smear_like(100, 100)), 65000, 65000)
        ),
    ),
    HostileCase("tiff_bomb", "too_large_pixels", _tiff_bomb),
    HostileCase(
        "over_pixel_limit",
        "too_large_pixels",
        lambda d: _write(d, "a.png", encode(".png", smear_like(200, 200))),
        {"max_pixels": 200 * 200 - 1},
    ),
    HostileCase(
        "float_nan_tiff",
        "bad_dtype",
        lambda d: _tiff(d, "nan.tif", np.full((100, 100), np.nan, np.float32)),
    ),
    HostileCase(
        "int16_tiff",
        "bad_dtype",
        lambda d: _tiff(d, "signed.tif", np.full((100, 100), -5, np.int16)),
    ),
    HostileCase(
        "bilevel_tiff",
        "bad_dtype",
        lambda d: _tiff(d, "bits.tif", np.eye(100, dtype=bool)),
    ),
    HostileCase(
        "tiff_5_channels",
        "bad_channels",
        lambda d: _tiff(
            d,
            "five.tif",
            np.random.default_rng(2).integers(0, 255, (100, 100, 5), np.uint8),
            photometric="rgb",
            extrasamples=["unspecified", "unspecified"],
        ),
    ),
    HostileCase(
        "tiff_4d_stack",
        "multi_frame",
        lambda d: _tiff(
            d,
            "stack.tif",
            np.stack([[smear_like(100, 100, s) for s in range(3)]] * 2),
            photometric="rgb",
        ),
    ),
    HostileCase(
        "tiff_z_stack",
        "multi_frame",
        lambda d: _tiff(
            d,
            "z.tif",
            np.stack([smear_like(100, 100, s)[..., 1] for s in range(5)]),
            photometric="minisblack",
        ),
    ),
    HostileCase("tiff_multipage", "multi_frame", _tiff_multipage),
    HostileCase("apng_of_5_frames", "multi_frame", lambda d: _write(d, "stack.png", apng(smear_like(100, 100), 5))),
    HostileCase(
        "one_pixel", "too_small", lambda d: _write(d, "dot.png", encode(".png", smear_like(1, 1)))
    ),
    HostileCase(
        "thumbnail",
        "too_small",
        lambda d: _write(d, "thumb.jpg", encode(".jpg", smear_like(40, 100))),
    ),
    HostileCase(
        "strip_10000x10",
        "absurd_aspect",
        lambda d: _write(d, "strip.png", encode(".png", smear_like(10, 10000))),
    ),
    HostileCase(
        "strip_1000x100",
        "absurd_aspect",
        lambda d: _write(d, "strip.jpg", encode(".jpg", smear_like(100, 1000))),
    ),
    HostileCase(
        "all_black",
        "blank_image",
        lambda d: _write(d, "black.png", encode(".png", np.zeros((200, 300, 3), np.uint8))),
    ),
    HostileCase(
        "one_grey_value_jpeg",
        "blank_image",
        lambda d: _write(d, "grey.jpg", encode(".jpg", np.full((200, 300, 3), 128, np.uint8))),
    ),
    HostileCase("tiff_deflate_bomb", "corrupt", lambda d: _write(d, "inflates.tif", deflate_bomb(64))),
    HostileCase("tiff_packbits_bomb", "corrupt",  # runs of 128 zeros from 2 bytes each: 64 MB
                lambda d: _write(d, "packbits.tif", one_strip_tiff(b"\x81\x00" * (1 << 19), 32773))),
    HostileCase(
        "flat_16bit_tiff",
        "blank_image",
        lambda d: _tiff(d, "flat16.tif", np.full((200, 300), 3000, np.uint16)),
    ),
]


def generate_all(directory: Path) -> list[tuple[HostileCase, Path]]:
    """Write every case into `directory` (one sub-folder each); return (case, path) pairs."""
    made = []
    for case in CASES:
        sub = directory / case.name
        sub.mkdir(parents=True, exist_ok=True)
        made.append((case, case.make(sub)))
    return made
