"""HL7 messages a lab system did not accept, as the archive's index records them (`hl7_rejections`).

A receiver's AR or CR (application or commit reject) refuses the message itself: sending it again
unchanged cannot help, so it is final for that message, recorded here with the receiver's text
(MSA-3, ERR) and the archive goes on with the next reports. An AE or CE (a transient error), or an
answer that is no ACK of the message (over 1 MiB, not an ACK: its reason the code), is tried again,
and recorded here only once such answers have come for `hl7_mllp_error_hold_s` (from one to the next:
not while the lab system cannot be reached: an answer after an outage counts from the last try that found none). A report
that supersedes one not accepted at a destination is not sent there either (`held`): an amended
report never overtakes its original. Rows are kept, never deleted: a later delivery of the same
report to the same destination and processing id (`smearscope archive send-hl7 --resend`), or in
production (P) whatever the rejected one's, closes one (`closed_at` set as the delivery is
recorded, so a clock set back meanwhile cannot leave it open; a row without it, of an index that
had no such column, is closed by a delivery recorded at or after its time), and `archive find`
lists both.

How long a report not yet stored has been answered AE/CE at a destination (`hl7_error_holds`: the
archive's running time, so neither a clock change nor a restart gives it the whole hold again) is
kept until its row is committed.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS hl7_rejections (
    report_id TEXT NOT NULL, destination TEXT NOT NULL, control_id TEXT NOT NULL, rejected_at REAL NOT NULL,
    sender TEXT NOT NULL, processing_id TEXT NOT NULL, code TEXT NOT NULL, lis_text TEXT NOT NULL,
    closed_at REAL);
CREATE INDEX IF NOT EXISTS hl7_rejections_report ON hl7_rejections (report_id, destination);
CREATE TABLE IF NOT EXISTS hl7_error_holds (
    report_id TEXT NOT NULL, destination TEXT NOT NULL, processing_id TEXT NOT NULL, held_s REAL NOT NULL,
    PRIMARY KEY (report_id, destination, processing_id));
"""

#: The code of a report not sent because the report it supersedes was not accepted there.
HELD = "held"


@dataclass(frozen=True)
class Rejection:
    """One HL7 message not accepted at a destination: `code` the receiver's MSA-1 (AR, CR; AE or CE once
    given up on) or HELD; `lis_text` what the receiver said (MSA-3, ERR), or why it was held."""

    report_id: str
    destination: str
    control_id: str
    sender: str
    processing_id: str
    code: str
    lis_text: str


@dataclass(frozen=True)
class RecordedRejection:
    """A rejection as the index records it; `open` while no later delivery of the report there closed it."""

    destination: str
    rejected_at: float
    sender: str
    control_id: str
    processing_id: str
    code: str
    lis_text: str
    open: bool

    def as_json(self) -> dict[str, object]:
        from datetime import datetime, timezone

        return {"destination": self.destination,
                "rejected_at": datetime.fromtimestamp(self.rejected_at, timezone.utc).isoformat(),
                "sender": self.sender, "control_id": self.control_id, "processing_id": self.processing_id,
                "code": self.code, "lis_text": self.lis_text, "open": self.open}


def record_rejections(db: sqlite3.Connection, rejections: list[Rejection]) -> None:
    """Add `rejections` to the index (in the caller's transaction; destinations already canonical)."""
    db.executemany("INSERT INTO hl7_rejections (report_id, destination, control_id, rejected_at, sender, "
                   "processing_id, code, lis_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [(r.report_id, r.destination, r.control_id, time.time(), r.sender, r.processing_id, r.code,
                     r.lis_text) for r in rejections])


def add_closed_at(db: sqlite3.Connection) -> None:
    """The table as made before rejections were closed explicitly gets its `closed_at` column (in place, in
    the caller's transaction)."""
    columns = {c for (_, c, *_) in db.execute("PRAGMA table_info(hl7_rejections)")}
    if columns and "closed_at" not in columns:
        db.execute("ALTER TABLE hl7_rejections ADD COLUMN closed_at REAL")


