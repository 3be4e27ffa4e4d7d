"""Finding archived reports: by specimen, run, station and date, the latest per run first, each with
the copies kept beside it (service.archive.copies) and the HL7 deliveries the index records of it.

Within a run the report no other archived report supersedes comes first (a verified report over the
preliminary one it replaces), then the rest, newest first; runs are ordered by their newest report.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from smearscope.service.archive.copies import ArchivedCopy, Listing, copies_of, list_folder
from smearscope.service.archive.rejections import RecordedRejection, rejections_of
from smearscope.service.archive.store import canonical_destination, open_index
from smearscope.service.hl7.identifiers import filler_order_number, placer_order_number

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedDelivery:
    """One HL7 delivery of a report as the index records it (store.Delivery, with its time)."""

    destination: str
    delivered_at: float
    sender: str
    control_id: str
    processing_id: str = "P"  # MSH-11; P in an index of version 2 (read-only, not upgraded: no such column)

    def as_json(self) -> dict[str, object]:
        return {"destination": self.destination,
                "delivered_at": datetime.fromtimestamp(self.delivered_at, timezone.utc).isoformat(),
                "sender": self.sender, "control_id": self.control_id, "processing_id": self.processing_id}


@dataclass(frozen=True)
class ArchivedReport:
    """One index row, with the report that supersedes it (if archived), its bundle's path and the
    copies beside its file (None: its folder could not be listed, `copies_error` says why)."""

    report_id: str
    station: str
    run_id: str | None
    specimen_id: str | None
    created_at: float
    kind: str
    schema_version: str
    verified: bool
    supersedes: str | None
    superseded_by: str | None
    path: Path
    fhir_path: Path | None
    copies: tuple[ArchivedCopy, ...] | None = ()
    copies_error: str | None = None
    hl7_deliveries: tuple[RecordedDelivery, ...] = ()  # oldest first; none in an index of version 1
    hl7_rejections: tuple[RecordedRejection, ...] = ()  # not accepted (service.archive.rejections), oldest first

    @property
    def not_accepted(self) -> bool:
        """A lab system did not accept it and no later delivery there closed that."""
        return any(r.open for r in self.hl7_rejections)

    def as_json(self) -> dict[str, object]:
        return {
            "report_id": self.report_id, "station": self.station, "run_id": self.run_id,
            "specimen_id": self.specimen_id,
            "created_at": datetime.fromtimestamp(self.created_at, timezone.utc).isoformat(),
            "kind": self.kind, "schema_version": self.schema_version, "verified": self.verified,
            "supersedes": self.supersedes, "superseded_by": self.superseded_by, "current": self.superseded_by is None,
            "path": str(self.path), "fhir_path": str(self.fhir_path) if self.fhir_path else None,
            "copies": None if self.copies is None else [c.as_json() for c in self.copies],
            "hl7_deliveries": [d.as_json() for d in self.hl7_deliveries],
            "hl7_rejections": [r.as_json() for r in self.hl7_rejections],
        }


def parse_since(text: str) -> float:
    """--since: a date (YYYY-MM-DD, UTC midnight) or an ISO time (UTC unless it names a zone)."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


_SELECT = """
SELECT r.*, (SELECT s.report_id FROM reports s WHERE s.supersedes = r.report_id
             ORDER BY s.created_at DESC LIMIT 1) AS superseded_by,
       b.path AS fhir
FROM reports r LEFT JOIN bundles b ON b.report_id = r.report_id
"""


