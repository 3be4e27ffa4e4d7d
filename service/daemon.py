"""The station daemon: threads and bounded queues around the pipeline.

    capture ──frames──▶ analysis ──reports──▶ outbox writer ──▶ Outbox ──▶ MqttPublisher (drain)
       ▲ FrameSource      ▲ requests (commands)                               │ cmd/#, telemetry
       └ QualityGate      └ SpecimenTracker                                   ▼

Queues and what each does when full (named policies):
  frames    keep_newest (camera, simulated: a live view, stale frames are worthless) or
            block (folder, replay: every file is analysed; the folder source has already moved it)
  requests  reject_when_full (a command is answered "busy")
  reports   block (reports are never dropped; the outbox behind it is durable)

Stopping: the capture worker watches the daemon's stop Event (set by SIGTERM/SIGINT, `--max-fields`,
the end of the source, a dead worker); the analysis and writer workers stop only at their
sentinels, so whatever was captured is drained. Shutdown: STOPPING=1, the source is closed,
the capture thread enqueues its sentinel, the analysis thread drains what was captured, closes an
open specimen run (its final report is published) and enqueues the reports sentinel; the writer
stores everything; the publisher drains (bounded) and publishes retained "offline". Every join has
a timeout. A frame that fails (bad input, analysis exception) is logged with its reason code,
counted, and the daemon goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import logging
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Generic, Literal, Protocol, TextIO, TypeVar

from device.frame import Frame
from device.quality import QualityGate
from device.sources import FrameSource, SourceConfigurationError, open_source
from device.telemetry import TelemetryReader
from service.config import EXIT_CONFIG, ConfigError, StationConfig, load_config
from service.ingest import IngestError, load_image
from service.mqtt_config import CredentialError
from service.notify import ProgressWatchdog, SystemdNotifier, watchdog_interval_from_env
from service.outbox import Outbox, OutboxLockedError
from service.pipeline import FieldResult
from service.publisher import MqttPublisher
from service.report import SCHEMA_VERSION, Report
from service.specimen import ClosedRun, RunAlreadyOpen, SpecimenPolicy, SpecimenTracker

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
DropPolicy = Literal["keep_newest", "block", "reject_when_full"]
T = TypeVar("T")

_SENTINEL: Any = object()
_TICK_S = 0.2
#: All worker joins at shutdown share this budget; with the publisher's drain
#: (mqtt.stop_drain_timeout_s, 10 s by default) it stays inside the unit's TimeoutStopSec=45.
_JOIN_BUDGET_S = 25.0
_COMMAND_TIMEOUT_S = 30.0
_BROKER_NOTICE_AFTER_S = 3.0
#: Live sources may drop stale frames; recorded ones must block (see the module docstring).
FRAME_POLICY: Mapping[str, DropPolicy] = {
    "camera": "keep_newest", "simulated": "keep_newest", "folder": "block", "replay": "block",
}
#: Config sections a `reload` applies live; every other change needs a restart.
LIVE_SECTIONS = ("log_level", "quality", "specimen")


class AnalyzerLike(Protocol):
    def analyze(self, frame: Frame, run_id: str | None = None) -> FieldResult: ...


AnalyzerFactory = Callable[[StationConfig], AnalyzerLike]


class StartupError(Exception):
    """The daemon cannot start; `field` names the config field at fault (exit 78) or is None."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if self.field else EXIT_FAILURE


