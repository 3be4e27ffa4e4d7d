"""Which broker connection failures a long-running client says (WARNING, ERROR) and which only at
DEBUG, and how long its outage has lasted: the station's publisher (service.mqtt.connection_events)
and the archive (service.archive.daemon) keep the journal of a lab offline for days to a few lines.
A failure is said once, and again at the soonest RESAY_S after it was said while no connection
succeeds; a connection made ends the outage (its length said by the caller), and the next failure
is news again."""

from __future__ import annotations

import time
from collections.abc import Callable

#: A failure said (WARNING or ERROR) is said again after this long at the soonest while none succeeds.
RESAY_S = 600.0


class FailureNews:
    """One client's connection failures since its last connection (paho's network thread only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._said: dict[str, float] = {}  # failure -> when said
        self._since: float | None = None  # the first failure since the last connection (clock)

    def news(self, failure: str, repeated: bool = False) -> bool:
        """Whether `failure` is said (not DEBUG): not `repeated` (the one said last, where the caller
        says a failure only once while it stays the same), nor said within RESAY_S."""
        now = self._clock()
        if self._since is None:
            self._since = now
        said_at = self._said.get(failure)
        if repeated or (said_at is not None and now - said_at < RESAY_S):
            return False
        self._said[failure] = now
        return True

    def outage_s(self) -> float:
        """How long the failures have gone on (0 before the first)."""
        return 0.0 if self._since is None else self._clock() - self._since

    def ended(self) -> float | None:
        """A connection made: the outage's length (None where no failure came before it); the next
        failure is news again."""
        length = None if self._since is None else self.outage_s()
        self._since = None
        self._said.clear()
        return length


def said_length(seconds: float) -> str:
    """An outage's length as a person reads it in a journal line: '40 s', '12 min', '3.5 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
