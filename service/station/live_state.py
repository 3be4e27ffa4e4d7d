"""The station's live run state (`<prefix>/<station>/run`, retained) on its way to the outbox.

A run state counts the fields of its run. One made on the analysis thread goes to the outbox
after the field or report it counts has been stored (`defer`: the workers queue it behind that
item, and the outbox writer hands it to `send`), never before: a crash between the two would
otherwise leave the broker counting a field the station's state does not hold, which the next
start takes for a state restored from an older backup (service.mqtt.run_watch)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from smearscope.service.mqtt.outbox import NewMessage, Outbox

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
        """A new run state: behind what it counts when the workers defer it, else at once."""
        if self.defer is not None:
            self.defer(message)
        else:
            self.send(publisher, message)

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
                self._send(publisher)

    def _send(self, publisher: _Publisher) -> None:
        if self._message is not None:
            self._seq = publisher.publish_many([], extra=[self._message])[-1]