class BoundedQueue(Generic[T]):
    """A queue.Queue whose behaviour when full is a named policy, with a drop counter."""

    def __init__(self, name: str, maxsize: int, policy: DropPolicy) -> None:
        self.name, self.policy = name, policy
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.dropped = 0

    def put(self, item: T, consumer_alive: Callable[[], bool] = lambda: True) -> bool:
        """Enqueue by the policy; False when the item was refused (reject_when_full, or a dead
        consumer). keep_newest evicts the oldest item instead; block waits."""
        if self.policy == "reject_when_full":
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                return False
        if self.policy == "keep_newest":
            while True:
                try:
                    self._queue.put_nowait(item)
                    return True
                except queue.Full:
                    try:
                        old = self._queue.get_nowait()
                    except queue.Empty:
                        continue
                    if old is _SENTINEL:  # never evict the end marker
                        self._queue.put(old)
                        return False
                    self.dropped += 1
                    self._on_drop(old)
        while True:
            try:
                self._queue.put(item, timeout=_TICK_S)
                return True
            except queue.Full:
                if not consumer_alive():
                    logger.error("%s queue: consumer gone; item not enqueued", self.name)
                    return False

    def _on_drop(self, item: Any) -> None:
        logger.debug("%s queue full: dropped the oldest item (keep_newest)", self.name)
        on_drop = getattr(item, "on_drop", None)
        if on_drop is not None:
            on_drop()

    def put_sentinel(self, consumer_alive: Callable[[], bool]) -> None:
        """Always called in a producer's `finally`: the consumer's end marker."""
        if not self.put(_SENTINEL, consumer_alive) and consumer_alive():
            logger.error("%s queue: could not enqueue the end marker", self.name)

    def get(self, timeout: float | None = None) -> Any:
        return self._queue.get(timeout=timeout)

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()

    def qsize(self) -> int:
        return self._queue.qsize()


@dataclass
class _Work:
    frame: Frame
    on_drop: Callable[[], None] | None = None


@dataclass
class _Request:
    """Work a command hands to the analysis thread (which owns the specimen state)."""

    name: str
    run: Callable[[], dict[str, Any]]
    done: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Outgoing:
    kind: Literal["field", "report"]
    report: Report


@dataclass(frozen=True)
class StoredReport:
    """A report the daemon put in the outbox (the ledger `--max-fields` runs print)."""

    kind: Literal["field", "report"]
    topic: str
    report_id: str
    seq: int
    run_id: str | None
    field_id: str | None
    fields_analyzed: int
    counts: Mapping[str, int]


