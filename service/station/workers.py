"""The station's three worker threads and the bounded queues between them.

    capture ──frames──▶ analysis ──reports──▶ outbox writer ──▶ MqttPublisher's outbox
       ▲ FrameSource      ▲ command requests (service.station.requests)
       └ QualityGate      └ SpecimenTracker

Queues and what each does when full (named policies, see service.station.work_queue):
  frames    keep_newest (camera, simulated: a live view, stale frames are worthless) or
            block (folder, replay: every file is analysed; a folder file stays in its folder
            until its field message is stored, `FrameSource.done`)
  reports   block (reports are never dropped; the outbox behind it is durable)

The outbox writer is service.station.report_writer (`ReportWriter`, a part of `StationWorkers`). A
report is stored compact, with its cells in separate messages (service.station.messages), in one
outbox transaction with the state it changes (service.station.durable): the input it came from, its
specimen run's cells. A full disk pauses the analysis (back-pressure: nothing is analysed that could
not be stored; status, STATUS= and telemetry say `disk_full`) until a write succeeds again; the
report in hand waits, it is not dropped.

The capture thread watches the daemon's stop Event; the analysis and writer threads stop only at their
sentinels, so whatever was captured is drained. At its end the analysis thread serves the last command
requests and closes an open specimen run, so its final report is stored. A frame that fails (bad
input, analysis exception) is logged with its reason code, counted, and the workers go on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from smearscope.device.camera_reads import CameraHungError
from smearscope.device.frame import Frame
from smearscope.device.quality import QualityGate
from smearscope.device.sources import FrameSource
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.wording import counted
from smearscope.service.ingest import IngestError
from smearscope.service.mqtt.outbox import NewMessage
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.station.calibration_watch import CalibrationWatch
from smearscope.service.station.clinic import ClinicFeed
from smearscope.service.station.daemon_summary import Stats, StoredReport
from smearscope.service.station.durable import RunMeta, StationState, same_file
from smearscope.service.station.field_pool import FieldPool
from smearscope.service.station.notify import ProgressWatchdog
from smearscope.service.station.report_writer import Outgoing, ReportWriter
from smearscope.service.station.requests import RequestQueue
from smearscope.service.station.specimen import ClosedRun, SpecimenTracker
from smearscope.service.station.startup import AnalyzerLike
from smearscope.service.station.work_queue import SENTINEL, TICK_S, BoundedQueue, DropPolicy

logger = logging.getLogger(__name__)

#: Live sources may drop stale frames; recorded ones must block (see the module docstring).
FRAME_POLICY: Mapping[str, DropPolicy] = {"camera": "keep_newest", "simulated": "keep_newest",
                                          "folder": "block", "replay": "block"}
THREAD_NAMES = ("capture", "analysis", "report-writer")  # the order shutdown joins them: producers first


@dataclass
class _Work:
    frame: Frame
    on_drop: Callable[[], None] | None = None


@dataclass(frozen=True)
class _Field:
    frame: Frame
    run_id: str | None  # the specimen run it was meant for
    scale_args: dict[str, Any]  # decided when handed to its run (Workers._scale_args)


class StationWorkers(ReportWriter):
    """capture -> analysis -> outbox writer, with their queues, counters and ledger."""

    def __init__(self, *, source_kind: str, gate: QualityGate, tracker: SpecimenTracker,
                 requests: RequestQueue, watchdog: ProgressWatchdog, stop: threading.Event,
                 request_stop: Callable[[str], None], max_fields: int | None,
                 scale_override: float | None, clinic: ClinicFeed | None = None,
                 concurrent_fields: int = 1, batch_delay_s: float = 0.004, calibration: str = "") -> None:
        self.gate, self.tracker, self.watchdog = gate, tracker, watchdog
        self.requests = requests  # commands' work on the specimen state, served between frames
        self._stop, self._request_stop = stop, request_stop
        self.max_fields, self.scale_override = max_fields, scale_override
        #: Fields analysed at once (field_pool); how long an engine batch waits for another's (engines.coalesce).
        self.concurrent_fields, self.batch_delay_s = concurrent_fields, batch_delay_s
        #: FHIR bundles, live run state and the review gallery (service.station.clinic).
        self.clinic, self.stats = clinic, Stats()
        self.ledger: deque[StoredReport] = deque(maxlen=10_000)
        self.outcomes: deque[tuple[str, str, str | None]] = deque(maxlen=10_000)
        #: Why a worker failed; any entry makes the daemon exit non-zero.
        self.failures: list[str] = []
        self.frames: BoundedQueue[_Work] = BoundedQueue("frames", 2, FRAME_POLICY.get(source_kind, "block"))
        self._camera = source_kind == "camera"
        self._camera_size: tuple[int, int] | None = None  # (width, height) of the camera's first frame (with_scale)
        self._reports: BoundedQueue[Outgoing] = BoundedQueue("reports", 64, "block")
        self.threads: dict[str, threading.Thread] = {}
        self.source: FrameSource | None = None
        self.analyzer: AnalyzerLike | None = None
        self.publisher: MqttPublisher | None = None
        self.state: StationState | None = None
        #: The calibration checks kept across runs, under the calibration `calibration` names (calibration_watch).
        self.calibration = calibration
        self.calibration_watch: CalibrationWatch | None = None
        #: The writer cannot store (disk full): the analysis waits (see the module docstring).
        self._store_failing = False
        self._runs_not_stored: set[str] = set()  # their run states are no longer sent (ReportWriter)
        self._closes_waiting: list[Outgoing] = []  # reports of runs left open the start could not store
        self._live_waiting: NewMessage | None = None  # a run state waiting for what it counts (analysis thread)

    @property
    def disk_full(self) -> bool:  # the outbox's disk is full: analysis paused until a write succeeds
        return self._store_failing or (self.publisher is not None and self.publisher.outbox.disk_full)

    def start(self, source: FrameSource, analyzer: AnalyzerLike,
              publisher: MqttPublisher) -> None:
        """Close the runs a previous process left open, then start the threads, consumers
        first (each producer checks that its consumer lives)."""
        self.source, self.analyzer, self.publisher = source, analyzer, publisher
        self.state = StationState(publisher.outbox)
        self.tracker.number_run = self.state.number_run  # each run's number, kept as it opens
        self.calibration_watch = CalibrationWatch(publisher.outbox, self.calibration)
        left_open = list(self._close_runs_left_open())
        if self.clinic is not None:  # typing needs the heads; verification the runs closed before
            closed = self.state.closed_runs(cells=False)
            without_fields, latest = self.state.runs_without_fields()  # start_run's ended with no field
            closed = closed + without_fields if latest else without_fields + closed  # the last run closed last
            self.clinic.start(analyzer, closed, self.state.run_cells, publisher, announce=left_open,
                              tracker=self.tracker, numbers=self.state.run_numbers())
            self.clinic.live.defer = self._defer_live  # from now on behind what each state counts
        for name, target in (("report-writer", self._report_loop),
                             ("analysis", self._analysis_loop), ("capture", self._capture_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self.threads[name] = thread
            thread.start()

    def dead_threads(self) -> list[str]:
        return [n for n, t in self.threads.items() if not t.is_alive()]

    def _fail(self, what: str, stop_reason: str) -> None:
        self.failures.append(what)
        self._request_stop(stop_reason)

    # ------------------------------------------------------------------ capture

    def _capture_loop(self) -> None:
        """Source -> quality gate -> frames queue, until the source ends or stop is requested."""
        assert self.source is not None
        frames = iter(self.source)
        analysis_alive = self.threads["analysis"].is_alive
        try:
            while not self._stop.is_set():
                if not self._wait_for_budget():
                    break
                frame = next(frames, None)
                if frame is None:
                    if not self._stop.is_set():
                        self._request_stop(f"source {self.source.name} ended")
                    break
                # A frame already taken (a folder file is moved on read) is handled even if stop
                # was requested meanwhile: the analysis thread drains the queue.
                frame = self.with_scale(frame, camera=self._camera)
                verdict = self.gate.check(frame, self.tracker.specimen_scale())  # uncalibrated: the run's
                if not verdict.accepted:
                    self.reject(frame.frame_id, "rejected", verdict.reason or "unknown")
                    self.source.done(frame, verdict.reason or "unknown")
                    continue
                self.stats.add("pending")
                work = _Work(frame, on_drop=functools.partial(self._dropped, frame.frame_id))
                if not self.frames.put(work, analysis_alive):
                    self.stats.add("pending", -1)
        except CameraHungError as exc:  # its threads stuck: only a new process (Restart=) frees the camera
            logger.error("%s", exc)
            self._fail(str(exc), "camera hung")
        except Exception:
            logger.exception("capture thread failed")
            self._fail("capture thread failed", "capture failure")
        finally:
            self.frames.put_sentinel(analysis_alive)

    def _wait_for_budget(self) -> bool:
        """With --max-fields, take no frame beyond the fields still wanted."""
        while self.max_fields is not None and not self._stop.is_set():
            snap = self.stats.snapshot()
            if snap["analysed"] + snap["pending"] < self.max_fields:
                return True
            self._stop.wait(0.05)
        return not self._stop.is_set()

    def with_scale(self, frame: Frame, camera: bool = False) -> Frame:
        """The frame at `analysis.microns_per_pixel` when the config overrides the scale; a `camera`
        frame of another size than the camera's first keeps none (the source said why), as the
        source's own scale holds at that first size only."""
        override = self.scale_override
        if override is None or frame.microns_per_pixel == override:
            return frame
        if camera:
            size = (int(frame.pixels.shape[1]), int(frame.pixels.shape[0]))
            self._camera_size = self._camera_size or size
            if size != self._camera_size:
                return frame
        return dataclasses.replace(frame, microns_per_pixel=override)

    def _dropped(self, frame_id: str) -> None:  # a stale frame dropped for a newer one (keep_newest)
        self.stats.add("pending", -1)
        self.outcomes.append((frame_id, "dropped", "keep_newest"))

    def reject(self, frame_id: str, outcome: str, reason: str) -> None:
        """Count a frame the gate refused ("rejected") or that could not be analysed."""
        self.stats.add(outcome, reason=reason)
        self.outcomes.append((frame_id, outcome, reason))
        if outcome == "rejected":
            logger.info("frame %s rejected: %s", frame_id, reason)

    # ------------------------------------------------------------------ analysis

    def _analysis_loop(self) -> None:
        """Frames and command requests -> field reports and specimen reports. Up to `concurrent_fields`
        frames are analysed at once (service.station.field_pool), finished in capture order; commands,
        the idle check and the disk-full pause are served whenever the pool has room."""
        writer_alive = self.threads["report-writer"].is_alive
        pool: FieldPool[_Field, FieldResult] = FieldPool(self._analyse_field, self.concurrent_fields)
        share = getattr(self.analyzer, "batch_across_fields", None)
        if self.concurrent_fields > 1 and share is not None:
            share(lambda: pool.active() - 1, self.batch_delay_s)
        ended = paused = False
        try:
            while not ended or pool.pending:
                done = pool.next_done(timeout=0.0 if pool.has_room() and not ended else TICK_S)
                if done is not None:
                    try:
                        self._finish(done.work, done.result, done.error)
                    finally:
                        self.stats.add("pending", -1)
                    continue
                if ended or not pool.has_room():
                    continue
                self.requests.serve_pending()
                closed = self.tracker.check_idle()
                if closed is not None:
                    self.emit_closed(closed)
                if self.disk_full and not self._stop.is_set():
                    if not paused:  # said once, whichever write hit the full disk first
                        logger.error("the outbox's disk is full: analysis paused until a write succeeds")
                        paused = True
                    time.sleep(TICK_S)  # back-pressure: the frames queue fills, capture waits
                    continue
                paused = False
                try:
                    item = self.frames.get(timeout=TICK_S)
                except queue.Empty:
                    continue
                if item is SENTINEL:
                    ended = True
                elif self._analysable(item.frame):
                    run_id = self.tracker.run_for_next_field()
                    pool.submit(_Field(item.frame, run_id, self._scale_args(item.frame, run_id)))
                else:
                    self.stats.add("pending", -1)
        except Exception:
            logger.exception("analysis thread failed")
            self._fail("analysis thread failed", "analysis failure")
        finally:
            pool.close()
            try:
                self.requests.serve_pending()
                closed = self.tracker.stop("shutdown")
                if closed is not None:
                    self.emit_closed(closed)
            except Exception:
                logger.exception("closing the open specimen run failed")
            finally:
                self.requests.close()
                self._reports.put_sentinel(writer_alive)

    def _analysable(self, frame: Frame) -> bool:
        """Analysed unless stored already (a folder file found again after a crash; a copy of an
        analysed image, refused: its cells would count twice) or stopping on a full disk."""
        assert self.state is not None and self.source is not None
        stored = self.state.stored_field(frame.input_key) if frame.input_key is not None else None
        if stored is not None and same_file(stored, frame.frame_id):  # this very file again
            logger.info("frame %s: its field message was stored before; not analysed again", frame.frame_id)
            self.outcomes.append((frame.frame_id, "skipped", "already_stored"))
            self.source.done(frame)
            return False
        if stored is not None:
            self.reject(frame.frame_id, "rejected", "duplicate_content")
            self.source.done(frame, f"duplicate_content: the same image as {stored} was analysed before")
            return False
        if self.disk_full:  # stopping: what could not be stored is not analysed
            self.stats.add("deferred")
            self.outcomes.append((frame.frame_id, "deferred", "disk_full"))
            return False
        if frame.input_key is not None:  # a copy that comes before it is stored is refused too
            self.state.taken(frame.input_key, frame.frame_id)
        return True

    def _analyse_field(self, work: _Field) -> FieldResult:
        """One field on a pool thread; what it raises reaches `_finish` in capture order."""
        assert self.analyzer is not None
        unit = "analysis" if self.concurrent_fields == 1 else f"analysis ({threading.current_thread().name})"
        with self.watchdog.working(unit):
            return self.analyzer.analyze(work.frame, work.run_id, **work.scale_args)

    def _scale_args(self, frame: Frame, run_id: str | None) -> dict[str, Any]:
        """As a field is handed to its run: a calibration check (its first fields) or the run's scale."""
        if frame.microns_per_pixel:
            return {"check_calibration": self.tracker.claim_calibration_check(run_id)}
        return {"specimen_scale": self.tracker.specimen_scale()}

    def analyse(self, frame: Frame) -> dict[str, Any]:
        """Analyse one accepted frame here; never raises for a bad frame. A command answer."""
        assert self.analyzer is not None
        run_id = self.tracker.run_for_next_field()
        work = _Field(frame, run_id, self._scale_args(frame, run_id))
        result, error = None, None
        try:
            with self.watchdog.working("analysis"):
                result = self.analyzer.analyze(frame, work.run_id, **work.scale_args)
        except Exception as exc:  # noqa: BLE001 - reported by _finish with its reason code
            error = exc
        return self._finish(work, result, error)

    def _finish(self, work: _Field, result: FieldResult | None, error: BaseException | None) -> dict[str, Any]:
        """A field's report into its specimen run and the outbox, or its failure counted (a failed
        field gives the calibration check it claimed back to its run)."""
        frame = work.frame
        if (error is not None or result is None) and work.scale_args.get("check_calibration"):
            self.tracker.release_calibration_check(work.run_id)
        if isinstance(error, IngestError):
            reason = getattr(error.code, "value", str(error.code))
            logger.warning("frame %s refused (%s): %s", frame.frame_id, reason, error)
            self.reject(frame.frame_id, "failed", reason)
            self._done(frame, reason)
            return {"ok": False, "frame_id": frame.frame_id, "error": reason, "message": str(error)}
        if error is not None or result is None:
            logger.error("frame %s: analysis failed (analysis_error)", frame.frame_id, exc_info=error)
            self.reject(frame.frame_id, "failed", "analysis_error")
            self._done(frame, "analysis_error")
            return {"ok": False, "frame_id": frame.frame_id, "error": "analysis_error",
                    "message": f"{type(error).__name__}: {error}"}
        if work.run_id is None:  # handed over with no run open: joins one opened since (or started now)
            self.tracker.run_for_next_field()
        open_run = self.tracker.open_run()
        if self.calibration_watch is not None:  # its check kept; flagged while the station's checks point away
            policy = self.tracker.policy
            result = self.calibration_watch.observe(result, policy.calibration_watch_fields,
                                                    policy.calibration_watch_runs)
        result, closed = self.tracker.add(result, handed_to=work.run_id)  # its run ended meanwhile: alone
        run = None
        if open_run is not None and result.report.run_id == open_run.run_id:
            run = RunMeta(open_run.run_id, open_run.started_at, open_run.started_by,
                          open_run.target_wbc, open_run.specimen_id)
        if self.clinic is not None:  # its crops first: a crash once the field is stored must not lose them
            self.clinic.field_added(frame.pixels, result, self.tracker, self.publisher)
        self._emit(Outgoing("field", result.report, frame, result.cells, run))
        if closed is not None:
            self.emit_closed(closed)
        self.stats.add("analysed")
        self.outcomes.append((frame.frame_id, "analysed", None))
        if self.max_fields is not None and self.stats.snapshot()["analysed"] >= self.max_fields:
            self._request_stop(f"{counted(self.max_fields, 'field')} analysed (--max-fields)")
        r = result.report
        return {"ok": True, "frame_id": frame.frame_id, "report_id": r.report_id,
                "run_id": r.run_id, "counts": r.counts.model_dump()}

    def _emit(self, item: Outgoing) -> None:
        """To the outbox writer; then the run state waiting for it (`_defer_live`), behind it."""
        if not self._reports.put(item, self.threads["report-writer"].is_alive):
            self.stats.add("lost")
            logger.error("%s report %s LOST: the outbox writer is gone", item.kind, item.report.report_id)
        self._flush_live()

    def _defer_live(self, message: NewMessage) -> None:
        """A run state made on the analysis thread: it waits for the next field or report emitted."""
        self._live_waiting = message

    def _flush_live(self) -> None:
        """The run state waiting, behind what was emitted before it."""
        message, self._live_waiting = self._live_waiting, None
        if message is not None:
            self._reports.put(Outgoing("live", None, live=message), self.threads["report-writer"].is_alive)

    def emit_started(self) -> None:
        """start_run opened a run: its state (open, no field yet) goes out behind what is queued."""
        progress = self.tracker.progress()
        if self.clinic is not None and progress is not None:
            self.clinic.run_opened(progress, self.publisher)
            self._flush_live()

    def emit_closed(self, closed: ClosedRun, live: bool = True) -> None:
        """Send the final report of a run that ended (none when it had no field: its start, kept
        if start_run opened it, goes), then its closed state."""
        if closed.report is not None:
            self._emit(Outgoing("report", closed.report))
        elif self.state is not None:
            if closed.started_by == "command" and closed.end_reason == "shutdown":
                logger.warning("run %s for specimen %s ended with the station's stop before any field: no report; "
                               "start_run again for that slide", closed.run_id, closed.specimen_id or "(none given)")
            self.state.run_ended_without_fields(closed)
        if self.clinic is not None:
            self.clinic.run_closed(closed, self.publisher, live)
            self._flush_live()  # its state after its report
