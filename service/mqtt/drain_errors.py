"""The drain thread's failures, said so a journal can be read: a pass that fails (an outbox that cannot
be read: an I/O error, a corrupt page) is retried every tick, and a traceback each time flooded the
journal. The first failure, and each reason not said before while passes fail, is said at ERROR with
its reason (the traceback at DEBUG); repeats at DEBUG, also of a reason that takes turns with another
(the expiry pass, every 10 s, fails on another column than the sending); the first pass that works
again at INFO, with how many failed."""

from __future__ import annotations

import logging

logger = logging.getLogger("smearscope.service.mqtt.publisher")  # where the drain thread's lines were said

#: The most reasons remembered as said while passes fail.
SAID_KEPT = 16


class DrainErrors:
    """Called by the drain thread only: `failed(exc)` in its except clause, `passed()` after a pass."""

    def __init__(self, outbox_path: object) -> None:
        self.outbox_path = outbox_path
        self._reason: str | None = None  # the last failing reason, while passes fail
        self._said: dict[str, None] = {}  # the reasons said at ERROR while passes fail (the last SAID_KEPT)
        self._failures = 0

    def failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self._failures += 1
        self._reason = reason
        if reason not in self._said:
            self._said[reason] = None
            if len(self._said) > SAID_KEPT:  # reasons that differ at each pass: each said, none kept long
                del self._said[next(iter(self._said))]
            logger.error("MQTT drain loop error (%s; outbox %s): nothing is sent or deleted while it lasts; "
                         "retried every tick, repeats said at DEBUG", reason, self.outbox_path)
            logger.debug("MQTT drain loop error", exc_info=exc)
        else:
            logger.debug("MQTT drain loop error again (%s), %d passes failed", reason, self._failures)

    def passed(self) -> None:
        if self._reason is None:
            return
        logger.info("MQTT drain loop works again (outbox %s) after %d failed passes (last: %s)",
                    self.outbox_path, self._failures, self._reason)
        self._reason, self._failures = None, 0
        self._said.clear()
