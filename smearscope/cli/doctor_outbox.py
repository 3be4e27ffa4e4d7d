"""`smearscope doctor`'s one read of the station's outbox file, changing nothing there: its counts
for the outbox line, the runs an earlier start held there (service.mqtt.run_watch: a restored older state the broker showed
further along) for the held-runs line, or that a running station holds it (each open beside one
waits out the station's lock), which also decides whether the parked line
(smearscope.cli.doctor_parked) is said. A user who may read the file but not write its folder (another user
than the station's, a read-only mount) reads it read-only, and is told what that read could not see."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: smearscope.cli.doctor's (status, what, detail).
Check = tuple[str, str, str]
#: Held runs said one line each (the oldest); any more are said together in one line.
HELD_SHOWN = 5
#: A run held longer than this (s) is a WARN: reports a clinic has been without for a day.
HELD_LONG_S = 86_400.0
#: How long doctor waits for the outbox file while another process has it (the station's start waits as long).
LOCK_WAIT_S = 2.0


@dataclass(frozen=True)
class HeldRun:
    """A run whose messages the station holds (the outbox file's held_runs): since `held_at` (Unix
    time), what the broker showed (`broker_state`, `broker_fields`; `later_run` where it showed a
    later run), the station's `own_fields`, and the specimen reports of it in the outbox."""

    run_id: str
    held_at: float
    broker_state: str
    broker_fields: int
    own_fields: int
    later_run: str | None
    reports: int


@dataclass(frozen=True)
class OutboxLook:
    """What opening the outbox file found: `exists` False (not created yet, nothing opened), the `messages`
    waiting in it (`reports` of them final), `held` by a running station, or the `error` that stopped the open."""

    exists: bool
    messages: int | None = None
    reports: int = 0
    held: bool = False
    error: Exception | None = None
    held_runs: tuple[HeldRun, ...] = ()
    #: Read read-only (this user may not write the folder or the file): how, and what the read could not see
    #: ("" where it was opened as the station opens it).
    read_only: str = ""
    #: The file's -wal, in bytes, that a read-only read could not take in (the last writes not yet in the file).
    unseen_wal: int = 0


def look_at_outbox(path: Path) -> OutboxLook:
    """Read the outbox file at `path` once (when it exists) and close it, changing nothing there: an older
    schema's file read as it is (the station's next start migrates it; the older station, put back, refuses a
    migrated one), no file made beside it. What it needs is read in one short read transaction and the file
    closed before any report is parsed: a station starting meanwhile waits 2 s for it, then gives up."""
    from smearscope.service.mqtt.outbox_schema import SCHEMA_VERSION, newer_schema, open_to_read

    if not path.exists():
        return OutboxLook(exists=False)
    try:
        with open_to_read(path, LOCK_WAIT_S) as (conn, read_only, unseen_wal):
            conn.execute("BEGIN")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise newer_schema(path, version)
            tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            messages, reports = (conn.execute("SELECT COUNT(*), COALESCE(SUM(kind = 'report'), 0) FROM outbox")
                                 .fetchone() if "outbox" in tables else (0, 0))
            held = _read_held(conn, tables)
    except Exception as exc:  # noqa: BLE001 - the outbox line says what is wrong with the file
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return OutboxLook(exists=True, held=True)
        return OutboxLook(exists=True, error=exc)
    return OutboxLook(exists=True, messages=int(messages), reports=int(reports), held_runs=_held_runs(*held),
                      read_only=read_only, unseen_wal=unseen_wal)


#: What the outbox file says of its held runs, as read: their rows, the later runs some were held after, and
#: the payloads of the specimen reports waiting (none read where no run is held).
HeldRows = tuple[list[tuple[str, str, int, int, float]], dict[str, str], list[bytes]]


