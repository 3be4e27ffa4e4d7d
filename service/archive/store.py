"""The archive on disk: one file per report as received (its FHIR bundle beside it) under
DIR/<station>/<YYYY-MM>/, and an SQLite index (WAL) to find them.

Each file is written whole or not at all (a temporary file, fsync, rename, fsync of the folder),
then its index row is committed (synchronous=FULL); only then does the caller acknowledge the
message. A crash between the two leaves a file without a row: the broker sends the message again
and the same file is written again, with its row. A report id already indexed is not stored twice.

No file is ever replaced by one of other content and nothing received is dropped: a copy that
differs from the one archived first, or comes while the first cannot be read, is written beside it
as `<report_id>+<digest>.json` (`+` is in no report id, so the name is no other report's).
A folder that is a symbolic link leading out of the archive is not written through: LinkOutOfArchive,
an OSError, so the caller holds the message as it holds one a full disk refuses.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smearscope.files import fsync_dir, write_atomically
from smearscope.service.archive.claims import SCHEMA as CLAIMS_SCHEMA
from smearscope.service.archive.index_backup import keep_before_upgrade, upgrade_lock
from smearscope.service.archive.message import BundleMessage, ReportMessage
from smearscope.service.archive.rejections import SCHEMA as REJECTIONS_SCHEMA
from smearscope.service.archive.rejections import (
    Rejection,
    add_closed_at,
    close_rejections,
    error_held,
    forget_error_held,
    open_count,
    open_rejection,
    record_error_held,
    record_rejections,
)

logger = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
#: The index's layout, kept in `PRAGMA user_version`. 1: the `reports` and `bundles` tables below
#: (an index made before it had a number, user_version 0 with these tables, is marked 1 in place).
#: 2: and `hl7_deliveries`, each HL7 message delivered (where, when, by whom); a version 1 index is
#: upgraded in place by adding it (its reports then have no delivery recorded). 3: and each delivery's
#: processing id (MSH-11: P, T or D), so a training message is never taken for the production one; a
#: version 2 index is upgraded in place, its deliveries P (every message was, before MSH-11 could be set).
#: 4: and `hl7_whole_id_runs`, the runs an earlier smearscope delivered a report of, when ORC-2/3 and SPM-2
#: carried the specimen and run ids whole: filled once, as a version 2 or 3 index is upgraded, from its
#: deliveries; every later message of such a run carries them whole too (whole_ids_run), so the lab system
#: matches an amended report with the one it has. An older smearscope refuses the upgraded index: what it
#: delivered would be missing from the table; the upgrade leaves it a copy of the index as it was (index_backup).
INDEX_VERSION = 4
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
CREATE TABLE IF NOT EXISTS hl7_deliveries (
    report_id TEXT NOT NULL, destination TEXT NOT NULL, control_id TEXT NOT NULL, delivered_at REAL NOT NULL,
    sender TEXT NOT NULL, processing_id TEXT NOT NULL DEFAULT 'P');
CREATE INDEX IF NOT EXISTS hl7_deliveries_report ON hl7_deliveries (report_id, destination);
CREATE TABLE IF NOT EXISTS hl7_whole_id_runs (run_id TEXT PRIMARY KEY);
""" + REJECTIONS_SCHEMA + CLAIMS_SCHEMA  # added to an index of version 3 or 4 in place: a smearscope before them ignores the tables


#: The columns of each table in version 1, in order: an unversioned index is upgraded only if it has these.
COLUMNS_V1 = {
    "reports": ("report_id", "station", "run_id", "specimen_id", "created_at", "kind", "schema_version",
                "verified", "supersedes", "message_id", "path", "received_at"),
    "bundles": ("report_id", "station", "path", "received_at"),
}


class OutsideArchive(ValueError):
    """A path that would leave the archive folder (refused; the message checks should prevent it)."""


class LinkOutOfArchive(OSError):
    """A folder or file in the archive that is a symbolic link leading out of it (put there by hand):
    nothing is written through it; the message is held, as on a full disk, until it is removed."""

    def __init__(self, link: Path, directory: Path) -> None:
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        where = "" if _inside(link.resolve(), directory) else f", outside the archive {directory}"
        super().__init__(f"{link} is a symbolic link to {target}{where}: the archive writes nothing through a "
                         f"link. Replace it with what it points to (rm {link}, then mv {link.resolve()} {link}: "
                         "the reports the index names there stay found) or just remove it; the archive stores "
                         "the message at its next try, no restart needed")
        self.link, self.target = link, target


