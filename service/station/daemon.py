"""The station daemon: opens the station's resources, runs its workers, supervises and stops them.

    capture ──frames──▶ analysis ──reports──▶ outbox writer ──▶ Outbox ──▶ MqttPublisher (drain)
       ▲ FrameSource      ▲ requests (commands)                               │ cmd/#, telemetry
       └ QualityGate      └ SpecimenTracker                                   ▼

The worker threads and their queues are `station.workers`; the MQTT commands are
`station.commands`, which reach the station only through what the daemon hands them; the counters
and the end-of-run ledger are `station.daemon_summary`; what it says of itself (status, STATUS=,
telemetry) is `station.daemon_status`; what stops a start, and the production analyzer factory, are
`station.startup`. A start that fails once the workers run stops them before closing the rest.

Stopping: the capture worker watches the daemon's stop Event (set by SIGTERM/SIGINT, `--max-fields`, the end of the
source, a dead worker); the analysis and writer workers stop only at their sentinels, so whatever was captured is
drained. Shutdown: STOPPING=1, the source is closed, the capture thread enqueues its sentinel, the analysis thread
drains what was captured, closes an open specimen run (its final report is published) and enqueues the reports
sentinel; the writer stores everything; the publisher drains and publishes retained "offline". The whole stop shares
one time budget counted from the stop request, under the unit's TimeoutStopSec (`station.stopping`): the drain gets
what the joins left of it. SIGHUP reloads the config file, as the `reload` command does: both are applied by the
daemon's main thread (the command through its control `RequestQueue`), which owns the config, and have the publisher
read its broker password and TLS files again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from smearscope.device.frame import Frame
from smearscope.device.quality import QualityGate
from smearscope.device.sources import FrameSource, SourceConfigurationError, open_source
from smearscope.device.telemetry import TelemetryReader
from smearscope.service.analysis.aggregate import AggregateThresholds
from smearscope.service.analysis.wording import counted
from smearscope.service.config import (
    EXIT_CONFIG,
    ConfigError,
    StationConfig,
    load_config,
    print_config_errors,
)
from smearscope.service.journal_log import setup_logging
from smearscope.service.mqtt.credentials import CredentialError
from smearscope.service.mqtt.outbox import Outbox, OutboxLockedError
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.mqtt.salvage import open_salvaging
from smearscope.service.mqtt.wall_clock import clock_before_release
from smearscope.service.station.calibration_watch import calibration_key
from smearscope.service.station.clinic import ClinicFeed
from smearscope.service.station.commands import StationCommands
from smearscope.service.station.daemon_status import DaemonStatus
from smearscope.service.station.daemon_summary import print_ledger
from smearscope.service.station.memory_bound import say_memory_verdict
from smearscope.service.station.notify import (
    ProgressWatchdog,
    SystemdNotifier,
    watchdog_interval_from_env,
)
from smearscope.service.station.preflight import config_field, file_problems, source_field
from smearscope.service.station.reload import compare, invalid_config_answer
from smearscope.service.station.requests import RequestQueue
from smearscope.service.station.scale_record import scale_calibration_note
from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker
from smearscope.service.station.startup import (
    EXIT_FAILURE,
    EXIT_OK,
    AnalyzerFactory,
    AnalyzerLike,
    StartupError,
    build_analyzer,
)
from smearscope.service.station.state_access import refused_for_access
from smearscope.service.station.stopping import (
    STOP_BUDGET_S,
    StopBudget,
    install_signal_handlers,
    join_workers,
)
from smearscope.service.station.work_queue import TICK_S
from smearscope.service.station.workers import THREAD_NAMES, StationWorkers

logger = logging.getLogger(__name__)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "StartupError", "StationDaemon", "build_analyzer",
           "main", "run_daemon"]

_BROKER_NOTICE_AFTER_S = 3.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class StationDaemon(DaemonStatus):
    """Owns the source, analyzer, outbox and publisher of one station process, and its workers."""

    def __init__(
        self,
        config: StationConfig,
        *,
        analyzer_factory: AnalyzerFactory = build_analyzer,
        config_path: Path | None = None,
        max_fields: int | None = None,
        environ: Mapping[str, str] | None = None,
        log_level_override: str | None = None,
        stop_budget_s: float = STOP_BUDGET_S,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.max_fields = max_fields
        #: A log level given on the command line; it wins over the config's (also on reload).
        self.log_level_override = log_level_override
        self._environ = environ
        self._analyzer_factory = analyzer_factory
        self._stop = threading.Event()
        self._stop_reason = ""
        #: The stop's time, from its first request (SIGTERM) to the publisher's "offline".
        self._stop_budget = StopBudget(stop_budget_s)
        self._reload_requested = threading.Event()
        self._fatal: list[str] = []
        self._started_at = time.monotonic()
        self._broker_noticed = False
        self.notifier = SystemdNotifier(environ=environ)
        self.watchdog = ProgressWatchdog(self.notifier, interval_s=watchdog_interval_from_env(environ),
                                         stall_timeout_s=config.watchdog.stall_timeout_s)
        self.gate = QualityGate(config.quality)
        self.tracker = SpecimenTracker(SpecimenPolicy.from_config(config.specimen),
                                       station_id=config.station_id,
                                       thresholds=AggregateThresholds(**config.flags.model_dump()))
        analysis_requests = RequestQueue("requests")
        #: Work for this (main) thread, which owns `config`: the reload command's.
        self._control = RequestQueue("control")
        self.workers = StationWorkers(
            source_kind=config.source.kind, gate=self.gate, tracker=self.tracker,
            requests=analysis_requests, watchdog=self.watchdog, stop=self._stop,
            request_stop=self.request_stop, max_fields=max_fields,
            scale_override=config.analysis.microns_per_pixel, clinic=ClinicFeed(config),
            concurrent_fields=config.analysis.concurrent_fields,
            batch_delay_s=config.analysis.batch_delay_ms / 1000.0,
            calibration=calibration_key(config.microns_per_pixel, config.source.microns_per_pixel_calibrated_on),
        )
        self.commands = StationCommands(
            workers=self.workers, tracker=self.tracker, analysis=analysis_requests,
            status=self.status, reload=lambda: self._control.call("reload", self.reload),
            clinic=self.workers.clinic,  # a file the command names is from this microscope (not a rendered one's)
            file_scale=None if config.source.kind == "simulated" else config.source.microns_per_pixel,
            file_folders=config.commands.analyze_file_folders)
        self.stats, self.ledger, self.outcomes = (self.workers.stats, self.workers.ledger,
                                                  self.workers.outcomes)
        self._telemetry_reader = TelemetryReader()
        self.outbox: Outbox | None = None
        self.final_outbox: dict[str, Any] | None = None
        self.evicted_seqs: set[int] = set()
        self.publisher: MqttPublisher | None = None
        self.source: FrameSource | None = None
        self.analyzer: AnalyzerLike | None = None
        #: What `run` was doing when it raised, for the log: "to start", "while running", "while
        #: stopping" or "while running, and again while stopping".
        self.failed: str = "to start"

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self, why: str) -> None:
        """Ask for an orderly shutdown (signal handlers, max_fields, source end). Idempotent."""
        if not self._stop.is_set():
            self._stop_budget.start()
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
        self.failed = "to start"
        try:
            self.start()
        except BaseException as exc:
            self._stop_what_started(exc)
            raise
        try:
            self.failed = "while running"
            self.supervise()
        except BaseException:
            self.failed = "while running, and again while stopping"
            self.shutdown()  # its own exception, if any, carries the first as its context
            self.failed = "while running"
            raise
        self.failed = "while stopping"
        return self.shutdown()

    def start(self) -> None:
        """Open everything, warm the engines, start the threads, then READY=1.

        Raises StartupError (config field and reason, or an operational reason)."""
        cfg = self.config
        self._check_files()
        say_memory_verdict(cfg)  # WARNING when the predicted peak is above the memory limit
        self.watchdog.start()
        self.notifier.status("starting: opening outbox, source and engines")
        box = cfg.mqtt.outbox
        try:
            with self.notifier.extending():  # a damaged file's salvage copies what it can read
                self.outbox = open_salvaging(lambda: Outbox.from_config(box), box.path)
        except OutboxLockedError as exc:
            raise StartupError(None, f"{exc} (is another smearscope running?)") from exc
        except Exception as exc:  # sqlite3 or OS error: the path unusable (78), or the disk full (1: retried)
            raise StartupError(config_field(exc, "mqtt.outbox.path"), f"cannot open {box.path}: {exc}") from exc
        try:
            self.publisher = MqttPublisher(cfg.mqtt, cfg.station_id, self.outbox,
                                           on_command=self.handle_command,
                                           telemetry_source=self._telemetry,
                                           environ=self._environ)
            self.publisher.owner_says_first_failure = True  # _notice_missing_broker says it, once
        except CredentialError as exc:
            raise StartupError("mqtt.password_credential", str(exc)) from exc
        try:
            self.source = open_source(cfg.source)
        except (SourceConfigurationError, OSError) as exc:  # e.g. a state_file it cannot open
            raise StartupError(config_field(exc, source_field(cfg.source, exc)), str(exc)) from exc
        t0 = time.monotonic()
        with self.notifier.extending():  # EXTEND_TIMEOUT_USEC= while it takes
            self.analyzer = self._analyzer_factory(cfg)  # loads and warms the engines
        logger.info("engines loaded and warm in %.1f s", time.monotonic() - t0)
        self.workers.start(self.source, self.analyzer, self.publisher)  # runs read back before get_runs is answered
        try:
            self.publisher.start()
        except Exception as exc:  # e.g. a TLS file changed while the engines loaded
            self._check_files()  # named as a config error when a file the config names is now at fault
            raise StartupError(None, f"the MQTT publisher did not start ({cfg.mqtt.address}): "
                                     f"{type(exc).__name__}: {exc}") from exc
        self._started_at = time.monotonic()
        self.notifier.ready(self.status_line())
        logger.info("station %s ready (source %s, frames queue %s)", cfg.station_id,
                    cfg.source.kind, self.workers.frames.policy)
        if wrong := clock_before_release():  # said again by the outbox once network time steps it
            logger.warning("%s", wrong)
        if note := scale_calibration_note(cfg):
            logger.log(note[0], "scale: %s", note[1])

    def _check_files(self) -> None:
        """StartupError when a file the configuration names is unusable (e.g. a TLS CA file that is
        missing): a config error (78), not a crash."""
        problems = file_problems(self.config)
        if problems:
            raise StartupError(problems[0][0], "; ".join(f"{loc}: {msg}" if i else msg
                                                         for i, (loc, msg) in enumerate(problems)))

    def _stop_what_started(self, why: BaseException) -> None:
        """A start that failed part-way stops what it started, in reverse: the workers first (capture
        stops, what was captured is analysed and stored, an open run's report with it), then the
        publisher, engines, source and outbox; no worker is left writing to a closed outbox."""
        if self.workers.threads:
            self.request_stop(f"start failed: {why}")
            if self.source is not None:
                self.source.close()
            self._fatal += join_workers(self.workers.threads, THREAD_NAMES, self._stop_budget.join_deadline())
        self._close_resources(0.0)

    def supervise(self) -> None:
        """Main-thread loop: STATUS= on change, reloads, broker notice, worker health."""
        last_status = ""
        while not self._stop.wait(1.0 if self.notifier.enabled else TICK_S):
            self._control.serve_pending()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                result = self.reload()
                restart = result.get("requires_restart")  # changed sections a reload cannot apply: said louder
                (logger.info if result.get("ok") and not restart else logger.warning)(
                    "reload: %s%s", result, " (restart the station to apply them)" if restart else "")
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line
            if time.monotonic() - self._started_at > _BROKER_NOTICE_AFTER_S:
                self._notice_missing_broker()
            dead = self.workers.dead_threads()
            if dead and not self._stop.is_set():
                self._fatal.append(f"worker thread(s) ended unexpectedly: {', '.join(dead)}")
                self.request_stop(self._fatal[-1])

    def _notice_missing_broker(self) -> None:
        """Say once that reports are held because no broker answers, and why (the publisher leaves
        its first failure to this notice: one line, not three)."""
        if self._broker_noticed or self.publisher is None:
            return
        if self.publisher.state.connects > 0:  # the broker answered: a later outage is the publisher's to say
            self._broker_noticed = True
            return
        self._broker_noticed = True
        m, state = self.config.mqtt, self.publisher.state
        refused = state.status == "refused"
        said = "the MQTT broker at {} refused the station" if refused else "no MQTT broker answered at {}"
        # the publisher's "cannot reach broker H:P (why)...; retrying ..., reports wait in the outbox", its why kept
        why = (state.last_error or "no connection yet").removeprefix(f"cannot reach broker {m.address} ")
        why = why.removesuffix(", reports wait in the outbox")
        text = (f"{said.format(m.address)}{' ' if why.startswith('(') else ' ('}{why}{'' if why.startswith('(') else ')'}"
                f"; reports are kept in the outbox {m.outbox.path} and sent when the broker "
                f"{'accepts it' if refused else 'answers'}")
        logger.warning("%s", text)
        self.publisher.owner_says_first_failure = False

    def shutdown(self) -> int:
        """Drain in-flight work, publish the open run's report, go offline; the exit code."""
        self.request_stop("shutdown")
        self._control.close()
        self.notifier.stopping(f"stopping ({self._stop_reason}): {self.status_line()}")
        if self.source is not None:
            self.source.close()
        self._fatal += join_workers(self.workers.threads, THREAD_NAMES, self._stop_budget.join_deadline())
        if self.publisher is not None and self.publisher.state.connects == 0:
            self._notice_missing_broker()
        self._close_resources(self._drain_s())
        snap = self.stats.snapshot()
        left = self.final_outbox or {}
        logger.info("stopped: %s analysed, %d rejected, %d failed, %d frames dropped "
                    "(%s), %d left in the queue; %d reports stored, %d lost, %d deferred to the next "
                    "start; outbox: %d messages waiting (%d final: specimen reports, FHIR bundles; "
                    "%d parked), %d field messages evicted", counted(snap["analysed"], "field"),
                    sum(snap["rejected"].values()) + getattr(self.source, "rejected_count", 0),
                    sum(snap["failed"].values()), self.workers.frames.dropped, self.workers.frames.policy,
                    snap["pending"], snap["stored"], snap["lost"], snap["deferred"], left.get("messages", 0),
                    left.get("reports", 0), left.get("parked", 0), left.get("evicted_fields", 0))
        failed = self._fatal or self.workers.failures or snap["lost"]
        return EXIT_FAILURE if failed else EXIT_OK

    def _drain_s(self) -> float:
        """The publisher's drain: mqtt.stop_drain_timeout_s, or less when the stop budget is short."""
        configured = self.config.mqtt.stop_drain_timeout_s
        drain = self._stop_budget.drain_s(configured, MqttPublisher.STOP_AFTER_DRAIN_S)
        if drain < configured and self.publisher is not None and self.publisher.state.connected:
            logger.warning("the outbox is drained for %.1f s, not mqtt.stop_drain_timeout_s=%g: the stop has taken "
                           "%.1f s of its %.0f s (under the unit's TimeoutStopSec) and the publisher needs up to %g s "
                           "after the drain", drain, configured, self._stop_budget.elapsed(),
                           self._stop_budget.total_s, MqttPublisher.STOP_AFTER_DRAIN_S)
        return drain

    def _close_resources(self, drain_s: float | None = None) -> None:
        if self.publisher is not None:
            self.publisher.stop(drain_s)  # bounded drain, retained "offline", disconnect
        if self.outbox is not None:  # what the summary and the ledger say, before it closes
            self.final_outbox = {**dataclasses.asdict(self.outbox.counts()),
                                 "parked": self.publisher.state.parked if self.publisher else 0}
            self.evicted_seqs = set(self.outbox.evicted_seqs)
        self.watchdog.stop()
        for part in (self.analyzer, self.source, self.workers.clinic):
            if getattr(part, "close", None) is not None:
                part.close()  # type: ignore[union-attr]
        self._telemetry_reader.close()
        if self.outbox is not None:
            self.outbox.close()
        self.notifier.close()

    # ------------------------------------------------------------------ commands

    def handle_command(self, name: str, arguments: dict[str, Any]) -> Mapping[str, Any]:
        """MQTT cmd/<name> (called on the publisher's command thread); the response body."""
        return self.commands.handle(name, arguments)

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply log level, quality gate and specimen policy live, and
        say which other changed sections need a restart. Runs on the daemon's main thread (SIGHUP,
        the reload command through the control queue) or on a caller that has not started it."""
        if self.config_path is None:
            return {"ok": False, "error": "no_config", "message": "no config file (embedded station); nothing to reload"}
        try:
            new = load_config(self.config_path, self._environ)
        except Exception as exc:  # noqa: BLE001 - or a file no check foresaw: SIGHUP never ends the station
            return invalid_config_answer(exc)
        change = compare(self.config, new, self.analyzer)
        if "log_level" in change.applied:  # a --log-level given on the command line still wins
            logging.getLogger().setLevel(self.log_level_override or new.log_level)
        if "quality" in change.applied:
            self.gate.config = new.quality
        if "specimen" in change.applied:
            self.tracker.set_policy(SpecimenPolicy.from_config(new.specimen))
        self.config = change.merged(self.config, new)
        if self.publisher is not None:  # the broker password and TLS files, for its next connection (mqtt.secrets)
            self.publisher.renew_secrets()
        return {"ok": True, "applied": list(change.applied), "requires_restart": list(change.requires_restart),
                "note": "a new specimen target applies to runs started after the reload"
                if "specimen" in change.applied else ""}

    def analyse(self, frame: Frame) -> dict[str, Any]:
        """Analyse one accepted frame on the calling thread (see StationWorkers.analyse)."""
        return self.workers.analyse(frame)


# ---------------------------------------------------------------------- entry points


def _load(config_path: Path | None, environ: Mapping[str, str] | None) -> StationConfig:
    if config_path is None:
        from smearscope.service.station.embedded import embedded_config

        return embedded_config(environ)
    return load_config(config_path, environ)


def run_daemon(
    config_path: Path | None,
    max_fields: int | None = None,
    *,
    analyzer_factory: AnalyzerFactory = build_analyzer,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    log_level: str | None = None,
) -> int:
    """`smearscope run`: the station daemon until SIGTERM/SIGINT (or `max_fields` fields).

    Without a config file the embedded simulated station runs (service.station.embedded). The root
    logger runs at `log_level` when given (the command line's `--log-level`), else at the
    config's `log_level`. Exit codes: 0 after an orderly stop, 78 for configuration errors
    (each printed as `field: reason`), 1 for other failures."""
    out = sys.stdout if out is None else out
    if max_fields is not None and max_fields < 1:
        print("--max-fields: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if log_level is not None:
        log_level = log_level.upper()
        if log_level not in LOG_LEVELS:
            print(f"--log-level: unknown level {log_level!r}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        config = _load(config_path, environ)
    except ConfigError as exc:
        print_config_errors(exc, config_path or "embedded config")
        return EXIT_CONFIG
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(log_level or config.log_level)
    if config_path is None:
        print(f"smearscope: embedded station '{config.station_id}' (simulated source, models "
              f"{config.analysis.models_dir}, MQTT {config.mqtt.address}, outbox "
              f"{config.mqtt.outbox.path})", file=out, flush=True)
    if refused_for_access(config):  # said before the daemon opens its review gallery
        return EXIT_CONFIG
    daemon = StationDaemon(
        config, analyzer_factory=analyzer_factory, config_path=config_path,
        max_fields=max_fields, environ=environ, log_level_override=log_level,
    )
    restore = install_signal_handlers(daemon)
    try:
        code = daemon.run()
    except StartupError as exc:
        print(f"{exc.field or 'smearscope'}: {exc.reason}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        logger.exception("station %s failed %s", config.station_id, daemon.failed)
        return EXIT_FAILURE
    finally:
        restore()
        logging.getLogger().setLevel(root_level)
    if max_fields is not None:
        print_ledger(daemon.ledger, daemon.config.mqtt, out, evicted=daemon.evicted_seqs)
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m smearscope.service.station.daemon [--config FILE] [--max-fields N] [--log-level LEVEL]`
    (same as `smearscope run`)."""
    ap = argparse.ArgumentParser(prog="python -m smearscope.service.station.daemon", description=main.__doc__)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--max-fields", type=int, default=None)
    ap.add_argument("--log-level", type=str.upper, default=None, choices=LOG_LEVELS,
                    help="log threshold; overrides the config's log_level (default: the config's)")
    args = ap.parse_args(argv)
    setup_logging(args.log_level or "INFO", "%(levelname)s %(threadName)s %(name)s: %(message)s")  # journald's or plain
    os.umask(os.umask(0o027) | 0o027)  # files private to the lab, as `smearscope run` (smearscope.cli.station)
    return run_daemon(args.config, args.max_fields, log_level=args.log_level)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so loggers are named smearscope.service.station.daemon.
    from smearscope.service.station.daemon import main as _main

    sys.exit(_main())
