"""Bounded queues between the daemon's threads, each with a named policy for when it is full.

  keep_newest       evict the oldest item (a live view: stale frames are worthless)
  block             wait for room (every item matters), unless the consumer is gone
  reject_when_full  refuse the item at once (the caller answers "busy")

A producer always ends with `put_sentinel()` in its `finally`; the consumer stops at `SENTINEL`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

logger = logging.getLogger(__name__)

DropPolicy = Literal["keep_newest", "block", "reject_when_full"]
T = TypeVar("T")

#: The end marker a producer enqueues when it stops; never evicted by keep_newest.
SENTINEL: Any = object()
#: How often blocked puts and waiting consumers look up (stop requested, consumer alive).
TICK_S = 0.2


class BoundedQueue(Generic[T]):
    """A queue.Queue whose behaviour when full is a named policy, with a drop counter."""

    def __init__(self, name: str, maxsize: int, policy: DropPolicy) -> None:
        self.name, self.policy = name, policy
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.dropped = 0

    def put(self, item: T, consumer_alive: Callable[[], bool] = lambda: True) -> bool:
        """Enqueue by the policy; False when the item was refused (reject_when_full, or a dead
        consumer). keep_newest evicts the oldest item instead; block waits."""
        if self.policy == "reject_when_full":
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                return False
        if self.policy == "keep_newest":
            while True:
                try:
                    self._queue.put_nowait(item)
                    return True
                except queue.Full:
                    try:
                        old = self._queue.get_nowait()
                    except queue.Empty:
                        continue
                    if old is SENTINEL:  # never evict the end marker
                        self._queue.put(old)
                        return False
                    self.dropped += 1
                    self._on_drop(old)
        while True:
            try:
                self._queue.put(item, timeout=TICK_S)
                return True
            except queue.Full:
                if not consumer_alive():
                    logger.error("%s queue: consumer gone; item not enqueued", self.name)
                    return False

    def _on_drop(self, item: Any) -> None:
        logger.debug("%s queue full: dropped the oldest item (keep_newest)", self.name)
        on_drop = getattr(item, "on_drop", None)
        if on_drop is not None:
            on_drop()

    def put_sentinel(self, consumer_alive: Callable[[], bool]) -> None:
        """Always called in a producer's `finally`: the consumer's end marker."""
        if not self.put(SENTINEL, consumer_alive) and consumer_alive():
            logger.error("%s queue: could not enqueue the end marker", self.name)

    def get(self, timeout: float | None = None) -> Any:
        return self._queue.get(timeout=timeout)

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()

    def qsize(self) -> int:
        return self._queue.qsize()
