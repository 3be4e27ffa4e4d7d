"""What a station run counted, and the summary a `--max-fields` run prints at the end.

`Stats` holds the counters the daemon's threads share; `StoredReport` is one line of the ledger
of reports the run put in the outbox; `print_ledger` says, per report, whether the broker has
acknowledged it or it still waits in the outbox.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.mqtt.outbox import Outbox, OutboxLockedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredReport:
    """A report the daemon put in the outbox (the ledger `--max-fields` runs print)."""

    kind: Literal["field", "report"]
    topic: str
    report_id: str
    seq: int
    run_id: str | None
    field_id: str | None
    fields_analyzed: int
    counts: Mapping[str, int]
    #: Its flags above info, as "severity:code" (a critical finding shows on its line).
    flags: tuple[str, ...] = ()


class Stats:
    """Counters shared by the threads (one lock; read as a snapshot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.analysed = 0
        self.rejected: Counter[str] = Counter()  # quality gate, by reason
        self.failed: Counter[str] = Counter()  # ingest/analysis errors, by reason code
        self.stored = 0
        self.lost = 0
        #: Not stored at a stop on a full disk, recovered by the next start (folder file, run).
        self.deferred = 0
        self.pending = 0  # frames enqueued and not yet finished

    def add(self, name: str, delta: int = 1, reason: str | None = None) -> None:
        with self._lock:
            if reason is None:
                setattr(self, name, getattr(self, name) + delta)
            else:
                getattr(self, name)[reason] += delta

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"analysed": self.analysed, "rejected": dict(self.rejected),
                    "failed": dict(self.failed), "stored": self.stored, "lost": self.lost,
                    "deferred": self.deferred, "pending": self.pending}


#: Outbox messages read at a time to see which reports are still held (payloads come with them:
#: an outbox at its max_bytes would otherwise be read into memory whole at exit).
LEDGER_PAGE = 200


def _still_held(box: Outbox, seqs: set[int]) -> set[int]:
    """Those of `seqs` the outbox still holds, read a page at a time up to the largest."""
    held: set[int] = set()
    after, last = 0, max(seqs, default=0)
    while after < last:
        page = box.pending(limit=LEDGER_PAGE, after_seq=after)
        if not page:
            break
        held.update(m.seq for m in page if m.seq in seqs)
        after = page[-1].seq
    return held


def print_ledger(ledger: Iterable[StoredReport], mqtt: MqttConfig, out: TextIO,
                 evicted: set[int] | None = None) -> None:
    """One line per report this run stored: delivered (acknowledged), still in the outbox, or
    evicted by the outbox's bound (a field message nobody will receive)."""
    reports = list(ledger)
    evicted = evicted or set()
    waiting: set[int] = set()
    path = mqtt.outbox.path
    try:
        with Outbox(path) as box:
            waiting = _still_held(box, {r.seq for r in reports})
    except (sqlite3.Error, OSError, OutboxLockedError) as exc:
        print(f"(cannot read the outbox {path}: {exc})", file=out)
    for r in reports:
        state = ("in-outbox" if r.seq in waiting else "evicted" if r.seq in evicted
                 else "delivered")
        c = r.counts
        where = f"run={r.run_id or '-'}" + (f" field={r.field_id}" if r.field_id else
                                            f" fields={r.fields_analyzed}")
        flags = f" flags={','.join(r.flags)}" if r.flags else ""
        print(f"{state:<10} {r.topic} {r.report_id} rbc={c['rbc']} wbc={c['wbc']} "
              f"platelet={c['platelet']} {where}{flags}", file=out)
    held = sum(1 for r in reports if r.seq in waiting)
    gone = sum(1 for r in reports if r.seq in evicted and r.seq not in waiting)
    print(f"{len(reports)} reports: {len(reports) - held - gone} delivered to "
          f"{mqtt.address}, {held} kept in the outbox {path} (sent when a broker answers)"
          f"{f', {gone} evicted by the outbox bound' if gone else ''}", file=out)
