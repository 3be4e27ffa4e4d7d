"""Durable store-and-forward outbox: every field/report message is on disk before it is published
and leaves the disk only when the broker has acknowledged it.

SQLite in WAL mode with `synchronous=FULL`. In WAL mode `NORMAL` syncs only at checkpoints, so a
power cut (common at rural sites) may roll back the last few commits: a report whose `put()` had
returned would silently vanish. `FULL` syncs the WAL on every commit, so a returned `put()` survives
a power cut; the price is one fsync per put/ack, negligible at a few messages per minute. A lost
ack only causes a re-send, which consumers dedupe (see docs/MQTT.md).

The file is opened in exclusive locking mode: one process owns an outbox at a time (a second
opener gets `OutboxLockedError`), which keeps the in-memory size counters honest. The OS releases
the lock when the owner dies, even by SIGKILL.

Bound policy "drop_oldest_field_keep_reports": above `max_messages` or `max_bytes`, per-field
(and per-cell detail) messages are evicted oldest first (intermediate results the final report
summarizes); final specimen reports are never evicted. If only reports remain, the put still
succeeds, the bound is exceeded and an error is logged: losing a patient's report is worse than
using more disk.

A full disk is not a bound: a write that fails is rolled back (without masking SQLite's own error,
e.g. SQLITE_FULL), raised to the caller, and `disk_full` stays True until a write succeeds again;
the station pauses its analysis meanwhile (service.station.workers). A reserve file beside the
outbox is given up so that acknowledged messages can still be deleted (service.mqtt.reserve).

Other tables may share the file and its transactions (`put_many(..., also=...)`, `write`,
`read`): the station keeps its specimen runs and the inputs it has stored there, so a message
and the state it changes are committed together (service.station.durable).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from typing_extensions import Self  # typing.Self needs Python 3.11

from smearscope.service.config.outbox import OutboxConfig, OverflowPolicy
from smearscope.service.mqtt.outbox_schema import COLUMNS as _COLUMNS
from smearscope.service.mqtt.outbox_schema import SCHEMA as _SCHEMA  # noqa: F401 (tests build files with it)
from smearscope.service.mqtt.outbox_schema import SCHEMA_VERSION as _SCHEMA_VERSION
from smearscope.service.mqtt.outbox_schema import apply_schema
from smearscope.service.mqtt.reserve import DiskReserve, is_disk_full, shrink_wal
from smearscope.service.mqtt.vacuum import STEPS_PER_CALL, SpaceReclaimer
from smearscope.service.mqtt.wall_clock import RELEASED, StampsFollowing, WallSteps

logger = logging.getLogger(__name__)

#: "field" and "cells" (per-cell detail) messages are evictable; "report" never is.
MessageKind = Literal["field", "report", "cells"]
MESSAGE_KINDS: tuple[str, ...] = ("field", "report", "cells")
#: Writes to other tables of the outbox file, run inside a put's transaction: (connection, the
#: sequence numbers just given to the messages).
StateWriter = Callable[[sqlite3.Connection, list[int]], None]
T = TypeVar("T")

_EVICTION_LOG_INTERVAL_S = 60.0
#: The newest evicted sequence numbers kept: the daemon's ledger's (10 000 reports), not 60 MB of them.
EVICTED_KEPT = 200_000
#: The WAL's file is cut back to this after a checkpoint (SQLite's 1000-page autocheckpoint).
WAL_LIMIT_BYTES = 4 * 1024 * 1024


class OutboxLockedError(RuntimeError):
    """Another process has this outbox file open."""


@dataclass(frozen=True)
class NewMessage:
    """A message to store: what `put_many` takes."""

    kind: MessageKind
    topic: str
    payload: bytes
    report_id: str
    schema_version: str
    qos: int = 1
    retain: bool = False
    content_type: str = "application/json"
    message_id: str | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message, exactly as it will be published."""

    seq: int
    kind: MessageKind
    topic: str
    payload: bytes
    qos: int
    retain: bool
    report_id: str
    message_id: str
    content_type: str
    schema_version: str
    created_at: float  # Unix time, seconds
    attempts: int  # times handed to the broker so far


@dataclass(frozen=True)
class OutboxCounts:
    """Size of the outbox now, and what the bound policy did since it was opened."""

    messages: int
    bytes: int
    reports: int
    fields: int
    evicted_fields: int
    over_bound: bool
    disk_full: bool = False


