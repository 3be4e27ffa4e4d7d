"""How the station stops: the signals that ask it to, and the one time budget the stop must fit.

systemd SIGKILLs the station `TimeoutStopSec` after SIGTERM (systemd/smearscope.service), which
leaves the unit failed (`Result: timeout`) without the retained "offline" or the stop summary. So
the whole stop shares one budget counted from the stop request: the workers' joins first (what
was captured is analysed, the open run's report stored), then the publisher's drain gets what is
left of it, less what the publisher needs afterwards to join its threads and publish "offline"
(`MqttPublisher.STOP_AFTER_DRAIN_S`), and never more than `mqtt.stop_drain_timeout_s`. A slow
last analysis shortens the drain instead of pushing the stop past the unit's timeout; what is not
sent stays in the outbox for the next start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Protocol

from smearscope.service.config.mqtt import UNIT_TIMEOUT_STOP_S

logger = logging.getLogger(__name__)

#: Kept of TimeoutStopSec for what follows the publisher's stop: closing the outbox, the engines
#: and the source, the summary, the interpreter's exit (normally well under a second).
CLOSE_MARGIN_S = 5.0
#: The stop's budget from the stop request (SIGTERM) to the publisher's last step.
STOP_BUDGET_S = UNIT_TIMEOUT_STOP_S - CLOSE_MARGIN_S
#: The workers' joins share at most this much of it (normally seconds).
JOIN_BUDGET_S = 25.0


class StopBudget:
    """One stop's time, counted from `start()` (the first stop request) on `clock`."""

    def __init__(self, total_s: float = STOP_BUDGET_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self._clock = clock
        self._started: float | None = None

    def start(self) -> None:
        """The stop was asked for (idempotent: the first request counts)."""
        if self._started is None:
            self._started = self._clock()

    def elapsed(self) -> float:
        self.start()
        assert self._started is not None
        return self._clock() - self._started

    def join_deadline(self) -> float:
        """When the workers' joins must have ended, on `clock`."""
        self.start()
        assert self._started is not None
        return self._started + min(JOIN_BUDGET_S, self.total_s)

    def drain_s(self, configured_s: float, after_drain_s: float) -> float:
        """The publisher's drain: what remains of the budget less `after_drain_s`, at most
        `configured_s` (mqtt.stop_drain_timeout_s), never below 0."""
        return max(0.0, min(configured_s, self.total_s - self.elapsed() - after_drain_s))


def join_workers(threads: Mapping[str, threading.Thread], names: Iterable[str], deadline: float,
                 clock: Callable[[], float] = time.monotonic) -> list[str]:
    """Join the named threads in order, all by `deadline` (on `clock`); what did not stop."""
    problems = []
    for name in names:  # producers first
        thread = threads.get(name)
        if thread is None:
            continue
        thread.join(max(0.1, deadline - clock()))
        if thread.is_alive():
            problems.append(f"{name} thread did not stop within the shutdown budget ({JOIN_BUDGET_S:.0f} s)")
            logger.error("%s", problems[-1])
    return problems


class Stoppable(Protocol):
    def request_stop(self, why: str) -> None: ...

    def request_reload(self) -> None: ...


def install_signal_handlers(daemon: Stoppable) -> Callable[[], None]:
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