def _read_held(conn: Any, tables: set[str]) -> HeldRows:
    """The held runs' rows and, where there are any, the specimen reports' payloads, unparsed (parsing them all
    took 1.2 s for 5,000 reports of 8 kB, the file held meanwhile)."""
    if "held_runs" not in tables:
        return [], {}, []
    rows = conn.execute("SELECT run_id, broker_state, broker_fields, own_fields, held_at FROM held_runs "
                        "ORDER BY held_at, run_id").fetchall()
    if not rows:
        return [], {}, []
    after = (dict(conn.execute("SELECT run_id, later_run FROM held_runs_after").fetchall())
             if "held_runs_after" in tables else {})
    # a report's topic ends /report; a FHIR Bundle's (counted with its report) does not
    payloads = [p for (p,) in conn.execute("SELECT payload FROM outbox WHERE kind = 'report' "
                                           "AND substr(topic, -7) = '/report'")]
    return rows, after, payloads


def _held_runs(rows: list[tuple[str, str, int, int, float]], after: dict[str, str],
               payloads: list[bytes]) -> tuple[HeldRun, ...]:
    """The runs the outbox file holds, each with its specimen reports there (not their FHIR Bundles)."""
    reports: dict[str, int] = {}
    for payload in payloads:
        try:
            body = json.loads(payload).get("body")
        except (ValueError, AttributeError):
            continue
        if isinstance(body, dict) and isinstance(body.get("run_id"), str):
            reports[body["run_id"]] = reports.get(body["run_id"], 0) + 1
    return tuple(HeldRun(run_id, held_at, state, broker_fields, own_fields, after.get(run_id), reports.get(run_id, 0))
                 for run_id, state, broker_fields, own_fields, held_at in rows)


def held_run_checks(look: OutboxLook, run_topic: str, protocol: str, now: float | None = None) -> list[Check]:
    """One line per run the outbox file holds (none where it holds none, or where a running station
    holds the file: its start said them at WARNING): INFO, WARN once held longer than HELD_LONG_S. Read
    read-only without the file's -wal, each says that its runs and counts may miss the station's last writes.
    Under MQTT 3.1.1 a start that hears no retained run state sends them only once its own run state
    comes back on `run_topic` (service.mqtt.run_watch): said too."""
    from smearscope.service.mqtt.run_watch import held_said

    now = time.time() if now is None else now
    # read without the -wal (as the outbox line says): runs held, and reports stored, since may be missing
    unseen = (f"; {look.read_only}, so its -wal ({look.unseen_wal / 1024:.0f} kB: the station's last writes) was not "
              "read and these runs and counts may miss them" if look.read_only and look.unseen_wal else "")
    checks: list[Check] = []
    for run in look.held_runs[:HELD_SHOWN]:
        days = (now - run.held_at) / 86_400
        reports = f"{run.reports} specimen report{'' if run.reports == 1 else 's'}"
        text = (f"{reports} of it in the outbox (with their FHIR Bundles), held {days:.1f} days; "
                + held_said(run.run_id, run.held_at, (run.broker_state, run.broker_fields, run.own_fields),
                            run.later_run, run_topic))
        if protocol == "3.1.1":
            text += (f". Under MQTT 3.1.1 (mqtt.protocol) a start that hears no retained run state sends them once "
                     f"its own run state comes back on {run_topic}: its account must read that topic "
                     "(config/mosquitto.acl.example)")
        text += unseen
        checks.append(("WARN" if now - run.held_at > HELD_LONG_S else "INFO", "held run", text))
    rest = look.held_runs[HELD_SHOWN:]
    if rest:  # the oldest are said in full; the rest in one line, released the same way
        reports = sum(run.reports for run in rest)
        checks.append(("WARN" if any(now - run.held_at > HELD_LONG_S for run in rest) else "INFO", "held run", (
            f"and {len(rest)} more run{'' if len(rest) == 1 else 's'} held, for "
            f"{(now - rest[0].held_at) / 86_400:.1f} to {(now - rest[-1].held_at) / 86_400:.1f} days "
            f"({rest[0].run_id} to {rest[-1].run_id}), {reports} specimen report{'' if reports == 1 else 's'} of them "
            f"in the outbox: released as the runs above{unseen}")))
    return checks
