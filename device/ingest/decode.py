"""Stage 1: ingest and validate one microscope frame (JPEG, PNG or TIFF) into 8-bit BGR.

Every refusal is an `IngestError` carrying a stable `RejectReason`; nothing else escapes for bad
input. Checks run in a fixed order, so one file always gets the same code:

1. the file itself        not_found, not_a_file, unreadable, empty_file, file_too_large
2. the format signature   not_an_image, unsupported_format
3. the container header   truncated, corrupt, unsupported_format, bad_dtype, bad_channels,
                          multi_frame (read from headers only: no pixel data is decoded yet)
4. the declared geometry  too_large_pixels, absurd_aspect, too_small
5. decoding               corrupt (for JPEG also every warning of libjpeg: "premature end of
                          data segment", "corrupt JPEG data", a bad Huffman code; OpenCV's
                          decoder would fill the damage with grey and carry on; a palette
                          PNG index past its palette, which libpng shows as black; a PNG
                          whose pixel data holds more than its header's rows, which libpng
                          drops: device.ingest.png_stream)
6. the content            blank_image

Geometry is judged from the header BEFORE decoding, so a decompression bomb (a few kilobytes
declaring gigapixels) is refused without allocating its pixels.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np
import simplejpeg
import tifffile

from smearscope.device.ingest.errors import IngestError, RejectReason, shown
from smearscope.device.ingest.files import read_image_file
from smearscope.device.ingest.headers import (
    ImageHeader,
    check_jpeg_scans,
    check_tiff_directory_offset,
    jpeg_header,
    png_header,
    tiff_header,
)
from smearscope.device.ingest.packbits import use_bounded_packbits
from smearscope.device.ingest.png_palette import paint, png_palette
from smearscope.device.ingest.png_stream import png_pixel_data_cut_short, png_stream
from smearscope.device.ingest.signatures import sniff
from smearscope.device.ingest.tiff_lzw import check_lzw_segments
from smearscope.device.ingest.tiff_segments import (
    SegmentOverflow,
    bounded_segments,
    check_tiff_inflation,
    opencv_tiff,
    orientation_cleared,
    use_bounded_inflate,
)

logger = logging.getLogger(__name__)
use_bounded_packbits()  # PackBits strips decoded into one buffer of their size (device.ingest.packbits)
use_bounded_inflate()  # deflate and LZMA strips inflated no further than their size (device.ingest.tiff_segments)

__all__ = ["DecodedImage", "ImageSource", "IngestError", "IngestLimits", "RejectReason",
           "check_geometry", "load_image"]

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


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
        name = source_name or shown(source)  # messages are UTF-8 text, whatever the file name's bytes
        data = read_image_file(os.fspath(source), limits.max_file_bytes, name)
    else:
        raise TypeError(f"load_image takes a path or bytes, not {type(source).__name__}")

    fmt = sniff(data, name)  # step 2 (device.ingest.signatures)
    if fmt == "png":
        samples, header = _load_png(data, name, limits)
    elif fmt == "jpeg":
        samples, header = _load_jpeg(data, name, limits)
    else:
        samples, header = _load_tiff(data, name, limits)

    pixels, sig_bits = _to_bgr8(samples, header.significant_bits)
    pixels = _apply_orientation(pixels, header.orientation)
    if int(pixels.max()) - int(pixels.min()) <= limits.blank_max_range:
        clear = samples.ndim == 3 and samples.shape[2] in (2, 4) and not samples[..., -1].any()
        raise IngestError(  # a fully transparent frame is white over white: say why, not only what
            RejectReason.BLANK_IMAGE, f"{name}: every pixel fully transparent (alpha 0), shown over white"
            if clear else f"{name}: all samples within {limits.blank_max_range} of {int(pixels.min())}")
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


# --- 3/4. headers (device.ingest.headers) and geometry ----------------------------------------


def _check_geometry(header: ImageHeader, name: str, limits: IngestLimits) -> None:
    check_geometry(header.width, header.height, name, limits)


def check_geometry(w: int, h: int, name: str, limits: IngestLimits, said: str = "header declares") -> None:
    """The frame size a header declares (or a video's frames have) within `limits`, else the
    `IngestError` an image file of that size gets: too_large_pixels, absurd_aspect or too_small."""
    if w * h > limits.max_pixels:
        raise IngestError(
            RejectReason.TOO_LARGE_PIXELS,
            f"{name}: {said} {w}x{h} = {w * h} pixels > limit {limits.max_pixels}",
        )
    if max(w, h) > limits.max_aspect * min(w, h):
        raise IngestError(
            RejectReason.ABSURD_ASPECT, f"{name}: {w}x{h} is beyond {limits.max_aspect:g}:1"
        )
    if min(w, h) < limits.min_side:
        raise IngestError(
            RejectReason.TOO_SMALL, f"{name}: {w}x{h} has a side below {limits.min_side} px"
        )


# --- 5. decoding ----------------------------------------------------------------------------


def _imdecode(data: bytes, flags: int, header: ImageHeader, name: str) -> np.ndarray:
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


def _load_png(data: bytes, name: str, limits: IngestLimits) -> tuple[np.ndarray, ImageHeader]:
    header = png_header(data, name)
    _check_geometry(header, name, limits)
    # UNCHANGED keeps 16 bit and alpha; orientation is applied by us from the eXIf chunk.
    palette = png_palette(data)  # palette indices: decoded as such and checked against the palette
    try:
        if palette is not None:
            img = paint(_imdecode(palette.ramp_png, cv2.IMREAD_UNCHANGED, header, name), palette, name)
        else:
            img = _imdecode(data, cv2.IMREAD_UNCHANGED, header, name)
    except IngestError as exc:
        if png_pixel_data_cut_short(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: PNG pixel data ends early") from exc
        raise
    if png_stream(data).beyond_header:  # libpng reads the declared rows and drops the rest with a warning
        raise IngestError(RejectReason.CORRUPT, f"{name}: PNG pixel data holds more than the {header.width}x"
                          f"{header.height} its header declares")
    return img, header


def _load_jpeg(data: bytes, name: str, limits: IngestLimits) -> tuple[np.ndarray, ImageHeader]:
    header = jpeg_header(data, name)
    _check_geometry(header, name, limits)
    check_jpeg_scans(header, name)
    # libjpeg-turbo in strict mode: a warning (damaged or missing entropy-coded data) is an
    # error, where OpenCV's decoder returns the image with the damage filled in. The same
    # library and settings as OpenCV's, so the pixels are the same. Orientation is ours to apply.
    four = header.channels == 4  # Adobe CMYK/YCCK: libjpeg-turbo cannot convert it to BGR
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="CMYK" if four else "BGR", strict=True)
    except ValueError as exc:
        raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG decoder: {exc}") from exc
    if img.shape[:2] != (header.height, header.width):
        raise IngestError(RejectReason.CORRUPT, f"{name}: decoded {img.shape[1]}x{img.shape[0]}, "
                          f"header says {header.width}x{header.height}")
    if four:  # checked strictly above; OpenCV converts CMYK (and Adobe's inversion) to BGR
        img = _imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, header, name)
    return np.ascontiguousarray(img), header


def _load_tiff(data: bytes, name: str, limits: IngestLimits) -> tuple[np.ndarray, ImageHeader]:
    check_tiff_directory_offset(data, name)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            header, page, photometric = tiff_header(tif, len(data), name)
            _check_geometry(header, name, limits)
            by_opencv = opencv_tiff(page)  # geometry checked above: the size OpenCV allocates is bounded
            check_tiff_inflation(data, page, name, by_opencv)  # segment count; PackBits runs counted
            if by_opencv:
                if page.dtype == np.uint8:  # libtiff's RGBA read, which goes on past a bad LZW code
                    check_lzw_segments(data, page, name)
                return _decode_tiff_opencv(data, page, header, name), header
            return _decode_tiff(page, header, photometric, name)
    except IngestError:
        raise
    except SegmentOverflow as exc:  # raised by the bounded inflaters as tifffile decodes
        raise IngestError(RejectReason.CORRUPT, f"{name}: {exc}") from exc
    except Exception as exc:  # tifffile raises many types on malformed files; all mean corrupt
        raise IngestError(RejectReason.CORRUPT, f"{name}: unreadable TIFF: {exc}") from exc


def _decode_tiff_opencv(data: bytes, page: tifffile.TiffPage, header: ImageHeader, name: str) -> np.ndarray:
    """An LZW, JPEG or PackBits compressed grey or RGB first page through OpenCV's libtiff, as
    `_decode_tiff` returns pages (BGR order, the container's dtype, orientation not yet applied)."""
    arr = cv2.imdecode(np.frombuffer(orientation_cleared(data, page), np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF ({page.compression!r}) could not be decoded")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[:2] != (header.height, header.width) or arr.dtype != np.dtype(page.dtype):
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF decoded to {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def _decode_tiff(
    page: tifffile.TiffPage, header: ImageHeader, photometric: str, name: str
) -> tuple[np.ndarray, ImageHeader]:
    with bounded_segments(page):  # deflate and LZMA strips inflated no further than a strip
        arr = page.asarray(maxworkers=1)
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
        if page.colormap is None or header.channels != 1:
            raise IngestError(RejectReason.CORRUPT, f"{name}: palette TIFF without colormap")
        # the colormap as BGR rows looked up straight into one frame, in row blocks (numpy makes 8-byte
        # indices of each block): taken at once as RGB planes, transposed, copied and turned to BGR, a
        # 64 MP file of 8-bit indices peaked at 1.15 GB
        bgr = np.ascontiguousarray(np.asarray(page.colormap)[::-1].T, dtype=np.uint16)  # 2**bits x 3, 16 bit
        out = np.empty((*arr.shape[:2], 3), np.uint16)
        step = _rows(out.shape)
        for r in range(0, arr.shape[0], step):
            np.take(bgr, arr[r : r + step, :, 0], axis=0, mode="clip", out=out[r : r + step])
        return out, ImageHeader("tiff", header.width, header.height, header.bit_depth, 3, header.orientation, 16)
    if arr.shape[2] == 3 and arr.dtype in (np.uint8, np.uint16):  # RGB -> BGR, the order used downstream
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)  # in C: a 48 MP copy in numpy took 0.5 s
    elif arr.shape[2] >= 3:
        arr = arr[:, :, [2, 1, 0, *range(3, arr.shape[2])]]
    if arr.shape[2] in (2, 4) and tuple(page.extrasamples)[:1] == (1,):
        arr = _unpremultiply(arr)
    return np.ascontiguousarray(arr), header


def _unpremultiply(arr: np.ndarray) -> np.ndarray:
    """Associated (premultiplied) alpha to straight alpha, so compositing is the same for all."""
    full = float(np.iinfo(arr.dtype).max)
    out = arr.copy()
    step = _rows(arr.shape)
    for r in range(0, arr.shape[0], step):  # in row blocks: the memory stays bounded
        colour = arr[r : r + step, ..., :-1].astype(np.float32)
        alpha = arr[r : r + step, ..., -1:].astype(np.float32)
        straight = np.where(alpha > 0, colour * full / np.maximum(alpha, 1.0), 0.0)
        out[r : r + step, ..., :-1] = np.clip(np.rint(straight), 0, full).astype(arr.dtype)
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
    top = int(colour.max()) if colour.size else 0
    if declared is not None:
        # PNG's sBIT only records the source's precision: a file that follows the spec has its
        # samples scaled to the full 16 bits already (a sample above 2**sBIT - 1 says so)
        return declared if top < (1 << declared) else 8 * colour.dtype.itemsize
    return sensor_depth(top)


def sensor_depth(top: int) -> int:
    """The smallest usual sensor depth (8, 10, 12, 14, 16 bit) that holds the sample `top`: the
    depth 16-bit samples with no declared one are scaled from (files here, cameras in
    `device.camera_frames`)."""
    return next((d for d in _SENSOR_DEPTHS if top < (1 << d)), 16)


#: Samples converted to 8 bits at a time (float32 temporaries of this many samples, about 16 MB):
#: a 64 MP 16-bit RGBA frame converted at once needed 3.5 GB beside the decoded array.
_CONVERT_SAMPLES = 1 << 22


def _rows(shape: tuple[int, ...]) -> int:
    """Rows per conversion step for an array of this shape."""
    return max(1, _CONVERT_SAMPLES // max(1, int(np.prod(shape[1:]))))


def _to_bgr8(samples: np.ndarray, declared_bits: int | None) -> tuple[np.ndarray, int]:
    """Grey, grey+alpha, BGR or BGRA at 8 or 16 bit -> (8-bit BGR, significant bits used).

    Alpha is composited over white, the colour of an empty smear background, so transparent
    regions never show whatever colour values the encoder left under them.
    """
    img = samples if samples.ndim == 3 else samples[:, :, None]
    bits = _significant_bits(img[:, :, :-1] if img.shape[2] in (2, 4) else img, declared_bits)
    return to_bgr8(samples, bits), bits


def to_bgr8(samples: np.ndarray, bits: int) -> np.ndarray:
    """Grey, grey+alpha, BGR or BGRA at 8 or 16 bit -> 8-bit BGR, `bits`-bit samples scaled to
    0..255 (a sample above 2**bits - 1 clips at 255); alpha composited over white (`_to_bgr8`)."""
    img = samples if samples.ndim == 3 else samples[:, :, None]
    has_alpha = img.shape[2] in (2, 4)
    colour = img[:, :, :-1] if has_alpha else img
    white = float((1 << bits) - 1)
    if not has_alpha and colour.dtype == np.uint16:
        # OpenCV's saturating scale: the same byte as the float path below for every 16-bit value at
        # each depth (checked over all 65536), without float temporaries, 7x faster on a 1080p frame
        colour = cv2.convertScaleAbs(colour, alpha=255.0 / white)
        colour = colour if colour.ndim == 3 else colour[:, :, None]
    elif has_alpha or colour.dtype != np.uint8:
        out = np.empty(colour.shape, np.uint8)
        step, full = _rows(colour.shape), float(np.iinfo(img.dtype).max)
        for r in range(0, colour.shape[0], step):  # in row blocks: the memory stays bounded
            values = colour[r : r + step].astype(np.float32)
            if has_alpha:
                alpha = img[r : r + step, :, -1:].astype(np.float32) / full
                values = values * alpha + white * (1.0 - alpha)
            out[r : r + step] = np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)
        colour = out
    if colour.shape[2] == 1:
        return cv2.cvtColor(colour, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(colour)


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