class Stats:
    """Counters shared by the threads (one lock; read as a snapshot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.analysed = 0
        self.rejected: Counter[str] = Counter()  # quality gate, by reason
        self.failed: Counter[str] = Counter()  # ingest/analysis errors, by reason code
        self.stored = 0
        self.lost = 0
        self.pending = 0  # frames enqueued and not yet finished

    def add(self, name: str, delta: int = 1, reason: str | None = None) -> None:
        with self._lock:
            if reason is None:
                setattr(self, name, getattr(self, name) + delta)
            else:
                getattr(self, name)[reason] += delta

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"analysed": self.analysed, "rejected": dict(self.rejected),
                    "failed": dict(self.failed), "stored": self.stored, "lost": self.lost,
                    "pending": self.pending}


def build_analyzer(config: StationConfig) -> AnalyzerLike:
    """The production analyzer: engines from `analysis.models_dir`, loaded and warmed up."""
    from engines.base import EngineError
    from engines.manifest import ManifestError
    from service.pipeline import MODEL_FILES, Analyzer, AnalyzerOptions
    from service.roi import RoiFilter

    a = config.analysis
    missing = [f for f in MODEL_FILES.values() if not (a.models_dir / f).is_file()]
    if missing:
        raise StartupError("analysis.models_dir", f"{a.models_dir} has no {', '.join(missing)}; "
                           "train and export the models or point analysis.models_dir at them")
    options = AnalyzerOptions(
        tile_size=a.tile_size, tile_overlap=a.tile_overlap, stain_method=a.stain_normalization,
        roi=RoiFilter(min_confidence=a.min_confidence, min_area_um2=a.min_area_um2,
                      max_aspect=a.max_aspect_ratio),
    )
    try:
        return Analyzer.from_models_dir(a.models_dir, backend=a.engine_backend, options=options,
                                        station_id=config.station_id)
    except (EngineError, ManifestError) as exc:
        raise StartupError("analysis.models_dir", str(exc)) from exc


class StationDaemon:
    """Owns the threads, queues, source, analyzer and publisher of one station process."""

    def __init__(
        self,
        config: StationConfig,
        *,
        analyzer_factory: AnalyzerFactory = build_analyzer,
        config_path: Path | None = None,
        max_fields: int | None = None,
        environ: Mapping[str, str] | None = None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.max_fields = max_fields
        self._environ = environ
        self._analyzer_factory = analyzer_factory
        self._announce = announce or (lambda text: None)
        self.stats = Stats()
        self.ledger: deque[StoredReport] = deque(maxlen=10_000)
        self.outcomes: deque[tuple[str, str, str | None]] = deque(maxlen=10_000)
        self._stop = threading.Event()
        self._stop_reason = ""
        self._reload_requested = threading.Event()
        self._reload_lock = threading.Lock()
        self._analysis_done = threading.Event()
        self._fatal: list[str] = []
        self._started_at = time.monotonic()
        self._broker_noticed = False
        self.notifier = SystemdNotifier(environ=environ)
        self.watchdog = ProgressWatchdog(
            self.notifier, interval_s=watchdog_interval_from_env(environ),
            stall_timeout_s=config.watchdog.stall_timeout_s,
        )
        self.gate = QualityGate(config.quality)
        self.tracker = SpecimenTracker(SpecimenPolicy.from_config(config.specimen),
                                       station_id=config.station_id)
        frame_policy = FRAME_POLICY.get(config.source.kind, "block")
        self._frames: BoundedQueue[_Work] = BoundedQueue("frames", 2, frame_policy)
        self._requests: BoundedQueue[_Request] = BoundedQueue("requests", 8, "reject_when_full")
        self._reports: BoundedQueue[_Outgoing] = BoundedQueue("reports", 64, "block")
        self._telemetry_reader = TelemetryReader()
        self.outbox: Outbox | None = None
        self.publisher: MqttPublisher | None = None
        self.source: FrameSource | None = None
        self.analyzer: AnalyzerLike | None = None
        self._threads: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self, why: str) -> None:
        """Ask for an orderly shutdown (signal handlers, max_fields, source end). Idempotent."""
        if not self._stop.is_set():
            self._stop_reason = why
            logger.info("stopping: %s", why)
            self._stop.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Start, supervise until asked to stop, shut down; the process exit code."""
        try:
            self.start()
        except BaseException:
            self._close_resources()
            raise
        try:
            self.supervise()
        finally:
            code = self.shutdown()
        return code

    def start(self) -> None:
        """Open everything, warm the engines, start the threads, then READY=1.

        Raises StartupError (config field and reason, or an operational reason)."""
        cfg = self.config
        self.watchdog.start()
        self.notifier.status("starting: opening outbox, source and engines")
        box = cfg.mqtt.outbox
        try:
            self.outbox = Outbox(box.path, box.max_messages, box.max_bytes, box.overflow_policy)
        except OutboxLockedError as exc:
            raise StartupError(None, f"{exc} (is another smearscope running?)") from exc
        except Exception as exc:  # sqlite3 or OS error: the configured path is unusable
            raise StartupError("mqtt.outbox.path", f"cannot open {box.path}: {exc}") from exc
        try:
            self.publisher = MqttPublisher(cfg.mqtt, cfg.station_id, self.outbox,
                                           on_command=self.handle_command,
                                           telemetry_source=self._telemetry,
                                           environ=self._environ)
        except CredentialError as exc:
            raise StartupError("mqtt.password_credential", str(exc)) from exc
        try:
            self.source = open_source(cfg.source)
        except SourceConfigurationError as exc:
            raise StartupError("source.path" if hasattr(cfg.source, "path") else "source.kind",
                               str(exc)) from exc
        t0 = time.monotonic()
        self.analyzer = self._analyzer_factory(cfg)  # loads and warms the engines
        logger.info("engines loaded and warm in %.1f s", time.monotonic() - t0)
        self.publisher.start()
        self._start_thread("report-writer", self._report_loop)
        self._start_thread("analysis", self._analysis_loop)
        self._start_thread("capture", self._capture_loop)
        self._started_at = time.monotonic()
        self.notifier.ready(self.status_line())
        logger.info("station %s ready (source %s, frames queue %s)", cfg.station_id,
                    cfg.source.kind, self._frames.policy)

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads[name] = thread
        thread.start()

    def supervise(self) -> None:
        """Main-thread loop: STATUS= on change, reloads, broker notice, worker health."""
        last_status = ""
        while not self._stop.wait(1.0 if self.notifier.enabled else _TICK_S):
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                logger.info("reload: %s", self.reload())
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line
            if time.monotonic() - self._started_at > _BROKER_NOTICE_AFTER_S:
                self._notice_missing_broker()
            dead = [n for n, t in self._threads.items() if not t.is_alive()]
            if dead and not self._stop.is_set():
                self._fatal.append(f"worker thread(s) ended unexpectedly: {', '.join(dead)}")
                self.request_stop(self._fatal[-1])

    def _notice_missing_broker(self) -> None:
        """Say once, in the log and to the user, that reports are held because no broker answers."""
        if self._broker_noticed or self.publisher is None or self.publisher.state.connected:
            return
        self._broker_noticed = True
        m, state = self.config.mqtt, self.publisher.state
        text = (f"no MQTT broker answered at {m.host}:{m.port} "
                f"({state.last_error or 'no connection yet'}); reports are kept in the outbox "
                f"{m.outbox.path} and sent when the broker answers")
        logger.warning("%s", text)
        self._announce(text)

    def shutdown(self) -> int:
        """Drain in-flight work, publish the open run's report, go offline; the exit code."""
        self.request_stop("shutdown")
        self.notifier.stopping(f"stopping ({self._stop_reason}): {self.status_line()}")
        if self.source is not None:
            self.source.close()
        deadline = time.monotonic() + _JOIN_BUDGET_S
        for name in ("capture", "analysis", "report-writer"):  # producers first
            thread = self._threads.get(name)
            if thread is not None:
                thread.join(max(0.1, deadline - time.monotonic()))
                if thread.is_alive():
                    self._fatal.append(f"{name} thread did not stop within the shutdown budget "
                                       f"({_JOIN_BUDGET_S:.0f} s)")
                    logger.error("%s", self._fatal[-1])
        if self.publisher is not None and self.publisher.state.connects == 0:
            self._notice_missing_broker()
        self._close_resources()
        snap = self.stats.snapshot()
        logger.info("stopped: %d fields analysed, %d rejected, %d failed, %d reports stored, "
                    "%d lost", snap["analysed"], sum(snap["rejected"].values()),
                    sum(snap["failed"].values()), snap["stored"], snap["lost"])
        return EXIT_FAILURE if self._fatal or snap["lost"] else EXIT_OK

    def _close_resources(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()  # bounded drain, retained "offline", disconnect
        self.watchdog.stop()
        close = getattr(self.analyzer, "close", None)
        if close is not None:
            close()
        if self.source is not None:
            self.source.close()
        self._telemetry_reader.close()
        if self.outbox is not None:
            self.outbox.close()
        self.notifier.close()

    # ------------------------------------------------------------------ capture

    def _capture_loop(self) -> None:
        """Source -> quality gate -> frames queue, until the source ends or stop is requested."""
        assert self.source is not None
        frames = iter(self.source)
        analysis_alive = self._threads["analysis"].is_alive
        try:
            while not self._stop.is_set():
                if not self._wait_for_budget():
                    break
                frame = next(frames, None)
                if frame is None:
                    if not self._stop.is_set():
                        self.request_stop(f"source {self.source.name} ended")
                    break
                # A frame already taken (a folder file is moved on read) is handled even if
                # stop was requested meanwhile: the analysis thread drains the queue.
                frame = self._with_scale(frame)
                verdict = self.gate.check(frame)
                if not verdict.accepted:
                    self._reject(frame.frame_id, "rejected", verdict.reason or "unknown")
                    continue
                self.stats.add("pending")
                work = _Work(frame, on_drop=functools.partial(self._dropped, frame.frame_id))
                if not self._frames.put(work, analysis_alive):
                    self.stats.add("pending", -1)
        except Exception:
            logger.exception("capture thread failed")
            self._fatal.append("capture thread failed")
            self.request_stop("capture failure")
        finally:
            self._frames.put_sentinel(analysis_alive)

    def _wait_for_budget(self) -> bool:
        """With --max-fields, take no frame beyond the fields still wanted."""
        while self.max_fields is not None and not self._stop.is_set():
            snap = self.stats.snapshot()
            if snap["analysed"] + snap["pending"] < self.max_fields:
                return True
            self._stop.wait(0.05)
        return not self._stop.is_set()

    def _with_scale(self, frame: Frame) -> Frame:
        override = self.config.analysis.microns_per_pixel
        if override is None or frame.microns_per_pixel == override:
            return frame
        return dataclasses.replace(frame, microns_per_pixel=override)

    def _dropped(self, frame_id: str) -> None:
        self.stats.add("pending", -1)
        self.outcomes.append((frame_id, "dropped", "keep_newest"))

    def _reject(self, frame_id: str, outcome: str, reason: str) -> None:
        self.stats.add(outcome, reason=reason)
        self.outcomes.append((frame_id, outcome, reason))
        if outcome == "rejected":
            logger.info("frame %s rejected by the quality gate: %s", frame_id, reason)

    # ------------------------------------------------------------------ analysis

    def _analysis_loop(self) -> None:
        """Frames and command requests -> field reports and specimen reports."""
        writer_alive = self._threads["report-writer"].is_alive
        try:
            while True:
                self._serve_requests()
                closed = self.tracker.check_idle()
                if closed is not None:
                    self._emit_closed(closed)
                try:
                    item = self._frames.get(timeout=_TICK_S)
                except queue.Empty:
                    continue
                if item is _SENTINEL:
                    break
                try:
                    self.analyse(item.frame)
                finally:
                    self.stats.add("pending", -1)
        except Exception:
            logger.exception("analysis thread failed")
            self._fatal.append("analysis thread failed")
            self.request_stop("analysis failure")
        finally:
            try:
                self._serve_requests()
                closed = self.tracker.stop("shutdown")
                if closed is not None:
                    self._emit_closed(closed)
            except Exception:
                logger.exception("closing the open specimen run failed")
            finally:
                self._analysis_done.set()
                self._reports.put_sentinel(writer_alive)

    def analyse(self, frame: Frame) -> dict[str, Any]:
        """Analyse one accepted frame; never raises for a bad frame. Returns a command answer."""
        assert self.analyzer is not None
        run_id = self.tracker.run_for_next_field()
        try:
            with self.watchdog.working("analysis"):
                result = self.analyzer.analyze(frame, run_id)
        except IngestError as exc:
            reason = getattr(exc.code, "value", str(exc.code))
            logger.warning("frame %s refused (%s): %s", frame.frame_id, reason, exc)
            self._reject(frame.frame_id, "failed", reason)
            return {"ok": False, "frame_id": frame.frame_id, "error": reason, "message": str(exc)}
        except Exception as exc:
            logger.exception("frame %s: analysis failed (analysis_error)", frame.frame_id)
            self._reject(frame.frame_id, "failed", "analysis_error")
            return {"ok": False, "frame_id": frame.frame_id, "error": "analysis_error",
                    "message": f"{type(exc).__name__}: {exc}"}
        result, closed = self.tracker.add(result)
        self._emit(_Outgoing("field", result.report))
        if closed is not None:
            self._emit_closed(closed)
        self.stats.add("analysed")
        self.outcomes.append((frame.frame_id, "analysed", None))
        if self.max_fields is not None and self.stats.snapshot()["analysed"] >= self.max_fields:
            self.request_stop(f"{self.max_fields} fields analysed (--max-fields)")
        r = result.report
        return {"ok": True, "frame_id": frame.frame_id, "report_id": r.report_id,
                "run_id": r.run_id, "counts": r.counts.model_dump()}

    def _emit(self, item: _Outgoing) -> None:
        if not self._reports.put(item, self._threads["report-writer"].is_alive):
            self.stats.add("lost")
            logger.error("%s report %s LOST: the outbox writer is gone", item.kind,
                         item.report.report_id)

    def _emit_closed(self, closed: ClosedRun) -> None:
        if closed.report is not None:
            self._emit(_Outgoing("report", closed.report))

    def _serve_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                request.response = request.run()
            except Exception as exc:
                logger.exception("command %s failed", request.name)
                request.response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            request.done.set()

    # ------------------------------------------------------------------ outbox writer

    def _report_loop(self) -> None:
        """Reports -> durable outbox (the publisher sends them). Never drops one."""
        while True:
            item = self._reports.get()
            if item is _SENTINEL:
                return
            try:
                self._store(item)
            except Exception:
                logger.exception("storing report %s failed", item.report.report_id)
                self.stats.add("lost")

    def _store(self, item: _Outgoing) -> None:
        assert self.publisher is not None
        report = item.report
        payload = report.model_dump_json().encode()
        attempt = 0
        # One stamp across the retries: an outbox that keeps failing is a stall, not progress.
        self.watchdog.work_started("publish")
        try:
            while True:
                try:
                    seq = self.publisher.publish_report(item.kind, report.report_id, payload,
                                                        SCHEMA_VERSION)
                    break
                except (sqlite3.Error, OSError) as exc:  # disk full, I/O error: retry
                    attempt += 1
                    if self._stop.is_set() and attempt >= 3:
                        self.stats.add("lost")
                        logger.error("%s report %s LOST: outbox write failed %d times while "
                                     "stopping: %s", item.kind, report.report_id, attempt, exc)
                        return
                    if attempt & (attempt - 1) == 0:
                        logger.error("outbox write of report %s failed (attempt %d): %s; "
                                     "retrying", report.report_id, attempt, exc)
                    time.sleep(min(10.0, 0.2 * 2 ** min(attempt, 6)))
        finally:
            self.watchdog.work_finished("publish")
        topic = self.publisher.report_topic if item.kind == "report" else self.publisher.field_topic
        field_id = report.source.frame_id if report.source is not None else None
        self.ledger.append(StoredReport(item.kind, topic, report.report_id, seq, report.run_id,
                                        field_id, report.fields_analyzed,
                                        report.counts.model_dump()))
        self.stats.add("stored")
        logger.info("stored %s message report_id=%s seq=%d run=%s field=%s", item.kind,
                    report.report_id, seq, report.run_id, field_id)

    # ------------------------------------------------------------------ commands

    def handle_command(self, name: str, arguments: dict[str, Any]) -> Mapping[str, Any]:
        """MQTT cmd/<name> (called on the publisher's command thread); the response body."""
        if name == "status":
            return {"ok": True, **self.status()}
        if name == "reload":
            return self.reload()
        if name == "start_run":
            target = arguments.get("target_wbc")
            if target is not None and (not isinstance(target, int) or isinstance(target, bool)
                                       or target < 1):
                return {"ok": False, "error": "target_wbc must be a positive integer"}
            return self._in_analysis(name, lambda: self._start_run(target))
        if name == "stop_run":
            return self._in_analysis(name, self._stop_run)
        if name == "analyze_file":
            return self._analyze_file(arguments.get("path"))
        return {"ok": False, "error": f"unknown command {name!r}",
                "commands": ["analyze_file", "reload", "start_run", "status", "stop_run"]}

    def _in_analysis(self, name: str, run: Callable[[], dict[str, Any]],
                     timeout: float = _COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """Run `run` on the analysis thread (it owns the specimen state) and wait for it."""
        if self._analysis_done.is_set():
            return {"ok": False, "error": "station is shutting down"}
        request = _Request(name, run)
        if not self._requests.put(request):
            return {"ok": False, "error": "busy: too many commands waiting"}
        deadline = time.monotonic() + timeout
        while not request.done.wait(_TICK_S):
            if self._analysis_done.is_set() and not request.done.is_set():
                return {"ok": False, "error": "station is shutting down"}
            if time.monotonic() >= deadline:
                return {"ok": True, "accepted": True, "done": False,
                        "note": f"still waiting for the analysis thread after {timeout:.0f} s; "
                                "its result will be published"}
        return request.response or {"ok": False, "error": "no response"}

    def _start_run(self, target: int | None) -> dict[str, Any]:
        try:
            run_id = self.tracker.start(started_by="command", target_wbc=target)
        except RunAlreadyOpen as exc:
            return {"ok": False, "error": str(exc)}
        progress = self.tracker.progress()
        target_wbc = progress.target_wbc if progress else None
        return {"ok": True, "run_id": run_id, "target_wbc": target_wbc}

    def _stop_run(self) -> dict[str, Any]:
        closed = self.tracker.stop("stopped")
        if closed is None:
            return {"ok": False, "error": "no specimen run is open"}
        self._emit_closed(closed)
        return {"ok": True, "run_id": closed.run_id, "fields": closed.fields,
                "classified_wbc": closed.classified_wbc, "target_wbc": closed.target_wbc,
                "complete": closed.complete,
                "report_id": closed.report.report_id if closed.report else None}

    def _analyze_file(self, path: object) -> dict[str, Any]:
        if not isinstance(path, str) or not path:
            return {"ok": False, "error": "analyze_file needs {\"path\": \"/absolute/file\"}"}
        if not Path(path).is_absolute():
            return {"ok": False, "error": "path must be absolute"}
        try:
            image = load_image(path)
        except IngestError as exc:
            reason = getattr(exc.code, "value", str(exc.code))
            self._reject(f"file:{path}", "failed", reason)
            return {"ok": False, "error": reason, "message": str(exc)}
        digest = hashlib.sha1(image.pixels.tobytes()).hexdigest()[:12]
        frame_id = f"file:{Path(path).name}@{digest}"
        frame = self._with_scale(Frame(pixels=image.pixels, frame_id=frame_id, source="command"))

        def run() -> dict[str, Any]:
            verdict = self.gate.check(frame)
            if not verdict.accepted:
                self._reject(frame.frame_id, "rejected", verdict.reason or "unknown")
                return {"ok": False, "frame_id": frame.frame_id, "error": verdict.reason}
            return self.analyse(frame)

        return self._in_analysis("analyze_file", run)

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply log level, quality gate and specimen policy live,
        and say which other changed sections need a restart."""
        with self._reload_lock:
            if self.config_path is None:
                return {"ok": False,
                        "error": "no config file (embedded station); nothing to reload"}
            try:
                new = load_config(self.config_path, self._environ)
            except ConfigError as exc:
                return {"ok": False, "error": "invalid config; nothing changed",
                        "problems": [f"{loc}: {msg}" for loc, msg in exc.errors]}
            old_dump, new_dump = self.config.model_dump(), new.model_dump()
            changed = [k for k in new_dump if new_dump[k] != old_dump[k]]
            applied = [k for k in changed if k in LIVE_SECTIONS]
            if "log_level" in applied:
                logging.getLogger().setLevel(new.log_level)
            if "quality" in applied:
                self.gate.config = new.quality
            if "specimen" in applied:
                self.tracker.set_policy(SpecimenPolicy.from_config(new.specimen))
            self.config = self.config.model_copy(update={k: getattr(new, k) for k in applied})
            restart = [k for k in changed if k not in LIVE_SECTIONS]
            return {"ok": True, "applied": applied, "requires_restart": restart,
                    "note": "a new specimen target applies to runs started after the reload"
                    if "specimen" in applied else ""}

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        progress = self.tracker.progress()
        out: dict[str, Any] = {
            "station_id": self.config.station_id,
            "state": "stopping" if self._stop.is_set() else "running",
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "fields_analysed": snap["analysed"],
            "rejected": snap["rejected"],
            "failed": snap["failed"],
            "frames_dropped": self._frames.dropped,
            "source_rejected_files": getattr(self.source, "rejected_count", 0),
            "reports_stored": snap["stored"],
            "reports_lost": snap["lost"],
            "run": progress.as_dict() if progress else None,
            "stalled_work": self.watchdog.stalled_work(),
        }
        if self.outbox is not None:
            out["outbox"] = dataclasses.asdict(self.outbox.counts())
        if self.publisher is not None:
            st = self.publisher.state
            out["broker"] = {"status": st.status, "last_error": st.last_error,
                             "delivered": st.delivered, "in_flight": st.in_flight}
        return out

    def status_line(self) -> str:
        snap = self.stats.snapshot()
        rejected = sum(snap["rejected"].values()) + getattr(self.source, "rejected_count", 0)
        failed = sum(snap["failed"].values())
        parts = [f"{snap['analysed']} fields analysed, {rejected} rejected, {failed} failed"]
        progress = self.tracker.progress()
        if progress is not None:
            parts.append(f"run {progress.run_id[:8]} {progress.classified_wbc}/"
                         f"{progress.target_wbc} WBC")
        if self.outbox is not None:
            counts = self.outbox.counts()
            parts.append(f"outbox {counts.messages} ({counts.reports} reports)")
        if self.publisher is not None:
            parts.append(f"broker {self.publisher.state.status}")
        return "; ".join(parts)

    def _telemetry(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        pipeline = {"fields_analysed": snap["analysed"],
                    "rejected": sum(snap["rejected"].values()),
                    "failed": sum(snap["failed"].values()),
                    "frames_dropped": self._frames.dropped,
                    "outbox_messages": self.outbox.counts().messages if self.outbox else None}
        return {**self._telemetry_reader.read(), "pipeline": pipeline}


# ---------------------------------------------------------------------- entry points


def _install_signal_handlers(daemon: StationDaemon) -> Callable[[], None]:
    """SIGTERM/SIGINT stop, SIGHUP reloads; returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # embedded in a test thread: the caller stops it

    def on_stop(signum: int, frame: FrameType | None) -> None:
        daemon.request_stop(f"signal {signal.Signals(signum).name}")

    def on_hup(signum: int, frame: FrameType | None) -> None:
        daemon.request_reload()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _print_ledger(daemon: StationDaemon, out: TextIO) -> None:
    """One line per report this run stored: delivered (acknowledged) or still in the outbox."""
    waiting: set[str] = set()
    path = daemon.config.mqtt.outbox.path
    try:
        with Outbox(path) as box:
            waiting = {m.report_id for m in box.pending(limit=1_000_000)}
    except (sqlite3.Error, OSError, OutboxLockedError) as exc:
        print(f"(cannot read the outbox {path}: {exc})", file=out)
    for r in daemon.ledger:
        state = "in-outbox" if r.report_id in waiting else "delivered"
        c = r.counts
        where = f"run={r.run_id or '-'}" + (f" field={r.field_id}" if r.field_id else
                                            f" fields={r.fields_analyzed}")
        print(f"{state:<10} {r.topic} {r.report_id} rbc={c['rbc']} wbc={c['wbc']} "
              f"platelet={c['platelet']} {where}", file=out)
    held = sum(1 for r in daemon.ledger if r.report_id in waiting)
    m = daemon.config.mqtt
    print(f"{len(daemon.ledger)} reports: {len(daemon.ledger) - held} delivered to "
          f"{m.host}:{m.port}, {held} kept in the outbox {path} (sent when a broker answers)",
          file=out)


def run_daemon(
    config_path: Path | None,
    max_fields: int | None = None,
    *,
    analyzer_factory: AnalyzerFactory = build_analyzer,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """`smearscope run`: the station daemon until SIGTERM/SIGINT (or `max_fields` fields).

    Without a config file the embedded simulated station runs (service.embedded). Exit codes:
    0 after an orderly stop, 78 for configuration errors (each printed as `field: reason`),
    1 for other failures."""
    out = sys.stdout if out is None else out
    if max_fields is not None and max_fields < 1:
        print("--max-fields: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if config_path is None:
            from service.embedded import embedded_config

            config = embedded_config(environ)
        else:
            config = load_config(config_path, environ)
    except ConfigError as exc:
        for loc, msg in exc.errors:
            print(f"{loc}: {msg}", file=sys.stderr)
        print(f"{config_path or 'embedded config'}: {len(exc.errors)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(config.log_level)
    interactive = config_path is None or max_fields is not None
    if config_path is None:
        print(f"smearscope: embedded station '{config.station_id}' (simulated source, models "
              f"{config.analysis.models_dir}, MQTT {config.mqtt.host}:{config.mqtt.port}, outbox "
              f"{config.mqtt.outbox.path})", file=out, flush=True)
    daemon = StationDaemon(
        config, analyzer_factory=analyzer_factory, config_path=config_path,
        max_fields=max_fields, environ=environ,
        announce=(lambda text: print(f"smearscope: {text}", file=out, flush=True))
        if interactive else None,
    )
    restore = _install_signal_handlers(daemon)
    try:
        code = daemon.run()
    except StartupError as exc:
        print(f"{exc.field or 'smearscope'}: {exc.reason}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        logger.exception("station %s failed to start", config.station_id)
        return EXIT_FAILURE
    finally:
        restore()
        logging.getLogger().setLevel(root_level)
    if max_fields is not None:
        _print_ledger(daemon, out)
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m service.daemon [--config FILE] [--max-fields N]` (same as `smearscope run`)."""
    ap = argparse.ArgumentParser(prog="python -m service.daemon", description=main.__doc__)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--max-fields", type=int, default=None)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    return run_daemon(args.config, args.max_fields)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so loggers are named service.daemon.
    from service.daemon import main as _main

    sys.exit(_main())