class Outbox:
    """A bounded, durable, thread-safe FIFO of messages awaiting broker acknowledgement."""

    def __init__(
        self,
        path: str | Path,
        max_messages: int = 50_000,
        max_bytes: int = 256 * 1024 * 1024,
        overflow_policy: OverflowPolicy = "drop_oldest_field_keep_reports",
        lock_timeout_s: float = 2.0,
        clock: WallSteps | None = None,
    ) -> None:
        if overflow_policy != "drop_oldest_field_keep_reports":
            raise ValueError(f"unknown outbox overflow policy {overflow_policy!r}")
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox bounds must be positive")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow_policy = overflow_policy
        self._lock = threading.Lock()
        self._evicted = 0
        #: Sequence numbers evicted since open (the newest EVICTED_KEPT), so a summary can say which were.
        self.evicted_seqs: set[int] = set()
        self._disk_full = False
        self._expiry_blocked = False  # expire_fields failed for lack of room
        self._wal_failing: str | None = None  # why the WAL could not be emptied, said once
        self._evicted_since_log = 0
        self._last_eviction_log = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by all threads, serialized by self._lock.
        self._conn = sqlite3.connect(self.path, timeout=lock_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            self._open()
            self._count, self._bytes, self._reports = self._measure()  # reads every row: a damaged page fails here
        except BaseException as exc:  # also a refused schema or a damaged file: its exclusive lock is not kept
            self._conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise OutboxLockedError(f"outbox {self.path} is in use by another process") from exc
            raise
        #: A wall clock's step moves the stamps of the rows stored since this start: their ages stay true
        self._clock = clock or WallSteps()
        self._stamps = StampsFollowing(self._clock)
        self._opened_seq = int(self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])
        self._reserve = DiskReserve(self.path.with_name(self.path.name + ".reserve"))
        self._reclaimer = SpaceReclaimer(self.path)
        self._reserve.make()
        logger.info("outbox %s opened: %d messages (%d reports), %d bytes", self.path, self._count,
                    self._reports, self._bytes)

    @classmethod
    def from_config(cls, config: OutboxConfig) -> Outbox:
        """Open (or create) the outbox file `config` describes."""
        return cls(config.path, config.max_messages, config.max_bytes, config.overflow_policy)

    def _open(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        # A new file only (an older one is converted by service.mqtt.vacuum once it has drained):
        # on an existing file the pragma writes its header, which fails on a full disk.
        if not conn.execute("PRAGMA page_count").fetchone()[0]:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"outbox {self.path}: cannot enable WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")
        # an acknowledged report's bytes are overwritten, not left in free pages (whatever the build's default)
        conn.execute("PRAGMA secure_delete=ON")
        # secure delete writes freed pages to the WAL: a large delete must not leave it that large
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        # A write transaction takes the exclusive lock now, not at the first put.
        conn.execute("BEGIN IMMEDIATE")
        try:
            apply_schema(conn, self.path)
        except BaseException:
            self._rollback()
            raise
        conn.execute("COMMIT")

    def _measure(self) -> tuple[int, int, int]:
        count, size, reports = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(kind = 'report'), 0) FROM outbox"
        ).fetchone()
        return int(count), int(size), int(reports)

    @property
    def disk_full(self) -> bool:
        """The last write failed for lack of space (cleared by the next write that succeeds)."""
        return self._disk_full

    def _rollback(self) -> None:
        """Roll back if a transaction is still open. SQLite may already have rolled back (a
        COMMIT that failed with SQLITE_FULL does); a second ROLLBACK would raise "no transaction
        is active" and hide the error that matters."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                logger.warning("outbox %s: rollback failed: %s", self.path, exc)

    def _transaction(self, work: Callable[[], T]) -> T:
        """Run `work` in one write transaction (caller holds self._lock); rolled back on error."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            result = work()
            self._conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if is_disk_full(exc):
                self._disk_full = True
            raise
        self._disk_full = False
        self._reserve.make()
        return result

    def probe(self) -> None:
        """One small write (the file header): raises while the disk is still full."""
        with self._lock:
            self._transaction(lambda: self._conn.execute(
                f"PRAGMA user_version={_SCHEMA_VERSION}"))

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(connection)` in one write transaction of this file (other tables)."""
        with self._lock:
            return self._transaction(lambda: work(self._conn))

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(connection)` for reading (other tables)."""
        with self._lock:
            return work(self._conn)

    def put(
        self,
        kind: MessageKind,
        topic: str,
        payload: bytes,
        *,
        report_id: str,
        schema_version: str,
        qos: int = 1,
        retain: bool = False,
        content_type: str = "application/json",
        message_id: str | None = None,
        created_at: float | None = None,
    ) -> int:
        """Store a message durably (committed and synced on return); returns its sequence number."""
        return self.put_many([NewMessage(kind, topic, payload, report_id, schema_version, qos,
                                         retain, content_type, message_id, created_at)])[0]

    def put_many(self, messages: Sequence[NewMessage],
                 also: StateWriter | None = None) -> list[int]:
        """Store messages in one transaction, with `also(connection, seqs)` (other tables) in
        the same one: all or nothing. Returns their sequence numbers."""
        rows = []
        for m in messages:
            if m.kind not in MESSAGE_KINDS:
                raise ValueError(f"unknown message kind {m.kind!r}")
            rows.append((m.kind, m.topic, bytes(m.payload), m.qos, int(m.retain), m.report_id,
                         m.message_id or uuid.uuid4().hex, m.content_type, m.schema_version, m.created_at))

        def insert() -> tuple[list[int], tuple[int, int, int], list[int]]:
            seqs = []
            count, size, reports = self._count, self._bytes, self._reports
            now = self._clock.stored_frame()  # after _follow_clock: the next step moves it with the rest
            for r in rows:
                cur = self._conn.execute(
                    "INSERT INTO outbox (kind, topic, payload, size, qos, retain, report_id, "
                    "message_id, content_type, schema_version, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (r[0], r[1], r[2], len(r[2]), *r[3:9], now if r[9] is None else r[9]),
                )
                seqs.append(int(cur.lastrowid or 0))
                count, size, reports = count + 1, size + len(r[2]), reports + (r[0] == "report")
            if also is not None:
                also(self._conn, seqs)
            counts, evicted = self._enforce_bounds(count, size, reports)
            return seqs, counts, evicted

        with self._lock:
            self._follow_clock()
            seqs, counts, evicted = self._transaction(insert)
            self._count, self._bytes, self._reports = counts
            self._evicted += len(evicted)
            self._evicted_since_log += len(evicted)
            self.evicted_seqs.update(evicted)
            if len(self.evicted_seqs) > EVICTED_KEPT:  # the oldest half goes
                self.evicted_seqs = set(sorted(self.evicted_seqs)[-EVICTED_KEPT // 2:])
        for kind, report_id in dict.fromkeys((r[0], r[5]) for r in rows):  # a report and its FHIR Bundle: one line
            self._log_bound_state(kind, report_id, len(evicted))
        return seqs

    def _enforce_bounds(
        self, count: int, size: int, reports: int
    ) -> tuple[tuple[int, int, int], list[int]]:
        """Evict oldest field/cells messages until within bounds (inside the caller's transaction)."""
        evicted: list[int] = []
        while count > self.max_messages or size > self.max_bytes:
            rows = self._conn.execute(
                "SELECT seq, size FROM outbox WHERE kind != 'report' ORDER BY seq LIMIT 256"
            ).fetchall()
            if not rows:
                break
            doomed: list[int] = []
            for seq, row_size in rows:
                if count <= self.max_messages and size <= self.max_bytes:
                    break
                doomed.append(seq)
                count -= 1
                size -= row_size
            self._conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in doomed])
            evicted += doomed
        return (count, size, reports), evicted

    def _log_bound_state(self, kind: str, report_id: str, evicted: int) -> None:
        over = self._count > self.max_messages or self._bytes > self.max_bytes
        if over and kind == "report":
            logger.error(
                "outbox over its bound with only reports left (%d messages, %d bytes; bounds %d, "
                "%d): report %s kept anyway, reports are never evicted",
                self._count,
                self._bytes,
                self.max_messages,
                self.max_bytes,
                report_id,
            )
        if evicted:
            now = time.monotonic()
            if now - self._last_eviction_log >= _EVICTION_LOG_INTERVAL_S:
                logger.warning(
                    "outbox full (bounds %d messages, %d bytes): evicted %d oldest field messages "
                    "since last notice (%d since open); reports are kept",
                    self.max_messages,
                    self.max_bytes,
                    self._evicted_since_log,
                    self._evicted,
                )
                self._last_eviction_log = now
                self._evicted_since_log = 0

    def holds(self, seq: int) -> bool:
        """Whether message `seq` still waits (not yet acknowledged, nor evicted)."""
        return self.read(lambda conn: conn.execute("SELECT 1 FROM outbox WHERE seq = ?", (seq,)).fetchone()) is not None

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[OutboxMessage]:
        """Up to `limit` unacknowledged messages with seq > after_seq, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        # in _COLUMNS' order: seq, kind, topic, payload, qos, retain, report_id, message_id, ...
        return [OutboxMessage(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), *r[6:]) for r in rows]

    def mark_attempted(self, seqs: Iterable[int]) -> None:
        """Count one more hand-over to the broker for each message (for diagnostics)."""
        params = [(s,) for s in seqs]
        if not params:
            return
        with self._lock:
            self._transaction(lambda: self._conn.executemany(
                "UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", params))

    def ack(self, seq: int) -> bool:
        """Delete a message the broker acknowledged; False if it was already gone."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages in one transaction; returns how many were deleted."""
        wanted = list(seqs)
        if not wanted:
            return 0
        return self._delete(f"seq IN ({','.join('?' * len(wanted))})", wanted)

    def _follow_clock(self) -> bool:
        """The stamps of the messages stored since this start moved by the wall clock's step (caller
        holds self._lock); False while a step is not followed yet (service.mqtt.wall_clock)."""
        return self._stamps.follow(lambda step: self._transaction(lambda: self._conn.execute(
            "UPDATE outbox SET created_at = created_at + ? WHERE seq > ?", (step, self._opened_seq)).rowcount))

    def expire_fields(self, created_before: float) -> int:
        """Delete field (and cells) messages created before `created_before` (Unix time); reports
        never expire. On a full disk (the reserve spent) they stay until there is room: said once."""
        with self._lock:
            followed = self._follow_clock()
        # stamped before this release by an earlier start: a wrong clock's, its age not known; stored
        # since this start while a step of the clock is not followed yet: neither
        since_start = " OR seq > ?" if followed else ""
        try:
            deleted = self._delete(f"kind != 'report' AND created_at < ? AND (created_at >= ? AND seq <= ?{since_start})",
                                   [created_before, RELEASED, self._opened_seq] + [self._opened_seq] * followed)
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            if not self._expiry_blocked:
                logger.warning("outbox %s: expired field messages kept, the disk has no room to delete "
                               "them (%s); tried again every 10 s", self.path, exc)
            self._expiry_blocked = True
            return 0
        self._expiry_blocked = False
        if deleted:
            logger.info("outbox: dropped %d expired field messages", deleted)
        return deleted

    def _delete(self, where: str, params: Sequence[object]) -> int:
        def delete() -> tuple[int, int, int]:
            row = self._conn.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(kind = 'report'), 0) "
                                     f"FROM outbox WHERE {where}", params).fetchone()
            self._conn.execute(f"DELETE FROM outbox WHERE {where}", params)
            return row

        with self._lock:
            full = self._disk_full  # a delete on a full disk gives the room its WAL holds back after it
            try:
                row = self._transaction(delete)
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                row, full = self._delete_on_full_disk(delete), True
            if full and row[0]:
                self._shrink_wal()  # the pages the delete freed then take new messages
            self._count -= int(row[0])
            self._bytes -= int(row[1])
            self._reports -= int(row[2])
            return int(row[0])

    def _delete_on_full_disk(self, delete: Callable[[], T]) -> T:
        """A delete a full disk refused, tried again with the room the WAL's file holds, then with the
        reserve's. On a full disk no checkpoint comes by itself (SQLite's waits for a 4 MB WAL): the
        WAL's file grows into whatever room there is and keeps it; a checkpoint writes its pages
        into the database file's own (already on the disk) and empties it. Where the outbox's own
        writes filled the disk, the WAL holds pages the database file has yet to grow by: that
        checkpoint needs the reserve's room, so it is made again once the reserve is given up."""
        self._shrink_wal()
        try:
            return self._transaction(delete)
        except sqlite3.Error as exc:
            if not (is_disk_full(exc) and self._reserve.release()):
                raise
        self._shrink_wal()
        return self._transaction(delete)

    def _shrink_wal(self) -> None:
        """The WAL emptied (caller holds self._lock); a failure said once while it repeats."""
        self._wal_failing = shrink_wal(self._conn, self.path, self._wal_failing)

    def give_back_space(self) -> None:
        """Free pages back to the disk once the outbox has drained (service.mqtt.vacuum; the
        publisher calls it every 10 s): a few steps, the lock taken for one at a time, so that a
        put waits for one step at most; the one-off VACUUM of an old-format file is one step (its
        whole copy, up to VACUUM_MAX_LIVE_BYTES)."""
        for _ in range(STEPS_PER_CALL):
            with self._lock:
                if not self._reclaimer.step(self._conn):
                    return

    def counts(self) -> OutboxCounts:
        with self._lock:
            return OutboxCounts(
                messages=self._count,
                bytes=self._bytes,
                reports=self._reports,
                fields=self._count - self._reports,
                evicted_fields=self._evicted,
                over_bound=self._count > self.max_messages or self._bytes > self.max_bytes,
                disk_full=self._disk_full,
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
