"""The review gallery on disk: each kept run's crops, what typing them needs and its latest overlay
thumbnail, in one SQLite file (WAL) beside the overlays, so that a restart (a power cut, the end of
a working day) loses no review material: a run analysed in the afternoon is reviewed and signed
the next morning.

The gallery (service.station.review) keeps its runs in memory and writes each field's changes
here in one transaction: the crops it kept, the crops shown for typing only that a review cell
displaced, the run's count of crops not kept and its thumbnail; runs it lets go are deleted. A
run whose changes could not be written (a full disk, a disk under the gallery's floor) is
written whole at the next write, so the file never drifts from memory. At
start it reads back the runs it would have kept, in the order it last touched them. A file that
cannot be opened or read is set aside (renamed `.unreadable-<time>`) and a new one begun: review
material is never worth a station that does not start; only the newest such copy is kept (the
older ones are deleted, said in the log), so a gallery that keeps breaking does not fill the disk. One that could not be read for the moment
(locked, an I/O error, a full disk) stays, and its earlier runs, not shown, are placed before the
gallery's own at the next write: the next start reads them back as older than the runs analysed
since, and keeps them only as far as its last runs leave room. Failures to write are logged, and
the gallery goes on in memory.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smearscope.service.station.typed_cells import TypeableCell

logger = logging.getLogger(__name__)

FILE_NAME = "gallery.sqlite"
_SUFFIXES = ("", "-wal", "-shm")
#: WAL pages (4 kB) after which the gallery's WAL is written into its file and cut back.
WAL_PAGES = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id    TEXT PRIMARY KEY,
    touched   INTEGER NOT NULL,
    not_kept  INTEGER NOT NULL,
    thumbnail TEXT
);
CREATE TABLE IF NOT EXISTS crops (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL,
    field_id  TEXT NOT NULL,
    cell      INTEGER NOT NULL,
    priority  INTEGER NOT NULL,
    crop      TEXT NOT NULL,
    typeable  TEXT,
    UNIQUE (run_id, field_id, cell)
);
"""


@dataclass(frozen=True)
class StoredRun:
    """One run as read back: its crops in arrival order, each with its priority and what typing it
    needs (None: not typeable)."""

    run_id: str
    not_kept: int
    thumbnail: dict[str, Any] | None
    crops: list[tuple[int, dict[str, Any], TypeableCell | None]]


@dataclass(frozen=True)
class RunChange:
    """One field's change to a run: the crops it kept, those shown for typing only that a review
    cell displaced, the run's count of crops not kept and its latest thumbnail."""

    run_id: str
    added: list[tuple[int, dict[str, Any], TypeableCell | None]]
    displaced: list[tuple[str, int]]
    not_kept: int
    thumbnail: dict[str, Any] | None


