"""Stage 1, step 2: a frame's format from its first bytes, before anything is decoded.

JPEG, PNG and TIFF are read. A file of another kind that a scanner, a PACS, a camera or an editor
writes (DICOM, PDF, PNM, OpenEXR, Radiance HDR, Sun raster, Photoshop, GIF, BMP, WebP, JPEG 2000,
JPEG XL, HEIF/AVIF, SVG, a ZIP or gzip archive) is refused `unsupported_format` with a message
naming what it is and what to do, so a technician can export the field again; anything else is
`not_an_image`. The file name's extension is never trusted, and no message repeats a word of the
content: it goes back over MQTT (analyze_file) and into reason files, and the file may be a secret
the service can read.
"""

from __future__ import annotations

import re
import struct

from smearscope.device.ingest.errors import IngestError, RejectReason
from smearscope.device.ingest.headers import PNG_SIGNATURE

_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}

#: What the refusal of a format that is no single image asks for.
_EXPORT = "export the field as PNG, JPEG or TIFF"
_UNPACK = "unpack it: each field is read as its own PNG, JPEG or TIFF file"


def sniff(data: bytes, name: str) -> str:
    """"png", "jpeg" or "tiff" from the magic bytes, else the `IngestError` of step 2."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[:4] in _TIFF_SIGNATURES:
        return "tiff"
    other = known_unsupported(data)
    if other:
        what, advice = other
        raise IngestError(RejectReason.UNSUPPORTED_FORMAT, f"{name}: this is {what}; {advice}")
    raise IngestError(RejectReason.NOT_AN_IMAGE, f"{name}: no JPEG/PNG/TIFF signature")


#: PNM by its magic number (P1..P7, PF/Pf), whitespace, comments, then what its header starts with:
#: the width (P1..P6, PF) or a PAM header line (P7). "P3" and a space alone would name a text file.
_PNM = re.compile(rb"P([1-6Ff])(?:\s|#[^\r\n]*[\r\n])+\d|P(7)\s(?:\s|#[^\r\n]*[\r\n])*(?:WIDTH|HEIGHT|DEPTH"
                  rb"|MAXVAL|TUPLTYPE|ENDHDR)\b")
_PNM_KINDS = {b"1": "PBM", b"4": "PBM", b"2": "PGM", b"5": "PGM", b"3": "PPM", b"6": "PPM", b"7": "PAM",
              b"F": "PFM", b"f": "PFM"}
#: SVG: the root element of an XML document is <svg> (with or without a namespace prefix), after any
#: XML declaration, comments, processing instructions and DOCTYPE; other XML and HTML are no images.
_XML_PROLOG_ITEM = re.compile(rb"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE\s[^[>]*(?:\[[^\]]*\][^[>]*)?>)", re.DOTALL)
_SVG_ROOT = re.compile(rb"\s*<(?:[A-Za-z_][\w.-]*:)?svg[\s>/]")
#: Bytes of the start of a file looked at for PNM and SVG headers.
_TEXT_HEAD = 4096


def known_unsupported(data: bytes) -> tuple[str, str] | None:
    """(what the file is, what to do) for a known format that is not read, else None."""
    if data[128:132] == b"DICM":  # the DICOM part 10 prefix, after a 128-byte preamble
        return "a DICOM file", _EXPORT
    if data.startswith(b"%PDF-"):
        return "a PDF document", _EXPORT
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF image", _EXPORT
    # "BM" alone is too weak (a text file may start so): also require a known DIB header size.
    if data[:2] == b"BM" and len(data) >= 18 and struct.unpack("<I", data[14:18])[0] in _BMP_DIB_SIZES:
        return "a BMP image", _EXPORT
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image", _EXPORT
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ")):
        return "a JPEG 2000 image", _EXPORT
    if data.startswith((b"\x00\x00\x00\x0cJXL \r\n\x87\n", b"\xff\n")):
        return "a JPEG XL image", _EXPORT
    if data[4:8] == b"ftyp" and _heif_brands(data):
        return "a HEIF/AVIF image", _EXPORT
    if data[:4] == b"v/1\x01":
        return "an OpenEXR image", _EXPORT
    if data.startswith((b"#?RADIANCE\n", b"#?RGBE\n")):
        return "a Radiance HDR image", _EXPORT
    if data[:4] == b"\x59\xa6\x6a\x95":
        return "a Sun raster image", _EXPORT
    if data[:4] == b"8BPS" and data[4:6] in (b"\x00\x01", b"\x00\x02"):
        return f"a Photoshop document ({'PSD' if data[5] == 1 else 'PSB'})", _EXPORT
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "a ZIP archive", _UNPACK
    if data[:3] == b"\x1f\x8b\x08":
        return "a gzip-compressed file", _UNPACK
    head = data[:_TEXT_HEAD]
    pnm = _PNM.match(head)
    if pnm:
        return f"a PNM image ({_PNM_KINDS[pnm.group(1) or pnm.group(2)]})", _EXPORT
    if _svg(head.removeprefix(b"\xef\xbb\xbf")):
        return "an SVG drawing", _EXPORT
    return None


def _svg(head: bytes) -> bool:
    """Whether the document's root element is <svg>."""
    pos = 0
    while (item := _XML_PROLOG_ITEM.match(head, pos)) and item.end() > pos:
        pos = item.end()
    return _SVG_ROOT.match(head, pos) is not None


#: ISO/IEC 23008-12 (HEIF, its HEVC images and sequences), Apple's and Canon's variants, AVIF.
_HEIF_BRANDS = frozenset((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1",
                          b"mif2", b"msf1", b"miaf", b"MiHE", b"MiHA", b"MiHB", b"avif", b"avis", b"avio"))


def _heif_brands(data: bytes) -> bool:
    """The ftyp box's major brand or one of its compatible brands (at most 64 read) is HEIF's or AVIF's."""
    size = min(struct.unpack(">I", data[:4])[0], 16 + 4 * 64, len(data))
    brands = [data[8:12]] + [data[k : k + 4] for k in range(16, size - 3, 4)]
    return any(brand in _HEIF_BRANDS for brand in brands)
