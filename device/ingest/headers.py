"""Stage 1, step 3: a frame's container header, read without decoding any pixel data.

PNG   every chunk is walked (length, CRC, order); IHDR, sBIT, eXIf and acTL (APNG frames) are read,
      no IDAT inflated.
JPEG  marker segments up to the first scan (frame header, EXIF), then an end-of-image marker.
TIFF  the first directory offset on the raw bytes, then tifffile's metadata of the first page:
      sample type, samples per pixel, colour model, compression, frame count, data extent; and
      which pages tifffile or OpenCV decodes, each strip or tile bounded first
      (device.ingest.tiff_segments).
EXIF  the orientation in IFD0 of an embedded TIFF block; damage there never rejects a frame.

Each parser returns an `ImageHeader` or raises `IngestError` with a stable `RejectReason`;
geometry limits are judged by the caller (device.ingest.decode), still before any decoding.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import tifffile

from smearscope.device.ingest.errors import IngestError, RejectReason
from smearscope.device.ingest.tiff_segments import opencv_tiff, tiff_decodable

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    bit_depth: int
    channels: int
    orientation: int = 1
    significant_bits: int | None = None  # declared by PNG sBIT / TIFF MaxSampleValue
    scans: int = 1  # a JPEG's scans (progressive: several), each a pass over every pixel


#: EXIF blocks of a JPEG read for its orientation (each up to 5400 entries: thousands of them took
#: seconds); the first that gives one is applied.
MAX_EXIF_BLOCKS = 4


def exif_orientation(tiff_bytes: bytes) -> int:
    """Orientation (1..8) from the IFD0 of an EXIF block; 1 when absent or unreadable.

    A broken EXIF block is metadata damage, not image damage: it never rejects the frame.
    """
    found = _exif_orientation_tag(tiff_bytes)
    return 1 if found is None else found


def _exif_orientation_tag(tiff_bytes: bytes) -> int | None:
    """The orientation tag's value (1..8; 1 for a value out of range), None when the block has
    none or cannot be read."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff_bytes[:2]]
        if struct.unpack(order + "H", tiff_bytes[2:4])[0] != 42:
            return None
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
    return None


# --- PNG -------------------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


#: Chunks a PNG may have: writers split image data into chunks of 8 KiB (libpng) or more; one per
#: KiB of file and 4096 besides (1 KiB chunks always read; 256 MB of them walk in 0.6 s). Millions
#: of tiny chunks (seconds of CRCs) are refused unread.
_PNG_CHUNKS_BESIDES = 4096
_PNG_BYTES_PER_CHUNK = 1024


def png_header(data: bytes, name: str) -> ImageHeader:
    """Walk every chunk (length, CRC, order) without inflating any image data."""
    pos = len(PNG_SIGNATURE)
    header: ImageHeader | None = None
    sig_bits: int | None = None
    orientation, exif_read = 1, False
    most = _PNG_CHUNKS_BESIDES + len(data) // _PNG_BYTES_PER_CHUNK
    for _ in range(most):
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
            header = ImageHeader("png", w, h, depth, _PNG_CHANNELS[color])
        elif ctype == b"sBIT" and length >= 1:
            sig_bits = max(body)
        elif ctype == b"eXIf" and not exif_read:  # one per file (PNG 1.5); a repeat is not read
            orientation, exif_read = exif_orientation(body), True
        elif ctype == b"acTL" and length >= 4 and (frames := struct.unpack(">I", body[:4])[0]) > 1:
            # an animated PNG: a series of frames (a z-stack, a time series), as a TIFF stack is refused
            raise IngestError(RejectReason.MULTI_FRAME, f"{name}: animated PNG of {frames} frames")
        elif ctype == b"IEND":
            break
        pos = end
    else:
        raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: PNG of more than {most} chunks "
                          f"({_PNG_CHUNKS_BESIDES} and one per {_PNG_BYTES_PER_CHUNK} bytes of file)")
    assert header is not None
    if sig_bits is not None and not 1 <= sig_bits <= header.bit_depth:
        sig_bits = None
    return ImageHeader(
        "png", header.width, header.height, header.bit_depth, header.channels, orientation, sig_bits
    )


# --- JPEG ------------------------------------------------------------------------------------

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


