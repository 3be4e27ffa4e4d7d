"""Batches across callers: concurrent `run` calls on one engine join one engine batch.

When a station analyses several fields at once (service.station.workers), each field's heads ask
for their own batch of crops. `CoalescingEngine` lets those requests meet: the first caller waits
up to `max_delay_s` for the others that are analysing too (`peers()`, the callers that may still
come), runs every waiting request as one batch up to the profile's maximum, and hands each caller
its own rows. With no peer at work it runs at once, so a lone caller never waits.

The rows of a request are exactly what `engine.run` alone would give (the backends compute each
sample independently of its batch-mates; checked for ONNX Runtime in tests/test_engines.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smearscope.engines.base import Engine

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    batch: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class CoalescingEngine:
    """An engine whose concurrent `run` calls are joined into shared batches (see the module
    docstring). Everything but `run` is the wrapped engine's."""

    def __init__(self, engine: Engine, max_delay_s: float = 0.004,
                 peers: Callable[[], int] = lambda: 0) -> None:
        self.engine = engine
        self.max_delay_s = max_delay_s
        #: How many OTHER callers are at work now and may ask soon (e.g. fields being analysed).
        self.peers = peers
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._leader = False
        #: Engine runs made, and requests they served (requests / runs = the coalescing gained).
        self.runs = 0
        self.requests = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        request = _Request(batch)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()
        while True:
            with self._cond:
                while self._leader and not request.done.is_set():
                    self._cond.wait()
                if request.done.is_set():
                    return self._answer(request)
                self._leader = True
            try:
                self._lead()  # serves the oldest waiting requests, ours among them or before it
            finally:
                with self._cond:
                    self._leader = False
                    self._cond.notify_all()

    @staticmethod
    def _answer(request: _Request) -> dict[str, np.ndarray]:
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _lead(self) -> None:
        """Wait for the peers (at most max_delay_s), then run one shared batch."""
        limit = self.engine.manifest.batch.max
        deadline = time.monotonic() + self.max_delay_s
        with self._cond:
            while True:
                rows = sum(len(r.batch) for r in self._waiting)
                left = deadline - time.monotonic()
                if rows >= limit or len(self._waiting) > self.peers() or left <= 0:
                    break
                self._cond.wait(left)
            taken, rows = [], 0
            for r in list(self._waiting):
                if taken and rows + len(r.batch) > limit:
                    break
                taken.append(r)
                rows += len(r.batch)
            for r in taken:
                self._waiting.remove(r)
        try:
            joined = taken[0].batch if len(taken) == 1 else np.concatenate([r.batch for r in taken])
            out = self.engine.run(joined)
            start = 0
            for r in taken:
                stop = start + len(r.batch)
                r.result = {name: value[start:stop] for name, value in out.items()}
                start = stop
        except Exception as exc:  # noqa: BLE001 - re-raised in every caller of the shared batch
            for r in taken:
                r.error = exc
        finally:
            self.runs += 1
            self.requests += len(taken)
            for r in taken:
                if r.result is None and r.error is None:
                    r.error = RuntimeError("the shared batch was interrupted")
                r.done.set()
