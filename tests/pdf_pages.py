"""What a PDF Chromium printed says, page by page, read without a PDF library: each page's text
(its fonts' ToUnicode maps applied to the glyph codes its content streams show) and, from a tagged
PDF's structure tree, the pages each table row and list item lies on. Enough for the PDFs Chromium
(Skia) writes with Page.printToPDF, not a general PDF reader."""

from __future__ import annotations

import re
import zlib


def _objects(pdf: bytes) -> dict[int, bytes]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(rb"(\d+) 0 obj(.*?)endobj", pdf, re.DOTALL)}


def _stream(body: bytes) -> bytes:
    head, rest = body.split(b"stream", 1)
    data = rest.lstrip(b"\r\n").rsplit(b"endstream", 1)[0]
    return zlib.decompress(data) if b"/FlateDecode" in head else data


def _cmap(text: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    for block in re.findall(rb"beginbfchar(.*?)endbfchar", text, re.DOTALL):
        for src, dst in re.findall(rb"<([0-9a-fA-F]+)>\s*<([0-9a-fA-F]+)>", block):
            out[int(src, 16)] = bytes.fromhex(dst.decode()).decode("utf-16-be")
    for block in re.findall(rb"beginbfrange(.*?)endbfrange", text, re.DOTALL):
        for lo, hi, dst in re.findall(rb"<([0-9a-fA-F]+)>\s*<([0-9a-fA-F]+)>\s*<([0-9a-fA-F]+)>", block):
            first = int(dst, 16)
            for i, code in enumerate(range(int(lo, 16), int(hi, 16) + 1)):
                out[code] = chr(first + i)
    return out


def _pages(pdf: bytes) -> list[int]:
    kids = re.search(rb"/Type /Pages\s*/Count \d+\s*/Kids \[([^\]]*)\]", pdf)
    assert kids, "no page tree"
    return [int(n) for n in re.findall(rb"(\d+) 0 R", kids.group(1))]


def page_texts(pdf: bytes) -> list[str]:
    """Each page's text, whitespace left out (Skia shows a glyph or a run at a time)."""
    objs = _objects(pdf)
    texts = []
    for page in _pages(pdf):
        body = objs[page]
        fonts: dict[bytes, dict[int, str]] = {}
        font_dict = re.search(rb"/Font <<(.*?)>>", body, re.DOTALL)
        for name, ref in re.findall(rb"/(\w+) (\d+) 0 R", font_dict.group(1) if font_dict else b""):
            to_unicode = re.search(rb"/ToUnicode (\d+) 0 R", objs[int(ref)])
            fonts[name] = _cmap(_stream(objs[int(to_unicode.group(1))])) if to_unicode else {}
        contents = re.search(rb"/Contents (\[[^\]]*\]|\d+ 0 R)", body)
        out: list[str] = []
        cmap: dict[int, str] = {}
        for ref in re.findall(rb"(\d+) 0 R", contents.group(1) if contents else b""):
            for m in re.finditer(rb"/(\w+) [\d.]+ Tf|<([0-9a-fA-F]*)> Tj|\[(.*?)\] TJ", _stream(objs[int(ref)]), re.DOTALL):
                if m.group(1):
                    cmap = fonts.get(m.group(1), {})
                    continue
                for hexed in [m.group(2)] if m.group(2) is not None else re.findall(rb"<([0-9a-fA-F]*)>", m.group(3)):
                    codes = bytes.fromhex(hexed.decode())
                    out.extend(cmap.get(int.from_bytes(codes[i:i + 2], "big"), "?") for i in range(0, len(codes), 2))
        texts.append(re.sub(r"\s+", "", "".join(out)))
    return texts


def tagged_spans(pdf: bytes, roles: tuple[str, ...]) -> list[tuple[str, set[int]]]:
    """For each structure element of these roles (a tagged PDF's "TR", "LI"...), the pages (from 1)
    its marked content lies on: more than one is an element cut across pages."""
    pages = _pages(pdf)
    elems: dict[int, tuple[str, int | None, int | None]] = {}
    for n, body in _objects(pdf).items():
        if b"/Type /StructElem" not in body[:60]:
            continue
        role, parent, page = (re.search(rb"/S /(\w+)", body), re.search(rb"/P (\d+) 0 R", body),
                              re.search(rb"/Pg (\d+) 0 R", body))
        elems[n] = (role.group(1).decode() if role else "", int(parent.group(1)) if parent else None,
                    pages.index(int(page.group(1))) + 1 if page else None)

    def under(n: int, top: int) -> bool:
        seen = 0
        while n is not None and seen < 64:
            if n == top:
                return True
            n, seen = elems.get(n, ("", None, None))[1], seen + 1  # type: ignore[assignment]
        return False

    return [(role, {pg for m, (_, _, pg) in elems.items() if pg and under(m, n)})
            for n, (role, _, _) in elems.items() if role in roles]
