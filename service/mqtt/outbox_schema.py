"""The outbox table (service.mqtt.outbox): its schema, the migration of a file made by an
earlier version, and the opens of a process that only reads the file (smearscope doctor)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: SQLite's shared-lock bytes (unix VFS: PENDING_BYTE 0x40000000 + 2, 510 of them), which a station's exclusive lock
#: holds and a reader's shared lock takes.
SHARED_FIRST, SHARED_SIZE = 0x40000000 + 2, 510

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so order is stable
    kind           TEXT    NOT NULL CHECK (kind IN ('field', 'report', 'cells')),
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

#: Version 1 allowed only 'field' and 'report' in its CHECK; SQLite cannot alter a CHECK, so the
#: table is rebuilt (same rows, same sequence numbers).
MIGRATE_1_TO_2 = (
    "ALTER TABLE outbox RENAME TO outbox_v1",
    "DROP INDEX IF EXISTS outbox_kind_seq",
    SCHEMA.split(";")[0],
    "INSERT INTO outbox SELECT * FROM outbox_v1",
    # Sequence numbers are never reused, even when every v1 message had been acknowledged.
    "DELETE FROM sqlite_sequence WHERE name = 'outbox'",
    ("INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox', seq FROM sqlite_sequence "
     "WHERE name = 'outbox_v1'"),
    "DROP TABLE outbox_v1",
    SCHEMA.split(";")[1],
)

COLUMNS = (
    "seq, kind, topic, payload, qos, retain, report_id, message_id, content_type, "
    "schema_version, created_at, attempts"
)


def apply_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the table, or bring an older file's to SCHEMA_VERSION (in the caller's transaction)."""
    for statement in filter(None, (s.strip() for s in SCHEMA.split(";"))):
        conn.execute(statement)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 1:
        for statement in MIGRATE_1_TO_2:
            conn.execute(statement)
        logger.info("outbox %s migrated from schema 1 to 2", path)
    if version in (0, 1):
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    elif version != SCHEMA_VERSION:
        # a newer version's file (a station put back to this version): left as it is, never rebuilt
        raise newer_schema(path, version)


def newer_schema(path: Path, version: int) -> RuntimeError:
    """The refusal of an outbox file of schema `version`, newer than this smearscope's."""
    return RuntimeError(f"outbox {path} has schema {version}, written by a newer version of smearscope (this one "
                        f"reads schema {SCHEMA_VERSION} and older); the file is left as it is: start that version "
                        "again, or move the file aside once its messages are sent (docs/STATION.md, "
                        "'Updating a station, and going back')")


def open_query_only(path: Path, timeout_s: float) -> sqlite3.Connection:
    """The existing outbox file at `path` for a process that must change nothing in it (smearscope doctor): opened
    as the station opens it, so the last connection to close removes the -wal and -shm files SQLite makes beside a
    WAL file for it (a read-only connection leaves them in the folder), but refusing every write (query_only):
    nothing migrated, no reserve file made, an older schema read as it is. Reading raises OperationalError
    'database is locked' after `timeout_s` while a running station holds the file."""
    # as_uri: a '#', '?' or '%' in the folder's name is no part of the URI's own syntax
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout_s, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only=ON")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def open_to_read(path: Path, timeout_s: float) -> Iterator[tuple[sqlite3.Connection, str, int]]:
    """The existing outbox file at `path` opened for one read (smearscope doctor), how it was read ("" where opened
    as the station opens it: open_query_only) and the bytes of its -wal that read could not see. A user who may not
    write the folder (another user than the station's, a read-only mount) opens it read-only; SQLite reads a WAL
    file's last writes (its -wal) only through a -shm index it makes beside the file, which such a user cannot, so
    then the file alone is read (immutable) under SQLite's own shared lock: a running station still reads as
    'database is locked', and none starts during the read. Where the folder is writable but the file is not, a
    read-only open would leave a -wal and -shm of this user's there that the station could not write: the file alone
    is read. Nothing in the folder is made or changed."""
    folder_writable = os.access(path.parent, os.W_OK | os.X_OK)
    if folder_writable and os.access(path, os.R_OK | os.W_OK):
        conn = open_query_only(path, timeout_s)
        try:
            yield conn, "", 0
        finally:
            conn.close()
        return
    why = (f"this user (uid {os.geteuid()}) cannot write {path.parent}" if not folder_writable else
           f"this user (uid {os.geteuid()}) cannot write the file")
    uri = path.resolve().as_uri()  # a '#', '?' or '%' in the folder's name is no part of the URI's own syntax
    if not folder_writable:  # nothing can be made there: SQLite reads the -wal too where its -shm is there to read
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout_s, isolation_level=None)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the WAL index is opened here, or not
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc):
                raise
        else:
            try:
                yield conn, f"read only: {why}", 0
            finally:
                conn.close()
            return
    wal = Path(f"{path}-wal")
    with open(path, "rb") as held:
        try:  # the shared lock SQLite takes to read: refused while a station holds the file, and holds off its start
            fcntl.lockf(held, fcntl.LOCK_SH | fcntl.LOCK_NB, SHARED_SIZE, SHARED_FIRST)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise sqlite3.OperationalError("database is locked") from exc
            raise
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)
        try:
            yield conn, f"read only, the file alone: {why}", wal.stat().st_size if wal.exists() else 0
        finally:
            conn.close()
