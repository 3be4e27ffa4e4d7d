"""The station's outbox writer: reports -> durable outbox, one transaction each with the state
they change, retried while the disk is full (the analysis waits meanwhile; see service.station.workers).

`ReportWriter` is a part of `StationWorkers` (service.station.workers), which runs `_report_loop` on
its "report-writer" thread and closes the runs a previous process left open at its start.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from smearscope.device.frame import Frame
from smearscope.device.sources import FrameSource
from smearscope.service.analysis.records import ClassifiedCell
from smearscope.service.analysis.report import SCHEMA_VERSION, Report
from smearscope.service.mqtt.outbox import MessageKind, NewMessage, StateWriter, is_disk_full
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.station.clinic import ClinicFeed
from smearscope.service.station.daemon_summary import Stats, StoredReport
from smearscope.service.station.durable import RunMeta, StationState
from smearscope.service.station.messages import report_messages
from smearscope.service.station.notify import ProgressWatchdog
from smearscope.service.station.specimen import ClosedRun, SpecimenTracker
from smearscope.service.station.startup import AnalyzerLike
from smearscope.service.station.verifications import drop_verification, waiting_verifications
from smearscope.service.station.work_queue import SENTINEL, BoundedQueue

#: The station workers' logger: what the writer says is said, and filtered, as it was before it had
#: a module of its own.
logger = logging.getLogger("smearscope.service.station.workers")

PROBE_S = 2.0  # while the disk is full and nothing is to be stored, how often the writer tries a write


@dataclass(frozen=True)
class Outgoing:
    kind: Literal["field", "report", "live"]
    #: "live": the report of the field or run its run state counts; None for a run with no field
    #: (its state counts nothing: it waits only for what was queued before it)
    report: Report | None
    frame: Frame | None = None  # the field's frame (its source is told when it is stored)
    cells: tuple[ClassifiedCell, ...] = ()
    run: RunMeta | None = None  # the run the field joined
    live: NewMessage | None = None  # "live": a run state, stored once what it counts is (service.station.live_state)


class ReportWriter:
    """The outbox writer of `StationWorkers`: stores what the analysis emits, never drops it."""

    publisher: MqttPublisher | None
    state: StationState | None
    source: FrameSource | None
    analyzer: AnalyzerLike | None
    clinic: ClinicFeed | None
    tracker: SpecimenTracker
    watchdog: ProgressWatchdog
    stats: Stats
    ledger: deque[StoredReport]
    _reports: BoundedQueue[Outgoing]
    _stop: threading.Event
    _store_failing: bool
    #: Runs with a field or report this process did not store (given up at a stop, or lost): their
    #: run states are no longer sent (`_store_live`).
    _runs_not_stored: set[str]
    #: Final reports of runs a previous process left open that the start could not store (a full
    #: disk): stored first, once the outbox takes them, not only at the next start.
    _closes_waiting: list[Outgoing]

    def _report_loop(self) -> None:
        """Reports -> durable outbox (the publisher sends them). Never drops one."""
        while self._closes_waiting:
            self._store(self._closes_waiting.pop(0))  # given up at a stop: the next start closes the run
        while True:
            try:
                item = self._reports.get(timeout=PROBE_S)
            except queue.Empty:
                self._probe_disk()
                continue
            if item is SENTINEL:
                return
            if item.live is not None:
                self._store_live(item.live)
                continue
            assert item.report is not None
            stored = False
            try:
                stored = self._store(item)
            except Exception:
                logger.exception("storing report %s failed", item.report.report_id)
                self.stats.add("lost")
            run_id = item.report.run_id
            if not stored and run_id is not None and run_id not in self._runs_not_stored:
                self._runs_not_stored.add(run_id)
                logger.warning("run %s: %s report %s was not stored; the run's states are not sent from now on "
                               "(the broker keeps its last state that counts only what was stored)",
                               run_id, item.kind, item.report.report_id)
            del item  # a stored field's frame (192 MB at 64 MP) is not held while the next is awaited

    def _store_live(self, message: NewMessage) -> None:
        """A run state, now that the field or report it counts is stored. Not once a field or the
        report of its run was not: it would count what the station's state does not hold, and the
        next start would take the broker's copy for a newer state than its own (service.mqtt.run_watch).
        The broker keeps the run's last state that counts only what was stored; the next start
        publishes the run as its state holds it."""
        if self.clinic is None or self.publisher is None:
            return
        if message.report_id in self._runs_not_stored:  # a run state's report_id is its run id
            return
        try:
            self.clinic.live.send(self.publisher, message)
        except Exception:
            logger.exception("live state of run %s failed (its reports are not affected)", message.report_id)

    def _probe_disk(self) -> None:
        """With nothing to store: has space come back? (The acks' deletes may be the only writes.)"""
        if self.publisher is None or not self.publisher.outbox.disk_full:
            return
        try:
            self.publisher.outbox.probe()
        except (sqlite3.Error, OSError):
            return
        logger.warning("outbox writable again: analysis resumes")

    def _store(self, item: Outgoing) -> bool:
        """Store with retries; a full disk pauses the analysis meanwhile (not a stall: STATUS=
        says why, and a restart by the watchdog would not free any space). False: given up at a stop."""
        assert self.publisher is not None
        attempt = 0
        while True:
            self.watchdog.work_started("publish")
            try:
                seq = self._store_once(item)
                break
            except (sqlite3.Error, OSError) as exc:
                attempt += 1
                full = is_disk_full(exc)
                self._store_failing = full
                if self._stop.is_set() and attempt >= 3:
                    self.watchdog.work_finished("publish")
                    self._give_up(item, exc, attempt)
                    return False
                if attempt & (attempt - 1) == 0:
                    logger.error("outbox write of %s report %s failed (attempt %d): %s; %s",
                                 item.kind, item.report.report_id, attempt, exc,
                                 "analysis paused until it succeeds" if full else "retrying")
                if full:
                    self.watchdog.work_finished("publish")
                self._stop.wait(min(10.0, 0.2 * 2 ** min(attempt, 6)))
        self.watchdog.work_finished("publish")
        if self._store_failing or attempt:
            logger.warning("outbox write succeeded after %d failed attempts: analysis resumes",
                           attempt)
        self._store_failing = False
        report = item.report
        assert report is not None
        if item.frame is not None:
            self._done(item.frame)
        topic = self.publisher.report_topic if item.kind == "report" else self.publisher.field_topic
        field_id = report.source.frame_id if report.source is not None else None
        self.ledger.append(StoredReport(item.kind, topic, report.report_id, seq, report.run_id,
                                        field_id, report.fields_analyzed,
                                        report.counts.model_dump(),
                                        tuple(f"{f.severity}:{f.code}" for f in report.flags
                                              if f.severity != "info")))
        self.stats.add("stored")
        # the field id holds a watched folder's file name, which may name the patient: not at INFO
        logger.info("stored %s message report_id=%s seq=%d run=%s", item.kind, report.report_id, seq, report.run_id)
        if field_id is not None:
            logger.debug("stored %s message report_id=%s is field %s", item.kind, report.report_id, field_id)
        return True

    def _store_once(self, item: Outgoing) -> int:
        """One transaction: the compact report, its cells messages and the state they change."""
        assert self.publisher is not None and self.state is not None
        report, config = item.report, self.publisher.config
        assert report is not None
        messages = report_messages(report, self.publisher.cells_topic, config.max_packet_size,
                                   config.publish_cells)
        items: list[tuple[MessageKind, str, bytes, str]] = [
            (item.kind, report.report_id, messages.report, SCHEMA_VERSION)]
        items += [("cells", report.report_id, body, SCHEMA_VERSION) for body in messages.cells]
        also: StateWriter
        if item.kind == "report":
            also = self.state.run_closed(report)
        else:
            field_id = report.source.frame_id if report.source is not None else report.report_id
            also = self.state.field_stored(
                report_id=report.report_id,
                input_key=item.frame.input_key if item.frame is not None else None, run=item.run,
                field_id=field_id, cells=item.cells, records=report.cells, models=report.models,
                software_version=report.software_version, flags=report.flags)
        extra = []  # a specimen report's FHIR Bundle goes in the same transaction
        if item.kind == "report" and self.clinic is not None and self.clinic.fhir_topic is not None:
            extra.append(self.clinic.fhir_message(report, self.publisher))
        return self.publisher.publish_many(items, also, extra)[0]

    def _give_up(self, item: Outgoing, exc: BaseException, attempts: int) -> None:
        """Stopping, and the outbox still refuses: what the next start recovers, or a loss."""
        report = item.report
        assert report is not None
        if item.kind == "report" and report.run_id:
            self.stats.add("deferred")
            logger.error("specimen report %s not stored at stop (%s); run %s stays in the outbox "
                         "database: the next start closes it, or goes on with it", report.report_id, exc,
                         report.run_id)
        elif item.frame is not None and item.frame.input_key is not None:
            self.stats.add("deferred")
            logger.error("field report %s not stored at stop (%s); %s stays in its folder and is "
                         "analysed at the next start", report.report_id, exc, item.frame.frame_id)
        else:
            self.stats.add("lost")
            logger.error("%s report %s LOST: outbox write failed %d times while stopping: %s",
                         item.kind, report.report_id, attempts, exc)

    def _close_runs_left_open(self) -> Iterator[str]:
        """Close the runs a previous process left open (restart) but one it resumes; yields those closed:
        their reports stored, or with no field (start_run's: their state goes out closed)."""
        assert self.state is not None
        self._store_answered_verifications()  # answered before the runs left open end: stored first, as they were
        answered = self.state.ending_report_ids()  # stop_run's answers named these reports' ids
        for run in self.tracker.resume_one(self.state.open_runs(getattr(self.analyzer, "models", None))):
            if not run.field_ids:  # started by start_run, no field stored: nothing to report, its state closed
                logger.warning("run %s for specimen %s, started by start_run %.0f s before this start, was left "
                               "open by the previous process before any field of it was stored: closed (%s), no "
                               "report; start_run again for that slide", run.run_id, run.specimen_id or "(none given)",
                               time.time() - run.started_at, run.end_requested or "restart")
                self.state.run_ended_without_fields(ClosedRun(
                    run.run_id, run.end_requested or "restart", 0, 0, run.target_wbc, None, None, run.started_at,
                    run.started_by, run.specimen_id))
                yield run.run_id
                continue
            report = self.tracker.final_report(run, run.end_requested or "restart")
            if run.run_id in answered:  # a LIS waits for it under that id
                report = report.model_copy(update={"report_id": answered[run.run_id]})
            try:
                seq = self._store_once(Outgoing("report", report))
            except (sqlite3.Error, OSError) as exc:
                logger.error("run %s left open by the previous process: its final report could not be stored "
                             "(%s); stored once the outbox takes it, before any new field", run.run_id, exc)
                self._closes_waiting.append(Outgoing("report", report))
                continue
            self.stats.add("stored")
            logger.info("stored report message report_id=%s seq=%d run=%s field=None (run left "
                        "open by the previous process, closed: %s)", report.report_id, seq,
                        run.run_id, report.end_reason)
            yield run.run_id

    def _store_answered_verifications(self) -> None:
        """The verified reports verify_run answered ok that the previous process did not store
        (service.station.verifications), under the ids answered, each where it still follows its
        run's report (a run is signed only once its report is stored: run_not_stored). Before the
        runs left open are closed, as the previous process would have stored them; a run whose
        verification waits is not pruned by them meanwhile (one that fails here is tried again). An
        amendment answered before the signature it supersedes was stored follows it once stored here
        (in the order answered), and waits with it when it is not."""
        assert self.state is not None
        outbox = self.state.outbox
        waiting = waiting_verifications(outbox)
        unstored = {report.report_id for report, _ in waiting}
        now_holds: dict[str | None, str] = {}  # run -> the verified report stored here: an amendment follows it
        for report, holds in waiting:
            verification = report.verification
            assert verification is not None
            holds = now_holds.get(report.run_id, holds)
            if holds != verification.supersedes and verification.supersedes in unstored:
                continue  # it amends a signature not stored yet: both tried again at the next start
            if holds != verification.supersedes:
                logger.error("run %s: the verification signed by %r at %.0f (report %s) follows report %s, but the "
                             "run holds %s: not stored, dropped (the run was signed again since by a station "
                             "version that did not keep it)", report.run_id, verification.verified_by,
                             verification.verified_at, report.report_id, verification.supersedes, holds)
                drop_verification(outbox, report.report_id)
                unstored.discard(report.report_id)  # an amendment of it is dropped with it
                continue
            try:
                seq = self._store_once(Outgoing("report", report))
            except (sqlite3.Error, OSError) as exc:
                logger.error("run %s: the verified report %s answered before the previous process stopped could "
                             "not be stored (%s); tried again at the next start", report.run_id, report.report_id,
                             exc)
                continue
            unstored.discard(report.report_id)
            now_holds[report.run_id] = report.report_id
            self.stats.add("stored")
            logger.info("stored report message report_id=%s seq=%d run=%s field=None (verified by %r, answered "
                        "before the previous process stopped)", report.report_id, seq, report.run_id,
                        verification.verified_by)

    def _done(self, frame: Frame, refused: str | None = None) -> None:
        if refused is not None and frame.input_key is not None and self.state is not None:
            self.state.released(frame.input_key)  # never stored: a copy of it is not one
        if self.source is not None:
            self.source.done(frame, refused)
