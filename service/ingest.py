"""Stage 1: ingest and validate one microscope frame (JPEG, PNG or TIFF) into 8-bit BGR.

Every refusal is an `IngestError` carrying a stable `RejectReason`; nothing else escapes for bad
input. Checks run in a fixed order, so one file always gets the same code:

1. the file itself        not_found, not_a_file, unreadable, empty_file, file_too_large
2. the format signature   not_an_image, unsupported_format
3. the container header   truncated, corrupt, unsupported_format, bad_dtype, bad_channels,
                          multi_frame (read from headers only: no pixel data is decoded yet)
4. the declared geometry  too_large_pixels, absurd_aspect, too_small
5. decoding               corrupt
6. the content            blank_image

Geometry is judged from the header BEFORE decoding, so a decompression bomb (a few kilobytes
declaring gigapixels) is refused without allocating its pixels.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import Union

import cv2
import numpy as np
import tifffile

logger = logging.getLogger(__name__)

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class RejectReason(str, Enum):
    """Why a frame was refused. The values are a stable public contract (logs, reports, UI)."""

    #: No file at the path.
    NOT_FOUND = "not_found"
    #: The path is a directory, FIFO, device or socket, not a regular file.
    NOT_A_FILE = "not_a_file"
    #: The file exists but the OS refused to read it (permissions, I/O error).
    UNREADABLE = "unreadable"
    #: Zero bytes.
    EMPTY_FILE = "empty_file"
    #: More bytes than `IngestLimits.max_file_bytes`; not read into memory.
    FILE_TOO_LARGE = "file_too_large"
    #: No known image signature: text, HTML, random bytes, a PDF...
    NOT_AN_IMAGE = "not_an_image"
    #: A recognised image format this analyzer does not decode (GIF, BMP, WebP, JPEG 2000,
    #: HEIF/AVIF, JPEG XL), or a TIFF whose compression or colour model is not supported.
    UNSUPPORTED_FORMAT = "unsupported_format"
    #: The signature is right but the structure is wrong (bad header, bad chunk CRC, a decoder
    #: that gives up, dimensions that disagree with the header).
    CORRUPT = "corrupt"
    #: The data stops early: no JPEG end-of-image marker, no PNG IEND, TIFF strips past the end.
    TRUNCATED = "truncated"
    #: The header declares more pixels than `IngestLimits.max_pixels` (decompression bomb).
    TOO_LARGE_PIXELS = "too_large_pixels"
    #: Long side / short side above `IngestLimits.max_aspect` (a strip, not a field of view).
    ABSURD_ASPECT = "absurd_aspect"
    #: Short side below `IngestLimits.min_side`: too few pixels to hold a single cell.
    TOO_SMALL = "too_small"
    #: Sample type other than 8- or 16-bit unsigned integer (float, signed, 1-bit, 32-bit...).
    BAD_DTYPE = "bad_dtype"
    #: Samples per pixel other than 1 (grey), 2 (grey+alpha), 3 (colour) or 4 (colour+alpha).
    BAD_CHANNELS = "bad_channels"
    #: A TIFF whose first series holds several frames (z-stack, time series, 4-D stack): which
    #: focal plane to analyse is the instrument's decision, not something to guess here.
    MULTI_FRAME = "multi_frame"
    #: Every pixel (nearly) the same value: lens cap on, shutter closed, saturated sensor.
    BLANK_IMAGE = "blank_image"


class IngestError(Exception):
    """A refused frame: `code` is a stable `RejectReason`, `message` is for humans."""

    def __init__(self, code: RejectReason, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class IngestLimits:
    """What a frame must satisfy before anything downstream sees it."""

    max_file_bytes: int = 256 * 1024 * 1024
    max_pixels: int = 64_000_000
    min_side: int = 64
    max_aspect: float = 8.0
    #: A frame whose max - min over all samples is at most this is blank (2 tolerates JPEG
    #: ringing on a flat field).
    blank_max_range: int = 2


@dataclass(frozen=True)
class DecodedImage:
    """A validated frame: `pixels` is height x width x 3 uint8 BGR, already upright."""

    pixels: np.ndarray
    width: int
    height: int
    source: str
    format: str  # "jpeg" | "png" | "tiff"
    original_bit_depth: int  # bits per sample as stored (1, 2, 4, 8, 12 or 16)
    significant_bits: int  # the depth used to scale samples to 8 bit (see `_significant_bits`)
    original_channels: int  # samples per pixel as stored, alpha included
    exif_orientation_applied: bool


@dataclass(frozen=True)
class _Header:
    format: str
    width: int
    height: int
    bit_depth: int
    channels: int
    orientation: int = 1
    significant_bits: int | None = None  # declared by PNG sBIT / TIFF MaxSampleValue


def load_image(
    source: ImageSource, *, limits: IngestLimits | None = None, source_name: str | None = None
) -> DecodedImage:
    """Read, validate and decode one frame from a path or from the file's bytes.

    Raises `IngestError` for every kind of bad input, and TypeError only when `source` is not a
    path or bytes (a programming error, not bad input).
    """
    limits = limits or IngestLimits()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = source_name or "<bytes>"
        if not data:
            raise IngestError(RejectReason.EMPTY_FILE, f"{name}: no bytes")
        if len(data) > limits.max_file_bytes:
            raise IngestError(
                RejectReason.FILE_TOO_LARGE,
                f"{name}: {len(data)} bytes > limit {limits.max_file_bytes}",
            )
    elif isinstance(source, (str, os.PathLike)):
        name = source_name or os.fspath(source)
        data = _read_file(os.fspath(source), limits)
    else:
        raise TypeError(f"load_image takes a path or bytes, not {type(source).__name__}")

    fmt = _sniff(data, name)
    if fmt == "png":
        samples, header = _load_png(data, name, limits)
    elif fmt == "jpeg":
        samples, header = _load_jpeg(data, name, limits)
    else:
        samples, header = _load_tiff(data, name, limits)

    pixels, sig_bits = _to_bgr8(samples, header.significant_bits)
    pixels = _apply_orientation(pixels, header.orientation)
    if int(pixels.max()) - int(pixels.min()) <= limits.blank_max_range:
        raise IngestError(
            RejectReason.BLANK_IMAGE,
            f"{name}: all samples within {limits.blank_max_range} of {int(pixels.min())}",
        )
    logger.debug("ingested %s: %s %dx%d", name, header.format, pixels.shape[1], pixels.shape[0])
    return DecodedImage(
        pixels=pixels,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        source=name,
        format=header.format,
        original_bit_depth=header.bit_depth,
        significant_bits=sig_bits,
        original_channels=header.channels,
        exif_orientation_applied=header.orientation != 1,
    )


# --- 1. the file ----------------------------------------------------------------------------


def _read_file(path: str, limits: IngestLimits) -> bytes:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise IngestError(RejectReason.NOT_FOUND, f"{path}: no such file") from None
    except OSError as exc:
        raise IngestError(RejectReason.UNREADABLE, f"{path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise IngestError(RejectReason.NOT_A_FILE, f"{path}: {kind}")
    if st.st_size == 0:
        raise IngestError(RejectReason.EMPTY_FILE, f"{path}: 0 bytes")
    if st.st_size > limits.max_file_bytes:
        raise IngestError(
            RejectReason.FILE_TOO_LARGE,
            f"{path}: {st.st_size} bytes > limit {limits.max_file_bytes}",
        )
    try:
        with open(path, "rb") as fh:
            # +1 so a file that grew after stat() is still caught by the size limit.
            data = fh.read(limits.max_file_bytes + 1)
    except OSError as exc:
        raise IngestError(RejectReason.UNREADABLE, f"{path}: {exc.strerror or exc}") from exc
    if not data:
        raise IngestError(RejectReason.EMPTY_FILE, f"{path}: 0 bytes")
    if len(data) > limits.max_file_bytes:
        raise IngestError(RejectReason.FILE_TOO_LARGE, f"{path}: grew past the size limit")
    return data


# --- 2. the signature -----------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}


def _sniff(data: bytes, name: str) -> str:
    """The format from magic bytes; the file name's extension is never trusted."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[:4] in _TIFF_SIGNATURES:
        return "tiff"
    other = _known_unsupported(data)
    if other:
        raise IngestError(
            RejectReason.UNSUPPORTED_FORMAT, f"{name}: {other} is not accepted (JPEG, PNG, TIFF)"
        )
    raise IngestError(
        RejectReason.NOT_AN_IMAGE, f"{name}: no JPEG/PNG/TIFF signature (starts {data[:8]!r})"
    )


