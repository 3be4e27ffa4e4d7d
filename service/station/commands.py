"""The station's MQTT commands (`cmd/<name>`): status, reload, start_run, stop_run, analyze_file.

Commands arrive on the publisher's command thread. Whatever touches the specimen state runs on
the analysis thread, which owns it: the command becomes a `CommandRequest` in a small
reject_when_full queue (a full one is answered "busy"), the analysis thread serves it between
frames, and the command thread waits for the answer, at most `COMMAND_TIMEOUT_S` (a late
result is still applied and published). `reload` is also what SIGHUP runs.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smearscope.device.frame import Frame
from smearscope.service.config import ConfigError, load_config
from smearscope.service.ingest import IngestError, load_image
from smearscope.service.station.specimen import RunAlreadyOpen, SpecimenPolicy
from smearscope.service.station.work_queue import TICK_S, BoundedQueue

if TYPE_CHECKING:
    from smearscope.service.station.daemon import StationDaemon

logger = logging.getLogger(__name__)

COMMAND_NAMES = ("analyze_file", "reload", "start_run", "status", "stop_run")
COMMAND_TIMEOUT_S = 30.0
#: Config sections a `reload` applies live; every other change needs a restart.
LIVE_SECTIONS = ("log_level", "quality", "specimen")


@dataclass
class CommandRequest:
    """Work a command hands to the analysis thread (which owns the specimen state)."""

    name: str
    run: Callable[[], dict[str, Any]]
    done: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None


class StationCommands:
    """Answers one daemon's commands; owns the request queue its analysis thread serves."""

    def __init__(self, daemon: StationDaemon, environ: Mapping[str, str] | None = None) -> None:
        self._daemon = daemon
        self._environ = environ
        self._requests: BoundedQueue[CommandRequest] = BoundedQueue(
            "requests", 8, "reject_when_full")
        self._analysis_done = threading.Event()
        self._reload_lock = threading.Lock()

    # ------------------------------------------------------------------ command thread

    def handle(self, name: str, arguments: dict[str, Any]) -> Mapping[str, Any]:
        """MQTT cmd/<name> (called on the publisher's command thread); the response body."""
        if name == "status":
            return {"ok": True, **self._daemon.status()}
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
        return {"ok": False, "error": f"unknown command {name!r}", "commands": list(COMMAND_NAMES)}

    def _in_analysis(self, name: str, run: Callable[[], dict[str, Any]],
                     timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """Run `run` on the analysis thread (it owns the specimen state) and wait for it."""
        if self._analysis_done.is_set():
            return {"ok": False, "error": "station is shutting down"}
        request = CommandRequest(name, run)
        if not self._requests.put(request):
            return {"ok": False, "error": "busy: too many commands waiting"}
        deadline = time.monotonic() + timeout
        while not request.done.wait(TICK_S):
            if self._analysis_done.is_set() and not request.done.is_set():
                return {"ok": False, "error": "station is shutting down"}
            if time.monotonic() >= deadline:
                return {"ok": True, "accepted": True, "done": False,
                        "note": f"still waiting for the analysis thread after {timeout:.0f} s; "
                                "its result will be published"}
        return request.response or {"ok": False, "error": "no response"}

    def _analyze_file(self, path: object) -> dict[str, Any]:
        if not isinstance(path, str) or not path:
            return {"ok": False, "error": "analyze_file needs {\"path\": \"/absolute/file\"}"}
        if not Path(path).is_absolute():
            return {"ok": False, "error": "path must be absolute"}
        workers = self._daemon.workers
        try:
            image = load_image(path)
        except IngestError as exc:
            reason = getattr(exc.code, "value", str(exc.code))
            workers.reject(f"file:{path}", "failed", reason)
            return {"ok": False, "error": reason, "message": str(exc)}
        digest = hashlib.sha1(image.pixels.tobytes()).hexdigest()[:12]
        frame_id = f"file:{Path(path).name}@{digest}"
        frame = workers.with_scale(Frame(pixels=image.pixels, frame_id=frame_id, source="command"))

        def run() -> dict[str, Any]:
            verdict = workers.gate.check(frame)
            if not verdict.accepted:
                workers.reject(frame.frame_id, "rejected", verdict.reason or "unknown")
                return {"ok": False, "frame_id": frame.frame_id, "error": verdict.reason}
            return workers.analyse(frame)

        return self._in_analysis("analyze_file", run)

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply log level, quality gate and specimen policy live,
        and say which other changed sections need a restart."""
        daemon = self._daemon
        with self._reload_lock:
            if daemon.config_path is None:
                return {"ok": False,
                        "error": "no config file (embedded station); nothing to reload"}
            try:
                new = load_config(daemon.config_path, self._environ)
            except ConfigError as exc:
                return {"ok": False, "error": "invalid config; nothing changed",
                        "problems": [f"{loc}: {msg}" for loc, msg in exc.errors]}
            old_dump, new_dump = daemon.config.model_dump(), new.model_dump()
            changed = [k for k in new_dump if new_dump[k] != old_dump[k]]
            applied = [k for k in changed if k in LIVE_SECTIONS]
            if "log_level" in applied:  # a --log-level given on the command line still wins
                logging.getLogger().setLevel(daemon.log_level_override or new.log_level)
            if "quality" in applied:
                daemon.gate.config = new.quality
            if "specimen" in applied:
                daemon.tracker.set_policy(SpecimenPolicy.from_config(new.specimen))
            daemon.config = daemon.config.model_copy(update={k: getattr(new, k) for k in applied})
            restart = [k for k in changed if k not in LIVE_SECTIONS]
            return {"ok": True, "applied": applied, "requires_restart": restart,
                    "note": "a new specimen target applies to runs started after the reload"
                    if "specimen" in applied else ""}

    # ------------------------------------------------------------------ analysis thread

    def serve_pending(self) -> None:
        """Run every waiting request (called by the analysis thread between frames)."""
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

    def close(self) -> None:
        """The analysis thread has ended: later and still-waiting requests are refused."""
        self._analysis_done.set()

    def _start_run(self, target: int | None) -> dict[str, Any]:
        tracker = self._daemon.tracker
        try:
            run_id = tracker.start(started_by="command", target_wbc=target)
        except RunAlreadyOpen as exc:
            return {"ok": False, "error": str(exc)}
        progress = tracker.progress()
        target_wbc = progress.target_wbc if progress else None
        return {"ok": True, "run_id": run_id, "target_wbc": target_wbc}

    def _stop_run(self) -> dict[str, Any]:
        closed = self._daemon.tracker.stop("stopped")
        if closed is None:
            return {"ok": False, "error": "no specimen run is open"}
        self._daemon.workers.emit_closed(closed)
        return {"ok": True, "run_id": closed.run_id, "fields": closed.fields,
                "classified_wbc": closed.classified_wbc, "target_wbc": closed.target_wbc,
                "complete": closed.complete,
                "report_id": closed.report.report_id if closed.report else None}
