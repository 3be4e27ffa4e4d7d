"""Sending archived reports to the lab from the archive's index (`smearscope archive send-hl7`): the
reports stored before the HL7 output was set up, or while it pointed elsewhere.

Each specimen report the index holds (made on or after `since`, oldest first, so a lab system gets
a run's preliminary report before its verified one) is written and/or sent as the running archive
does (service.archive.hl7_out), and each delivery recorded in the index at once, in its own
transaction. A report with a delivery recorded to a destination (by the running archive or by an
earlier send) with the same processing id (MSH-11) is not delivered there again unless `again`: one
sent there in training (T) or debugging (D) is not delivered in production (P), and is sent as P. A message the
lab system rejects (AR, CR) is recorded as not accepted and the send goes on; one recorded so is sent again
only when `resend` names it. Each delivery is claimed in the index first (service.archive.claims), so two
sends at once deliver a report to a destination once. The first delivery that fails otherwise stops the
send: what was delivered before it is recorded, so the same command run again goes on from there.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smearscope.service.archive.claims import claim, release
from smearscope.service.archive.hl7_out import UNREADABLE, Hl7Output, oru_of, unreadable_reason
from smearscope.service.archive.rejections import HELD, Rejection, open_rejection, record_rejections
from smearscope.service.archive.store import (
    INDEX_NAME,
    canonical_destination,
    open_index,
    open_index_query_only,
    record_deliveries,
    whole_ids_run,
)
from smearscope.service.hl7.mllp import Rejected

logger = logging.getLogger(__name__)

#: A claim of another host stands for one exchange's bound and this long (service.archive.claims).
CLAIM_MARGIN_S = 60.0


@dataclass(frozen=True)
class SendResult:
    """What one send did: deliveries made, ones skipped as made before, reports that cannot be read
    (or are gone), messages the lab system rejected now (recorded), ones skipped as not accepted there
    before (rejected or held: `--resend`), ones another send was delivering (claimed: service.archive.claims),
    and the error that stopped it (None: it went through)."""

    delivered: int
    already: int
    unreadable: int
    stopped_by: str | None
    rejected: int = 0
    not_accepted: int = 0
    in_flight: int = 0


def not_archived(directory: Path, report_ids: tuple[str, ...]) -> list[str]:
    """The ones of `report_ids` that are no specimen report of the archive at `directory`, read from its index
    with writes refused (nothing made, upgraded or left in the folder: a mistyped `--resend` changes nothing);
    FileNotFoundError when the folder holds no archive."""
    db = open_index_query_only(directory.resolve())
    try:
        return sorted(report_id for report_id in set(report_ids) if db.execute(
            "SELECT 1 FROM reports WHERE report_id = ? AND kind = 'specimen'", (report_id,)).fetchone() is None)
    finally:
        db.close()


def send_from_index(directory: Path, output: Hl7Output, since: float | None, again: bool = False,
                    progress: Callable[[str], None] | None = None, resend: tuple[str, ...] = ()) -> SendResult:
    """Deliver the archived specimen reports made on or after `since` (None: all) to each of `output`'s
    destinations where the index records no delivery of them (`again`: to each, whatever it records).
    A report the index records as not accepted there (rejected, or held behind its original) is skipped,
    unless `resend` names it; with `resend`, only those reports go, then the ones held behind them."""
    if not (directory / INDEX_NAME).is_file():  # not made here: a mistyped --dir is no new archive
        raise FileNotFoundError(f"no archive at {directory} ({INDEX_NAME} not there)")
    db = open_index(directory.resolve(), read_only=False)  # upgrades a version 1 index
    delivered = already = unreadable = rejected = skipped = in_flight = 0
    pid = output.processing_id
    try:
        rows = db.execute("SELECT report_id, path, supersedes FROM reports WHERE kind = 'specimen' AND "
                          "created_at >= ? ORDER BY created_at, report_id",
                          (since if since is not None else float("-inf"),)).fetchall()
        missing = set(resend) - {report_id for report_id, _, _ in rows}
        if missing:
            raise FileNotFoundError(f"no archived specimen report {', '.join(sorted(missing))} in {directory}")
        for report_id, relative, supersedes in rows:
            done = {canonical_destination(d) for (d,) in db.execute(
                "SELECT DISTINCT destination FROM hl7_deliveries WHERE report_id = ? AND processing_id = ?",
                (report_id, pid))}
            todo = []
            for d in output.destinations:
                refused = open_rejection(db, report_id, d, pid)
                if resend and report_id not in resend and refused != HELD:
                    continue  # --resend: those named, and the ones held behind them
                if refused is not None and report_id not in resend and not again and (
                        refused != HELD or _original_refused(db, supersedes, d, pid)):
                    skipped += 1
                elif again or d not in done or (report_id in resend and refused is not None):
                    todo.append(d)
                else:
                    already += 1
            if not todo:
                continue
            path = directory / relative
            try:
                _, oru, control_id = oru_of(path.read_bytes(), output.addressing, lambda run: whole_ids_run(db, run))
            except (OSError, *UNREADABLE) as exc:
                unreadable += 1
                logger.error("report %s at %s cannot be read as a report of this smearscope (%s: %s): not sent",
                             report_id, path, type(exc).__name__, unreadable_reason(exc))
                continue
            for destination in todo:
                original = _original_refused(db, supersedes, destination, pid)
                if original is not None:  # an amended report never overtakes its original
                    why = f"the report it supersedes, {supersedes}, was not accepted there ({original})"
                    if report_id in resend:
                        return SendResult(delivered, already, unreadable, f"report {report_id} to {destination}: "
                                          f"{why}: --resend {supersedes} first", rejected, skipped, in_flight)
                    if open_rejection(db, report_id, destination, pid) == HELD:  # recorded once while it stands
                        logger.error("report %s is NOT sent to %s: %s; held there (recorded before)", report_id,
                                     destination, why)
                    else:
                        logger.error("report %s is NOT sent to %s: %s; recorded as held there", report_id,
                                     destination, why)
                        with db:
                            record_rejections(db, [Rejection(report_id, destination, control_id, output.sender, pid,
                                                             HELD, why)])
                    skipped += 1
                    continue
                # checked again with the claim: another send may have delivered it since, or be delivering it
                taken = claim(db, report_id, destination, pid, again, output.mllp_timeout_s + CLAIM_MARGIN_S,
                            canonical_destination)
                if taken is not None:
                    if taken == "delivered":
                        already += 1
                    else:
                        in_flight += 1
                        logger.warning("report %s is being delivered to %s by another send-hl7 (claimed in the "
                                       "index): left to it", report_id, destination)
                    continue
                try:
                    delivery = output.deliver(destination, report_id, oru, control_id)
                except Rejected as exc:
                    with db:
                        record_rejections(db, [output.rejection(destination, report_id, control_id, exc)])
                        release(db, report_id, destination, pid)
                    rejected += 1
                    continue
                except OSError as exc:
                    with db:
                        release(db, report_id, destination, pid)
                    return SendResult(delivered, already, unreadable,
                                      f"report {report_id} to {destination}: {type(exc).__name__}: {exc}",
                                      rejected, skipped, in_flight)
                with db:  # the record and the claim's end in one transaction
                    record_deliveries(db, [delivery])
                    release(db, report_id, destination, pid)
                delivered += 1
                if progress is not None:
                    progress(f"{report_id} -> {destination} (MSH-10 {control_id})")
    finally:
        db.close()
    return SendResult(delivered, already, unreadable, None, rejected, skipped, in_flight)


def _original_refused(db: sqlite3.Connection, supersedes: str | None, destination: str, pid: str) -> str | None:
    """The code of the open rejection of the report `supersedes` names at `destination` (None: none)."""
    if supersedes is None or not destination.startswith("mllp:"):
        return None
    return open_rejection(db, supersedes, destination, pid)
