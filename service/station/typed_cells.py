"""White cells a technician typed in the review gallery, kept for the station's own class means.

Red cells the gallery shows for review (a sickle call, an unidentified one) can be typed too, with
the RBC head's classes (`kind` "rbc", no features): their types count in a verified report
(verify_run) and nowhere else.

A station in a new lab types white cells worse than the labs its head was trained on; a few typed
cells per class fix most of that (station means, service.analysis.station_means). The gallery
offers each white cell's crop; the technician picks its type on the dashboard (`cmd/type_cells`)
and the station stores it here with what a fit needs and the crop no longer has: the WBC head's
penultimate features (views averaged, and per view), the class the head gave it, its open-set
scores, the head's sha256 and views, and the field's scale. `smearscope adapt-wbc --station`
fits the means from the rows of the head the station runs.

SQLite (WAL), one row per cell (run, field, cell index): typing a cell again replaces its type,
an empty type removes it. At most `MAX_ROWS` rows (about 3 kB each with the committed head's 256
features in two views: 15 MB): past that a red cell's type of a run that can no longer be verified
gives its place (it counts nowhere any more); with none such the command answers `typed_cells_full`
and nothing is overwritten. While the file's disk has less than `[review] min_free_disk_mb` free
(`disk_low`) no cell is typed (`typed_cells_disk_low`): the outbox needs the room more.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smearscope.service.analysis.station_means import same_scale
from smearscope.service.station.disk_room import free_bytes

if TYPE_CHECKING:
    from smearscope.service.config import StationConfig

#: Rows the file may hold (a fit needs ten or more per class: this is hundreds of fits' worth).
MAX_ROWS = 5_000

_SCHEMA = """CREATE TABLE IF NOT EXISTS typed_white_cells (
    run_id TEXT NOT NULL, field_id TEXT NOT NULL, cell INTEGER NOT NULL, kind TEXT NOT NULL,
    type TEXT NOT NULL, head_type TEXT NOT NULL, model_sha256 TEXT NOT NULL, views TEXT NOT NULL,
    dim INTEGER NOT NULL, features BLOB NOT NULL, view_features BLOB NOT NULL,
    open_set_scores TEXT NOT NULL, microns_per_pixel REAL, typed_at REAL NOT NULL,
    PRIMARY KEY (run_id, field_id, cell))"""


class TypedCellsError(Exception):
    """A typed-cells file that cannot be opened or read (`code`: typed_cells_unavailable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TypeableCell:
    """What the gallery keeps of a white cell so that a technician's type can be stored."""

    features: np.ndarray
    view_features: np.ndarray
    head_type: str
    open_set_scores: Mapping[str, float]
    model_sha256: str
    views: tuple[str, ...]
    microns_per_pixel: float | None
    #: "wbc": a cell the WBC head typed (features kept, for station means); "rbc": a red cell the
    #: RBC head typed (no features: its type counts in a verified report only).
    kind: str = "wbc"
    #: The types this cell may be given when not every class of its head (a red cell of a field
    #: whose scale was estimated: no size-based class); None: every class.
    types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TypedCells:
    """The typed cells of one head and view set, as a fit takes them; and how many rows were
    left out because another head (or the head in other views) gave their features."""

    features: np.ndarray
    view_features: list[np.ndarray]
    types: list[str]
    head_types: list[str]
    open_set_scores: list[dict[str, float]]
    runs: int = 0
    other_head: int = 0
    other_views: int = 0
    other_scale: int = 0
    scales: list[float | None] = field(default_factory=list)


def _as_upgraded(db: sqlite3.Connection) -> sqlite3.Connection:
    """A read-only connection to a file from before red cells were typed (no `kind` column: the station adds
    it when it next writes the file) reads it as the station will: every row a white cell. A temporary view
    of the table's name, which SQLite looks up before the file's own tables, so `doctor` and `adapt-wbc
    --station` run after an update read the cells typed before it (they stopped: 'no such column: kind')."""
    columns = [r[1] for r in db.execute("PRAGMA main.table_info(typed_white_cells)")]
    if "kind" not in columns:
        db.execute(f"CREATE TEMP VIEW typed_white_cells AS SELECT {', '.join(columns)}, 'wbc' AS kind "
                   "FROM main.typed_white_cells")
    return db


class TypedCellStore:
    """The typed-cells file; one connection shared under a lock (the command thread writes, a
    CLI may read the same file at the same time: WAL)."""

    def __init__(self, path: Path, read_only: bool = False, max_rows: int = MAX_ROWS,
                 min_free_bytes: float = 0.0) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        #: Below this much free on the file's disk no cell is typed (`[review] min_free_disk_mb`).
        self.min_free_bytes = min_free_bytes
        #: re-entrant: a command's batch holds it while its cells are written (`batch`)
        self._lock = threading.RLock()
        self._batch = False
        try:
            if read_only:
                if self.path.exists() and not self.path.is_file():
                    raise TypedCellsError("typed_cells_unavailable", f"{self.path} is not a file (a directory?): "
                                          "[review] typed_cells_path must name the typed-cells file")
                if not self.path.is_file():
                    raise TypedCellsError("no_typed_cells", f"{self.path}: no typed-cells file (nothing typed yet "
                                          "on this station, or another [review] typed_cells_path)")
                self._db = self._open_read_only()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
                self._db.execute("PRAGMA journal_mode=WAL")
                # FULL: each type synced at its commit, before type_cells answers it stored (WAL's NORMAL
                # syncs at checkpoints only: a power cut took back types a run was then signed without)
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA secure_delete=ON")  # a removed type is overwritten, not left in free pages
                self._db.execute(_SCHEMA)
                if "kind" not in self._columns():  # a file from before red cells were typed
                    self._db.execute("ALTER TABLE typed_white_cells ADD COLUMN kind TEXT NOT NULL DEFAULT 'wbc'")
                self._db.commit()
        except (sqlite3.Error, OSError) as exc:
            raise TypedCellsError("typed_cells_unavailable", f"{self.path}: {exc}") from exc

    def _columns(self) -> list[str]:
        return [r[1] for r in self._db.execute("PRAGMA table_info(typed_white_cells)").fetchall()]

    def _open_read_only(self) -> sqlite3.Connection:
        """A read-only connection. Reading a WAL file needs its -shm beside it: a reader that may not
        write the folder (another user than the station's) can read it only while no -wal file is
        left (the station stopped cleanly), then as an immutable file."""
        uri = self.path.resolve().as_uri()
        try:
            db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, timeout=10)
            return self._readable(db)
        except sqlite3.OperationalError as exc:
            if Path(f"{self.path}-wal").exists() and Path(f"{self.path}-wal").stat().st_size > 0:
                raise TypedCellsError("typed_cells_unavailable", f"{self.path}: {exc} (read it as the station's "
                                      "user, e.g. sudo -u smearscope)") from exc
        db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False, timeout=10)
        return self._readable(db)

    def _readable(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """`db` once its table is read; a file without any table yet (the station making it at this moment, its
        first cell typed) holds no typed cell: no_typed_cells, as no file (it was typed_cells_unavailable,
        'no such table', a doctor FAIL). A file of other tables is another file (typed_cells_unavailable)."""
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            if tables and "typed_white_cells" not in tables:  # another file: the outbox, a gallery
                raise TypedCellsError("typed_cells_unavailable", f"{self.path} is not a typed-cells file (it holds "
                                      f"{', '.join(tables[:5])}): [review] typed_cells_path must name a file of "
                                      "its own, not another of the station's")
            if not tables:
                raise TypedCellsError("no_typed_cells", f"{self.path}: no cell typed yet (no table of them in it "
                                      "yet: the station makes it as it stores its first cell)")
            db.execute("SELECT count(*) FROM typed_white_cells").fetchone()
            return _as_upgraded(db)
        except BaseException:
            db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for the writes made inside (one command's cells: one sync to the disk, at
        the end, instead of one a cell). Each write stays its own savepoint: one that fails is
        undone alone. Whatever was written is on the disk when the block leaves; an error that
        lost the transaction is raised here, so that none of its writes is answered stored."""
        with self._lock:
            if self._batch:
                raise RuntimeError("typed cells: batches do not nest")
            self._db.execute("BEGIN IMMEDIATE")
            self._batch = True
            try:
                yield
                if not self._db.in_transaction:  # rolled back by SQLite itself (a disk error)
                    raise sqlite3.OperationalError("the transaction was rolled back: nothing of it was stored")
                self._db.commit()
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
            finally:
                self._batch = False

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write: its own transaction, or a savepoint of the batch under way."""
        with self._lock:
            if not self._batch:
                with self._db:
                    yield
                return
            if not self._db.in_transaction:
                raise sqlite3.OperationalError("the command's transaction was rolled back by an earlier error")
            self._db.execute("SAVEPOINT cell")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK TO cell")
                    self._db.execute("RELEASE cell")
                raise
            self._db.execute("RELEASE cell")

    def put(self, run_id: str, field_id: str, cell: int, type_: str, c: TypeableCell,
            live_runs: Collection[str] | None = None) -> bool:
        """Store (or retype) one cell; False when the file is full and the cell is new. In a full
        file a red cell's type of a run not in `live_runs` (the runs that can still be verified:
        a red cell's type counts in a verified report only) gives its place, oldest first."""
        feats = np.asarray(c.features, np.float32).ravel()
        views = (np.asarray(c.view_features, np.float32).reshape(-1, feats.size) if feats.size
                 else np.zeros((0, 0), np.float32))
        with self._write():
            known = self._db.execute("SELECT 1 FROM typed_white_cells WHERE run_id=? AND field_id=? AND cell=?",
                                     (run_id, field_id, cell)).fetchone()
            if known is None and self._count() >= self.max_rows and not (
                    live_runs is not None and self._drop_stale_red_cell(live_runs)):
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO typed_white_cells (run_id, field_id, cell, kind, type, head_type, "
                "model_sha256, views, dim, features, view_features, open_set_scores, microns_per_pixel, typed_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, field_id, cell, c.kind, type_, c.head_type, c.model_sha256, json.dumps(list(c.views)), feats.size,
                 feats.tobytes(), views.tobytes(), json.dumps({k: float(v) for k, v in c.open_set_scores.items()}),
                 c.microns_per_pixel, time.time()))
        return True

    def disk_low(self) -> bool:
        """The file's disk has less free than `min_free_bytes`: the outbox needs the room more."""
        return free_bytes(self.path) < self.min_free_bytes

    def _drop_stale_red_cell(self, live_runs: Collection[str]) -> bool:
        """Delete the oldest red cell's row of a run not in `live_runs` (under the lock, in the
        caller's transaction); False when there is none."""
        runs = list(live_runs)
        cur = self._db.execute(
            "DELETE FROM typed_white_cells WHERE rowid = (SELECT rowid FROM typed_white_cells WHERE kind='rbc' AND "
            f"run_id NOT IN ({','.join('?' * len(runs))}) ORDER BY rowid LIMIT 1)", runs)
        return cur.rowcount > 0

    def retype(self, run_id: str, field_id: str, cell: int, type_: str, kind: str) -> bool:
        """A stored cell of `kind` given another type (its features stay); False when the file
        holds no such cell."""
        with self._write():
            cur = self._db.execute("UPDATE typed_white_cells SET type=?, typed_at=? WHERE run_id=? AND field_id=? "
                                   "AND cell=? AND kind=?", (type_, time.time(), run_id, field_id, cell, kind))
        return cur.rowcount > 0

    def remove(self, run_id: str, field_id: str, cell: int) -> bool:
        with self._write():
            cur = self._db.execute("DELETE FROM typed_white_cells WHERE run_id=? AND field_id=? AND cell=?",
                                   (run_id, field_id, cell))
        return cur.rowcount > 0

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM typed_white_cells").fetchone()[0])

    def kind_of(self, run_id: str, field_id: str, cell: int) -> str | None:
        """The kind of a stored cell ("wbc" / "rbc"); None when the file does not hold it."""
        with self._lock:
            row = self._db.execute("SELECT kind FROM typed_white_cells WHERE run_id=? AND field_id=? AND cell=?",
                                   (run_id, field_id, cell)).fetchone()
        return row[0] if row else None

    def types_of_run(self, run_id: str) -> dict[tuple[str, int], tuple[str, str]]:
        """The types given to one run's cells: (field id, cell index) -> (kind, type)."""
        with self._lock:
            rows = self._db.execute("SELECT field_id, cell, kind, type FROM typed_white_cells WHERE run_id=?",
                                    (run_id,)).fetchall()
        return {(f, int(c)): (k, t) for f, c, k, t in rows}

    def counts(self, model_sha256: str, views: Sequence[str] | None = None,
               microns_per_pixel: float | None = None) -> dict[str, int]:
        """Typed white cells per class of this head (artefacts are no class: left out); with `views`
        and `microns_per_pixel`, only those `load` takes for a fit in these views at this scale."""
        with self._lock:
            rows = self._db.execute("SELECT type, views, microns_per_pixel FROM typed_white_cells WHERE model_sha256=? "
                                    "AND kind='wbc' AND type != 'artefact'", (model_sha256,)).fetchall()
        out: dict[str, int] = {}
        for type_, row_views, mpp in rows:
            if (views is None or json.loads(row_views) == list(views)) and same_scale(mpp, microns_per_pixel):
                out[type_] = out.get(type_, 0) + 1
        return dict(sorted(out.items()))

    def load(self, model_sha256: str, views: Sequence[str], microns_per_pixel: float | None = None) -> TypedCells:
        """Every white cell typed with features of this head in these views (the others counted;
        an artefact is no class of the head: left out); with
        `microns_per_pixel` (a calibrated station) only cells analysed at that scale, within 1 %:
        features depend on the resample to the canonical scale, so cells typed before a
        recalibration, or at an estimated scale, are left out and counted."""
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT run_id, type, head_type, model_sha256, views, dim, features, view_features, "
                    "open_set_scores, microns_per_pixel FROM typed_white_cells WHERE kind='wbc' AND type != 'artefact' "
                    "ORDER BY typed_at, run_id, field_id, cell").fetchall()
        except sqlite3.Error as exc:
            raise TypedCellsError("typed_cells_unavailable", f"{self.path}: {exc}") from exc
        want = list(views)
        feats, view_feats, types, head_types, scores, scales, runs = [], [], [], [], [], [], set()
        other_head = other_views = other_scale = 0
        for run_id, type_, head_type, sha, row_views, dim, f, vf, s, mpp in rows:
            if sha != model_sha256:
                other_head += 1
                continue
            if json.loads(row_views) != want:
                other_views += 1
                continue
            if not same_scale(mpp, microns_per_pixel):
                other_scale += 1
                continue
            feats.append(np.frombuffer(f, np.float32).astype(np.float64))
            view_feats.append(np.frombuffer(vf, np.float32).astype(np.float64).reshape(-1, dim))
            types.append(type_)
            head_types.append(head_type)
            scores.append(json.loads(s))
            scales.append(mpp)
            runs.add(run_id)
        dim = len(feats[0]) if feats else 0
        return TypedCells(np.array(feats, np.float64).reshape(len(feats), dim), view_feats, types, head_types,
                          scores, len(runs), other_head, other_views, other_scale, scales)


def default_path(outbox_path: Path) -> Path:
    """Where a station keeps its typed cells unless `[review] typed_cells_path` says otherwise."""
    return Path(outbox_path).parent / "typed_cells.sqlite3"


def review_directory(config: StationConfig) -> Path:
    """Where the station keeps its overlays and review gallery: `[review] directory`, or `review`
    beside its outbox (as its typed cells)."""
    return config.review.directory or Path(config.mqtt.outbox.path).parent / "review"


def typed_cells_path(config: StationConfig) -> Path:
    """The station's typed-cells file: `[review] typed_cells_path`, or beside its outbox."""
    return config.review.typed_cells_path or default_path(config.mqtt.outbox.path)
