"""The identifiers an HL7 v2.5.1 message carries, each within its field's length as sent (docs/HL7.md,
"Escapes and lengths"): an id too long for its field is sent as a short form made from it alone, never cut
(a cut id would be another one). Kept apart from the message (service.hl7.oru) so the archive's queries
match a short form a lab system shows without loading the report model."""

from __future__ import annotations

import base64
import hashlib
import logging
import re

from smearscope.service.hl7.encode import text

logger = logging.getLogger(__name__)

#: The namespace of the filler's identifiers (EI-2) and of the equipment (OBX-18).
NAMESPACE = "smearscope"
#: v2.5.1's length of ORC-2/OBR-2 (EI): the whole field as sent; the placer order number has no namespace
#: (EI-2: the lab's accession number is the LIS's own), so all 22 are EI.1's. A strict LIS refuses a longer one.
PLACER_LENGTH = 22
#: The short placer order number of a longer specimen id: up to this many of its leading letters and digits,
#: '-', then this many base32 characters of its SHA-256 (60 bits): 9 + 1 + 12 = PLACER_LENGTH.
PLACER_PREFIX, PLACER_HASH = 9, 12
#: v2.5.1's length of ORC-3/OBR-3 (EI, the filler order number) and OBX-18 (EI, the equipment), the whole field as
#: sent: EI.1, '^' and the namespace `smearscope` together; so 11 characters are left for EI.1.
FILLER_LENGTH = EQUIPMENT_LENGTH = 22
#: The short equipment id of a longer station id: up to this many of its leading letters and digits, '-', then
#: base32 characters of its SHA-256 to EI.1's 11 (4 + 1 + 6: 30 bits, for the few stations of one lab).
EQUIPMENT_PREFIX = 4
#: v2.5.1's length of SPM-2 (EIP): the placer's id (22 at most) '^' the filler's (22 at most, '&' between its
#: parts) fit in it.
SPECIMEN_ID_LENGTH = 80


def _short(value: str, room: int, prefix: int, digits: int) -> str:
    """`value` escaped when it fits `room` characters as sent; else up to `prefix` of its leading letters and
    digits, '-' (none without them) and `digits` base32 characters of the SHA-256 of the whole value (UTF-8):
    the same value always gives the same one, two differing anywhere (the end too) different ones."""
    whole = text(value)
    if len(whole) <= room:
        return whole
    lead = re.sub(r"[^A-Za-z0-9]", "", value[: 4 * room])[:prefix]
    digest = base64.b32encode(hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()).decode()
    return f"{lead}-{digest[:digits]}" if lead else digest[:digits]


def placer_order_number(specimen_id: str) -> str:
    """ORC-2/OBR-2's EI.1 (and SPM-2's placer part) for `specimen_id`, escaped: the id as the lab knows it when
    it fits PLACER_LENGTH as sent; else its leading letters and digits (up to PLACER_PREFIX), '-' and
    PLACER_HASH base32 characters of the SHA-256 of the whole id (UTF-8): the same id always gives the same
    value, two ids differing anywhere (the end too) give different ones. The message carries the whole id
    in a note (oru_r01)."""
    return _short(specimen_id, PLACER_LENGTH, PLACER_PREFIX, PLACER_HASH)


def filler_order_number(run_id: str) -> str:
    """ORC-3/OBR-3's EI.1 (and SPM-2's filler part) for `run_id`, escaped: the run id when it fits before
    `^smearscope` in FILLER_LENGTH; else (a run id is a UUID, 36 characters) 11 base32 characters of its
    SHA-256 (55 bits), the same for every report of the run. The message carries the whole run id in a note."""
    room = FILLER_LENGTH - len(NAMESPACE) - 1
    return _short(run_id, room, 0, room)


def equipment_id(station_id: str) -> str:
    """OBX-18's EI.1 for `station_id`, escaped: the station id when it fits before `^smearscope` in
    EQUIPMENT_LENGTH; else up to EQUIPMENT_PREFIX of its leading letters and digits, '-' and base32 characters
    of its SHA-256. The message carries the whole station id in a note."""
    room = EQUIPMENT_LENGTH - len(NAMESPACE) - 1
    return _short(station_id, room, EQUIPMENT_PREFIX, room - EQUIPMENT_PREFIX - 1)
