"""systemd notify protocol without libsystemd, and a progress-based watchdog.

`SystemdNotifier` sends datagrams to $NOTIFY_SOCKET (a path, or '@name' for an abstract socket);
with no NOTIFY_SOCKET every call is a no-op, so the daemon runs the same outside systemd.

`ProgressWatchdog` pings WATCHDOG=1 every $WATCHDOG_USEC/2 only while the pipeline makes progress:
the pipeline stamps `work_started()` / `work_finished()` around each unit of work (or `beat()`s
during a long one). Idle is healthy; a unit of work running longer than the stall timeout stops
the pings, and systemd restarts the service after WatchdogSec.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

logger = logging.getLogger(__name__)

#: While the engines load (TensorRT deserialization on a small Jetson), the start timeout is
#: extended by EXTEND_STEP_S at a time, for at most EXTEND_LIMIT_S.
EXTEND_STEP_S = 120.0
EXTEND_LIMIT_S = 600.0


def _socket_address(notify_socket: str) -> str | bytes:
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    return notify_socket


class SystemdNotifier:
    """Sends sd_notify(3) state strings; silent no-op when not run by systemd."""

    def __init__(self, notify_socket: str | None = None, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        target = env.get("NOTIFY_SOCKET") if notify_socket is None else notify_socket
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._error_logged = False
        if target and target.startswith(("/", "@")):
            self._address = _socket_address(target)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        elif target:
            logger.warning("NOTIFY_SOCKET %r is not a unix socket path; notifications off", target)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send 'KEY=value' lines in one datagram; True when sent (False when disabled/failed)."""
        if self._sock is None or self._address is None:
            return False
        message = "\n".join(assignments).encode()
        with self._lock:
            try:
                self._sock.sendto(message, self._address)
            except OSError as exc:
                # Log once: systemd restarting or a full socket buffer must not flood the journal.
                if not self._error_logged:
                    logger.warning("sd_notify to %r failed: %s", self._address, exc)
                    self._error_logged = True
                return False
        self._error_logged = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (engine load and warm-up) is complete."""
        return self.notify("READY=1", *([_status_line(status)] if status else []))

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status`."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: more time for a slow start or stop."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    @contextmanager
    def extending(self, step_s: float = EXTEND_STEP_S, limit_s: float = EXTEND_LIMIT_S) -> Iterator[None]:
        """While the block runs (engines loading), EXTEND_TIMEOUT_USEC=step_s now and every step_s/3:
        a slow but live load is not killed by the unit's TimeoutStartSec=. Only limit_s long, so a
        load that hangs still meets a timeout, at most step_s after that."""
        if not self.enabled:
            yield
            return
        done = threading.Event()

        def extend() -> None:
            end = time.monotonic() + limit_s
            while not done.is_set() and time.monotonic() < end:
                self.extend_timeout(step_s)
                done.wait(step_s / 3)

        thread = threading.Thread(target=extend, name="notify-extend", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=1.0)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([_status_line(status)] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line, no embedded newlines


def watchdog_interval_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, or None when systemd expects no pings from us."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog belongs to another process (e.g. a wrapper)
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 2e6 if value > 0 else None


class ProgressWatchdog:
    """Pings the systemd watchdog while no unit of work is stuck.

    Work is tracked per name (e.g. "analysis", "publish") so concurrent stages each get their
    stamp. `tick()` is one check-and-ping; the background thread calls it every `interval_s`.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        interval_s: float | None = None,
        stall_timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self.interval_s = watchdog_interval_from_env() if interval_s is None else interval_s
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self._stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def work_started(self, name: str = "analysis") -> None:
        with self._lock:
            self._started[name] = self._clock()

    def beat(self, name: str = "analysis") -> None:
        """Progress inside a long unit of work: restamp it if it is running."""
        with self._lock:
            if name in self._started:
                self._started[name] = self._clock()

    def work_finished(self, name: str = "analysis") -> None:
        with self._lock:
            self._started.pop(name, None)

    @contextmanager
    def working(self, name: str = "analysis") -> Iterator[None]:
        self.work_started(name)
        try:
            yield
        finally:
            self.work_finished(name)

    def stalled_work(self) -> dict[str, float]:
        """Units of work running longer than the stall timeout, with their age in seconds."""
        now = self._clock()
        with self._lock:
            return {
                name: now - t for name, t in self._started.items()
                if now - t > self.stall_timeout_s
            }

    def tick(self) -> bool:
        """Ping if healthy; True when WATCHDOG=1 was sent."""
        stalled = self.stalled_work()
        if stalled:
            if not self._stalled:
                desc = ", ".join(f"{n} for {age:.0f} s" for n, age in sorted(stalled.items()))
                logger.error("work stalled (%s); withholding watchdog pings", desc)
                self._notifier.status(f"stalled: {desc}")
                self._stalled = True
            return False
        if self._stalled:
            logger.info("work progressing again; watchdog pings resume")
            self._stalled = False
        return self._notifier.watchdog()

    def start(self) -> bool:
        """Start the ping thread; False (and no thread) when systemd set no watchdog."""
        if not self.interval_s or self._thread is not None:
            logger.debug("systemd watchdog not enabled; no pings")
            return False
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        assert self.interval_s
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