class IndexVersionError(RuntimeError):
    """An index this smearscope cannot use as it is (made by a newer one, or of a layout it does not
    know); nothing in it was changed. A restart does not mend it."""


@dataclass(frozen=True)
class Delivery:
    """One HL7 message delivered: `destination` `file:<folder>` or `mllp:<host>:<port>`; `sender` `archive`
    (the running archive) or `send-hl7` (sent from the index by `smearscope archive send-hl7`);
    `processing_id` its MSH-11 (P, T or D): a report is delivered to a destination once per processing id."""

    report_id: str
    destination: str
    control_id: str
    sender: str
    processing_id: str = "P"


def canonical_destination(destination: str) -> str:
    """`destination` as the index records and compares it: an MLLP listener's IPv6 address in brackets,
    in its compressed lower-case form (`mllp:[fd00::5]:2575`). A row written by an older smearscope may
    hold it without brackets (`mllp:fd00::5:2575`): an MLLP destination whose host has a colon is read
    as an IPv6 address, the part after the last colon its port. The rows are read so, not rewritten.
    Other destinations (`file:<folder>`, `mllp:<name>:<port>`) are returned as they are."""
    if not destination.startswith("mllp:"):
        return destination
    host, sep, port = destination[len("mllp:"):].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" not in host:
        return destination
    try:
        host = ipaddress.IPv6Address(host).compressed
    except ValueError:
        pass  # no address this smearscope would send to: bracketed as it is, never matched with one
    return f"mllp:[{host}]{sep}{port}"


def record_deliveries(db: sqlite3.Connection, deliveries: list[Delivery]) -> None:
    """Add `deliveries` to the index (in the caller's transaction), each destination canonical."""
    db.executemany("INSERT INTO hl7_deliveries (report_id, destination, control_id, delivered_at, sender, "
                   "processing_id) VALUES (?, ?, ?, ?, ?, ?)",
                   [(d.report_id, canonical_destination(d.destination), d.control_id, time.time(), d.sender,
                     d.processing_id) for d in deliveries])
    close_rejections(db, [(d.report_id, canonical_destination(d.destination), d.processing_id) for d in deliveries])


@dataclass(frozen=True)
class Stored:
    """What storing one message did: `new` False when it was there already (a duplicate)."""

    report_id: str
    path: Path
    new: bool


#: The runs (a report of no run: its own id, as oru_r01's filler order number) with an HL7 delivery recorded.
_RUN = "coalesce(r.run_id, r.report_id)"
_DELIVERED_RUNS = f"SELECT DISTINCT {_RUN} FROM hl7_deliveries d JOIN reports r ON r.report_id = d.report_id"


def whole_ids_run(db: sqlite3.Connection, run_id: str) -> bool:
    """Whether the messages of run `run_id` carry its specimen and run ids whole (oru_r01 `whole_ids`): an
    earlier smearscope delivered a report of it so. An index not yet upgraded (a reader's, of version 2 or 3):
    every delivery it records was."""
    if int(db.execute("PRAGMA user_version").fetchone()[0]) >= 4:
        query = "SELECT 1 FROM hl7_whole_id_runs WHERE run_id = ?"
    elif db.execute("SELECT 1 FROM sqlite_master WHERE name = 'hl7_deliveries'").fetchone() is not None:
        query = (f"SELECT 1 FROM hl7_deliveries d JOIN reports r ON r.report_id = d.report_id "
                 f"WHERE {_RUN} = ? LIMIT 1")
    else:
        return False
    return db.execute(query, (run_id,)).fetchone() is not None


