"""HL7 v2 encoding: the escapes every text gets, the lengths it is cut to, and DTM times.

Every text that goes into a message passes `text()`: each delimiter escaped (HL7 v2.5.1 section 2.7): `|` `^` `&`
`~` `\\` as `\\F\\` `\\S\\` `\\T\\` `\\R\\` `\\E\\`, and every control character (a line break
among them, which would end the segment) as `\\Xhh\\`, and cut to its field's length as sent
(never inside an escape). Nothing a report holds can then end a field, a component or a segment early.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

#: The encoding characters of MSH-2: component, repetition, escape, subcomponent.
ENCODING_CHARACTERS = "^~\\&"
FIELD, COMPONENT, REPETITION, ESCAPE, SUBCOMPONENT = "|", "^", "~", "\\", "&"
SEGMENT_END = "\r"
_ESCAPES = {FIELD: "\\F\\", COMPONENT: "\\S\\", SUBCOMPONENT: "\\T\\", REPETITION: "\\R\\", ESCAPE: "\\E\\"}

#: Lengths (characters) of HL7 v2.5.1's data types, each text cut to its own before it is escaped.
ST = 199      # ST, the text of a CWE and each component of an EI, HD, XCN
ID = 20       # ST/ID as a code (the identifier of a CWE, OBX-4's sub-id, the message control id)
FT = 65536    # FT (NTE-3, a comment)


def text(value: object, length: int = ST) -> str:
    """`value` as an HL7 text of at most `length` characters as sent: delimiters and control characters
    escaped, cut before the first character whose escape would not fit whole."""
    out: list[str] = []
    size = 0
    for ch in str(value):
        if 0xD800 <= ord(ch) <= 0xDFFF:  # a lone surrogate (JSON's \\ud800) has no UTF-8
            ch = "\ufffd"
        piece = _ESCAPES.get(ch) or (f"\\X{ord(ch):02X}\\" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
        if size + len(piece) > length:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def code(value: str) -> str:
    """A code as HL7 text: escaped, never cut (a code cut short is another code); docs/HL7.md names the
    local codes longer than HL7's 20 characters."""
    return text(value, 5 * len(value))


def components(*parts: str) -> str:
    """Components (already escaped) joined by `^`, empty ones at the end dropped."""
    return COMPONENT.join(parts).rstrip(COMPONENT)


def subcomponents(*parts: str) -> str:
    return SUBCOMPONENT.join(parts).rstrip(SUBCOMPONENT)


def segment(name: str, *fields: str) -> str:
    """One segment (fields already escaped), empty fields at the end dropped."""
    return FIELD.join((name, *fields)).rstrip(FIELD)


def dtm(when: float | str) -> str:
    """An instant (seconds since 1970, or an ISO time with its zone) as HL7 DTM in UTC, to the
    millisecond: YYYYMMDDHHMMSS.SSS+0000."""
    moment = (datetime.fromtimestamp(when, timezone.utc) if isinstance(when, (int, float))
              else datetime.fromisoformat(when).astimezone(timezone.utc))
    return moment.strftime("%Y%m%d%H%M%S.") + f"{moment.microsecond // 1000:03d}+0000"


def number(value: float) -> str:
    """A number as HL7 NM: plain decimal, no exponent; ValueError for NaN or an infinity (JSON as Python
    reads it takes them), which NM has no way to say."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a number HL7's NM can carry")
    if isinstance(value, int):
        return str(value)
    out = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if out in ("-0", "") else out


#: HL7 table 0301, universal id type: what an HD's universal id (HD-2) is.
UNIVERSAL_ID_TYPES = ("DNS", "GUID", "HCD", "HL7", "ISO", "L", "M", "N", "Random", "URI", "UUID", "x400", "x500")
IS = 20       # IS, the namespace id of an HD (HD-1)


def hd(value: str) -> str:
    """`value` as an HL7 HD (hierarchic designator: namespace id, or namespace id^universal id^its type from
    table 0301, e.g. `LAB^2.16.840.1.113883.19.4.6^ISO`), checked: ValueError saying what is wrong when it
    holds another delimiter (`|`, `~`, `\\`, `&`), a control character, more than 3 components, a part
    longer than HL7 gives it, or a universal id without its type (or a type without the id)."""
    if not value:
        raise ValueError("an HD (hierarchic designator) cannot be empty")
    bad = sorted({ch for ch in value if ch in (FIELD, REPETITION, ESCAPE, SUBCOMPONENT) or ord(ch) < 0x20
                  or ord(ch) == 0x7F})
    if bad:
        raise ValueError(f"{value!r} holds {', '.join(map(repr, bad))}: an HD takes no HL7 delimiter but '^' "
                         "between its components, and no control character")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):  # a byte that is no UTF-8, as Python's argv decodes it
        raise ValueError(f"{value!r} is not UTF-8 text: the message is UTF-8 (MSH-18), and so must an HD be")
    parts = value.split(COMPONENT)
    if len(parts) > 3:
        raise ValueError(f"{value!r} has {len(parts)} components: an HD has at most 3 (namespace id^universal "
                         "id^universal id type)")
    namespace, universal, kind = (parts + ["", ""])[:3]
    if len(namespace) > IS or len(universal) > ST:
        raise ValueError(f"{value!r}: an HD's namespace id takes at most {IS} characters, its universal id {ST}")
    if not namespace and not universal:
        raise ValueError(f"{value!r} names neither a namespace id nor a universal id")
    if bool(universal) != bool(kind):
        raise ValueError(f"{value!r}: a universal id (HD-2) goes with its type (HD-3) and the other way round")
    if kind and kind not in UNIVERSAL_ID_TYPES:
        raise ValueError(f"{value!r}: universal id type {kind!r} is not one of HL7 table 0301's "
                         f"({', '.join(UNIVERSAL_ID_TYPES)})")
    return components(namespace, universal, kind)