#: Scans a JPEG may have (progressive JPEGs from cameras and encoders have about 10), and scans
#: times pixels (each scan is a pass of the decoder over every pixel: 100 over 64 MP took 10 s), so
#: a 64 MP field may have 12, one of 8 MP or less 100.
MAX_JPEG_SCANS = 100
MAX_JPEG_SCAN_PIXELS = 800_000_000


_FILL = re.compile(rb"\xff+")
_NOT_FF = re.compile(rb"[^\xff]*")
#: A 0xFF that is no stuffed FF 00 and no restart marker: a marker, or the first of fill bytes.
_FF_NOT_STUFFED = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_STUFFED_OR_RESTART = frozenset({0x00, *range(0xD0, 0xD8)})
#: Markers read before the first scan (its own included), after its header (the end-of-image one included)
#: and inside one scan's data, each counted apart: segments, scans, restart markers between segments, runs
#: of fill bytes. A camera's JPEG has tens, a progressive one a few per scan; millions (seconds) are refused.
MAX_JPEG_MARKERS = 4096


def _scans_to_end(data: bytes, pos: int, name: str) -> int | None:
    """Scans from the first scan header at `pos` to the end-of-image marker (None without one),
    walking the segments between scans (their bodies may hold any bytes, FF DA or FF D9 among them)
    and skipping entropy-coded data and runs of stray or fill bytes whole (in C). Bytes after the
    end (camera trailers) are not read; more than `MAX_JPEG_MARKERS` markers are refused."""
    scans, n = 0, len(data)
    for _ in range(MAX_JPEG_MARKERS):
        pos = _NOT_FF.match(data, pos).end()  # type: ignore[union-attr]  # stray bytes
        if pos < n:
            pos = _FILL.match(data, pos).end() - 1  # type: ignore[union-attr]  # a run's last 0xFF
        if pos + 2 > n:
            return None
        marker = data[pos + 1]
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xD9:
            return scans
        if pos + 4 > n:
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            scans += 1
            pos = _entropy_end(data, pos, name)
            if pos is None:
                return None
    raise _too_many_markers(name, "after its first scan header")


def _too_many_markers(name: str, where: str) -> IngestError:
    return IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: JPEG of more than {MAX_JPEG_MARKERS} markers {where}")


def _entropy_end(data: bytes, pos: int, name: str) -> int | None:
    """Where entropy-coded data from `pos` ends (the last 0xFF before its marker; FF 00 and restart
    markers are data), None at the file's end; runs of fill bytes inside it count toward the cap."""
    n = len(data)
    for _ in range(MAX_JPEG_MARKERS):
        found = _FF_NOT_STUFFED.search(data, pos)
        if found is None:
            return None
        pos = _FILL.match(data, found.start()).end() - 1  # type: ignore[union-attr]
        if pos + 1 >= n or data[pos + 1] not in _STUFFED_OR_RESTART:
            return pos
        pos += 2
    raise _too_many_markers(name, "inside a scan's entropy-coded data")


