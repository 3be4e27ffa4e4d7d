"""Sending archived reports to the lab from the archive's index (`smearscope archive send-hl7`): the
reports stored before the HL7 output was set up, or while it pointed elsewhere.

Each specimen report the index holds (made on or after `since`, oldest first, so a lab system gets
a run's preliminary report before its verified one) is written and/or sent as the running archive
does (service.archive.hl7_out), and each delivery recorded in the index at once, in its own
transaction. A report with a delivery recorded to a destination (by the running archive or by an
earlier send) with the same processing id (MSH-11) is not delivered there again unless `again`: one
sent there in training (T) or debugging (D) is not delivered in production (P), and is sent as P. The first delivery that fails stops the
send: what was delivered before it is recorded, so the same command run again goes on from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smearscope.service.archive.hl7_out import UNREADABLE, Hl7Output, oru_of, unreadable_reason
from smearscope.service.archive.store import (
    INDEX_NAME,
    canonical_destination,
    open_index,
    record_deliveries,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    """What one send did: deliveries made, ones skipped as made before, reports that cannot be read
    (or are gone), and the error that stopped it (None: it went through)."""

    delivered: int
    already: int
    unreadable: int
    stopped_by: str | None


def send_from_index(directory: Path, output: Hl7Output, since: float | None, again: bool = False,
                    progress: Callable[[str], None] | None = None) -> SendResult:
    """Deliver the archived specimen reports made on or after `since` (None: all) to each of `output`'s
    destinations where the index records no delivery of them (`again`: to each, whatever it records)."""
    if not (directory / INDEX_NAME).is_file():  # not made here: a mistyped --dir is no new archive
        raise FileNotFoundError(f"no archive at {directory} ({INDEX_NAME} not there)")
    db = open_index(directory.resolve(), read_only=False)  # upgrades a version 1 index
    delivered = already = unreadable = 0
    try:
        rows = db.execute("SELECT report_id, path FROM reports WHERE kind = 'specimen' AND created_at >= ? "
                          "ORDER BY created_at, report_id", (since if since is not None else float("-inf"),)
                          ).fetchall()
        for report_id, relative in rows:
            done = {canonical_destination(d) for (d,) in db.execute(
                "SELECT DISTINCT destination FROM hl7_deliveries WHERE report_id = ? AND processing_id = ?",
                (report_id, output.processing_id))}
            todo = [d for d in output.destinations if again or d not in done]
            already += len(output.destinations) - len(todo)
            if not todo:
                continue
            path = directory / relative
            try:
                _, oru, control_id = oru_of(path.read_bytes(), output.addressing)
            except (OSError, *UNREADABLE) as exc:
                unreadable += 1
                logger.error("report %s at %s cannot be read as a report of this smearscope (%s: %s): not sent",
                             report_id, path, type(exc).__name__, unreadable_reason(exc))
                continue
            for destination in todo:
                try:
                    delivery = output.deliver(destination, report_id, oru, control_id)
                except OSError as exc:
                    return SendResult(delivered, already, unreadable,
                                      f"report {report_id} to {destination}: {type(exc).__name__}: {exc}")
                with db:
                    record_deliveries(db, [delivery])
                delivered += 1
                if progress is not None:
                    progress(f"{report_id} -> {destination} (MSH-10 {control_id})")
    finally:
        db.close()
    return SendResult(delivered, already, unreadable, None)
