"""Messages stored under another station id or topic prefix: a station renamed (or its prefix
changed) with messages still waiting in its outbox. They go out on the topics they were stored
under, where the envelope's `station_id` says the same; the station says so once at its start, so
that the broker account keeps its right to those topics until they are delivered."""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter

from smearscope.service.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)


def stored_under_other_ids(outbox: Outbox, base: str) -> dict[str, tuple[int, int]]:
    """The outbox's messages whose topic is not under `base/` (`<prefix>/<station_id>`): by their
    own `<prefix>/<station_id>`, (messages, of which specimen reports)."""

    def count(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
        return db.execute("SELECT topic, kind, COUNT(*) FROM outbox WHERE substr(topic, 1, ?) != ? "
                          "GROUP BY topic, kind", (len(base) + 1, base + "/")).fetchall()

    messages: Counter[str] = Counter()
    reports: Counter[str] = Counter()
    for topic, kind, n in outbox.read(count):
        other = "/".join(topic.split("/")[:2])
        messages[other] += n
        if kind == "report":
            reports[other] += n
    return {other: (messages[other], reports[other]) for other in sorted(messages)}


def say_stored_under_other_ids(outbox: Outbox, base: str) -> None:
    """One WARNING per other station id with messages waiting (nothing when there is none)."""
    for other, (messages, reports) in stored_under_other_ids(outbox, base).items():
        logger.warning(
            "the outbox holds %d messages (%d of them reports) stored under %s, not %s (the station was renamed, "
            "or its topic_prefix changed, with them waiting): they go out on %s/... as stored; keep this "
            "station's broker account allowed to write %s/# until they are delivered (docs/STATION.md, "
            "'Renaming or retiring a station')", messages, reports, other, base, other, other)