def _known_unsupported(data: bytes) -> str | None:
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    # "BM" alone is too weak (a text file may start so): also require a known DIB header size.
    if (
        data[:2] == b"BM"
        and len(data) >= 18
        and struct.unpack("<I", data[14:18])[0] in _BMP_DIB_SIZES
    ):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ")):
        return "JPEG 2000"
    if data.startswith((b"\x00\x00\x00\x0cJXL ", b"\xff\n")):
        return "JPEG XL"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
        return "HEIF/AVIF"
    return None


# --- 3/4. headers and geometry --------------------------------------------------------------


def _check_geometry(header: _Header, name: str, limits: IngestLimits) -> None:
    w, h = header.width, header.height
    if w * h > limits.max_pixels:
        raise IngestError(
            RejectReason.TOO_LARGE_PIXELS,
            f"{name}: header declares {w}x{h} = {w * h} pixels > limit {limits.max_pixels}",
        )
    if max(w, h) > limits.max_aspect * min(w, h):
        raise IngestError(
            RejectReason.ABSURD_ASPECT, f"{name}: {w}x{h} is beyond {limits.max_aspect:g}:1"
        )
    if min(w, h) < limits.min_side:
        raise IngestError(
            RejectReason.TOO_SMALL, f"{name}: {w}x{h} has a side below {limits.min_side} px"
        )


