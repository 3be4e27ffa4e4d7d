"""Fields analysed side by side, handed back in capture order (the analysis stage of the daemon).

With `size` 1 a field is analysed while the next one is captured, as always. With more, the next
field's resampling and detection run while the previous one's crops are classified, and the
fields' head batches can meet in one engine batch (engines.coalesce, through the analyzer's
`batch_across_fields`). Results come back strictly in the order the fields were submitted, so
the specimen runs and the outbox see the same sequence as with one field at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

W = TypeVar("W")
R = TypeVar("R")


@dataclass(frozen=True)
class Done(Generic[W, R]):
    """One finished field: what was submitted, and its result or the exception it raised."""

    work: W
    result: R | None
    error: BaseException | None


class FieldPool(Generic[W, R]):
    """Up to `size` calls of `analyze` at once on worker threads; results in submission order."""

    def __init__(self, analyze: Callable[[W], R], size: int, name: str = "analysis") -> None:
        if size < 1:
            raise ValueError(f"the pool needs at least one worker, got {size}")
        self.size = size
        self._analyze = analyze
        self._executor = ThreadPoolExecutor(size, thread_name_prefix=f"{name}-worker")
        self._pending: deque[tuple[W, Future[R]]] = deque()
        self._lock = threading.Lock()
        self._active = 0

    @property
    def pending(self) -> int:
        """Fields submitted and not yet handed back."""
        return len(self._pending)

    def has_room(self) -> bool:
        return len(self._pending) < self.size

    def active(self) -> int:
        """Fields being analysed right now (for engines.coalesce: the callers that may come)."""
        with self._lock:
            return self._active

    def submit(self, work: W) -> None:
        if not self.has_room():
            raise RuntimeError("field pool is full")
        self._pending.append((work, self._executor.submit(self._run, work)))

    def _run(self, work: W) -> R:
        with self._lock:
            self._active += 1
        try:
            return self._analyze(work)
        finally:
            with self._lock:
                self._active -= 1

    def next_done(self, timeout: float | None) -> Done[W, R] | None:
        """The oldest field once it has finished (waiting at most `timeout`), else None."""
        if not self._pending:
            return None
        work, future = self._pending[0]
        try:
            result = future.result(timeout)
            error = None
        except FutureTimeout:
            return None
        except Exception as exc:  # noqa: BLE001 - the caller reports it per field
            result, error = None, exc
        self._pending.popleft()
        return Done(work, result, error)

    def close(self) -> None:
        """No more fields; waits for the threads (callers drain `next_done` first)."""
        self._executor.shutdown(wait=True)
