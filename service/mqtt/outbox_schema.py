"""The outbox table (service.mqtt.outbox): its schema, and the migration of a file made by an
earlier version."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2

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