def _exif_orientation(tiff_bytes: bytes) -> int:
    """Orientation (1..8) from the IFD0 of an EXIF block; 1 when absent or unreadable.

    A broken EXIF block is metadata damage, not image damage: it never rejects the frame.
    """
    try:
        order = {b"II": "<", b"MM": ">"}[tiff_bytes[:2]]
        if struct.unpack(order + "H", tiff_bytes[2:4])[0] != 42:
            return 1
        ifd = struct.unpack(order + "I", tiff_bytes[4:8])[0]
        (count,) = struct.unpack(order + "H", tiff_bytes[ifd : ifd + 2])
        for i in range(count):
            entry = tiff_bytes[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(order + "HHI", entry[:8])
            if tag == 0x0112 and typ == 3 and n >= 1:
                value = struct.unpack(order + "H", entry[8:10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        logger.warning("unreadable EXIF block; orientation not applied")
    return 1


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_header(data: bytes, name: str) -> _Header:
    """Walk every chunk (length, CRC, order) without inflating any image data."""
    pos = len(_PNG_SIGNATURE)
    header: _Header | None = None
    sig_bits: int | None = None
    orientation = 1
    while True:
        if pos + 12 > len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: PNG ends before its IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if length > 0x7FFFFFFF:
            raise IngestError(RejectReason.CORRUPT, f"{name}: PNG chunk length {length}")
        end = pos + 12 + length
        if end > len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: PNG {ctype!r} chunk cut short")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : end])
        if zlib.crc32(ctype + body) != crc:
            raise IngestError(RejectReason.CORRUPT, f"{name}: PNG {ctype!r} chunk CRC mismatch")
        if header is None:
            if ctype != b"IHDR" or length != 13:
                raise IngestError(RejectReason.CORRUPT, f"{name}: PNG does not start with IHDR")
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            if w == 0 or h == 0 or depth not in _PNG_DEPTHS.get(color, ()):
                raise IngestError(
                    RejectReason.CORRUPT,
                    f"{name}: PNG IHDR {w}x{h}, depth {depth}, colour type {color}",
                )
            header = _Header("png", w, h, depth, _PNG_CHANNELS[color])
        elif ctype == b"sBIT" and length >= 1:
            sig_bits = max(body)
        elif ctype == b"eXIf":
            orientation = _exif_orientation(body)
        elif ctype == b"IEND":
            break
        pos = end
    if sig_bits is not None and not 1 <= sig_bits <= header.bit_depth:
        sig_bits = None
    return _Header(
        "png", header.width, header.height, header.bit_depth, header.channels, orientation, sig_bits
    )


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


def _jpeg_header(data: bytes, name: str) -> _Header:
    """Walk the marker segments up to the first scan, then require an end-of-image marker."""
    pos = 2
    sof: tuple[int, int, int, int] | None = None
    orientation = 1
    while True:
        if pos + 2 > len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: JPEG ends inside its header")
        if data[pos] != 0xFF:
            raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG marker expected at {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xD9:
            raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG ends before any image data")
        if pos + 4 > len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: JPEG ends inside its header")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG segment length {length}")
        body = data[pos + 4 : pos + 2 + length]
        if pos + 2 + length > len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: JPEG segment cut short")
        if marker in _SOF_MARKERS:
            if len(body) < 6:
                raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG frame header too short")
            sof = struct.unpack(">BHHB", body[:6])
        elif marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(body[6:])
        elif marker == 0xDA:
            break
        pos += 2 + length
    if sof is None:
        raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG scan before any frame header")
    precision, h, w, components = sof
    if w == 0 or h == 0:
        raise IngestError(
            RejectReason.CORRUPT, f"{name}: JPEG frame {w}x{h} (DNL height is not supported)"
        )
    if components not in (1, 3, 4):
        raise IngestError(RejectReason.BAD_CHANNELS, f"{name}: JPEG with {components} components")
    # Entropy-coded data stuffs every 0xFF as FF 00, so FF D9 after the scan header can only be
    # the real end-of-image marker. Bytes after it (camera trailers) are allowed.
    if data.find(b"\xff\xd9", pos) < 0:
        raise IngestError(RejectReason.TRUNCATED, f"{name}: JPEG has no end-of-image marker")
    return _Header("jpeg", w, h, precision, components, orientation)


# --- 5. decoding ----------------------------------------------------------------------------


def _imdecode(data: bytes, flags: int, header: _Header, name: str) -> np.ndarray:
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        raise IngestError(RejectReason.CORRUPT, f"{name}: decoder error: {exc}") from exc
    if img is None:
        raise IngestError(RejectReason.CORRUPT, f"{name}: the {header.format} decoder gave up")
    if img.shape[:2] != (header.height, header.width):
        raise IngestError(
            RejectReason.CORRUPT,
            f"{name}: decoded {img.shape[1]}x{img.shape[0]}, header says "
            f"{header.width}x{header.height}",
        )
    return img


def _load_png(data: bytes, name: str, limits: IngestLimits) -> tuple[np.ndarray, _Header]:
    header = _png_header(data, name)
    _check_geometry(header, name, limits)
    # UNCHANGED keeps 16 bit and alpha; orientation is applied by us from the eXIf chunk.
    return _imdecode(data, cv2.IMREAD_UNCHANGED, header, name), header


def _load_jpeg(data: bytes, name: str, limits: IngestLimits) -> tuple[np.ndarray, _Header]:
    header = _jpeg_header(data, name)
    _check_geometry(header, name, limits)
    # COLOR gives BGR for grey, YCbCr and Adobe CMYK alike; orientation is ours to apply, so
    # the decoder must not apply it a second time.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    return _imdecode(data, flags, header, name), header


_TIFF_PHOTOMETRIC = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette"}


def _load_tiff(data: bytes, name: str, limits: IngestLimits) -> tuple[np.ndarray, _Header]:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 64-bit offset at byte 8
    field, fmt = (data[8:16], "Q") if big else (data[4:8], "I")
    if len(field) < struct.calcsize(fmt):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF ends inside its header")
    (first_ifd,) = struct.unpack(order + fmt, field)
    if first_ifd >= len(data):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF directory beyond end of file")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return _decode_tiff(tif, len(data), name, limits)
    except IngestError:
        raise
    except Exception as exc:  # tifffile raises many types on malformed files; all mean corrupt
        raise IngestError(RejectReason.CORRUPT, f"{name}: unreadable TIFF: {exc}") from exc


def _decode_tiff(
    tif: tifffile.TiffFile, file_size: int, name: str, limits: IngestLimits
) -> tuple[np.ndarray, _Header]:
    if not tif.pages or not tif.series:
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF without images")
    if len(tif.series) > 1:
        logger.info("%s: TIFF holds %d series; using the first", name, len(tif.series))
    series = tif.series[0]
    page = series.pages[0] if series.pages else None
    if not isinstance(page, tifffile.TiffPage):
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF first page unreadable")
    samples = int(page.samplesperpixel)
    max_sample = page.tags.get(281)
    orient_tag = page.tags.get(274)
    orientation = int(orient_tag.value) if orient_tag is not None else 1
    header = _Header(
        "tiff",
        int(page.imagewidth),
        int(page.imagelength),
        int(page.bitspersample),
        samples,
        orientation if 1 <= orientation <= 8 else 1,
        _declared_bits(max_sample.value) if max_sample is not None else None,
    )
    if page.dtype is None or np.dtype(page.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise IngestError(
            RejectReason.BAD_DTYPE,
            f"{name}: TIFF samples are {page.dtype} ({page.bitspersample} bit, "
            f"format {int(page.sampleformat)}); only 8/16-bit unsigned are accepted",
        )
    if samples not in (1, 2, 3, 4):
        raise IngestError(RejectReason.BAD_CHANNELS, f"{name}: TIFF with {samples} samples/pixel")
    photometric = _TIFF_PHOTOMETRIC.get(int(page.photometric))
    if photometric is None:
        raise IngestError(
            RejectReason.UNSUPPORTED_FORMAT, f"{name}: TIFF photometric {page.photometric!r}"
        )
    try:
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except KeyError as exc:
        raise IngestError(
            RejectReason.UNSUPPORTED_FORMAT, f"{name}: TIFF compression: {exc.args[0]}"
        ) from None
    frames = [n for n, ax in zip(series.shape, series.axes) if ax not in "YXS" and n != 1]
    if frames:
        raise IngestError(
            RejectReason.MULTI_FRAME,
            f"{name}: TIFF series of shape {series.shape} ({series.axes}): several frames",
        )
    if any(o + n > file_size for o, n in zip(page.dataoffsets, page.databytecounts)):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF image data past end of file")
    _check_geometry(header, name, limits)

    arr = page.asarray()
    axes = page.axes
    arr = arr.reshape([n for n, ax in zip(arr.shape, axes) if ax in "YXS"])
    axes = "".join(ax for ax in axes if ax in "YXS")
    if "S" not in axes:
        arr, axes = arr[..., None], axes + "S"
    arr = np.moveaxis(arr, [axes.index("Y"), axes.index("X"), axes.index("S")], [0, 1, 2])
    if arr.shape[:2] != (header.height, header.width):
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF decoded to {arr.shape}")
    if photometric == "miniswhite":
        arr = np.iinfo(arr.dtype).max - arr
    elif photometric == "palette":
        if page.colormap is None or samples != 1:
            raise IngestError(RejectReason.CORRUPT, f"{name}: palette TIFF without colormap")
        cmap = np.asarray(page.colormap)  # 3 x 2**bits, 16 bit
        arr = np.take(cmap, arr[..., 0], axis=1, mode="clip").transpose(1, 2, 0).astype(np.uint16)
        header = _Header(
            "tiff", header.width, header.height, header.bit_depth, 3, header.orientation, 16
        )
    if arr.shape[2] >= 3:  # RGB(A) -> BGR(A), the OpenCV order everything downstream uses
        arr = arr[:, :, [2, 1, 0, *range(3, arr.shape[2])]]
    if arr.shape[2] in (2, 4) and tuple(page.extrasamples)[:1] == (1,):
        arr = _unpremultiply(arr)
    return np.ascontiguousarray(arr), header


def _declared_bits(max_sample_value: object) -> int | None:
    values = np.atleast_1d(np.asarray(max_sample_value)).astype(np.int64)
    top = int(values.max()) if values.size else 0
    return top.bit_length() if 0 < top < 0xFFFF else None


def _unpremultiply(arr: np.ndarray) -> np.ndarray:
    """Associated (premultiplied) alpha to straight alpha, so compositing is the same for all."""
    full = float(np.iinfo(arr.dtype).max)
    colour = arr[..., :-1].astype(np.float32)
    alpha = arr[..., -1:].astype(np.float32)
    straight = np.where(alpha > 0, colour * full / np.maximum(alpha, 1.0), 0.0)
    out = arr.copy()
    out[..., :-1] = np.clip(np.rint(straight), 0, full).astype(arr.dtype)
    return out


# --- conversion to 8-bit upright BGR --------------------------------------------------------

_SENSOR_DEPTHS = (8, 10, 12, 14, 16)


def _significant_bits(colour: np.ndarray, declared: int | None) -> int:
    """Bit depth that 16-bit samples are scaled from.

    A 12-bit sensor in a 16-bit container tops out at 4095: `>> 8` would leave the frame at
    1/16 brightness. Stretching to the frame's own maximum is no better: exposure would then
    depend on content (an underexposed frame brightened, stain colours shifting frame to frame).
    So: the depth declared by the file (PNG sBIT, TIFF MaxSampleValue) when there is one, else
    the smallest usual sensor depth (8, 10, 12, 14, 16) that holds the largest colour sample.
    """
    if colour.dtype == np.uint8:
        return 8
    if declared is not None:
        return declared
    top = int(colour.max()) if colour.size else 0
    return next(d for d in _SENSOR_DEPTHS if top < (1 << d))


def _to_bgr8(samples: np.ndarray, declared_bits: int | None) -> tuple[np.ndarray, int]:
    """Grey, grey+alpha, BGR or BGRA at 8 or 16 bit -> (8-bit BGR, significant bits used).

    Alpha is composited over white, the colour of an empty smear background, so transparent
    regions never show whatever colour values the encoder left under them.
    """
    img = samples if samples.ndim == 3 else samples[:, :, None]
    has_alpha = img.shape[2] in (2, 4)
    colour = img[:, :, :-1] if has_alpha else img
    bits = _significant_bits(colour, declared_bits)
    white = float((1 << bits) - 1)
    if has_alpha or colour.dtype != np.uint8:
        values = colour.astype(np.float32)
        if has_alpha:
            alpha = img[:, :, -1:].astype(np.float32) / float(np.iinfo(img.dtype).max)
            values = values * alpha + white * (1.0 - alpha)
        colour = np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)
    if colour.shape[2] == 1:
        return cv2.cvtColor(colour, cv2.COLOR_GRAY2BGR), bits
    return np.ascontiguousarray(colour), bits


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright per the EXIF/TIFF Orientation tag (values 1..8)."""
    if orientation == 2:
        return cv2.flip(img, 1)
    if orientation == 3:
        return cv2.rotate(img, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(img, 0)
    if orientation == 5:
        return cv2.transpose(img)
    if orientation == 6:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(img), -1)
    if orientation == 8:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img
