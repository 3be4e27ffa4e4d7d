"""A technician's verification (verify_run), kept in the station's outbox file before it is answered.

The verified report goes to the outbox writer's thread, which stores it after the answer. Until
then the whole report (who signed, when, the report it supersedes, the types counted, its cells)
waits in the table `answered_verifications`, written on the analysis thread before the answer and
deleted in the transaction that stores the report (StationState.run_closed). A start that finds
one stores it under the answered id (service.station.report_writer), so a crash, a power cut or a
stop on a full disk in between never loses a signature the station answered ok. A run with a
verification waiting is not pruned from the last closed runs until it is stored.
"""

from __future__ import annotations

import logging
import sqlite3

from smearscope.service.analysis.report import Report
from smearscope.service.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)

#: An earlier version opening the file ignores the table (sends nothing of it; a later start stores it).
SCHEMA = """CREATE TABLE IF NOT EXISTS answered_verifications (
    report_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, verified_by TEXT NOT NULL, verified_at REAL NOT NULL,
    supersedes TEXT NOT NULL, report TEXT NOT NULL)"""


def keep_verification(outbox: Outbox, report: Report) -> bool:
    """The verified report, kept before the command is answered; False when the file refuses the
    write (a full disk; logged), and the verification must then be refused."""
    verification = report.verification
    assert verification is not None and report.run_id is not None
    try:
        outbox.write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO answered_verifications VALUES (?, ?, ?, ?, ?, ?)",
            (report.report_id, report.run_id, verification.verified_by, verification.verified_at,
             verification.supersedes, report.model_dump_json())))
    except (sqlite3.Error, OSError) as exc:
        logger.error("run %s: the verification signed by %r could not be kept in the outbox file (%s); "
                     "refused, nothing signed", report.run_id, verification.verified_by, exc)
        return False
    return True


def waiting_verifications(outbox: Outbox) -> list[tuple[Report, str | None]]:
    """The verified reports answered but not stored, in the order answered, each with the id of
    the report its run holds now (None: no closed run of that id)."""
    rows = outbox.read(lambda conn: conn.execute(
        "SELECT v.report_id, v.run_id, v.report, (SELECT json_extract(c.report, '$.report_id') FROM closed_runs c "
        "WHERE c.run_id = v.run_id) FROM answered_verifications v ORDER BY v.rowid").fetchall())
    out = []
    for report_id, run_id, text, holds in rows:
        try:
            out.append((Report.model_validate_json(text), holds))
        except ValueError as exc:
            logger.error("run %s: the verified report %s kept before its answer cannot be read (%s); left in the "
                         "outbox file's table answered_verifications", run_id, report_id, exc)
    return out


def drop_verification(outbox: Outbox, report_id: str) -> None:
    """A verification that no longer follows its run's report (signed again by another version)."""
    outbox.write(lambda conn: conn.execute("DELETE FROM answered_verifications WHERE report_id = ?", (report_id,)))
