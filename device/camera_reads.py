"""A live camera's open() and read() calls, each bounded by `read_timeout_s`.

OpenCV's `VideoCapture.read()` cannot be interrupted: a stalled GStreamer/CSI pipeline or a V4L2
driver that stops handing out buffers leaves it blocked for ever, and the station would wait with
it, looking idle. So every call on a capture runs on a daemon thread of that capture's own, and the
camera source waits for it no longer than the bound. A call past the bound is a hung camera: said
once at ERROR (with the device, path, URL or pipeline), its thread and capture abandoned (released
by that thread should the call ever return), and a new capture opened. Only a single open() or
read() is bounded; the waits between reconnects are not calls and are never a hang, however long.

Abandoned threads cost a capture each (a V4L2 device held, buffers): when more than
MAX_STUCK_THREADS are still stuck, `CameraHungError` ends the source, the station stops with exit
status 1, and systemd's `Restart=` starts a fresh process.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Camera threads left stuck in a call at once before the station gives up and exits for a restart.
MAX_STUCK_THREADS = 3

_ids = itertools.count(1)


class CameraHungError(RuntimeError):
    """More camera threads are stuck in calls than the station keeps: only a new process frees them."""


@dataclass(frozen=True)
class Activity:
    """What the camera source is doing: 'opening' or 'reading' (a bounded call), 'reconnect_wait'
    (until `until`, never bounded), 'idle' (between calls: the station has the frame)."""

    what: str
    since: float
    until: float | None = None


class _Call:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done = fn, threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:  # noqa: BLE001  (raised again in the waiting thread)
            self.error = exc
        finally:
            self.done.set()


class _Worker:
    """One capture's thread: runs its calls in order; None ends it."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"camera-{name}-{next(_ids)}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                job()
            except Exception:  # a release that fails: nothing waits for it
                logger.debug("camera release failed", exc_info=True)


class GuardedCapture:
    """The camera source's capture, each call on it bounded (see the module docstring)."""

    def __init__(self, name: str, device: int | str, opener: Callable[[], Any], timeout_s: float,
                 stop: threading.Event, clock: Callable[[], float] = time.monotonic,
                 poll_s: float = 0.05) -> None:
        self._name, self._device, self._opener = name, device, opener
        self._timeout_s, self._stop, self._clock, self._poll_s = timeout_s, stop, clock, poll_s
        self._worker: _Worker | None = None
        self.capture: Any = None
        self.activity = Activity("idle", clock())
        #: Calls that took longer than the bound, since the source opened.
        self.hung_calls = 0
        #: A call hung and no frame came since (the status's camera.recovering).
        self.recovering = False
        #: Unix time of the latest hung call, None before the first.
        self.last_hang_at: float | None = None
        self._stuck: list[threading.Thread] = []

    @property
    def stuck_threads(self) -> int:
        """Abandoned camera threads still stuck in their call."""
        self._stuck = [t for t in self._stuck if t.is_alive()]
        return len(self._stuck)

    def open(self) -> bool:
        """Open a capture (the opener returns None when the camera is not there); False when it is
        not there, hung, or the source closed meanwhile."""
        self.capture = None
        done, capture = self._call("opening", self._opener)
        self.capture = capture if done else None
        return self.capture is not None

    def read(self) -> tuple[bool, Any] | None:
        """The capture's read(); None when it hung or the source closed meanwhile."""
        capture = self.capture
        done, result = self._call("reading", capture.read)
        return result if done else None

    def waiting(self, delay_s: float) -> None:
        """The source waits `delay_s` before it reconnects (never a hang)."""
        now = self._clock()
        self.activity = Activity("reconnect_wait", now, now + delay_s)

    def frame_came(self) -> None:
        self.recovering = False

    def release(self) -> None:
        """Release the capture on its thread (after a call in flight, if any) and end the thread."""
        capture, self.capture = self.capture, None
        worker, self._worker = self._worker, None
        if worker is not None:
            if capture is not None:
                worker.jobs.put(capture.release)
            worker.jobs.put(None)

    def _call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, fn()) run on the capture's thread; (False, None) past the bound or at a close."""
        if self._worker is None:
            self._worker = _Worker(self._name)
        call = _Call(fn)
        self._worker.jobs.put(call)
        since = self._clock()
        self.activity = Activity(what, since)
        try:
            while not call.done.wait(self._poll_s):
                if self._stop.is_set():
                    return False, None
                if self._clock() - since > self._timeout_s:
                    self._abandon(what, call, self._clock() - since)
                    return False, None
        finally:
            self.activity = Activity("idle", self._clock())
        if call.error is not None:
            raise call.error
        return True, call.result

    def _abandon(self, what: str, call: _Call, elapsed_s: float) -> None:
        worker, self._worker = self._worker, None
        capture, self.capture = self.capture, None
        assert worker is not None
        opened = call if what == "opening" else None

        def let_go() -> None:  # runs should the stuck call ever return
            for held in (capture, opened.result if opened is not None else None):
                if held is not None:
                    held.release()

        worker.jobs.put(let_go)
        worker.jobs.put(None)
        self._stuck.append(worker.thread)
        self.hung_calls += 1
        self.recovering, self.last_hang_at = True, time.time()
        stuck = self.stuck_threads
        call_name = "open()" if what == "opening" else "read()"
        if stuck > MAX_STUCK_THREADS:
            raise CameraHungError(
                f"{self._name}: camera {self._device!r}: {stuck} camera threads are stuck in calls that never "
                f"returned (hung call {self.hung_calls}: {call_name} for {elapsed_s:.0f} s), more than the "
                f"{MAX_STUCK_THREADS} the station leaves behind; the station stops so that a new process "
                "(systemd Restart=) frees the camera")
        logger.error("%s: camera %r: %s has not returned after %.0f s (camera.read_timeout_s=%g): the camera "
                     "or its driver hangs; hung call %d, its thread abandoned (%d stuck, at most %d before the "
                     "station restarts); opening the camera again", self._name, self._device, call_name,
                     elapsed_s, self._timeout_s, self.hung_calls, stuck, MAX_STUCK_THREADS)