class ArchiveStore:
    """The archive folder and its index. One writer (the daemon's storer thread); readers
    (`smearscope archive find/show`) open it with `open_index(read_only=True)`."""

    def __init__(self, directory: Path,
                 on_new_report: Callable[[ReportMessage], list[Delivery | Rejection]] | None = None) -> None:
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.on_new_report = on_new_report
        self._db = open_index(self.directory, read_only=False)
        self._remove_leftovers()

    def close(self) -> None:
        self._db.close()

    def not_accepted(self, report_id: str, destination: str, processing_id: str) -> str | None:
        """The code of `report_id`'s open rejection at `destination` (service.archive.rejections), else None."""
        return open_rejection(self._db, report_id, destination, processing_id)

    def whole_ids(self, run_id: str) -> bool:
        """Whether run `run_id`'s messages carry its ids whole (whole_ids_run)."""
        return whole_ids_run(self._db, run_id)

    def error_held(self, report_id: str, destination: str, processing_id: str) -> float:
        """Seconds `report_id` has been answered AE/CE at `destination`, by earlier runs too (rejections)."""
        return error_held(self._db, report_id, destination, processing_id)

    def record_error_held(self, report_id: str, destination: str, processing_id: str, held_s: float) -> None:
        record_error_held(self._db, report_id, destination, processing_id, held_s)

    def not_accepted_count(self) -> int:
        """How many reports a lab system has not accepted (an open rejection: service.archive.rejections)."""
        return open_count(self._db)

    def report_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM reports").fetchone()[0])

    def _remove_leftovers(self) -> None:
        """Temporary files of writes a crash interrupted (their message was never acknowledged)."""
        for tmp in self.directory.glob("*/*/.*.tmp"):
            if not _inside(tmp.resolve(), self.directory):  # under a folder linked out: not the archive's
                continue
            with contextlib.suppress(OSError):
                tmp.unlink()
                logger.info("removed %s, left by an interrupted write", tmp)

    def _folder(self, *levels: str) -> Path:
        """DIR/<levels>, made if missing (resolved). LinkOutOfArchive when a level is a symbolic link
        leading out of the archive; OutsideArchive when a level itself would (the message checks
        prevent that)."""
        path = self.directory
        for level in levels:
            path = path / level
            if path.is_symlink() and not _inside(path.resolve(), self.directory):
                raise LinkOutOfArchive(path, self.directory)
        folder = path.resolve()
        if not _inside(folder, self.directory):
            raise OutsideArchive(f"{'/'.join(levels)} is outside {self.directory}")
        if not folder.is_dir():
            parts = folder.relative_to(self.directory).parts
            for depth in range(1, len(parts) + 1):
                level = self.directory.joinpath(*parts[:depth])
                if not level.is_dir():
                    level.mkdir(exist_ok=True)
                    fsync_dir(level.parent)
        return folder

    def _file(self, folder: Path, name: str) -> Path:
        path = folder / name
        if path.is_symlink():  # not made by the archive: not replaced, wherever it leads
            raise LinkOutOfArchive(path, self.directory)
        if path.resolve().parent != folder:
            raise OutsideArchive(f"{name!r} is not a file name in {folder}")
        return path

    def _place(self, folder: Path, name: str, copy_name: str, payload: bytes) -> Path:
        """`payload` written in `folder` as `name`, or as `copy_name` when a file of that name with other
        content is there (another record's, or one that cannot be read): never replaced. A file of that
        name with this content (written before a crash, its row not committed) is taken as it is."""
        path = self._file(folder, name)
        try:
            if path.read_bytes() == payload:
                fsync_dir(folder)  # its rename may not be on disk yet (the crash came before the sync)
                return path
            reason = "holds other content"
        except FileNotFoundError:
            write_atomically(path, payload)
            return path
        except OSError as exc:
            reason = f"cannot be read ({type(exc).__name__}: {exc})"
        copy = self._file(folder, copy_name)
        write_atomically(copy, payload)
        logger.error("%s is there already and %s: not replaced; this message is stored beside it as %s", path,
                     reason, copy.name)
        return copy

    def _beside(self, kept: Path, copy_name: str, payload: bytes) -> Path:
        """A copy of a record already indexed at `kept`, written beside it (once per content)."""
        copy = self._file(self._folder(*kept.parent.relative_to(self.directory).parts), copy_name)
        if not copy.is_file():
            write_atomically(copy, payload)
        return copy

    def _again(self, kept: Path, payload: bytes, what: str, copy_name: str) -> Path:
        """A record indexed already, received again: the path of what now holds this payload. The kept
        file is compared (read once: not retried); gone, it is written again; of other content or
        unreadable, this payload goes beside it (ERROR when unreadable) and the index still names it."""
        try:
            same = kept.read_bytes() == payload
        except FileNotFoundError:  # removed by hand since: this copy takes its place
            logger.warning("%s is indexed but %s is gone; written again", what, kept)
            path = self._file(self._folder(*kept.parent.relative_to(self.directory).parts), kept.name)
            write_atomically(path, payload)
            return path
        except OSError as exc:  # permission, an I/O error: not compared, not retried, not lost
            copy = self._beside(kept, copy_name, payload)
            logger.error("%s came again and its archived copy %s cannot be read (%s: %s): the copy received now "
                         "is stored beside it as %s and acknowledged; the index still names %s. Check that "
                         "file's owner and mode (the archive's user must read it) or the disk (an I/O error: "
                         "the kernel log)", what, kept, type(exc).__name__, exc, copy.name, kept.name)
            return copy
        if same:
            return kept
        copy = self._beside(kept, copy_name, payload)
        logger.warning("%s came again with other content: the first one received is kept (the index names %s), "
                       "this one stored beside it as %s", what, kept.name, copy.name)
        return copy

    def put_report(self, message: ReportMessage) -> Stored:
        copy_name = f"{message.report_id}+{_digest(message.payload)}.json"
        row = self._db.execute("SELECT path FROM reports WHERE report_id = ?", (message.report_id,)).fetchone()
        if row is not None:
            what = f"report {message.report_id} from {message.station} (message {message.message_id})"
            return Stored(message.report_id, self._again(self.directory / row[0], message.payload, what, copy_name),
                          new=False)
        path = self._place(self._folder(message.station, message.month), f"{message.report_id}.json", copy_name,
                           message.payload)
        # before the row: a report acknowledged has its HL7 (hl7_out), its deliveries in the row's transaction
        delivered = self.on_new_report(message) if self.on_new_report is not None else []
        with self._db:
            record_deliveries(self._db, [d for d in delivered if isinstance(d, Delivery)])
            record_rejections(self._db, [d for d in delivered if isinstance(d, Rejection)])
            forget_error_held(self._db, message.report_id)
            self._db.execute(
                "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (message.report_id, message.station, message.run_id, message.specimen_id, message.created_at,
                 message.kind, message.schema_version, int(message.verified), message.supersedes,
                 message.message_id, str(path.relative_to(self.directory)), time.time()))
        return Stored(message.report_id, path, new=True)

    def put_bundle(self, message: BundleMessage) -> Stored:
        copy_name = f"{message.report_id}+{_digest(message.payload)}.fhir.json"
        row = self._db.execute("SELECT path FROM bundles WHERE report_id = ?", (message.report_id,)).fetchone()
        if row is not None:
            what = f"FHIR bundle of report {message.report_id} from {message.station}"
            return Stored(message.report_id, self._again(self.directory / row[0], message.payload, what, copy_name),
                          new=False)
        report = self._db.execute("SELECT station, path FROM reports WHERE report_id = ?",
                                  (message.report_id,)).fetchone()
        if report is not None and report[0] != message.station:
            logger.warning("FHIR bundle of report %s came from station %s, its report from %s; kept under %s",
                           message.report_id, message.station, report[0], message.station)
            report = None
        # beside its report; a bundle that came first goes where its report will (the same instant)
        levels = Path(report[1]).parent.parts if report is not None else (message.station, message.month)
        path = self._place(self._folder(*levels), f"{message.report_id}.fhir.json", copy_name, message.payload)
        with self._db:
            self._db.execute("INSERT INTO bundles VALUES (?, ?, ?, ?)",
                             (message.report_id, message.station, str(path.relative_to(self.directory)),
                              time.time()))
        return Stored(message.report_id, path, new=True)


