"""The archive's HL7 output: each specimen report it stores also written as an HL7 v2.5.1 ORU^R01
file, `<report_id>.hl7` in the folder an interface engine reads (`--hl7-dir`), and/or sent to a
lab system over MLLP, its ACK awaited (`--hl7-mllp`).

Both happen before the report's index row is committed, so before the broker has its
acknowledgement: a file the disk refuses, or a message the receiver does not acknowledge (AA or
CA), is an OSError, and the archive holds the report (unacknowledged, tried again) as it holds one
a full disk refuses. A message the receiver rejects (AR, CR), or answers AE/CE for `error_hold_s`,
is final for it: recorded as not accepted (service.archive.rejections) with the report's row, and
the archive goes on; a report superseding one not accepted there is held back, not sent. An archive that dies before the row is committed gets the report again and
writes and sends the same message again (the same bytes, the same MSH-10). While a report is held,
the destinations that took it are not given it again (only the refusing one is tried again). A report delivered again
once indexed is neither written nor sent again: the engine may have taken the first file away.
Each delivery (a file written, a message acknowledged) is recorded in the index with the report's
row (store.Delivery), so `smearscope archive send-hl7` (service.archive.send_hl7) sends from the index
only what was not delivered there.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from smearscope.files import remove_unless_written, write_atomically
from smearscope.service.archive.message import ReportMessage
from smearscope.service.archive.rejections import HELD, Rejection
from smearscope.service.archive.store import ArchiveStore, Delivery, canonical_destination
from smearscope.service.hl7 import mllp
from smearscope.service.hl7.header import Addressing

logger = logging.getLogger(__name__)

SUFFIX = ".hl7"
#: The files' mode: the interface engine reads them as a member of the folder's group (docs/HL7.md).
MODE = 0o640
#: A temporary file of write_atomically's for a message (mkstemp's prefix and suffix, its 8 random characters).
_LEFTOVER = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\.hl7\.[A-Za-z0-9_]{8}\.tmp")
#: What a body this smearscope cannot read as a report raises (pydantic's ValidationError is a ValueError).
UNREADABLE = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def oru_of(payload: bytes, addressing: Addressing | None = None,
           whole_ids: Callable[[str], bool] | None = None) -> tuple[str, str, str]:
    """(the report's kind, its ORU^R01 message, its control id) from an archived envelope; one of
    UNREADABLE when its body is not a report this smearscope reads. `whole_ids` (the index's
    store.whole_ids_run): whether a run's messages carry its specimen and run ids whole, as an earlier
    smearscope delivered one of its reports."""
    # imported here: the report model and the FHIR mapping pull numpy and OpenCV in, which the
    # archive needs only when it makes HL7
    from smearscope.service.analysis.report import Report
    from smearscope.service.hl7.oru import control_id, oru_r01

    body = json.loads(payload).get("body")
    report = Report.model_validate(body)
    whole = whole_ids is not None and whole_ids(report.run_id or report.report_id)
    try:
        return (report.kind, oru_r01(report, addressing, whole_ids=whole),
                control_id(report.report_id, (addressing or Addressing()).processing_id))
    except (OverflowError, OSError) as exc:
        # a time no calendar holds (a run of 10**20 s): `datetime` says EOVERFLOW as an OSError, which the
        # archive would take for a disk refusing the file and hold the report, and those behind it, for ever
        raise ValueError(f"a time out of the calendar's range ({type(exc).__name__}: {exc})") from exc


def unreadable_reason(exc: BaseException) -> str:
    """Why a body cannot be read, for a log line or a terminal: pydantic's text quotes the body's own keys
    as they are and spans lines; its first 300 characters on one line, control, bidi and other invisible
    characters shown as \\xNN / \\uNNNN (mllp.shown)."""
    return mllp.shown(str(exc)[:300])


class Hl7FolderError(OSError):
    """The HL7 folder cannot be made (under a plain file, a read-only file system): said as such, not as
    the archive folder failing."""


class DropFolderLinked(OSError):
    """The HL7 folder, a folder when the archive started, is a symbolic link now: nothing is written
    through it (held, as a full folder holds a report), wherever it leads."""

    def __init__(self, directory: Path) -> None:
        try:
            target = str(directory.readlink())
        except OSError:
            target = "?"
        super().__init__(errno.ELOOP, f"the HL7 folder {directory} was replaced by a symbolic link (to {target}): "
                         "nothing is written through it; put the folder back, or restart the archive with "
                         "--hl7-dir naming where the files should go")


class Hl7Output:
    """Called with each new report before its row is committed (ArchiveStore's `on_new_report`)."""

    def __init__(self, directory: Path | None, mllp_address: tuple[str, int] | None, mllp_timeout_s: float,
                 addressing: Addressing | None = None, sender: str = "archive",
                 stop: threading.Event | None = None, error_hold_s: float = 600.0) -> None:
        self.directory = directory.resolve() if directory is not None else None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise Hl7FolderError(f"cannot make the HL7 folder {self.directory} (--hl7-dir): "
                                     f"{exc.strerror or exc}") from exc
        self.mllp_address = mllp_address
        self.mllp_timeout_s = mllp_timeout_s
        self.addressing = addressing
        self.sender = sender
        self.stop = stop  # set: a send waiting for its ACK gives up (the archive stopping)
        self.error_hold_s = error_hold_s  # an AE/CE answered this long is given up on (recorded, not held)
        #: (report id, destination, processing id) -> the code of its open rejection there (the index's), or None
        self.not_accepted: Callable[[str, str, str], str | None] | None = None
        #: run id -> whether its messages carry the ids whole (the index's store.whole_ids_run), or None
        self.whole_ids: Callable[[str], bool] | None = None
        #: the seconds a report has been answered AE/CE at a destination, by earlier runs too, and keeping
        #: that total (the index's): a restart does not give a report the whole hold again
        self.error_held: Callable[[str, str, str], float] | None = None
        self.record_error_held: Callable[[str, str, str, float], None] | None = None
        # the report held, its deliveries (and rejections) made so far, and how long a receiver has answered it
        # with errors (the seconds held so far, and the monotonic time of the last error answer: None while
        # paused, the receiver not answering at all since)
        self._held: tuple[str, list[Delivery | Rejection]] | None = None
        self._erring: tuple[float, float | None] | None = None

    def use_index(self, store: ArchiveStore) -> None:
        """Consult the running archive's index: an amended report waits behind its original not accepted
        there, a run an earlier smearscope sent with its ids whole keeps them, and a report answered AE/CE
        keeps the time it has been held over a restart (docs/HL7.md)."""
        self.not_accepted = store.not_accepted
        self.whole_ids = store.whole_ids
        self.error_held, self.record_error_held = store.error_held, store.record_error_held

    def remove_leftovers(self) -> None:
        """The temporary files of writes a crash interrupted (`.<report_id>.hl7.<random>.tmp`: their report
        was never acknowledged, so it comes again): an engine taking `*.hl7` never removes them, and they
        hold patient data. Called by the running archive at start only; one a `send-hl7` beside it is writing
        (locked by write_atomically until renamed) is left to it, where removing it failed that delivery."""
        if self.directory is None or self.directory.is_symlink():
            return
        try:
            entries = list(self.directory.iterdir())
        except OSError as exc:  # a folder it may write but not list: its writes say what is wrong
            logger.warning("cannot list the HL7 folder %s for temporary files left by a killed write: %s",
                           self.directory, exc)
            return
        for entry in entries:
            if _LEFTOVER.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                try:
                    if remove_unless_written(entry):
                        logger.info("removed %s, left by an interrupted write", entry)
                    else:  # removing it would fail that delivery
                        logger.info("left %s: a write under way (smearscope archive send-hl7 beside the archive)",
                                    entry)
                except FileNotFoundError:
                    pass  # renamed by its write meanwhile
                except OSError as exc:
                    logger.warning("left %s (a temporary file of a write to the HL7 folder, killed or still "
                                   "under way): it cannot be opened to tell which (%s)", entry, exc)

    @property
    def processing_id(self) -> str:
        """MSH-11 of the messages (P, T or D): part of what the index records of a delivery."""
        return (self.addressing or Addressing()).processing_id

    @property
    def destinations(self) -> list[str]:
        """Where messages go, as the index records a delivery: `file:<folder>`, `mllp:<host>:<port>`
        (store.canonical_destination: an IPv6 address in brackets, compressed)."""
        out = [f"file:{self.directory}"] if self.directory is not None else []
        return out + ([canonical_destination(f"mllp:{mllp.address_text(self.mllp_address)}")]
                      if self.mllp_address else [])

    def deliver(self, destination: str, report_id: str, oru: str, control_id: str) -> Delivery:
        """Write or send one message to one of `destinations`; OSError when it is not delivered."""
        if destination.startswith("file:") and self.directory is not None:
            if self.directory.is_symlink():  # it was a folder at start (resolved): not written through a link
                raise DropFolderLinked(self.directory)
            path = self.directory / f"{report_id}{SUFFIX}"
            write_atomically(path, oru.encode("utf-8"), MODE)
            logger.info("wrote the HL7 message of report %s: %s", report_id, path)
        elif destination.startswith("mllp:") and self.mllp_address is not None:
            code = mllp.send(self.mllp_address, oru, control_id, self.mllp_timeout_s, self.stop)
            logger.info("sent the HL7 message of report %s (MSH-10 %s) to %s: %s", report_id, control_id,
                        mllp.address_text(self.mllp_address), code)
        else:
            raise ValueError(f"{destination!r} is not one of {self.destinations}")
        return Delivery(report_id, destination, control_id, self.sender, self.processing_id)

    def __call__(self, message: ReportMessage) -> list[Delivery]:
        """Write and/or send `message`'s ORU^R01 (the deliveries, for the index); nothing for a field report
        (only a run's reports go to the lab) or a body this smearscope cannot read (an ERROR: the report is
        archived all the same). A destination that refuses it for good gives a Rejection instead (for the index,
        with the deliveries); OSError (a full disk, no ACK, an AE) is the caller's to hold the report for."""
        try:
            kind, oru, control_id = oru_of(message.payload, self.addressing, self.whole_ids)
        except UNREADABLE as exc:
            logger.error("report %s from %s cannot be read as a report of this smearscope (%s: %s): archived, "
                         "but no HL7 message was made", message.report_id, message.station, type(exc).__name__,
                         unreadable_reason(exc))
            return []
        if kind != "specimen":
            logger.info("report %s from %s is a %s report: no HL7 message (only specimen reports go to the lab)",
                        message.report_id, message.station, kind)
            return []
        # a report held (one destination refused it, or its index row could not be committed after
        # all took it) is offered again: the destinations that took it are not given it again (an
        # engine that took the file would get it once per retry). Kept until another report comes: a
        # report whose row is committed is never offered again.
        if self._held is None or self._held[0] != message.report_id:
            self._held, self._erring = (message.report_id, []), None
        made = self._held[1]
        done = {d.destination for d in made}
        for destination in self.destinations:
            if destination not in done:
                made.append(self._offer(destination, message, oru, control_id))
        return list(made)

    def _offer(self, destination: str, message: ReportMessage, oru: str,
               control_id: str) -> Delivery | Rejection:
        """`message` delivered to `destination`, or recorded as not accepted there for good: rejected
        (AR, CR), an AE/CE answered for `error_hold_s`, or held back behind its original (said once,
        at ERROR); OSError while it is to be tried again."""
        rejected = self._rejected_original(destination, message)
        if rejected is not None:
            logger.error("report %s is NOT sent to %s: %s, and an amended report never overtakes its original; "
                         "recorded as held there: `smearscope archive send-hl7 --resend %s` sends that one, then "
                         "this; the reports behind it go on", message.report_id, destination, rejected,
                         message.supersedes)
            return Rejection(message.report_id, destination, control_id, self.sender, self.processing_id, HELD,
                             rejected)
        try:
            return self.deliver(destination, message.report_id, oru, control_id)
        except mllp.Rejected as exc:
            return self.rejection(destination, message.report_id, control_id, exc)
        except mllp.NotAcknowledged as exc:
            if exc.kind not in mllp.ERRORS:  # no answer at all: held for as long as it lasts, not counted;
                if self._erring is not None:  # the next error answer counts from the end of this try on
                    self._erring = (self._erring[0], time.monotonic())
                raise
            if self._error_held(destination, message.report_id) < self.error_hold_s:
                raise
            return self.rejection(destination, message.report_id, control_id, exc)

    def _error_held(self, destination: str, report_id: str) -> float:
        """Seconds `report_id` has now been answered with errors (AE/CE, no ACK of it) at `destination`: from
        each error answer to the next while the receiver keeps answering so, this run's and earlier runs'
        (monotonic within a run: a clock change neither shortens nor stretches it), kept in the index. The
        time it could not be reached, or did not answer, in between does not count: an outage is held for as
        long as it lasts, and does not spend the hold of the answer after it, which counts from the end of the
        last try that found no answer (one retry's wait: a lab system answering AE between outages is given
        up on in the end)."""
        now = time.monotonic()
        if self._erring is None:
            before = self.error_held(report_id, destination, self.processing_id) if self.error_held else 0.0
            self._erring = (before, None)
        held, since = self._erring
        held += now - since if since is not None else 0.0
        self._erring = (held, now)
        if self.record_error_held is not None:
            self.record_error_held(report_id, destination, self.processing_id, held)
        return held

    def _rejected_original(self, destination: str, message: ReportMessage) -> str | None:
        """Why `message` may not go to `destination` before its original (the report it supersedes, not
        accepted there): an amended report never overtakes it. None: it may go."""
        if message.supersedes is None or self.not_accepted is None or not destination.startswith("mllp:"):
            return None
        code = self.not_accepted(message.supersedes, destination, self.processing_id)
        if code is None:
            return None
        return f"the report it supersedes, {message.supersedes}, was not accepted there ({code})"

    def rejection(self, destination: str, report_id: str, control_id: str,
                  exc: mllp.NotAcknowledged) -> Rejection:
        """The record of `report_id` not accepted at `destination` (`exc` an AR or CR, or an AE or CE given up
        on), said once at ERROR with the receiver's text."""
        code, lis_text = exc.kind, exc.lis_text
        answered = f"it answered {code!r}" if code not in (mllp.TOO_BIG, mllp.NOT_ACK) else f"its answer is {code}"
        given_up = f" for {self.error_hold_s:g} s" if code in mllp.ERRORS else ""
        logger.error("report %s was NOT accepted by %s: %s%s (MSH-10 %s): %s; recorded as not "
                     "accepted, not sent again; the reports behind it go on. Once the lab system is set up to "
                     "take it: `smearscope archive send-hl7 --resend %s`", report_id, destination, answered,
                     given_up, control_id, mllp.shown(lis_text[:200]) or "(no text)", report_id)
        return Rejection(report_id, destination, control_id, self.sender, self.processing_id, code, lis_text)