def jpeg_header(data: bytes, name: str) -> ImageHeader:
    """Walk the marker segments up to the first scan, then require an end-of-image marker."""
    pos = 2
    sof: tuple[int, int, int, int] | None = None
    orientation: int | None = None
    exif_blocks = 0
    for _ in range(MAX_JPEG_MARKERS):
        if pos + 2 > len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: JPEG ends inside its header")
        if data[pos] != 0xFF:
            raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG marker expected at {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes
            pos = _FILL.match(data, pos).end() - 1  # type: ignore[union-attr]
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
        elif (marker == 0xE1 and body.startswith(b"Exif\x00\x00") and orientation is None
              and exif_blocks < MAX_EXIF_BLOCKS):  # the first EXIF block that gives one, as OpenCV reads it
            orientation, exif_blocks = _exif_orientation_tag(body[6:]), exif_blocks + 1
        elif marker == 0xDA:
            break
        pos += 2 + length
    else:
        raise _too_many_markers(name, "before its first scan")
    if sof is None:
        raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG scan before any frame header")
    precision, h, w, components = sof
    if w == 0 or h == 0:
        raise IngestError(
            RejectReason.CORRUPT, f"{name}: JPEG frame {w}x{h} (DNL height is not supported)"
        )
    if components not in (1, 3, 4):
        raise IngestError(RejectReason.BAD_CHANNELS, f"{name}: JPEG with {components} components")
    if precision != 8:  # 12-bit (medical/scientific) JPEG: a valid file the decoder cannot read
        raise IngestError(
            RejectReason.UNSUPPORTED_FORMAT, f"{name}: {precision}-bit JPEG (8-bit JPEG, PNG or TIFF are read)"
        )
    # Each scan of a progressive JPEG is a pass over every coefficient: hundreds of tiny scans make
    # a small file cost the decoder minutes (a 210 kB file of 883 scans took 19 s). Cameras and
    # encoders write 1 (baseline) to about 10.
    scans = _scans_to_end(data, pos, name)
    if scans is None and data.find(b"\xff\xd9", pos) != -1:  # its end is there: damage derailed the walk
        raise IngestError(RejectReason.CORRUPT, f"{name}: JPEG data damaged (its markers do not lead to the "
                          "end-of-image marker it holds)")
    if scans is None:
        raise IngestError(RejectReason.TRUNCATED, f"{name}: JPEG has no end-of-image marker")
    if scans > MAX_JPEG_SCANS:
        raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: JPEG of {scans} scans (at most "
                          f"{MAX_JPEG_SCANS} are read)")
    return ImageHeader("jpeg", w, h, precision, components, orientation or 1, scans=scans)


def check_jpeg_scans(header: ImageHeader, name: str) -> None:
    """Scans times pixels within MAX_JPEG_SCAN_PIXELS (`unsupported_format`); after the geometry check,
    so a frame over the pixel limit is refused for its size."""
    most = max(1, min(MAX_JPEG_SCANS, MAX_JPEG_SCAN_PIXELS // (header.width * header.height)))
    if header.scans > most:
        raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: JPEG of {header.scans} scans over "
                          f"{header.width}x{header.height} pixels (at most {most} are read at that size)")


# --- TIFF ------------------------------------------------------------------------------------

TIFF_PHOTOMETRIC = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette"}


def check_tiff_directory_offset(data: bytes, name: str) -> None:
    """The first directory must lie inside the file (checked before tifffile parses anything)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 64-bit offset at byte 8
    field, fmt = (data[8:16], "Q") if big else (data[4:8], "I")
    if len(field) < struct.calcsize(fmt):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF ends inside its header")
    (first_ifd,) = struct.unpack(order + fmt, field)
    if first_ifd >= len(data):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF directory beyond end of file")
    # through a preview page first (NewSubfileType bit 0) to the field's directory, which must be there
    at, which = first_ifd, "its first directory"
    for _ in range(MAX_TIFF_DIRECTORIES):
        following, preview = _check_directory(data, order, big, at, name, which)
        if not preview or following == 0:
            return  # the field's directory (or a file of a preview alone, read as it is)
        if following >= len(data):
            raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF ends before the page its preview stands for")
        at, which = following, "the directory after its preview page"


#: Tags that say how and where the pixels are stored: tifffile drops one whose values lie past the
#: file's end and takes its default (BitsPerSample 1: a cut file would be `bad_dtype`).
_STRUCTURE_TAGS = np.array([256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 338,
                            339], np.uint16)
_TIFF_TYPE_BYTES = np.zeros(32)
_TIFF_TYPE_BYTES[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18]] = [1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 8,
                                                                              8, 8]


def _check_directory(data: bytes, order: str, big: bool, at: int, name: str, which: str) -> tuple[int, bool]:
    """The directory's entries, its next-directory offset and its structure tags' values all inside
    the file (`truncated`): a writer that puts directories first and stopped early. Returns (the next
    directory's offset, whether this page is marked reduced-resolution: NewSubfileType bit 0)."""
    head, size, inline = (8, 20, 8) if big else (2, 12, 4)
    if at + head > len(data):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF ends inside {which}")
    (n,) = struct.unpack(order + ("Q" if big else "H"), data[at : at + head])
    if at + head + n * size + (8 if big else 4) > len(data):  # the entries, then the next directory's offset
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF ends inside {which}")
    word = order + ("u8" if big else "u4")
    entries = np.frombuffer(data, np.dtype([("tag", order + "u2"), ("type", order + "u2"), ("count", word),
                                            ("value", word)]), count=n, offset=at + head)
    structure = entries[np.isin(entries["tag"], _STRUCTURE_TAGS)]
    # in float64: a count of 2**64 - 1 overflows no integer, and sizes this near the file's are exact
    nbytes = _TIFF_TYPE_BYTES[np.minimum(structure["type"], 31)] * structure["count"].astype(np.float64)
    past = (nbytes > inline) & (structure["value"].astype(np.float64) + nbytes > len(data))
    if past.any():
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF tag {int(structure['tag'][past][0])}'s values "
                          "lie past the end of file")
    (following,) = struct.unpack(order + ("Q" if big else "I"), data[at + head + n * size :][: 8 if big else 4])
    kind = entries[entries["tag"] == 254]
    value = int(kind["value"][0]) if kind.size else 0
    if kind.size and int(kind["type"][0]) == 3 and order == ">":  # a SHORT in the field's first bytes
        value >>= 48 if big else 16
    return following, bool(value & 1)


#: Image directories a TIFF may hold (pages and their SubIFDs): a field, perhaps a thumbnail or a
#: few resolutions. tifffile groups them into series in time that grows faster than their number
#: (a 5 MB file of 20 000 one-pixel pages took two minutes, 2000 SubIFDs 1.2 s); more are refused
#: before any series is made.
MAX_TIFF_DIRECTORIES = 64


def _directories(tif: tifffile.TiffFile, most: int) -> int:
    """The file's pages and SubIFDs, read page by page and counted up to one past `most` (a page
    met again ends the count)."""
    n, seen = 0, set()
    for k in range(most + 1):
        try:
            page = tif.pages[k]
        except IndexError:
            break
        if page.offset in seen:  # a chain that loops back (tifffile cuts it short, later)
            break
        seen.add(page.offset)
        n += 1 + len(getattr(page, "subifds", None) or ())
        if n > most:
            break
    return n


def tiff_header(
    tif: tifffile.TiffFile, file_size: int, name: str
) -> tuple[ImageHeader, tifffile.TiffPage, str]:
    """(header, first page, photometric name) of the first series, every check short of
    geometry and decoding; tifffile's own exceptions are the caller's to map to `corrupt`."""
    if not tif.pages:
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF without images")
    if _directories(tif, MAX_TIFF_DIRECTORIES) > MAX_TIFF_DIRECTORIES:
        raise IngestError(RejectReason.MULTI_FRAME, f"{name}: TIFF of more than {MAX_TIFF_DIRECTORIES} "
                          "image directories")
    if not tif.series:
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF without images")
    # a writer's preview first (NewSubfileType bit 0: a reduced-resolution version of another image)
    # is not the field: the first series whose page is not one is read, else the first
    series = next((s for s in tif.series if s.pages and not int(getattr(s.pages[0], "subfiletype", 0)) & 1),
                  tif.series[0])
    if len(tif.series) > 1:
        logger.info("%s: TIFF holds %d series; using series %d", name, len(tif.series), tif.series.index(series))
    page = series.pages[0] if series.pages else None
    if not isinstance(page, tifffile.TiffPage):
        raise IngestError(RejectReason.CORRUPT, f"{name}: TIFF first page unreadable")
    samples = int(page.samplesperpixel)
    max_sample = page.tags.get(281)
    orient_tag = page.tags.get(274)
    orientation = int(orient_tag.value) if orient_tag is not None else 1
    header = ImageHeader(
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
    photometric = TIFF_PHOTOMETRIC.get(int(page.photometric))
    if photometric is None:
        raise IngestError(
            RejectReason.UNSUPPORTED_FORMAT, f"{name}: TIFF photometric {page.photometric!r}"
        )
    if not tiff_decodable(page) and not (opencv_tiff(page) and photometric in ("minisblack", "rgb")):
        raise IngestError(
            RejectReason.UNSUPPORTED_FORMAT,
            f"{name}: TIFF compression {page.compression!r} with photometric {photometric}",
        )
    frames = [n for n, ax in zip(series.shape, series.axes) if ax not in "YXS" and n != 1]
    if frames:
        raise IngestError(
            RejectReason.MULTI_FRAME,
            f"{name}: TIFF series of shape {series.shape} ({series.axes}): several frames",
        )
    if any(o + n > file_size for o, n in zip(page.dataoffsets, page.databytecounts)):
        raise IngestError(RejectReason.TRUNCATED, f"{name}: TIFF image data past end of file")
    return header, page, photometric


def _declared_bits(max_sample_value: object) -> int | None:
    values = np.atleast_1d(np.asarray(max_sample_value)).astype(np.int64)
    top = int(values.max()) if values.size else 0
    return top.bit_length() if 0 < top < 0xFFFF else None