def _inside(path: Path, directory: Path) -> bool:
    """`path` (resolved) is a folder or file within `directory`, not `directory` itself."""
    return path.is_relative_to(directory) and path != directory


def _digest(payload: bytes) -> str:
    """What names a copy: the same content always gets the same name (a repeated delivery, one file)."""
    return hashlib.sha256(payload).hexdigest()[:16]


def open_index(directory: Path, read_only: bool) -> sqlite3.Connection:
    """The archive's index: created (WAL, synchronous=FULL) for the writer, an unversioned one of
    version 1 layout (or version 1, 2, 3) upgraded to 4, one holding reports copied first (index_backup); for a reader, opened read-only, FileNotFoundError when the folder
    holds no archive. IndexVersionError, nothing changed, for an index of a newer version (or an
    unversioned one of another layout)."""
    path = directory / INDEX_NAME
    if read_only:
        if not path.is_file():
            raise FileNotFoundError(f"no archive at {directory} ({INDEX_NAME} not there)")
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            _version(db, path)
        except BaseException:
            db.close()
            raise
        return db
    db = sqlite3.connect(path, timeout=10, isolation_level="DEFERRED", check_same_thread=False)
    try:
        _version(db, path)  # before anything is written: a newer index is left as it is
        # locked at every open, not only below version 4: an index of version 4 may still lack a column added
        # in place (add_closed_at), and two processes adding it at once stopped one ('duplicate column name')
        with upgrade_lock(path):
            version = _version(db, path)  # read under the lock: another process may have upgraded it meanwhile
            has_reports = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'reports'").fetchone() is not None
            if version < INDEX_VERSION and has_reports and db.execute("SELECT 1 FROM reports LIMIT 1").fetchone():
                keep_before_upgrade(db, path, version, INDEX_VERSION)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            with db:
                columns = {c for (_, c, *_) in db.execute("PRAGMA table_info(hl7_deliveries)")}
                # version 2's table, without the processing id: in a version 2 index, or in one of version 0 or 1
                # whose upgrade to 2 stopped before numbering it (an upgrade to 3 cut short has the column)
                if columns and "processing_id" not in columns:
                    db.execute("ALTER TABLE hl7_deliveries ADD COLUMN processing_id TEXT NOT NULL DEFAULT 'P'")
                    logger.info("the archive index %s upgraded from version %d to %d (each HL7 delivery's processing id "
                                "recorded; those before are P, production)", path, version, INDEX_VERSION)
                db.executescript(SCHEMA)
                add_closed_at(db)  # a version 3 or 4 index whose hl7_rejections was made without it
                if version == 0 and db.execute("SELECT 1 FROM reports LIMIT 1").fetchone() is not None:
                    logger.info("the archive index %s had no version number (made before it had one): its layout "
                                "is version 1's, upgraded to version %d", path, INDEX_VERSION)
                elif version == 1:
                    logger.info("the archive index %s upgraded from version 1 to %d (HL7 deliveries recorded from now "
                                "on; none is recorded for the reports before)", path, INDEX_VERSION)
                if columns and version < 4:  # each delivery so far was made with the ids whole
                    runs = db.execute(f"INSERT OR IGNORE INTO hl7_whole_id_runs {_DELIVERED_RUNS}").rowcount
                    logger.info("the archive index %s upgraded from version %d to %d: %d runs were sent to the lab "
                                "system with their specimen and run ids whole (ORC-2/3, SPM-2); their later reports "
                                "are sent so too", path, version, INDEX_VERSION, runs)
                if version < INDEX_VERSION:
                    db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
    except BaseException:
        db.close()
        raise
    fsync_dir(directory)
    return db


