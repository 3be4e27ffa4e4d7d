"""paho's network thread, watched: started again should it end while the publisher (or the archive) runs.

That thread reads the broker's acknowledgements and makes every reconnect. Whatever ends it (a
BaseException from a callback, which `suppress_exceptions` does not catch, or an error paho does not
catch, e.g. one raised in its reconnect wait), the station would otherwise analyse on with its
reports piling up in the outbox and never reconnect (the archive, never store another report). The
publisher's drain loop and the archive's watcher thread call `ensure_running` each tick (at most half a
second), while messages are held too (the station's outbox waiting for the broker; the archive's
storer holding a message the disk or the lab system refuses, or waiting for the lab system's ACK), so
a dead thread is replaced within one. Each has one caller, so no two start the same thread at once.

Each `loop_start` gives the client a new pair of wake-up sockets (`_sockpairR`, `_sockpairW` in paho 2.2) and
drops the old pair unclosed. The watch does not close that pair itself: any thread that queues a packet (a
publish, the archive storer's `ack`) reads `_sockpairW` and writes a byte to it, and one that read it just
before the restart would find it closed under it, an OSError out of its publish or ack (paho catches only
BlockingIOError there). Nothing needs it closed: with the ended thread gone, the client's attributes held the
only lasting references, so CPython closes both sockets as `loop_start` replaces them, or as a writer still
holding the write end lets go (a ResourceWarning under `-X dev`). A hook that keeps the ended thread's
traceback (pytest's) keeps its read end open; Python's own, the station's and the archive's, does not.
"""

from __future__ import annotations

import logging
import time

import paho.mqtt.client as mqtt

logger = logging.getLogger(__name__)

#: A thread that ends again sooner than this after its restart is said at DEBUG, counted, not at
#: ERROR each time (the next ERROR comes after one that ran this long).
QUIET_S = 60.0


class NetworkThreadWatch:
    """Starts paho's network thread (`loop_start`) again when it has ended unasked; ERROR once."""

    def __init__(self, then: str = "the station reconnects and sends what the outbox holds") -> None:
        self.then = then  # what follows the restart, for the ERROR line
        self.restarts = 0  # network threads started again by this watch
        self._restarted_at: float | None = None
        self._quiet_deaths = 0

    def ensure_running(self, client: mqtt.Client | None, stopping: bool) -> bool:
        """Start the client's network thread again if it ended without `loop_stop`; True if it did.
        Not during a stop (`stopping`), whose `loop_stop` ends it on purpose."""
        if client is None or stopping:
            return False
        thread = getattr(client, "_thread", None)  # paho sets it to None as its thread ends
        if thread is not None:
            return False  # running, or ending this instant: its end clears it, seen next tick
        now = time.monotonic()
        recent = self._restarted_at is not None and now - self._restarted_at < QUIET_S
        if recent:
            self._quiet_deaths += 1
            logger.debug("MQTT network thread ended again (%d times since the last report); starting it again",
                         self._quiet_deaths)
        else:
            logger.error("MQTT network thread ended unexpectedly (%d quick ends before); starting it again: %s",
                         self._quiet_deaths, self.then)
            self._quiet_deaths = 0
        # the same client: paho keeps its queue, its socket (if still open) and its reconnect state; the wake-up
        # sockets it replaces are closed as their last reference goes (above)
        if client.loop_start() != mqtt.MQTT_ERR_SUCCESS:
            return False
        self.restarts += 1
        self._restarted_at = now
        return True
