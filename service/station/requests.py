"""Work handed to the thread that owns some state, served by that thread between its own work.

A command thread (MQTT) must not touch what another thread owns: the specimen state belongs to
the analysis thread, the configuration to the daemon's main thread. It wraps the work in a
`CommandRequest`, puts it in the owner's `RequestQueue` (reject_when_full: a full queue answers
"busy") and waits for the answer, at most `COMMAND_TIMEOUT_S` (a late result is still applied
and published by the owner). The owner calls `serve_pending()` between its own work and `close()`
when it ends, after which waiting and later requests are refused.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smearscope.service.station.work_queue import TICK_S, BoundedQueue

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 30.0


@dataclass
class CommandRequest:
    """One piece of work for the owning thread, and its answer."""

    name: str
    run: Callable[[], dict[str, Any]]
    done: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None


class RequestQueue:
    """A small queue of requests one thread serves for the others."""

    def __init__(self, name: str, capacity: int = 8) -> None:
        self._requests: BoundedQueue[CommandRequest] = BoundedQueue(name, capacity, "reject_when_full")
        self._owner_done = threading.Event()

    def call(self, name: str, run: Callable[[], dict[str, Any]],
             timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """Have the owner run `run` and wait for its answer (called by any other thread)."""
        if self._owner_done.is_set():
            return {"ok": False, "error": "shutting_down", "message": "the station is shutting down"}
        request = CommandRequest(name, run)
        if not self._requests.put(request):
            return {"ok": False, "error": "busy", "message": "too many commands waiting"}
        deadline = time.monotonic() + timeout
        while not request.done.wait(TICK_S):
            if self._owner_done.is_set() and not request.done.is_set():
                return {"ok": False, "error": "shutting_down", "message": "the station is shutting down"}
            if time.monotonic() >= deadline:
                return {"ok": True, "accepted": True, "done": False,
                        "note": f"still waiting for the station after {timeout:.0f} s; "
                                "its result will be published"}
        if request.response is None:
            return {"ok": False, "error": "command_failed", "message": "the station gave no response"}
        return request.response

    def serve_pending(self) -> None:
        """Run every waiting request (called by the owning thread between its own work)."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                request.response = request.run()
            except Exception as exc:
                logger.exception("command %s failed", request.name)
                request.response = {"ok": False, "error": "command_failed", "message": f"{type(exc).__name__}: {exc}"}
            request.done.set()

    def close(self) -> None:
        """The owning thread has ended: later and still-waiting requests are refused."""
        self._owner_done.set()