def open_index_query_only(directory: Path) -> sqlite3.Connection:
    """The existing index of the archive at `directory` for a check that must change nothing: opened as its
    writer opens it (so the last connection to close removes SQLite's -wal and -shm files, which a read-only
    connection to a WAL index leaves in the folder) but refusing every write (query_only), its version checked,
    nothing made or upgraded. FileNotFoundError when the folder holds no archive."""
    path = directory / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no archive at {directory} ({INDEX_NAME} not there)")
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=10)
    try:
        db.execute("PRAGMA query_only = ON")
        _version(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _version(db: sqlite3.Connection, path: Path) -> int:
    """The index's version (0: none yet, a new index or one made before it had a number, of version
    1's layout, or one whose first start stopped before all its tables were made; 1: without HL7
    deliveries); IndexVersionError for one this smearscope cannot use."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > INDEX_VERSION:
        raise IndexVersionError(f"the archive index {path} is of version {version}, newer than this smearscope's "
                                f"(version {INDEX_VERSION}): it was made by a newer smearscope archive. Nothing in "
                                "it was changed; run that newer smearscope (or restore the index's backup made "
                                "before it)")
    if version == 0:
        tables = {name: tuple(row[1] for row in db.execute(f"PRAGMA table_info({name})"))
                  for name in COLUMNS_V1}
        # a table missing is made by the schema (a first start stopped between its statements)
        present = {name: columns for name, columns in tables.items() if columns}
        if any(columns != COLUMNS_V1[name] for name, columns in present.items()):
            raise IndexVersionError(f"the archive index {path} has no version number and not the layout of "
                                    f"version 1 ({', '.join(f'{n}: {len(c)} columns' for n, c in present.items())}): "
                                    "not made by smearscope archive; nothing in it was changed")
    return version
