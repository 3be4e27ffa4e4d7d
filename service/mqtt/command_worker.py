"""Commands received over MQTT, run one at a time off paho's network thread.

paho's callbacks run on its network thread, which must not block, and a command may take seconds
(`analyze_file` runs a whole analysis). So the publisher only queues each command here; the
worker thread parses its JSON payload, runs the station's handler and gives the answer back to the
publisher (`respond`), which sends it. The queue is bounded: `submit()` refuses a command when it
is full, and the publisher hands it to `refuse()`, whose "busy" answer this thread sends first
(at most `BUSY_BACKLOG` of them wait; beyond that a refusal is only logged). Nothing here talks MQTT.

Every command gets an answer, whatever its payload: one that arrives with the retain flag is
refused (`retained_command`: a command left on the broker would run again at every reconnect),
and an empty one too (`empty_command`: under MQTT 3.1.1 clearing a retained command arrives so,
live, and must not run); clearing a retained one under MQTT 5 (empty and retained) is not
answered. One over `MAX_PAYLOAD_BYTES` or nested deeper
than `MAX_DEPTH` is refused before it is parsed (Python's JSON parser recurses, and a 100 000-deep
array would raise RecursionError), and any exception of the handler is answered as an error. The
publisher replaces this thread should it ever end (service.mqtt.publisher).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

#: The station's handler: (command name, JSON arguments) -> the response body.
CommandHandler = Callable[[str, dict[str, Any]], Mapping[str, Any]]
#: How the answer goes back: (command name, response body, MQTT 5 correlation data).
Responder = Callable[[str, Mapping[str, Any], bytes | None], None]

QUEUE_SIZE = 32
#: "busy" answers waiting to be sent, at most.
BUSY_BACKLOG = 1024
#: Largest command payload parsed; commands are small JSON objects.
MAX_PAYLOAD_BYTES = 65_536
#: Deepest nesting of arrays and objects parsed.
MAX_DEPTH = 32


def nesting_depth(payload: bytes) -> int:
    """The deepest nesting of JSON arrays and objects in `payload`, brackets inside strings
    ignored; counted without parsing, so any depth is measured in constant stack."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


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
        self._queue: queue.Queue[tuple[str, bytes, bytes | None, bool] | None] = queue.Queue(QUEUE_SIZE)
        self._busy: deque[tuple[str, bytes | None]] = deque()
        self._busy_lock = threading.Lock()
        self.refused_unanswered = 0
        self._threads: list[threading.Thread] = []

    def start(self, *, replacing: bool = False) -> None:
        """Serve commands on a thread of its own (a publisher started again starts afresh)."""
        thread = threading.Thread(target=self.run, name="mqtt-cmd", daemon=True)
        self._threads = [*self._threads, thread] if replacing else [thread]
        thread.start()

    def ensure_running(self) -> None:
        """Replace the thread should it have ended while not stopping (it should not: logged)."""
        if self._threads and not self._threads[-1].is_alive() and not self._stop.is_set():
            logger.error("MQTT command thread ended unexpectedly; starting a new one")
            self.start(replacing=True)

    def threads(self) -> list[threading.Thread]:
        """Every thread started, for the publisher to join at stop."""
        return list(self._threads)

    def submit(self, name: str, payload: bytes, correlation: bytes | None, *,
               retained: bool = False) -> bool:
        """Queue a command (`retained`: it came with the retain flag); False when the queue is
        full (the caller answers "busy"). A retained command's clearing is dropped here."""
        if retained and not payload:
            logger.info("retained command %r cleared on the broker", name)
            return True
        try:
            self._queue.put_nowait((name, payload, correlation, retained))
            return True
        except queue.Full:
            return False

    def refuse(self, name: str, correlation: bytes | None) -> None:
        """A command the full queue refused (any thread, never blocks): answered "busy" by the
        worker thread before the next queued command."""
        with self._busy_lock:
            if len(self._busy) < BUSY_BACKLOG:
                self._busy.append((name, correlation))
                return
            self.refused_unanswered += 1
        logger.warning("command %r refused and not answered: %d busy answers already wait",
                       name, BUSY_BACKLOG)

    def _answer_refused(self) -> None:
        while True:
            with self._busy_lock:
                if not self._busy:
                    return
                name, correlation = self._busy.popleft()
            self._respond(name, {"ok": False, "error": "busy", "message": "too many commands waiting"},
                          correlation)

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
                self._answer_refused()
                try:
                    item = self._queue.get(timeout=self._tick_s)
                except queue.Empty:
                    continue
                if item is None:
                    break
                name, payload, correlation, retained = item
                self._respond(name, self.answer(name, payload, retained=retained), correlation)
            except Exception:  # the responder failed: this command is lost, the thread is not
                logger.exception("command thread: answering a command failed")

    def answer(self, name: str, payload: bytes, *, retained: bool = False) -> Mapping[str, Any]:
        """The response body for one command; never raises."""
        if self.handler is None:
            return {"ok": False, "error": "no_commands", "message": "this station accepts no commands"}
        if retained:
            logger.warning("command %r arrived retained: not run", name)
            return {"ok": False, "error": "retained_command", "message": "a command is published "
                    "without the retain flag; one left retained on the broker would run again at "
                    "every reconnect: clear it with an empty retained message on its topic"}
        if len(payload) > MAX_PAYLOAD_BYTES:
            return {"ok": False, "error": "payload_too_large", "message": f"payload of {len(payload)} bytes "
                    f"is over the limit of {MAX_PAYLOAD_BYTES}"}
        if nesting_depth(payload) > MAX_DEPTH:
            return {"ok": False, "error": "payload_too_deep", "message": f"payload nested deeper than {MAX_DEPTH} levels"}
        if not payload.strip():  # not {}: clearing a retained command publishes an empty one, live
            return {"ok": False, "error": "empty_command", "message": "a command needs a JSON object payload "
                    "({} for none); an empty one, as clearing a retained command sends, is not run"}
        try:
            arguments = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            return {"ok": False, "error": "not_json", "message": f"payload is not JSON: {exc}"}
        if not isinstance(arguments, dict):
            return {"ok": False, "error": "not_an_object", "message": "payload must be a JSON object"}
        try:
            return self.handler(name, arguments)
        except Exception as exc:
            logger.exception("command %r failed", name)
            return {"ok": False, "error": "command_failed", "message": f"{type(exc).__name__}: {exc}"}
