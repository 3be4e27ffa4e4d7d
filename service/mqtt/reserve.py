"""Space kept aside beside the outbox for a full disk.

Deleting the messages the broker acknowledged needs room too (SQLite writes the delete to its
WAL first): on a disk that filled while the broker was away, the acknowledgements that arrive
when it comes back could not be deleted, and every reconnect would send those messages again.
A delete refused for lack of space is tried again after a checkpoint (below a 4 MB WAL SQLite
makes none by itself, so on a full disk the WAL's file keeps the room it grew into), then once
more with the room of a file of RESERVE_BYTES (`<outbox>.reserve`) kept beside the outbox and
given up for it, after a second checkpoint: where the outbox's own writes filled the disk, the
WAL holds pages the database file has yet to grow by, which only the reserve's room lets the
checkpoint write. It is made again once the disk has room for it twice over. After
a delete on a full disk the WAL is emptied (`shrink_wal`), so that the room its file holds goes
back to the disk. A new message's write needs room for its WAL frames, which the pages the
deletes freed inside the database do not give: the WAL's room given back may take a few; the
analysis resumes for good when space is freed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: The reserve's size: room to delete a few hundred acknowledged messages.
RESERVE_BYTES = 2 * 1024 * 1024
#: How often (s) a missing reserve is looked at again (each write may ask).
RECHECK_S = 30.0


class DiskReserve:
    """A file of `size` bytes at `path`, allocated on the disk (not sparse)."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path, self.size = path, size
        self._checked = -RECHECK_S
        self._made = False  # made by this process: trusted whole even where the disk keeps zeros as holes

    def make(self) -> None:
        """The file, where the disk has room for it twice over (looked at every RECHECK_S)."""
        if time.monotonic() - self._checked < RECHECK_S or self._whole():
            return
        self._checked = time.monotonic()
        try:
            if shutil.disk_usage(self.path.parent).free > 2 * self.size:
                with open(self.path, "wb") as fh:
                    os.posix_fallocate(fh.fileno(), 0, self.size)
                self._made = True
        except OSError as exc:
            logger.warning("cannot keep the reserve file %s (%s)", self.path, exc)
            self.path.unlink(missing_ok=True)

    def _whole(self) -> bool:
        """The file is there and allocated in full (not one a crash cut short, or sparse)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        return st.st_size >= self.size and (self._made or st.st_blocks * 512 >= self.size)

    def release(self) -> bool:
        """Give the space back; False when there was none to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        logger.warning("disk full: the %.0f MB reserve %s given up, so acknowledged messages can be deleted",
                       self.size / 2**20, self.path)
        self._checked = time.monotonic()  # not made again at once, on a disk still full
        return True


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's SQLITE_FULL and for ENOSPC/EDQUOT from the OS."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return int(code) & 0xFF == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def failure_cause(exc: BaseException) -> str:
    """Why a write failed, in words for the log: a full disk, or SQLite's own code and message."""
    if is_disk_full(exc):
        return f"the disk is full: {exc}"
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__  # e.g. SQLITE_IOERR_FSYNC
    return f"{name}: {exc}" if str(exc) else name


def shrink_wal(conn: sqlite3.Connection, path: Path, said: str | None = None) -> str | None:
    """A TRUNCATE checkpoint: the WAL's pages written into the database and its file emptied.
    Returns why it failed (None when it did not); a failure `said` already is logged at DEBUG."""
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        cause = failure_cause(exc)
        logger.log(logging.DEBUG if cause == said else logging.WARNING, "outbox %s: cannot empty its WAL (%s)",
                   path, cause)
        return cause
    return None