def close_rejections(db: sqlite3.Connection, deliveries: list[tuple[str, str, str]]) -> None:
    """Each (report id, destination, processing id) delivered: its open rejections there are closed (in the
    caller's transaction, with the delivery's row). A production (P) delivery closes those of training and
    debugging too (the lab system has the report: one rejected while it validated the interface is not
    listed for ever); a T or D delivery closes only its own, never a production rejection."""
    db.executemany("UPDATE hl7_rejections SET closed_at = ? WHERE report_id = ? AND destination = ? AND "
                   "(processing_id = ? OR ? = 'P') AND closed_at IS NULL",
                   [(time.time(), report_id, destination, pid, pid) for report_id, destination, pid in deliveries])


#: A rejection a smearscope before `closed_at` recorded is closed by a delivery recorded at or after it.
_OPEN = """NOT EXISTS (SELECT 1 FROM hl7_deliveries d WHERE d.report_id = j.report_id
                   AND d.destination = j.destination AND d.processing_id = j.processing_id
                   AND d.delivered_at >= j.rejected_at)"""


def _open(db: sqlite3.Connection) -> str | None:
    """What holds for an open rejection `j` in this index (None: it has no such table: read-only and
    made before rejections were recorded)."""
    columns = {c for (_, c, *_) in db.execute("PRAGMA table_info(hl7_rejections)")}
    if not columns:
        return None
    return f"j.closed_at IS NULL AND {_OPEN}" if "closed_at" in columns else _OPEN


def open_rejection(db: sqlite3.Connection, report_id: str, destination: str, processing_id: str) -> str | None:
    """The code of the latest rejection of `report_id` at `destination` no delivery has closed since
    (None: none open): the one recorded last (rows are never deleted, so the rowid orders them even where
    the clock was set back between two)."""
    if (is_open := _open(db)) is None:
        return None
    row = db.execute(f"SELECT code FROM hl7_rejections j WHERE report_id = ? AND destination = ? AND "
                     f"processing_id = ? AND {is_open} ORDER BY j.rowid DESC LIMIT 1",
                     (report_id, destination, processing_id)).fetchone()
    return None if row is None else str(row[0])


def open_count(db: sqlite3.Connection) -> int:
    """How many reports have a rejection no delivery has closed since, at any destination."""
    if (is_open := _open(db)) is None:
        return 0
    return int(db.execute(f"SELECT count(DISTINCT report_id) FROM hl7_rejections j WHERE {is_open}").fetchone()[0])


def error_held(db: sqlite3.Connection, report_id: str, destination: str, processing_id: str) -> float:
    """Seconds `report_id` has been answered AE/CE at `destination` before (0: never; by earlier runs too)."""
    row = db.execute("SELECT held_s FROM hl7_error_holds WHERE report_id = ? AND destination = ? AND "
                     "processing_id = ?", (report_id, destination, processing_id)).fetchone()
    return 0.0 if row is None else float(row[0])


def record_error_held(db: sqlite3.Connection, report_id: str, destination: str, processing_id: str,
                      held_s: float) -> None:
    """Keep that `report_id` has been answered AE/CE at `destination` for `held_s` in all (its own transaction)."""
    with db:
        db.execute("INSERT OR REPLACE INTO hl7_error_holds VALUES (?, ?, ?, ?)",
                   (report_id, destination, processing_id, held_s))


def forget_error_held(db: sqlite3.Connection, report_id: str) -> None:
    """`report_id` is stored (delivered or recorded as not accepted): its AE/CE time is no longer needed
    (in the caller's transaction, with the report's row)."""
    db.execute("DELETE FROM hl7_error_holds WHERE report_id = ?", (report_id,))


def rejections_of(db: sqlite3.Connection, where: str, params: list[object]) -> dict[str, list[RecordedRejection]]:
    """The recorded rejections of the reports `where` selects (over `reports r`), by report id, oldest first."""
    if (is_open := _open(db)) is None:
        return {}
    found: dict[str, list[RecordedRejection]] = {}
    for row in db.execute(f"SELECT j.*, {is_open} AS still FROM hl7_rejections j JOIN reports r "
                          "ON r.report_id = j.report_id" + where + " ORDER BY j.rejected_at, j.rowid", params):
        found.setdefault(row["report_id"], []).append(RecordedRejection(
            row["destination"], row["rejected_at"], row["sender"], row["control_id"], row["processing_id"],
            row["code"], row["lis_text"], bool(row["still"])))
    return found
