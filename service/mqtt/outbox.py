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
messages are evicted oldest first (they are intermediate results the final report summarizes);
final specimen reports are never evicted. If only reports remain, the put still succeeds, the
bound is exceeded and an error is logged: losing a patient's report is worse than using more disk.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from typing_extensions import Self  # typing.Self needs Python 3.11

from smearscope.service.config.outbox import OutboxConfig, OverflowPolicy

logger = logging.getLogger(__name__)

MessageKind = Literal["field", "report"]

_SCHEMA_VERSION = 1
_EVICTION_LOG_INTERVAL_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so order is stable
    kind           TEXT    NOT NULL CHECK (kind IN ('field', 'report')),
    topic          TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    size           INTEGER NOT NULL,
    qos            INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain         INTEGER NOT NULL,
    report_id      TEXT    NOT NULL,
    message_id     TEXT    NOT NULL UNIQUE,
    content_type   TEXT    NOT NULL,
    schema_version TEXT    NOT NULL,
    created_at     REAL    NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_kind_seq ON outbox (kind, seq);
"""

_COLUMNS = (
    "seq, kind, topic, payload, qos, retain, report_id, message_id, content_type, "
    "schema_version, created_at, attempts"
)


class OutboxLockedError(RuntimeError):
    """Another process has this outbox file open."""


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


class Outbox:
    """A bounded, durable, thread-safe FIFO of messages awaiting broker acknowledgement."""

    def __init__(
        self,
        path: str | Path,
        max_messages: int = 50_000,
        max_bytes: int = 256 * 1024 * 1024,
        overflow_policy: OverflowPolicy = "drop_oldest_field_keep_reports",
        lock_timeout_s: float = 2.0,
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
        self._evicted_since_log = 0
        self._last_eviction_log = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by all threads, serialized by self._lock.
        self._conn = sqlite3.connect(
            self.path, timeout=lock_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._open()
        except sqlite3.OperationalError as exc:
            self._conn.close()
            if "locked" in str(exc):
                raise OutboxLockedError(f"outbox {self.path} is in use by another process") from exc
            raise
        self._count, self._bytes, self._reports = self._measure()
        logger.info(
            "outbox %s opened: %d messages (%d reports), %d bytes",
            self.path,
            self._count,
            self._reports,
            self._bytes,
        )

    @classmethod
    def from_config(cls, config: OutboxConfig) -> Outbox:
        """Open (or create) the outbox file `config` describes."""
        return cls(config.path, config.max_messages, config.max_bytes, config.overflow_policy)

    def _open(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"outbox {self.path}: cannot enable WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")
        # A write transaction takes the exclusive lock now, not at the first put.
        conn.execute("BEGIN IMMEDIATE")
        for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
            conn.execute(statement)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        elif version != _SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            raise RuntimeError(
                f"outbox {self.path} has schema {version}, expected {_SCHEMA_VERSION}"
            )
        conn.execute("COMMIT")

    def _measure(self) -> tuple[int, int, int]:
        count, size, reports = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(kind = 'report'), 0) FROM outbox"
        ).fetchone()
        return int(count), int(size), int(reports)

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
        if kind not in ("field", "report"):
            raise ValueError(f"unknown message kind {kind!r}")
        payload = bytes(payload)
        message_id = message_id or uuid.uuid4().hex
        created_at = time.time() if created_at is None else created_at
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT INTO outbox (kind, topic, payload, size, qos, retain, report_id, "
                    "message_id, content_type, schema_version, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        kind,
                        topic,
                        payload,
                        len(payload),
                        qos,
                        int(retain),
                        report_id,
                        message_id,
                        content_type,
                        schema_version,
                        created_at,
                    ),
                )
                seq = int(cur.lastrowid or 0)
                counts = (
                    self._count + 1,
                    self._bytes + len(payload),
                    self._reports + (kind == "report"),
                )
                counts, evicted = self._enforce_bounds(*counts)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._count, self._bytes, self._reports = counts
            self._evicted += evicted
            self._evicted_since_log += evicted
        self._log_bound_state(kind, report_id, evicted)
        return seq

    def _enforce_bounds(
        self, count: int, size: int, reports: int
    ) -> tuple[tuple[int, int, int], int]:
        """Evict oldest field messages until within bounds (inside the caller's transaction)."""
        evicted = 0
        while count > self.max_messages or size > self.max_bytes:
            rows = self._conn.execute(
                "SELECT seq, size FROM outbox WHERE kind = 'field' ORDER BY seq LIMIT 256"
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
            evicted += len(doomed)
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

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[OutboxMessage]:
        """Up to `limit` unacknowledged messages with seq > after_seq, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            OutboxMessage(
                seq=r[0],
                kind=r[1],
                topic=r[2],
                payload=bytes(r[3]),
                qos=r[4],
                retain=bool(r[5]),
                report_id=r[6],
                message_id=r[7],
                content_type=r[8],
                schema_version=r[9],
                created_at=r[10],
                attempts=r[11],
            )
            for r in rows
        ]

    def mark_attempted(self, seqs: Iterable[int]) -> None:
        """Count one more hand-over to the broker for each message (for diagnostics)."""
        params = [(s,) for s in seqs]
        if not params:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", params
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def ack(self, seq: int) -> bool:
        """Delete a message the broker acknowledged; False if it was already gone."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages in one transaction; returns how many were deleted."""
        wanted = list(seqs)
        if not wanted:
            return 0
        return self._delete(f"seq IN ({','.join('?' * len(wanted))})", wanted)

    def expire_fields(self, created_before: float) -> int:
        """Delete field messages created before `created_before` (Unix time); reports never expire."""
        deleted = self._delete("kind = 'field' AND created_at < ?", [created_before])
        if deleted:
            logger.info("outbox: dropped %d expired field messages", deleted)
        return deleted

    def _delete(self, where: str, params: Sequence[object]) -> int:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(kind = 'report'), 0) "
                    f"FROM outbox WHERE {where}",
                    params,
                ).fetchone()
                self._conn.execute(f"DELETE FROM outbox WHERE {where}", params)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._count -= int(row[0])
            self._bytes -= int(row[1])
            self._reports -= int(row[2])
            return int(row[0])

    def counts(self) -> OutboxCounts:
        with self._lock:
            return OutboxCounts(
                messages=self._count,
                bytes=self._bytes,
                reports=self._reports,
                fields=self._count - self._reports,
                evicted_fields=self._evicted,
                over_bound=self._count > self.max_messages or self._bytes > self.max_bytes,
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
