"""What the archive accepts: a station's report envelope or FHIR bundle, read into a frozen record,
or refused with the reason said in one line.

Anything that reaches a path is checked here first: the station id (the topic level) and the report
id must be plain names, so no message can name a file outside the archive folder.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from smearscope.service.fhir.codes import ID_REPORT

logger = logging.getLogger(__name__)

#: A station id, as the station itself accepts one (service.mqtt.publisher); matched whole
#: (fullmatch: `$` would let a trailing newline through).
STATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A report id that is a plain file name: the station's are UUIDs.
REPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
#: The report schema versions this archive knows (schemas/report.schema.json); a report of another
#: is stored as received all the same, with a warning: it is the lab's record.
KNOWN_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5")
#: Short text fields stored in the index (run and specimen ids, schema version, kind).
MAX_FIELD_CHARS = 256


class Refused(ValueError):
    """A message the archive will not store; the text says why, for the log."""


@dataclass(frozen=True)
class ReportMessage:
    """A report envelope as received, with what the index keeps of it."""

    station: str
    report_id: str
    message_id: str | None
    run_id: str | None
    specimen_id: str | None
    created_at: float
    kind: str
    schema_version: str
    supersedes: str | None
    verified: bool
    payload: bytes

    @property
    def month(self) -> str:
        return datetime.fromtimestamp(self.created_at, timezone.utc).strftime("%Y-%m")


@dataclass(frozen=True)
class BundleMessage:
    """A FHIR bundle as received, identified by its report's id."""

    station: str
    report_id: str
    month: str
    payload: bytes


def station_of(topic: str, prefix: str, leaf: str) -> str:
    """The station id in `<prefix>/<station>/<leaf>`, refused when it is no plain station id."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != prefix or parts[2] != leaf:
        raise Refused(f"topic {topic[:200]!r} is not {prefix}/<station>/{leaf}")
    if not STATION_ID.fullmatch(parts[1]):
        raise Refused(f"station id {parts[1][:80]!r} in the topic is not a station id ([A-Za-z0-9_-], 1 to 64)")
    return parts[1]


def _object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refused(f"not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise Refused(f"{what} is a JSON {type(doc).__name__}, not an object")
    return doc


def _text(doc: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_CHARS:
        raise Refused(f"{where}.{key} is {str(value)[:80]!r}, not text of 1 to {MAX_FIELD_CHARS} characters")
    try:  # JSON's \ud800 escapes give lone surrogates, which the index (UTF-8) cannot hold
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(f"{where}.{key} is {value[:80]!r}, not text (a lone surrogate)") from None
    return value


def report_id_checked(value: str | None, where: str) -> str:
    if value is None or not REPORT_ID.fullmatch(value):
        raise Refused(f"{where} {str(value)[:80]!r} is not a report id ([A-Za-z0-9_.:-], up to 128, "
                      "starting with a letter or digit)")
    return value


def read_report(station: str, payload: bytes) -> ReportMessage:
    """The report envelope (docs/MQTT.md) from `station`'s report topic; Refused if it is not one."""
    envelope = _object(payload, "the message")
    if envelope.get("kind") != "report":
        raise Refused(f"envelope kind {str(envelope.get('kind'))[:40]!r} is not 'report' (no report envelope)")
    said = envelope.get("station_id")
    if said != station:
        raise Refused(f"envelope station_id {str(said)[:80]!r} is not the topic's station {station!r}")
    report_id = report_id_checked(_text(envelope, "report_id", "envelope"), "envelope report_id")
    body = envelope.get("body")
    if not isinstance(body, dict):
        raise Refused("envelope has no report body (a JSON object)")
    if body.get("report_id") != report_id:
        raise Refused(f"body report_id {str(body.get('report_id'))[:80]!r} is not the envelope's {report_id!r}")
    if body.get("station_id") not in (None, station):  # its HL7 would name that station (MSH-4, OBX-18)
        raise Refused(f"body station_id {str(body.get('station_id'))[:80]!r} is not the topic's station {station!r}")
    created_at = body.get("created_at")
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)) or not math.isfinite(created_at) \
            or not 0 <= created_at < 253402300800:  # before year 10000: a month folder
        raise Refused(f"body created_at {str(created_at)[:40]!r} is not a time (seconds since 1970)")
    verification = body.get("verification")
    if verification is not None and not isinstance(verification, dict):
        raise Refused("body verification is not an object")
    supersedes = None
    if verification is not None and verification.get("supersedes") is not None:
        supersedes = report_id_checked(_text(verification, "supersedes", "verification"), "verification.supersedes")
    schema_version = _text(envelope, "schema_version", "envelope", required=True) or ""
    if schema_version not in KNOWN_SCHEMA_VERSIONS:
        logger.warning("report %s from %s has schema version %r, not one this archive knows (%s): stored as "
                       "received; a newer smearscope reads it", report_id, station, schema_version[:40],
                       ", ".join(KNOWN_SCHEMA_VERSIONS))
    return ReportMessage(
        station=station, report_id=report_id,
        message_id=_text(envelope, "message_id", "envelope"),
        run_id=_text(body, "run_id", "body"), specimen_id=_text(body, "specimen_id", "body"),
        created_at=float(created_at), kind=_text(body, "kind", "body", required=True) or "",
        schema_version=schema_version,
        supersedes=supersedes, verified=verification is not None, payload=payload)


def read_bundle(station: str, payload: bytes) -> BundleMessage:
    """A station's FHIR bundle (docs/FHIR.md: its identifier is the report id); Refused if not one."""
    bundle = _object(payload, "the bundle")
    if bundle.get("resourceType") != "Bundle":
        raise Refused(f"resourceType {str(bundle.get('resourceType'))[:40]!r} is not 'Bundle'")
    identifier = bundle.get("identifier")
    if not isinstance(identifier, dict) or identifier.get("system") != ID_REPORT:
        raise Refused(f"bundle identifier is not a smearscope report id (system {ID_REPORT})")
    report_id = report_id_checked(identifier.get("value"), "bundle identifier")
    stamp = bundle.get("timestamp")
    try:
        when = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
        month = when.astimezone(timezone.utc).strftime("%Y-%m") if when is not None and when.tzinfo else None
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved past the calendar's ends
        month = None
    if month is None:
        raise Refused(f"bundle timestamp {str(stamp)[:40]!r} is not an ISO time with its zone")
    return BundleMessage(station=station, report_id=report_id, month=month, payload=payload)
