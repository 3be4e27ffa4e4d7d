"""Giving the outbox file's room back to the disk once it has drained.

SQLite keeps the pages of deleted rows inside its file for later writes: after a long outage
the outbox file keeps the size its backlog reached (up to `max_bytes`, plus its runs' cells)
although every message has been delivered. A file made by this version has
`auto_vacuum=INCREMENTAL`: once free pages are at least FREE_SHARE of the file and MIN_FREE_BYTES,
`PRAGMA incremental_vacuum` hands them back, STEP_PAGES per transaction (each committed and
synced like a put, so no queued message is at risk at any point), and a TRUNCATE checkpoint
cuts the file. A file made before has no such mode: it is converted once by a `VACUUM`, only
while what it holds is small (VACUUM_MAX_LIVE_BYTES: the outbox's lock is held for the whole
copy) and the disk has room for the copy (its WAL holds the whole file once).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from smearscope.service.mqtt.reserve import RESERVE_BYTES, shrink_wal

logger = logging.getLogger(__name__)

#: Space is given back once free pages are this share of the file...
FREE_SHARE = 0.5
#: ...and at least this many bytes (a file in use keeps some free pages for its next writes).
MIN_FREE_BYTES = 8 * 2**20
#: Pages given back per transaction (4 MB at SQLite's default page size).
STEP_PAGES = 1024
#: Steps at most per call: the caller (the publisher's thread, every 10 s) goes on sending
#: between calls.
STEPS_PER_CALL = 8
#: A file without incremental vacuum is converted by a VACUUM only while it holds at most this.
VACUUM_MAX_LIVE_BYTES = 32 * 2**20
#: After a failed step (e.g. a full disk), the next try waits this long (s).
RETRY_S = 60.0


@dataclass(frozen=True)
class FileSpace:
    """The outbox file's pages: how many, how many free, and whether it vacuums incrementally."""

    page_size: int
    pages: int
    free_pages: int
    incremental: bool

    @property
    def free_bytes(self) -> int:
        return self.free_pages * self.page_size

    @property
    def live_bytes(self) -> int:
        return (self.pages - self.free_pages) * self.page_size

    def worth_giving_back(self) -> bool:
        return self.free_bytes >= MIN_FREE_BYTES and self.free_pages >= FREE_SHARE * self.pages


def measure(conn: sqlite3.Connection) -> FileSpace:
    """The file's pages (from its header: no scan)."""
    def pragma(name: str) -> int:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])

    return FileSpace(pragma("page_size"), pragma("page_count"), pragma("freelist_count"),
                     pragma("auto_vacuum") == 2)


class SpaceReclaimer:
    """Gives an outbox file's free pages back to the disk, a step at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._retry_at = 0.0
        self._started_bytes = 0  # the file's size when the giving back began; 0 when idle
        self._said_no_room = False
        self._failing: str | None = None  # the last failure, said once while it repeats

    def step(self, conn: sqlite3.Connection) -> bool:
        """One step (the caller holds the outbox's lock, no transaction open); True while more
        remain. A failure (a full disk, no memory for the VACUUM's copy) is logged, not raised."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            return self._step(conn)
        except (sqlite3.Error, MemoryError, OSError) as exc:  # a full disk, the VACUUM's copy (SQLITE_NOMEM)
            self._failed(conn, exc)
            return False

    def _step(self, conn: sqlite3.Connection) -> bool:
        space = measure(conn)
        if not self._started_bytes:
            if not space.worth_giving_back() or not (space.incremental or self._can_convert(space)):
                return False
            self._started_bytes = space.pages * space.page_size
        if not space.free_pages:
            self._finish(conn)
            return False
        if space.incremental:
            # executescript steps the pragma to its end (execute() would free one page)
            conn.executescript(f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({STEP_PAGES}); COMMIT;")
        else:
            self._convert(conn, space)
        self._failing = None
        return True

    def _failed(self, conn: sqlite3.Connection, exc: BaseException) -> None:
        """Rolled back, tried again in RETRY_S; said once for as long as it fails the same way."""
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback:
                logger.debug("outbox %s: rollback after a failed step: %s", self.path, rollback)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        logger.log(logging.DEBUG if reason == self._failing else logging.WARNING, "outbox %s: cannot give "
                   "free space back to the disk now (%s); trying again every %.0f s", self.path, reason, RETRY_S)
        self._failing = reason
        self._retry_at = time.monotonic() + RETRY_S
        try:
            self._finish(conn)  # the WAL's room the failed step took goes back to the disk
        except OSError as finish:  # the file's size not read: only the log line is missing
            logger.debug("outbox %s: after a failed step: %s", self.path, finish)

    def _can_convert(self, space: FileSpace) -> bool:
        free = shutil.disk_usage(self.path.parent).free
        if space.live_bytes <= VACUUM_MAX_LIVE_BYTES and free >= 2 * space.live_bytes + 2 * RESERVE_BYTES:
            return True
        if not self._said_no_room:
            logger.info("outbox %s: %.0f MB free inside the file, kept until it holds at most %.0f MB "
                        "(now %.0f) with the disk room to copy it", self.path, space.free_bytes / 2**20,
                        VACUUM_MAX_LIVE_BYTES / 2**20, space.live_bytes / 2**20)
            self._said_no_room = True
        return False

    def _convert(self, conn: sqlite3.Connection, space: FileSpace) -> None:
        """A file made before incremental vacuum: one VACUUM, which also switches it on."""
        logger.log(logging.DEBUG if self._failing else logging.INFO, "outbox %s: compacting the file (%.1f MB "
                   "in use of %.1f MB) and switching on incremental vacuum", self.path, space.live_bytes / 2**20,
                   space.pages * space.page_size / 2**20)
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA temp_store=MEMORY")  # the copy (at most VACUUM_MAX_LIVE_BYTES) in memory
        try:
            conn.execute("VACUUM")
        finally:
            conn.execute("PRAGMA temp_store=DEFAULT")

    def _finish(self, conn: sqlite3.Connection) -> None:
        """Checkpoint so that the file is cut to its last page now, and say what was given back."""
        if not self._started_bytes:
            return
        started, self._started_bytes = self._started_bytes, 0
        shrink_wal(conn, self.path)
        now = self.path.stat().st_size
        if now < started:  # a failed try gave nothing back: nothing to say
            logger.info("outbox %s: %.1f MB given back to the disk (file %.1f MB -> %.1f MB)", self.path,
                        (started - now) / 2**20, started / 2**20, now / 2**20)
