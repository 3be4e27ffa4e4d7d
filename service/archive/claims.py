"""One delivery per report and destination among `smearscope archive send-hl7` commands run at once
(`hl7_claims` in the archive's index).

Each send checked the recorded deliveries, then sent, then recorded: two sends over the same reports
(two operators, a timer beside a hand-run one) both found a report undelivered and the lab system got
it twice. Now a send claims a report's destination before delivering it, in one write transaction
(BEGIN IMMEDIATE) with the check of the recorded deliveries and claims: the other send sees the claim
and leaves that delivery to it. The claim is removed with the delivery's record (one transaction), or
when the delivery fails. A claim left by a process that died (killed, the machine off) does not stand
for ever: on the same host, one whose process is gone (its pid and start time) is taken over at once;
one of another host once `ttl_s` has passed since it was made.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable
from functools import cache

SCHEMA = """
CREATE TABLE IF NOT EXISTS hl7_claims (
    report_id TEXT NOT NULL, destination TEXT NOT NULL, processing_id TEXT NOT NULL, owner TEXT NOT NULL,
    claimed_at REAL NOT NULL, PRIMARY KEY (report_id, destination, processing_id));
"""


def _start_time(pid: int) -> str | None:
    """The process's start time (/proc/<pid>/stat field 22, clock ticks since boot), which tells a reused
    pid from the process that made a claim; None where it cannot be read (gone, or no /proc)."""
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()  # noqa: SIM115
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


@cache
def this_owner() -> str:
    """Who claims: `<host> <pid> <start time>`."""
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid()) or '?'}"


def _alive(owner: str, claimed_at: float, ttl_s: float) -> bool:
    """Whether the claim `owner` made at `claimed_at` still stands."""
    host, pid, started = (owner.split(" ") + ["", "", ""])[:3]
    if host == socket.gethostname() and pid.isdigit() and started != "?":
        return _start_time(int(pid)) == started
    return time.time() - claimed_at < ttl_s


def claim(db: sqlite3.Connection, report_id: str, destination: str, processing_id: str, again: bool, ttl_s: float,
          canonical: Callable[[str], str]) -> str | None:
    """Claim `report_id`'s delivery to `destination` (canonical) for this process; None when claimed, else
    why not: 'delivered' (the index records a delivery there with `processing_id`, each destination it records
    made `canonical`; not checked with `again`) or 'claimed' (another send is delivering it)."""
    db.execute("BEGIN IMMEDIATE")  # the check and the claim in one write transaction: the other send waits
    try:
        row = db.execute("SELECT owner, claimed_at FROM hl7_claims WHERE report_id = ? AND destination = ? AND "
                         "processing_id = ?", (report_id, destination, processing_id)).fetchone()
        if row is not None and row[0] != this_owner() and _alive(row[0], row[1], ttl_s):
            why: str | None = "claimed"
        elif not again and destination in {canonical(d) for (d,) in db.execute(
                "SELECT DISTINCT destination FROM hl7_deliveries WHERE report_id = ? AND processing_id = ?",
                (report_id, processing_id))}:
            why = "delivered"
        else:
            db.execute("INSERT OR REPLACE INTO hl7_claims VALUES (?, ?, ?, ?, ?)",
                       (report_id, destination, processing_id, this_owner(), time.time()))
            why = None
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return why


def release(db: sqlite3.Connection, report_id: str, destination: str, processing_id: str) -> None:
    """Remove this process's claim (in the caller's transaction, or its own)."""
    db.execute("DELETE FROM hl7_claims WHERE report_id = ? AND destination = ? AND processing_id = ? AND owner = ?",
               (report_id, destination, processing_id, this_owner()))
