"""What the station holds back from the broker, for the people who must act on it: the outbox
messages parked (service.mqtt.inflight: too large for the broker's packet limit, refused by the
broker as too large, or held back for another reason) counted, and the oldest named, as the
telemetry's `parked` object, the status command and `smearscope doctor` carry them. To the clinic
a parked report is a report that did not arrive."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from smearscope.service.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)


def parked_summary(outbox: Outbox, parked: Mapping[int, int], too_large: Collection[int],
                   now: float) -> dict[str, Any]:
    """{messages, reports, too_large, oldest}: the parked messages (seq -> packet size), how many
    are final reports (specimen reports, FHIR bundles), how many were parked as too large, and the
    oldest still in the outbox ({report_id, kind, topic, reason, bytes, created_at (Unix time),
    age_s}; null when none). One parked meanwhile deleted (expired, evicted) is not counted."""
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
            "reason": "too_large" if oldest[0] in too_large else "held",
            "bytes": parked.get(oldest[0]), "created_at": oldest[4], "age_s": round(max(0.0, now - oldest[4]), 1)},
    }
