"""Why a frame is refused: the stable reason codes of stage 1 (ingest) and the error carrying one.

The values of `RejectReason` are a public contract (logs, reports, UI); `device.ingest` (and `service.ingest`) re-export
both names, and the header parsers (`device.ingest.headers`) raise the same error.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from enum import Enum

logger = logging.getLogger(__name__)


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
    #: No known signature: text, HTML, XML other than SVG, random bytes, a video...
    NOT_AN_IMAGE = "not_an_image"
    #: A recognised format this analyzer does not decode, named in the message with what to do
    #: (DICOM, PDF, PNM, OpenEXR, Radiance HDR, Sun raster, Photoshop, GIF, BMP, WebP, JPEG 2000,
    #: JPEG XL, HEIF/AVIF, SVG, a ZIP or gzip archive: `device.ingest.signatures`), or a TIFF whose
    #: compression or colour model is not supported.
    UNSUPPORTED_FORMAT = "unsupported_format"
    #: The signature is right but the structure is wrong (bad header, bad chunk CRC, a decoder
    #: that gives up, dimensions that disagree with the header, PNG pixel data of more rows than it).
    CORRUPT = "corrupt"
    #: The data stops early: no JPEG end-of-image marker, no PNG IEND, TIFF strips past the end or a
    #: TIFF cut inside its first directory (or, after a preview page, the field's).
    TRUNCATED = "truncated"
    #: The header declares more pixels than `IngestLimits.max_pixels` (decompression bomb).
    TOO_LARGE_PIXELS = "too_large_pixels"
    #: Resampled to the canonical scale the frame would exceed the analysis's pixel limit
    #: (`service.analysis.scale.MAX_CANONICAL_PIXELS`): a large field at low magnification.
    TOO_LARGE_AT_SCALE = "too_large_at_scale"
    #: Long side / short side above `IngestLimits.max_aspect` (a strip, not a field of view).
    ABSURD_ASPECT = "absurd_aspect"
    #: Short side below `IngestLimits.min_side`: too few pixels to hold a single cell.
    TOO_SMALL = "too_small"
    #: Sample type other than 8- or 16-bit unsigned integer (float, signed, 1-bit, 32-bit...).
    BAD_DTYPE = "bad_dtype"
    #: Samples per pixel other than 1 (grey), 2 (grey+alpha), 3 (colour) or 4 (colour+alpha).
    BAD_CHANNELS = "bad_channels"
    #: A TIFF whose first series holds several frames (z-stack, time series, 4-D stack), or an
    #: animated PNG of several: which focal plane to analyse is the instrument's decision, not
    #: something to guess here.
    MULTI_FRAME = "multi_frame"
    #: Every pixel (nearly) the same value: lens cap on, shutter closed, saturated sensor.
    BLANK_IMAGE = "blank_image"


#: Anything but printable ASCII: looked at one by one (`_escaped_if_unseen`).
_NOT_ASCII = re.compile(r"[^\x20-\x7e]")

#: The categories shown escaped: control characters (C0, DEL, C1), format characters (bidi
#: embeddings, overrides, isolates and marks, zero-width ones) and the line and paragraph separators.
_UNSEEN = frozenset(("Cc", "Cf", "Zl", "Zp"))


def shown(path: os.PathLike[str] | str) -> str:
    """A file name or path as valid UTF-8 text on one line (for messages, logs, frame ids and
    reports): bytes that are not UTF-8, as an SMB share's Latin-1 names give, appear as \\xNN, and so
    do control characters (a name holding a line break would start a forged line in the journal);
    format characters as \\uNNNN (a name holding U+202E would show the words after it reversed)."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that is no name's byte (a path from JSON): as \\udNNN
        raw = os.fspath(path).encode("utf-8", "backslashreplace")  # type: ignore[union-attr]
    return _NOT_ASCII.sub(_escaped_if_unseen, raw.decode("utf-8", "backslashreplace"))


def _escaped_if_unseen(found: re.Match[str]) -> str:
    """The character found escaped (`escaped_char`) where its category is one of `_UNSEEN`."""
    return escaped_char(found) if unicodedata.category(found.group()) in _UNSEEN else found.group()


def escaped_char(found: re.Match[str]) -> str:
    """The character a pattern found as \\xNN (or \\uNNNN, \\UNNNNNNNN): a `re.sub` replacement."""
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class IngestError(Exception):
    """A refused frame: `code` is a stable `RejectReason`, `message` is for humans."""

    def __init__(self, code: RejectReason, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
