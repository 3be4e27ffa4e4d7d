"""A damaged outbox file, salvaged at the station's start.

An SD card that loses its power mid-write, or wears out, can leave a page of the outbox file
unreadable. SQLite then refuses the whole file ("database disk image is malformed") and a station
that refused to start on it delivered none of the reports in its good pages, and analysed nothing,
until someone came to the lab. So a file SQLite calls damaged (an SQLite file by its header: a
path that names another kind of file is a configuration mistake, refused as before) is kept aside
as `<outbox>.damaged-<UTC time>` (its WAL with it), and every row that can still be read, of
every table, goes into a new outbox file under the same sequence numbers (its messages are sent
as before; consumers drop a repeat by its id); the rows that cannot be read are said by their
sequence numbers, for the kept file's recovery. The new file is written beside the damaged one
and takes its name only once whole, so a crash or a full disk meanwhile leaves the damaged file
as it was for the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from smearscope.service.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
_DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
#: Sequence numbers tried one at a time past a damaged part before the rest of a table is given up.
MAX_PROBES = 1_000_000


def is_damaged(exc: BaseException, path: Path) -> bool:
    """Whether `exc`, opening the outbox at `path`, says an SQLite file there is damaged."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code not in _DAMAGED:
        return False
    try:
        with path.open("rb") as fh:
            return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Salvaged:
    """What a salvage kept: the damaged file's new name, its messages (and specimen reports among
    them) and other rows carried into the new file, and the sequence numbers it could not read."""

    path: Path
    kept_as: Path
    messages: int
    reports: int
    other_rows: int
    unread: tuple[tuple[int, int], ...]  # (first, last) sequence numbers of the outbox table not read
    why: str
    tables_unread: tuple[str, ...] = ()  # the station's own tables some rows of which could not be read

    def said(self) -> str:
        unread = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.unread[:10])
        more = f" and {len(self.unread) - 10} more ranges" if len(self.unread) > 10 else ""
        lost = (f"its messages of sequence numbers {unread}{more} could not be read (some may have been "
                "delivered and deleted before)" if self.unread else "every message of it was read")
        if self.tables_unread:
            lost += f"; some rows of {', '.join(self.tables_unread)} could not be read"
        return (f"outbox {self.path} is damaged ({self.why}): kept as {self.kept_as}; {self.messages} messages "
                f"({self.reports} specimen reports and FHIR bundles) and {self.other_rows} rows of the station's "
                f"own tables read from it into a new outbox file, to be sent as before; {lost}. Keep the damaged "
                f"file until its lab has what it holds (docs/MQTT.md, 'The outbox'); check the storage card")


def _tables(src: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """(type, name, sql) of the damaged file's tables and indexes (SQLite's own left out)."""
    try:
        rows = src.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE "
                           "'sqlite_%' ORDER BY type = 'index', rowid").fetchall()
    except sqlite3.DatabaseError as exc:
        logger.error("outbox salvage: the damaged file's list of tables cannot be read (%s): nothing read", exc)
        return []
    return [(t, n, s) for t, n, s in rows if t in ("table", "index")]


def _rows(src: sqlite3.Connection, table: str, unread: list[tuple[int, int]]) -> Iterator[tuple]:
    """Every row of `table` that can be read, rowid first, in rowid order; the rowids past which a
    scan failed and the next readable one are added to `unread` as (first, last) not read."""
    after = -(2**63)
    try:
        top = src.execute(f'SELECT max(rowid) FROM "{table}"').fetchone()[0]
    except sqlite3.DatabaseError:
        top = None
    if top is None and table == "outbox":
        try:
            top = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0]
        except (sqlite3.DatabaseError, TypeError):
            top = None
    while True:
        try:
            for row in src.execute(f'SELECT rowid, * FROM "{table}" WHERE rowid > ? ORDER BY rowid', (after,)):
                after = row[0]
                yield row
            return
        except sqlite3.DatabaseError:
            first = after + 1 if after > -(2**63) else 1
            found = None
            for rowid in range(first, min(top if top is not None else first + MAX_PROBES, first + MAX_PROBES) + 1):
                try:
                    row = src.execute(f'SELECT rowid, * FROM "{table}" WHERE rowid = ?', (rowid,)).fetchone()
                except sqlite3.DatabaseError:
                    continue
                if row is not None:
                    found = row
                    break
            last = found[0] - 1 if found is not None else (top if top is not None else first + MAX_PROBES)
            if first <= last:  # a scan may fail past a row a lookup reads
                unread.append((first, last))
            if found is None:
                return
            yield found
            after = found[0]


