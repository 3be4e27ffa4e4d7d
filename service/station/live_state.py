"""The station's live run state (`<prefix>/<station>/run`, retained) on its way to the outbox.

A run state counts the fields of its run. One made on the analysis thread goes to the outbox
after the field or report it counts has been stored (`defer`: the workers queue it behind that
item, and the outbox writer hands it to `send`), never before: a crash between the two would
otherwise leave the broker counting a field the station's state does not hold, which the next
start takes for a state restored from an older backup (service.mqtt.run_watch)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from smearscope.service.mqtt.outbox import NewMessage, Outbox
from smearscope.service.mqtt.reserve import is_disk_full

logger = logging.getLogger(__name__)


class _Publisher(Protocol):
    outbox: Outbox

    def publish_many(self, items: list, also: object = None, extra: Sequence[NewMessage] = ()) -> list[int]: ...


class LiveState:
    """The last run state handed to the outbox, sent again after each reconnect; its lock keeps
    the outbox's order of run states their order here."""

    def __init__(self) -> None:
        self._message: NewMessage | None = None
        self._seq: int | None = None  # its copy in the outbox
        self._lock = threading.Lock()
        #: Set by the station's workers: where a run state goes to wait for what it counts.
        self.defer: Callable[[NewMessage], None] | None = None

    def publish(self, publisher: _Publisher, message: NewMessage) -> None:
        """A new run state: behind what it counts when the workers defer it, else at once (at the
        start: on a full disk it waits, see `_send_when_room`)."""
        if self.defer is not None:
            self.defer(message)
        else:
            with self._lock:
                self._message = message
                self._seq = None
                self._send_when_room(publisher)

    def send(self, publisher: _Publisher, message: NewMessage) -> None:
        """A run state into the outbox now (the outbox writer's thread, once what it counts is stored)."""
        with self._lock:
            self._message = message
            self._seq = None  # the copy waiting, if any, is of an older state
            self._send(publisher)

    def republish(self, publisher: _Publisher) -> None:
        """The last run state again (MqttPublisher.on_reconnected: the broker may have lost its
        retained copy, or restored an older one from its last save), unless its copy still waits
        in the outbox (a connection that keeps dropping would add one each time)."""
        with self._lock:
            if self._seq is None or not publisher.outbox.holds(self._seq):
                self._send_when_room(publisher)

    def _send_when_room(self, publisher: _Publisher) -> None:
        """`_send`, where a full disk leaves the state waiting (said at WARNING) for the next state or
        reconnect: a station restarted on a full disk with a run to take back failed to start on
        it, at every restart, and never delivered what its outbox held (whose acknowledgements
        free its room). A report's write is never let go so: the writer pauses the analysis."""
        try:
            self._send(publisher)
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            logger.warning("live run state not stored, the outbox's disk is full (%s): the run's next state, "
                           "or the broker's next connection, sends it", exc)

    def _send(self, publisher: _Publisher) -> None:
        if self._message is not None:
            self._seq = publisher.publish_many([], extra=[self._message])[-1]
