"""What the station holds back from the broker, for the people who must act on it: the outbox
messages parked (service.mqtt.inflight: too large for the broker's packet limit, refused by the
broker as too large, or held back for another reason) counted, and the oldest named, as the
telemetry's `parked` object, the status command and `smearscope doctor` carry them. To the clinic
a parked report is a report that did not arrive."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from smearscope.service.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)


#: Why a message is parked, as `oldest.reason` says it.
REASONS = {"refused": "refused_as_too_large", "over": "over_packet_limit"}


class ParkedReader:
    """`parked_summary` for telemetry, the status command and the STATUS= line, never raising for the
    outbox: a read that fails (an I/O error, a corrupt page) gives the counts the station holds in
    memory, `reports` and `oldest` unknown (null) and `read_error` saying why; said once at WARNING
    while it fails, and at INFO when the outbox is read again. The last summary is kept: a caller
    that asks often (the STATUS= line, each second) gets it again, without reading the outbox, while
    the parked set is the one it was read for and it is younger than the caller's `max_age_s`."""

    def __init__(self, outbox: Outbox, clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self._clock = clock
        self._lock = threading.Lock()
        self._failing: str | None = None  # the read's error, while it fails
        self._last: tuple[Hashable, float, dict[str, Any]] | None = None  # (parked set, read at (clock), summary)

    def __call__(self, parked: Mapping[int, int], too_large: Mapping[int, tuple[str, int | None]],
                 now: float, *, max_age_s: float = 0.0) -> dict[str, Any]:
        """The summary of the parked messages `parked` (seq -> packet size; `too_large` as in
        `parked_summary`) at `now` (Unix time), read from the outbox unless the last one read was of
        this parked set less than `max_age_s` ago (by the reader's clock): that one, its oldest's
        `age_s` counted to `now`. A message deleted meanwhile (expired, evicted) is counted until
        the parked set changes or the summary is `max_age_s` old."""
        key = (tuple(sorted(parked.items())), tuple(sorted(too_large.items())))
        with self._lock:
            last = self._last
        if last is not None and last[0] == key and self._clock() - last[1] < max_age_s:
            return _aged(last[2], now)
        read_at = self._clock()
        summary = self._read(parked, too_large, now)
        with self._lock:
            self._last = (key, read_at, summary)
        return _aged(summary, now)

    def _read(self, parked: Mapping[int, int], too_large: Mapping[int, tuple[str, int | None]],
              now: float) -> dict[str, Any]:
        try:
            summary = parked_summary(self.outbox, parked, too_large, now)
        except sqlite3.Error as exc:
            too_large_n, reason = sum(1 for seq in parked if seq in too_large), f"{type(exc).__name__}: {exc}"
            with self._lock:
                said, self._failing = self._failing is not None, reason
            if not said:
                logger.warning("the outbox %s cannot be read for its parked messages (%s): telemetry, status and "
                               "the STATUS= line count them from memory (%d, %d too large), their reports and "
                               "oldest unknown, until it reads again", self.outbox.path, exc, len(parked), too_large_n)
            return {"messages": len(parked), "reports": None, "too_large": too_large_n,
                    "oldest": None, "read_error": reason}
        with self._lock:
            was, self._failing = self._failing, None
        if was is not None:
            logger.info("the outbox %s is read again for its parked messages", self.outbox.path)
        return summary


def _aged(summary: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A copy of `summary` (the kept one stays as read), its oldest's `age_s` counted to `now`."""
    oldest = summary["oldest"]
    return {**summary, "oldest": None if oldest is None else
            {**oldest, "age_s": round(max(0.0, now - oldest["created_at"]), 1)}}


def parked_summary(outbox: Outbox, parked: Mapping[int, int], too_large: Mapping[int, tuple[str, int | None]],
                   now: float) -> dict[str, Any]:
    """{messages, reports, too_large, oldest, read_error (null)}: the parked messages (seq -> packet size), how many
    are final reports (specimen reports, FHIR bundles), how many were parked as too large (seq ->
    ("refused" by the broker, 0x95, or "over" the connection's packet limit; that limit)), and the
    oldest still in the outbox ({report_id, kind, topic, reason, bytes, limit, created_at (Unix
    time), age_s}; null when none). One parked meanwhile deleted (expired, evicted) is not counted."""
    rows: list[tuple[int, str, str, str, float]] = _in_outbox(outbox, "seq, kind, topic, report_id, created_at", parked)
    oldest = min(rows, key=lambda r: (r[4], r[0]), default=None)
    return {
        "messages": len(rows),
        "reports": sum(1 for r in rows if r[1] == "report"),
        "too_large": sum(1 for r in rows if r[0] in too_large),
        "oldest": None if oldest is None else {
            "report_id": oldest[3], "kind": oldest[1], "topic": oldest[2],
            "reason": REASONS[too_large[oldest[0]][0]] if oldest[0] in too_large else "held",
            "bytes": parked.get(oldest[0]), "limit": _limit(too_large.get(oldest[0])),
            "created_at": oldest[4], "age_s": round(max(0.0, now - oldest[4]), 1)},
        "read_error": None,
    }


def present_seqs(outbox: Outbox, seqs: Iterable[int]) -> set[int]:
    """Which of the messages `seqs` (parked ones) are still in the outbox; one deleted meanwhile
    (expired, evicted) is not among them. Raises what `Outbox.read` raises."""
    return {r[0] for r in _in_outbox(outbox, "seq", seqs)}


def _in_outbox(outbox: Outbox, columns: str, seqs: Iterable[int]) -> list[Any]:
    """`columns` (a constant of this module) of the outbox rows among `seqs`, by seq; none read for no seqs."""
    wanted = sorted(seqs)
    if not wanted:
        return []
    marks = ",".join("?" * len(wanted))
    return outbox.read(lambda conn: conn.execute(  # placeholders only
        f"SELECT {columns} FROM outbox WHERE seq IN ({marks}) ORDER BY seq", wanted).fetchall())


def _limit(why: tuple[str, int | None] | None) -> int | None:
    """The packet limit a message was parked over (none for one the broker refused: its limit is unknown)."""
    return why[1] if why is not None and why[0] == "over" else None
