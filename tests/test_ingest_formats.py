"""Stage 1 (ingest), step 2: a file of a known format the analyzer does not read is refused
`unsupported_format` naming what it is (a technician exports the field again), told by its first
bytes before anything is decoded; text, other XML and random bytes stay `not_an_image`."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import cv2
import hostile  # tests/ is on sys.path (pytest prepend import mode), as for conftest
import numpy as np
import pytest

from smearscope.service.ingest import IngestError, load_image

FIELD = hostile.smear_like(80, 96)


def _by_opencv(ext: str, grey: bool = False, floats: bool = False) -> Callable[[Path], bytes]:
    """The field written by OpenCV's own encoder for `ext` (a real file of that format)."""
    def write(tmp: Path) -> bytes:
        img = cv2.cvtColor(FIELD, cv2.COLOR_BGR2GRAY) if grey else FIELD
        path = tmp / f"field{ext}"
        assert cv2.imwrite(str(path), img.astype(np.float32) / 255 if floats else img)
        return path.read_bytes()
    return write


def _dicom(_: Path) -> bytes:
    """A DICOM part 10 file's start: preamble, prefix, file meta group (explicit VR little endian)."""
    syntax = b"1.2.840.10008.1.2.1\x00"  # explicit VR little endian
    meta = struct.pack("<HH2sH", 2, 0x10, b"UI", len(syntax)) + syntax
    return bytes(128) + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)) + meta


def _pdf(_: Path) -> bytes:
    return (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
            b"2 0 obj <</Type /Pages /Kids [] /Count 0>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n")


def _exr(_: Path) -> bytes:
    """OpenEXR: magic, version 2 (scanline), a channels attribute (one half channel "Y")."""
    chlist = b"Y\x00" + struct.pack("<iBxxxii", 1, 0, 1, 1) + b"\x00"
    return b"v/1\x01" + struct.pack("<I", 2) + b"channels\x00chlist\x00" + struct.pack("<I", len(chlist)) + chlist


def _psd(_: Path) -> bytes:
    """A Photoshop document: header (3 channels, 80 x 96, 8 bit, RGB), empty sections, raw planes."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 80, 96, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + FIELD[..., ::-1].transpose(2, 0, 1).tobytes()


def _j2k(_: Path) -> bytes:
    """A JPEG 2000 codestream: SOC, then SIZ (96 x 80, 3 components of 8 bits)."""
    siz = struct.pack(">HIIIIIIIIH", 0, 96, 80, 0, 0, 96, 80, 0, 0, 3) + bytes((7, 1, 1)) * 3
    return b"\xff\x4f\xff\x51" + struct.pack(">H", len(siz) + 2) + siz


def _jxl_codestream(_: Path) -> bytes:
    return b"\xff\x0a" + bytes(range(64))


def _jxl_container(_: Path) -> bytes:
    ftyp = b"jxl " + struct.pack(">I", 0) + b"jxl "
    return b"\x00\x00\x00\x0cJXL \r\n\x87\n" + struct.pack(">I", 8 + len(ftyp)) + b"ftyp" + ftyp


def _avif(_: Path) -> bytes:
    ftyp = b"avif" + struct.pack(">I", 0) + b"avifmif1miaf"
    return struct.pack(">I", 8 + len(ftyp)) + b"ftyp" + ftyp + struct.pack(">I", 8) + b"mdat"


def _svg(_: Path) -> bytes:
    return (b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?>\n<!-- exported -->\n'
            b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="96" height="80"><circle cx="40" cy="40" r="9"/></svg>\n')


def _zip_of_fields(_: Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("field_001.png", hostile.encode(".png", FIELD))
        archive.writestr("field_002.png", hostile.encode(".png", FIELD[::-1]))
    return out.getvalue()


def _gzip_of_field(_: Path) -> bytes:
    return gzip.compress(hostile.encode(".png", FIELD))


EXPORT = "export the field as PNG, JPEG or TIFF"
UNPACK = "unpack it: each field is read as its own PNG, JPEG or TIFF file"
KNOWN_FORMATS = {
    "dicom": (_dicom, "a DICOM file", EXPORT),
    "pdf": (_pdf, "a PDF document", EXPORT),
    "ppm": (_by_opencv(".ppm"), "a PNM image (PPM)", EXPORT),
    "pgm": (_by_opencv(".pgm", grey=True), "a PNM image (PGM)", EXPORT),
    "pbm": (_by_opencv(".pbm", grey=True), "a PNM image (PBM)", EXPORT),
    "pam": (_by_opencv(".pam"), "a PNM image (PAM)", EXPORT),
    "pfm": (_by_opencv(".pfm", floats=True), "a PNM image (PFM)", EXPORT),
    "radiance_hdr": (_by_opencv(".hdr", floats=True), "a Radiance HDR image", EXPORT),
    "sun_raster": (_by_opencv(".ras"), "a Sun raster image", EXPORT),
    "openexr": (_exr, "an OpenEXR image", EXPORT),
    "psd": (_psd, "a Photoshop document (PSD)", EXPORT),
    "jp2": (_by_opencv(".jp2"), "a JPEG 2000 image", EXPORT),
    "j2k": (_j2k, "a JPEG 2000 image", EXPORT),
    "jxl_codestream": (_jxl_codestream, "a JPEG XL image", EXPORT),
    "jxl_container": (_jxl_container, "a JPEG XL image", EXPORT),
    "avif": (_avif, "a HEIF/AVIF image", EXPORT),
    "webp": (_by_opencv(".webp"), "a WebP image", EXPORT),
    "svg": (_svg, "an SVG drawing", EXPORT),
    "zip": (_zip_of_fields, "a ZIP archive", UNPACK),
    "gzip": (_gzip_of_field, "a gzip-compressed file", UNPACK),
}


@pytest.mark.parametrize("kind", list(KNOWN_FORMATS))
def test_a_known_format_that_is_not_read_is_unsupported_format_naming_it(kind: str, tmp_path: Path) -> None:
    """Each written as a real file (by OpenCV's encoder where it has one, else a valid header) and
    read from its path: refused naming what it is and what to do, where most were `not_an_image`."""
    make, what, advice = KNOWN_FORMATS[kind]
    path = tmp_path / "field.png"  # the extension is never trusted
    path.write_bytes(make(tmp_path))
    with pytest.raises(IngestError) as err:
        load_image(path)
    assert err.value.code.value == "unsupported_format", err.value.message
    assert err.value.message == f"{path}: this is {what}; {advice}"


NOT_IMAGES = {
    "random_bytes": np.random.default_rng(11).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "xml_not_svg": b'<?xml version="1.0"?>\n<!DOCTYPE report [<!ENTITY svg "x">]>\n<report><svg/></report>\n',
    "html_with_inline_svg": b"<!DOCTYPE html>\n<html><body><svg width='9' height='9'></svg></body></html>\n",
    "text_starting_like_pnm": b"P3 ward, bed 12\nP5: 96 80 255\n",
    "text_starting_like_pam": b"P7\nwidth of the field: 96\n",
    "text_starting_like_pdf_later": b"see %PDF-1.4 attached\n",
}


@pytest.mark.parametrize("kind", list(NOT_IMAGES))
def test_random_bytes_text_and_xml_that_is_no_svg_stay_not_an_image(kind: str, tmp_path: Path) -> None:
    data = NOT_IMAGES[kind]
    assert data[128:132] != b"DICM"
    path = tmp_path / "field.png"
    path.write_bytes(data)
    with pytest.raises(IngestError) as err:
        load_image(path)
    assert err.value.code.value == "not_an_image", err.value.message
