"""What the station holds back from the broker, for the people who must act on it: the outbox
messages parked (service.mqtt.inflight: too large for the broker's packet limit, refused by the
broker as too large, or held back for another reason) counted, and the oldest named, as the
telemetry's `parked` object, the status command and `smearscope doctor` carry them. To the clinic
a parked report is a report that did not arrive."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from smearscope.service.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)


#: Why a message is parked, as `oldest.reason` says it.
REASONS = {"refused": "refused_as_too_large", "over": "over_packet_limit"}


def parked_summary(outbox: Outbox, parked: Mapping[int, int], too_large: Mapping[int, tuple[str, int | None]],
                   now: float) -> dict[str, Any]:
    """{messages, reports, too_large, oldest}: the parked messages (seq -> packet size), how many
    are final reports (specimen reports, FHIR bundles), how many were parked as too large (seq ->
    ("refused" by the broker, 0x95, or "over" the connection's packet limit; that limit)), and the
    oldest still in the outbox ({report_id, kind, topic, reason, bytes, limit, created_at (Unix
    time), age_s}; null when none). One parked meanwhile deleted (expired, evicted) is not counted."""
    rows: list[tuple[int, str, str, str, float]] = []
    if parked:
        seqs = sorted(parked)
        marks = ",".join("?" * len(seqs))
        rows = outbox.read(lambda conn: conn.execute(  # placeholders only
            f"SELECT seq, kind, topic, report_id, created_at FROM outbox WHERE seq IN ({marks}) ORDER BY seq",
            seqs).fetchall())
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
    }


def _limit(why: tuple[str, int | None] | None) -> int | None:
    """The packet limit a message was parked over (none for one the broker refused: its limit is unknown)."""
    return why[1] if why is not None and why[0] == "over" else None