def _array(data: str, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(tuple(shape)).astype(np.float32)


def typeable_json(t: TypeableCell) -> str:
    f, v = np.ascontiguousarray(t.features, "<f4"), np.ascontiguousarray(t.view_features, "<f4")
    return json.dumps({
        "features": base64.b64encode(f.tobytes()).decode(), "shape": list(f.shape),
        "view_features": base64.b64encode(v.tobytes()).decode(), "view_shape": list(v.shape),
        "head_type": t.head_type, "open_set_scores": dict(t.open_set_scores), "model_sha256": t.model_sha256,
        "views": list(t.views), "microns_per_pixel": t.microns_per_pixel, "kind": t.kind,
        "types": None if t.types is None else list(t.types)})


def typeable_from_json(text: str) -> TypeableCell:
    d = json.loads(text)
    return TypeableCell(
        _array(d["features"], d["shape"]), _array(d["view_features"], d["view_shape"]), str(d["head_type"]),
        {str(k): float(v) for k, v in d["open_set_scores"].items()}, str(d["model_sha256"]),
        tuple(d["views"]), None if d["microns_per_pixel"] is None else float(d["microns_per_pixel"]),
        kind=str(d["kind"]), types=None if d["types"] is None else tuple(d["types"]))


class GalleryStore:
    """The gallery's SQLite file; every method may be called from any thread (one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._failing = False  # a write failed: said once, until one succeeds

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a power cut keeps what was written
                db.execute("PRAGMA secure_delete=ON")  # a deleted run's crops are overwritten, not left in free pages
                # the WAL counts in [review] max_disk_mb: checkpointed well before SQLite's default
                # 1000 pages (4 MB, many times a default gallery's own file), and cut back after
                db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
                db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def load(self, keep: int) -> list[StoredRun]:
        """The last `keep` runs touched, oldest first (those before are deleted); [] with no file.
        An unreadable file is set aside and a new one begun."""
        try:
            if not self.path.exists():
                return []
        except OSError as exc:  # a folder this user may not enter (restored as another user)
            logger.error("review gallery file %s not read (%s): review material of the runs before this "
                         "start is not shown", self.path, exc)
            return []
        with self._lock:
            try:
                return self._load(keep)
            except sqlite3.OperationalError as exc:  # locked, or an I/O error: the file is kept as it is
                logger.error("review gallery file %s not read (%s): review material of the runs before this "
                             "start is not shown", self.path, exc)
                self.close_locked()
                return []
            except (sqlite3.Error, OSError, ValueError, KeyError, TypeError) as exc:
                self._set_aside(exc)
                return []

    def _load(self, keep: int) -> list[StoredRun]:
        db = self._connect()
        runs = db.execute("SELECT run_id, not_kept, thumbnail FROM runs ORDER BY touched").fetchall()
        gone, runs = runs[:max(0, len(runs) - keep)], runs[max(0, len(runs) - keep):]
        if gone:
            self._delete(db, [r[0] for r in gone])
        out = []
        for run_id, not_kept, thumbnail in runs:
            rows = db.execute("SELECT priority, crop, typeable FROM crops WHERE run_id=? ORDER BY id",
                              (run_id,)).fetchall()
            crops = [(int(p), json.loads(c), None if t is None else typeable_from_json(t)) for p, c, t in rows]
            out.append(StoredRun(run_id, int(not_kept), None if thumbnail is None else json.loads(thumbnail),
                                 crops))
        return out

    def _set_aside(self, exc: BaseException) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        stamp, n = int(time.time()), 1
        aside = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        while any(Path(f"{aside}{s}").exists() for s in _SUFFIXES):  # never another file's WAL beside it
            aside, n = self.path.with_name(f"{self.path.name}.unreadable-{stamp}-{n}"), n + 1
        logger.error("review gallery file %s unreadable (%s): set aside as %s, review material of the runs "
                     "before this start is not shown", self.path, exc, aside.name)
        for suffix in _SUFFIXES:
            try:
                Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
            except OSError:
                if not suffix:
                    return  # not set aside: the earlier copies stay
        self._delete_older_copies(aside)

    def _delete_older_copies(self, newest: Path) -> None:
        """Only the copy just set aside is kept: a gallery that keeps breaking must not fill the disk."""
        keep = {f"{newest.name}{s}" for s in _SUFFIXES}
        for old in sorted(self.path.parent.glob(f"{self.path.name}.unreadable-*")):
            if old.name in keep:
                continue
            try:
                size = old.stat().st_size
                old.unlink()
                logger.warning("review gallery: older unreadable copy %s (%.1f MB) deleted, only the newest "
                               "(%s) is kept", old.name, size / 2**20, newest.name)
            except OSError as exc:
                logger.warning("review gallery: cannot delete the older unreadable copy %s: %s", old.name, exc)

    def write(self, order: Sequence[str], change: RunChange | None = None, whole: Sequence[StoredRun] = (),
              dropped: Iterable[str] = (), keep: int | None = None) -> bool:
        """In one transaction: one field's `change` to its run, the runs in `whole` written anew
        (their earlier changes could not be written), the runs let go deleted, and every run's
        place in `order` (the gallery's, oldest first; runs the file holds and the gallery does
        not, from a start that could not read it, before them all, as many of the latest of them
        as `keep` runs leave room for next to `order`: the next start reads back no more, and starts
        that could not read the file, one after another, must not grow it without end); False
        (logged) when it could not be written."""
        with self._lock:
            try:
                db = self._connect()
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    self._delete(db, list(dropped))
                    # runs the gallery does not hold (a file it could not read at start, its runs
                    # left there) go before its own: never read back as newer than those
                    held = set(order)
                    unread = [r for (r,) in db.execute("SELECT run_id FROM runs ORDER BY touched").fetchall()
                              if r not in held]
                    if keep is not None and (extra := len(unread) - max(0, keep - len(order))) > 0:
                        self._delete(db, unread[:extra])
                        unread = unread[extra:]
                    for run in whole:
                        self._delete(db, [run.run_id])
                        self._put(db, run.run_id, run.not_kept, run.thumbnail, run.crops, ())
                    if change is not None:
                        self._put(db, change.run_id, change.not_kept, change.thumbnail, change.added, change.displaced)
                    db.executemany("UPDATE runs SET touched=? WHERE run_id=?",
                                   [(k - len(unread), r) for k, r in enumerate(unread)] + list(enumerate(order)))
            except (sqlite3.Error, OSError) as exc:
                if not self._failing:
                    logger.warning("review gallery file %s not written (%s): the runs changed meanwhile are "
                                   "written whole at the next write that succeeds", self.path, exc)
                self._failing = True
                return False
        if self._failing:
            logger.info("review gallery file %s written again", self.path)
            self._failing = False
        return True

    @staticmethod
    def _put(db: sqlite3.Connection, run_id: str, not_kept: int, thumbnail: dict[str, Any] | None,
             added: Iterable[tuple[int, dict[str, Any], TypeableCell | None]], displaced: Iterable[tuple[str, int]],
             ) -> None:
        db.execute("INSERT INTO runs (run_id, touched, not_kept, thumbnail) VALUES (?, 0, ?, ?) "
                   "ON CONFLICT(run_id) DO UPDATE SET not_kept=excluded.not_kept, thumbnail=excluded.thumbnail",
                   (run_id, not_kept, None if thumbnail is None else json.dumps(thumbnail)))
        db.executemany("DELETE FROM crops WHERE run_id=? AND field_id=? AND cell=?",
                       [(run_id, f, c) for f, c in displaced])
        db.executemany("INSERT OR REPLACE INTO crops (run_id, field_id, cell, priority, crop, typeable) "
                       "VALUES (?, ?, ?, ?, ?, ?)", [(run_id, crop["field_id"], int(crop["cell"]), p, json.dumps(crop),
                                                     None if t is None else typeable_json(t)) for p, crop, t in added])

    @staticmethod
    def _delete(db: sqlite3.Connection, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            db.execute("DELETE FROM crops WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE run_id=?", (run_id,))

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    def close_locked(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
