"""The wall clock as a station without a clock battery sees it.

A Jetson has no battery-backed clock unless one is fitted: it boots with the time it last saved,
or 1970, and network time steps it forward later (or never, offline); an operator may set it by
hand, backwards too. Durations are timed on the monotonic clock; what is stamped with the wall
clock (messages' `created_at`, a field's `captured_at`) carries whatever it read.

`RELEASED`: the date of this release; a wall clock before it is wrong. `WallSteps` tells how far
the wall clock stepped since it last looked, against the monotonic clock, so that ages counted
from a wall-clock stamp (the outbox's field-message expiry) follow the step."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

#: This release's date: a station's wall clock that reads earlier is wrong (no clock battery, no
#: network time yet).
RELEASED = datetime(2026, 12, 6, tzinfo=timezone.utc).timestamp()

#: A change of the wall clock against the monotonic one smaller than this in one look is network
#: time slewing it (at most 0.5 ms a second), not a step.
STEP_S = 2.0


def clock_before_release(now: float | None = None) -> str | None:
    """What to say when the wall clock reads before this release (None when it does not)."""
    now = time.time() if now is None else now
    if now >= RELEASED:
        return None
    return (f"the wall clock reads {datetime.fromtimestamp(now, timezone.utc):%Y-%m-%d %H:%M} UTC, before this "
            f"release ({datetime.fromtimestamp(RELEASED, timezone.utc):%Y-%m-%d}): no clock battery and no "
            "network time yet? Reports carry that time in created_at and captured_at, and a TLS broker's "
            "certificate is judged against it (not yet valid); set the clock (NTP, timedatectl)")


def clock_reading(now: float | None = None) -> str:
    """The wall clock's reading, said where a certificate's validity was judged against it."""
    now = time.time() if now is None else now
    said = f"the wall clock reads {datetime.fromtimestamp(now, timezone.utc):%Y-%m-%d %H:%M} UTC"
    return clock_before_release(now) or f"{said}: a certificate's validity is judged against it"


class WallSteps:
    """Steps of the wall clock seen against the monotonic clock."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self._monotonic = monotonic
        self._offset = wall() - monotonic()
        self._pending = 0.0

    def step(self) -> float:
        """Seconds the wall clock stepped (forward: positive) since `applied` was last called;
        0.0 for less than `STEP_S` in one look (slewing, absorbed)."""
        offset = self.wall() - self._monotonic()
        moved, self._offset = offset - self._offset, offset
        self._pending += moved if abs(moved) >= STEP_S else 0.0
        return self._pending

    def applied(self) -> None:
        """The step `step` returned was taken into account."""
        self._pending = 0.0

    def stored_frame(self) -> float:
        """Now, as the stamps stored so far read it: the wall clock at `step`'s last look, moved on by
        the monotonic clock since, less a step not yet taken into account. Each later step moves such
        a stamp with the others, whenever it came (a stamp read before it and stored after it kept the
        old clock's reading, and a clock stepped forward 56 years expired it at once)."""
        return self._monotonic() + self._offset - self._pending


class StampsFollowing:
    """Stored stamps (the outbox's messages of this start) moved by each step of the wall clock,
    so that ages counted from them stay true."""

    def __init__(self, steps: WallSteps) -> None:
        self._steps = steps
        self._unfollowed = False

    def follow(self, move: Callable[[float], int]) -> bool:
        """Move the stamps by the step not yet followed (`move(step)`: how many it moved). A write
        that fails (a full disk) is tried again at the next call; False until then: those stamps
        are not their ages, and nothing may expire by them."""
        if step := self._steps.step():
            try:
                moved = move(step)
            except sqlite3.Error as exc:
                if not self._unfollowed:  # once, not at every expiry check while the disk is full
                    logger.warning("outbox: the wall clock stepped by %+.0f s; the ages of the messages stored since "
                                   "this start could not follow it yet (%s): they are not expired until they do",
                                   step, exc)
                self._unfollowed = True
                return False
            self._steps.applied()
            self._unfollowed = False
            logger.warning("outbox: the wall clock stepped by %+.0f s; the ages of the %d messages stored since "
                           "this start follow it", step, moved)
        return True
