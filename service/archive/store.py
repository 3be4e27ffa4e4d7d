"""The archive on disk: one file per report as received (its FHIR bundle beside it) under
DIR/<station>/<YYYY-MM>/, and an SQLite index (WAL) to find them.

Each file is written whole or not at all (a temporary file, fsync, rename, fsync of the folder),
then its index row is committed (synchronous=FULL); only then does the caller acknowledge the
message. A crash between the two leaves a file without a row: the broker sends the message again
and the same file is written again, with its row. A report id already indexed is not stored twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from smearscope.service.archive.message import BundleMessage, ReportMessage

logger = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY, station TEXT NOT NULL, run_id TEXT, specimen_id TEXT,
    created_at REAL NOT NULL, kind TEXT NOT NULL, schema_version TEXT NOT NULL,
    verified INTEGER NOT NULL, supersedes TEXT, message_id TEXT, path TEXT NOT NULL,
    received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS reports_specimen ON reports (specimen_id);
CREATE INDEX IF NOT EXISTS reports_run ON reports (run_id);
CREATE INDEX IF NOT EXISTS reports_created ON reports (created_at);
CREATE INDEX IF NOT EXISTS reports_supersedes ON reports (supersedes);
CREATE TABLE IF NOT EXISTS bundles (
    report_id TEXT PRIMARY KEY, station TEXT NOT NULL, path TEXT NOT NULL, received_at REAL NOT NULL);
"""


class OutsideArchive(ValueError):
    """A path that would leave the archive folder (refused; the message checks should prevent it)."""


@dataclass(frozen=True)
class Stored:
    """What storing one message did: `new` False when it was there already (a duplicate)."""

    report_id: str
    path: Path
    new: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all, on disk before this returns."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class ArchiveStore:
    """The archive folder and its index. One writer (the daemon's storer thread); readers
    (`smearscope archive find/show`) open it with `open_index(read_only=True)`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._db = open_index(self.directory, read_only=False)
        self._remove_leftovers()

    def close(self) -> None:
        self._db.close()

    def report_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM reports").fetchone()[0])

    def _remove_leftovers(self) -> None:
        """Temporary files of writes a crash interrupted (their message was never acknowledged)."""
        for tmp in self.directory.glob("*/*/.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                logger.info("removed %s, left by an interrupted write", tmp)

    def _folder(self, station: str, month: str) -> Path:
        folder = (self.directory / station / month).resolve()
        if not folder.is_relative_to(self.directory) or folder == self.directory:
            raise OutsideArchive(f"{station}/{month} is outside {self.directory}")
        if not folder.is_dir():
            for level in (folder.parent, folder):
                if not level.is_dir():
                    level.mkdir(exist_ok=True)
                    _fsync_dir(level.parent)
        return folder

    def _file(self, folder: Path, name: str) -> Path:
        path = folder / name
        if path.resolve().parent != folder:
            raise OutsideArchive(f"{name!r} is not a file name in {folder}")
        return path

    def put_report(self, message: ReportMessage) -> Stored:
        row = self._db.execute("SELECT path FROM reports WHERE report_id = ?", (message.report_id,)).fetchone()
        if row is not None:
            kept = self.directory / row[0]
            try:
                if kept.read_bytes() != message.payload:
                    logger.warning("report %s from %s came again with other content (message %s); the first "
                                   "one received is kept", message.report_id, message.station, message.message_id)
            except FileNotFoundError:  # removed by hand since: this copy takes its place
                logger.warning("report %s is indexed but %s is gone; written again", message.report_id, kept)
                kept.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(kept, message.payload)
            return Stored(message.report_id, kept, new=False)
        path = self._file(self._folder(message.station, message.month), f"{message.report_id}.json")
        write_atomically(path, message.payload)
        with self._db:
            self._db.execute(
                "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (message.report_id, message.station, message.run_id, message.specimen_id, message.created_at,
                 message.kind, message.schema_version, int(message.verified), message.supersedes,
                 message.message_id, str(path.relative_to(self.directory)), time.time()))
        return Stored(message.report_id, path, new=True)

    def put_bundle(self, message: BundleMessage) -> Stored:
        row = self._db.execute("SELECT path FROM bundles WHERE report_id = ?", (message.report_id,)).fetchone()
        if row is not None:
            return Stored(message.report_id, self.directory / row[0], new=False)
        report = self._db.execute("SELECT station, path FROM reports WHERE report_id = ?",
                                  (message.report_id,)).fetchone()
        if report is not None and report[0] != message.station:
            logger.warning("FHIR bundle of report %s came from station %s, its report from %s; kept under %s",
                           message.report_id, message.station, report[0], message.station)
            report = None
        # beside its report; a bundle that came first goes where its report will (the same instant)
        folder = ((self.directory / report[1]).parent if report is not None
                  else self._folder(message.station, message.month))
        path = self._file(folder, f"{message.report_id}.fhir.json")
        write_atomically(path, message.payload)
        with self._db:
            self._db.execute("INSERT INTO bundles VALUES (?, ?, ?, ?)",
                             (message.report_id, message.station, str(path.relative_to(self.directory)),
                              time.time()))
        return Stored(message.report_id, path, new=True)


def open_index(directory: Path, read_only: bool) -> sqlite3.Connection:
    """The archive's index: created (WAL, synchronous=FULL) for the writer; for a reader, opened
    read-only, FileNotFoundError when the folder holds no archive."""
    path = directory / INDEX_NAME
    if read_only:
        if not path.is_file():
            raise FileNotFoundError(f"no archive at {directory} ({INDEX_NAME} not there)")
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        return db
    db = sqlite3.connect(path, timeout=10, isolation_level="DEFERRED", check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    with db:
        db.executescript(SCHEMA)
    _fsync_dir(directory)
    return db