def _copy(src: sqlite3.Connection, dst: sqlite3.Connection,
          tables_unread: list[str]) -> tuple[int, int, int, list[tuple[int, int]]]:
    """Every readable row of `src` into the empty `dst`, in one transaction: (messages, reports among
    them, other rows, the outbox's sequence numbers not read); other tables not read whole are
    added to `tables_unread`."""
    messages = reports = other = 0
    unread: list[tuple[int, int]] = []
    dst.execute("PRAGMA auto_vacuum=INCREMENTAL")  # as the outbox makes a new file
    dst.execute("PRAGMA journal_mode=WAL")
    dst.execute("BEGIN IMMEDIATE")
    try:
        version = src.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError:
        version = 0
    tables = _tables(src)
    for _, _, sql in tables:
        dst.execute(sql)
    for kind, table, sql in tables:
        if kind != "table" or "WITHOUT ROWID" in sql.upper():
            continue
        info = src.execute(f'PRAGMA table_info("{table}")').fetchall()
        columns = [c[1] for c in info]
        keys = [c for c in info if c[5]]
        aliased = len(keys) == 1 and keys[0][2].upper() == "INTEGER"  # its key is the rowid (the outbox's seq)
        names = ", ".join(f'"{c}"' for c in columns)
        insert = (f'INSERT OR IGNORE INTO "{table}" ({"" if aliased else "rowid, "}{names}) '
                  f'VALUES ({", ".join("?" * (len(columns) + (not aliased)))})')
        skipped: list[tuple[int, int]] = []
        for row in _rows(src, table, unread if table == "outbox" else skipped):
            dst.execute(insert, row[1:] if aliased else row)
            if table == "outbox":
                messages += 1
                reports += row[1 + columns.index("kind")] == "report"
            else:
                other += 1
        if skipped:
            tables_unread.append(table)
    if any(t == "outbox" for _, t, _ in tables):  # sequence numbers are never reused
        try:
            seq = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        except sqlite3.DatabaseError:
            seq = None
        top = max([seq[0] if seq else 0, *(b for _, b in unread)])
        dst.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'outbox'", (top,))
        if not dst.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'outbox'").fetchone():
            dst.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (top,))
    dst.execute(f"PRAGMA user_version={int(version)}")
    dst.execute("COMMIT")
    return messages, reports, other, unread


def salvage(path: Path, why: str, now: float | None = None) -> Salvaged:
    """Write what can be read of the damaged outbox file at `path` to a new file, keep the damaged
    one as `<path>.damaged-<UTC time>` and put the new one at `path` (the outbox then opens it as
    usual). The copy is made beside it first: a crash or a full disk while it is made leaves the
    damaged file where it was, salvaged again at the next start."""
    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}")
    new = path.with_name(f".{path.name}.salvage.tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{new}{suffix}").unlink(missing_ok=True)  # a salvage a crash cut short
    src = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)  # a name with "?" or "#" too
    dst = sqlite3.connect(new, isolation_level=None)
    try:
        tables_unread: list[str] = []
        messages, reports, other, unread = _copy(src, dst, tables_unread)
        dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all in the file itself: it moves alone
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        dst.close()
        src.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{new}{suffix}").unlink(missing_ok=True)
        raise
    dst.close()
    src.close()
    with new.open("rb") as fh:
        os.fsync(fh.fileno())
    try:
        os.link(path, kept)  # kept under both names until the new file takes the outbox's
    except OSError:  # a file system without hard links
        shutil.copyfile(path, kept)
    for suffix in ("-wal", "-shm"):  # the damaged file's WAL must not be read into the new one
        old = Path(f"{path}{suffix}")
        if old.exists():
            old.rename(f"{kept}{suffix}")
    Path(f"{new}-wal").unlink(missing_ok=True)
    os.replace(new, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return Salvaged(path, kept, messages, reports, other, tuple(unread), why, tuple(tables_unread))


def open_salvaging(open_outbox: Callable[[], Outbox], path: Path) -> Outbox:
    """`open_outbox()`, its whole file checked first (SQLite's quick_check: every page of every
    table, the station's runs and cells too, which the outbox's own open does not read: a bad page
    there failed the start at every restart); a file SQLite finds damaged is salvaged (said at
    ERROR) and opened again."""
    try:
        box = open_outbox()
    except sqlite3.DatabaseError as exc:
        if not is_damaged(exc, path):
            raise
        why = str(exc)
    else:
        try:
            problem = box.read(lambda conn: conn.execute("PRAGMA quick_check(1)").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc, path):
                box.close()
                raise
            problem = str(exc)
        if problem == "ok":
            return box
        box.close()
        why = " ".join(str(problem).split())
    said = salvage(path, why)
    logger.error("%s", said.said())
    return open_outbox()