def _deliveries(db: sqlite3.Connection, where: str, params: list[object]) -> dict[str, list[RecordedDelivery]]:
    """The recorded HL7 deliveries of the reports `where` selects, by report id, oldest first (none when
    the index is of version 1: opened read-only, it is not upgraded, so it has no such table)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hl7_deliveries'").fetchone() is None:
        return {}
    found: dict[str, list[RecordedDelivery]] = {}
    # a version 2 index, read-only (not upgraded), has no processing id: its deliveries were all P
    columns = {c for (_, c, *_) in db.execute("PRAGMA table_info(hl7_deliveries)")}
    processing_id = "d.processing_id" if "processing_id" in columns else "'P'"
    for row in db.execute(f"SELECT d.*, {processing_id} AS pid FROM hl7_deliveries d JOIN reports r ON r.report_id = d.report_id"
                          + where + " ORDER BY d.delivered_at, d.rowid", params):
        found.setdefault(row["report_id"], []).append(RecordedDelivery(
            canonical_destination(row["destination"]), row["delivered_at"], row["sender"], row["control_id"],
            row["pid"]))
    return found


def _row(directory: Path, row: sqlite3.Row, deliveries: dict[str, list[RecordedDelivery]],
         rejections: dict[str, list[RecordedRejection]]) -> ArchivedReport:
    return ArchivedReport(
        report_id=row["report_id"], station=row["station"], run_id=row["run_id"], specimen_id=row["specimen_id"],
        created_at=row["created_at"], kind=row["kind"], schema_version=row["schema_version"],
        verified=bool(row["verified"]), supersedes=row["supersedes"], superseded_by=row["superseded_by"],
        path=directory / row["path"], fhir_path=directory / row["fhir"] if row["fhir"] else None,
        hl7_deliveries=tuple(deliveries.get(row["report_id"], ())),
        hl7_rejections=tuple(rejections.get(row["report_id"], ())))


def find(directory: Path, specimen: str | None = None, run: str | None = None, station: str | None = None,
         since: float | None = None, not_accepted: bool = False) -> list[ArchivedReport]:
    """The matching reports, latest per run first (module docstring); `not_accepted`: only those a lab
    system did not accept (an open rejection)."""
    db = open_index(directory, read_only=True)
    try:
        where, params = [], []
        # the specimen and run as the lab system shows them too: ORC-2's and ORC-3's short forms (docs/HL7.md)
        for column, value, short in (("specimen_id", specimen, placer_order_number),
                                     ("run_id", run, filler_order_number), ("station", station, None)):
            if value is not None:
                ids = [value] if short is None else _shown_as(db, column, value, short)
                where.append(f"r.{column} IN ({', '.join('?' * len(ids))})" if ids else "0")
                params += ids
        if since is not None:
            where.append("r.created_at >= ?")
            params.append(since)
        clause = " WHERE " + " AND ".join(where) if where else ""
        deliveries, rejections = _deliveries(db, clause, params), rejections_of(db, clause, params)
        found = [_row(directory, row, deliveries, rejections) for row in db.execute(_SELECT + clause, params)]
    finally:
        db.close()
    if not_accepted:
        found = [r for r in found if r.not_accepted]
    listings: dict[Path, Listing | OSError] = {}  # each folder listed once
    found = [_with_copies(r, listings) for r in found]
    newest: dict[tuple[str, str], float] = {}
    for r in found:
        key = _run_key(r)
        newest[key] = max(newest.get(key, r.created_at), r.created_at)
    return sorted(found, key=lambda r: (-newest[_run_key(r)], _run_key(r), r.superseded_by is not None,
                                        -r.created_at, r.report_id))


def _shown_as(db: sqlite3.Connection, column: str, value: str, short: Callable[[str], str]) -> list[str]:
    """The ids in `column` that a lab system shows as `value`: `value` itself where the index holds it, else
    those whose HL7 short form (`short`) it is (each id of the column hashed: 50 000 runs in under a second)."""
    if db.execute(f"SELECT 1 FROM reports WHERE {column} = ? LIMIT 1", (value,)).fetchone() is not None:
        return [value]
    return [i for (i,) in db.execute(f"SELECT DISTINCT {column} FROM reports WHERE {column} IS NOT NULL")
            if short(i) == value]


def _run_key(r: ArchivedReport) -> tuple[str, str]:
    """A run groups its reports; a report without a run is a group of its own."""
    return (r.station, r.run_id) if r.run_id else (r.station, "report:" + r.report_id)


def lookup(directory: Path, report_id: str, copies: bool = True) -> tuple[ArchivedReport | None, Path | None]:
    """The report's index row (None: not archived) and its bundle's path (None: no bundle; a bundle
    may be archived before its report arrives). `copies`: the report's copies looked for (its
    folder listed); without, the row's `copies` is None, not looked for (`archive show --fhir`
    lists the bundle's instead)."""
    db = open_index(directory, read_only=True)
    try:
        row = db.execute(_SELECT + " WHERE r.report_id = ?", (report_id,)).fetchone()
        deliveries = _deliveries(db, " WHERE r.report_id = ?", [report_id])
        rejections = rejections_of(db, " WHERE r.report_id = ?", [report_id])
        bundle = db.execute("SELECT path FROM bundles WHERE report_id = ?", (report_id,)).fetchone()
    finally:
        db.close()
    report = _row(directory, row, deliveries, rejections) if row is not None else None
    if report is not None:
        report = _with_copies(report, {}) if copies else replace(report, copies=None, copies_error="not looked for")
    return (report,
            directory / bundle["path"] if bundle is not None else None)


def _with_copies(report: ArchivedReport, listings: dict[Path, Listing | OSError]) -> ArchivedReport:
    """`report` with the copies beside its file, its folder listed once per `listings`."""
    folder = report.path.parent
    if folder not in listings:
        try:
            listings[folder] = list_folder(folder)
        except OSError as exc:
            listings[folder] = exc
    listing = listings[folder]
    if isinstance(listing, OSError):
        return replace(report, copies=None, copies_error=f"{folder} cannot be listed ({listing.strerror or listing})")
    return replace(report, copies=copies_of(report.path, report.report_id, listing=listing))
