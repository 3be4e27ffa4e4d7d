"""The archive's HL7 output: each specimen report it stores also written as an HL7 v2.5.1 ORU^R01
file, `<report_id>.hl7` in the folder an interface engine reads (`smearscope archive --hl7-dir`).

The file is written whole or not at all (a temporary dot-file, fsync, rename, fsync of the folder)
before the report's index row is committed, so before the broker has its acknowledgement: an
archive that dies before the row is committed gets the report again and writes the same file
again (the same bytes, the same MSH-10), and a report once acknowledged has its file. A report
delivered again once indexed is not written again: the engine may have taken the first file away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from smearscope.service.archive.message import ReportMessage

logger = logging.getLogger(__name__)

SUFFIX = ".hl7"
#: The files' mode: the interface engine reads them as a member of the folder's group (docs/HL7.md).
MODE = 0o640


def oru_of(payload: bytes) -> tuple[str, str]:
    """(the report's kind, its ORU^R01 message) from an archived envelope; ValueError (pydantic's
    ValidationError is one) when its body is not a report this smearscope reads."""
    # imported here: the report model and the FHIR mapping pull numpy and OpenCV in, which the
    # archive needs only when it writes HL7
    from smearscope.service.analysis.report import Report
    from smearscope.service.hl7.oru import oru_r01

    body = json.loads(payload).get("body")
    report = Report.model_validate(body)
    return report.kind, oru_r01(report)


def write_hl7(directory: Path, message: ReportMessage, write: Callable[[Path, bytes, int], None]) -> Path | None:
    """`message`'s ORU^R01 at DIR/<report_id>.hl7 through `write(path, data, mode)` (atomic, synced; mode 0640); None
    for a field report (only a run's reports go to the lab) or a body this smearscope cannot read
    as a report (an ERROR: the report is archived all the same). An OSError (a full disk) is the
    caller's to hold the message for."""
    try:
        kind, oru = oru_of(message.payload)
    except (ValueError, TypeError, AttributeError) as exc:
        logger.error("report %s from %s cannot be read as a report of this smearscope (%s: %s): archived, but "
                     "no HL7 message was written to %s", message.report_id, message.station, type(exc).__name__,
                     str(exc)[:300], directory)
        return None
    if kind != "specimen":
        logger.info("report %s from %s is a %s report: no HL7 message (only specimen reports go to the lab)",
                    message.report_id, message.station, kind)
        return None
    path = directory / f"{message.report_id}{SUFFIX}"
    write(path, oru.encode("utf-8"), MODE)
    logger.info("wrote the HL7 message of report %s: %s", message.report_id, path)
    return path
