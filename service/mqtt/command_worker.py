"""Commands received over MQTT, run one at a time off paho's network thread.

paho's callbacks run on its network thread, which must not block, and a command may take seconds
(`analyze_file` runs a whole analysis). So the publisher only queues each command here; the
worker thread parses its JSON payload, runs the station's handler and gives the answer back to the
publisher (`respond`), which sends it. The queue is bounded: `submit()` refuses a command when it
is full, and the publisher answers "busy" at once. Nothing here talks MQTT.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

#: The station's handler: (command name, JSON arguments) -> the response body.
CommandHandler = Callable[[str, dict[str, Any]], Mapping[str, Any]]
#: How the answer goes back: (command name, response body, MQTT 5 correlation data).
Responder = Callable[[str, Mapping[str, Any], bytes | None], None]

QUEUE_SIZE = 32


class CommandWorker:
    """A bounded queue of received commands and the loop (`run`, a thread target) that serves it."""

    def __init__(
        self,
        handler: CommandHandler | None,
        respond: Responder,
        stop: threading.Event,
        tick_s: float = 0.5,
    ) -> None:
        self.handler = handler
        self._respond = respond
        self._stop = stop
        self._tick_s = tick_s
        self._queue: queue.Queue[tuple[str, bytes, bytes | None] | None] = queue.Queue(QUEUE_SIZE)

    def submit(self, name: str, payload: bytes, correlation: bytes | None) -> bool:
        """Queue a command; False when the queue is full (the caller answers "busy")."""
        try:
            self._queue.put_nowait((name, payload, correlation))
            return True
        except queue.Full:
            return False

    def wake_to_stop(self) -> None:
        """Unblock the loop once the stop Event is set."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the loop also watches the stop Event

    def run(self) -> None:
        """Serve commands in arrival order until the stop Event (or its wake-up) arrives."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=self._tick_s)
            except queue.Empty:
                continue
            if item is None:
                break
            name, payload, correlation = item
            self._respond(name, self.answer(name, payload), correlation)

    def answer(self, name: str, payload: bytes) -> Mapping[str, Any]:
        """The response body for one command; never raises."""
        if self.handler is None:
            return {"ok": False, "error": "this station accepts no commands"}
        try:
            arguments = json.loads(payload) if payload.strip() else {}
        except ValueError as exc:
            return {"ok": False, "error": f"payload is not JSON: {exc}"}
        if not isinstance(arguments, dict):
            return {"ok": False, "error": "payload must be a JSON object"}
        try:
            return self.handler(name, arguments)
        except Exception as exc:
            logger.exception("command %r failed", name)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
