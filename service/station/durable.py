"""What a station must remember across a crash, kept in its outbox file beside the messages.

The tables below, each written in the same transaction as the message that changes them
(`Outbox.put_many(..., also=...)`), so a message and its state are stored together or not at all,
and two written at once:

  station_inputs   the inputs (a watched folder's files, by content hash: `Frame.input_key`)
                   whose field message is stored, with its field (frame id); a file found again
                   after a crash is not analysed twice, a copy of it is refused
  specimen_fields  the cells of every field of the open specimen runs, with the run's start,
                   target and models, and of the last `KEEP_CLOSED_RUNS` closed ones. A run
                   whose rows survive a crash (or a stop on a full disk) without a closed_runs
                   row is taken back by the next start within its idle timeout
                   (SpecimenTracker.resume_one) unless `ending_runs` holds it, else closed with
                   `specimen_incomplete` (end reason `restart`, or the end asked for)
  closed_runs      the runs whose final (or verified) specimen report is stored: its report
                   (without cells) and why it ended, so a technician can still verify one of
                   the last runs after a restart (verify_run); its start and who started it
                   are its fields' (get_runs says them); older ones are deleted with their fields
  ending_runs      the runs `stop_run` ended, written at once (`run_ending`), deleted with the
                   run's stored report: a crash before it is stored never takes the run back;
                   a row whose run has no field stored is dropped at open
  answered_reports the id of the report `stop_run`'s answer named, written with its ending_runs
                   row and deleted with the stored report: the start that closes such a run
                   stores its report under that id (a row whose ending_runs row is gone, an
                   earlier version's store, is dropped at open)
  answered_verifications  the verified report verify_run answered, whole, written before the
                   answer and deleted with its stored report: the next start stores it
                   (service.station.verifications)
  started_runs     the runs `start_run` opened (its start, target and specimen id), written at
                   once (`run_started`) and deleted with the run's first stored field (its row
                   says the same from then on) or when the run ends without one
                   (`run_ended_without_fields`): a run left open with no field is taken back as
                   one with fields is, its idle timeout counted from its start, else closed
                   without a report (said at WARNING with its specimen id)
  runs_without_fields  the last `KEEP_CLOSED_RUNS` runs start_run opened that ended without a
                   field (`run_ended_without_fields`, in the transaction that deletes their
                   started_runs row): their retained run state (closed, 0 fields) is the
                   station's own at the next start (service.mqtt.run_watch), and the latest
                   is published again then when no run closed after it (`after_closed`: the
                   newest closed_runs rowid when it ended)
  run_numbers      each run's number on this station (1, 2, 3, ...), given when it opens
                   (`number_run`, in its own transaction): the next is one more than the highest
                   given, which is never deleted (the last `KEEP_RUN_NUMBERS` are kept), so a
                   restart never gives one again; a state restored from a backup goes on from the
                   backup's, which is how a start tells the broker's run of a station that went on
                   after the backup (service.mqtt.run_order)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smearscope.device.ingest import shown
from smearscope.service.analysis.aggregate import is_classified_wbc
from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.records import ClassifiedCell
from smearscope.service.analysis.report import NOT_RECORDED, CellRecord, Flag, ModelInfo, Report
from smearscope.service.mqtt.outbox import Outbox, StateWriter
from smearscope.service.station.cell_json import cell_from_json, cell_json
from smearscope.service.station.run_records import StartedBy, has_states
from smearscope.service.station.specimen import FIELD_FLAGS, ClosedRun, SpecimenRun
from smearscope.service.station.verifications import SCHEMA as VERIFICATIONS_SCHEMA

logger = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS station_inputs (
        input_key TEXT PRIMARY KEY, report_id TEXT NOT NULL, stored_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS specimen_fields (
        run_id TEXT NOT NULL, field_id TEXT NOT NULL, position INTEGER NOT NULL,
        started_at REAL NOT NULL, started_by TEXT NOT NULL, target_wbc INTEGER NOT NULL,
        models TEXT NOT NULL, cells TEXT NOT NULL, stored_at REAL NOT NULL,
        PRIMARY KEY (run_id, field_id))""",
    """CREATE TABLE IF NOT EXISTS closed_runs (
        run_id TEXT PRIMARY KEY, end_reason TEXT NOT NULL, report TEXT NOT NULL, closed_at REAL NOT NULL)""",
    # a run a technician stopped, written at once: until its report is stored (a crash, a full
    # disk) the next start closes it for that reason rather than take it back
    """CREATE TABLE IF NOT EXISTS ending_runs (
        run_id TEXT PRIMARY KEY, end_reason TEXT NOT NULL, at REAL NOT NULL)""",
    # the report id stop_run answered for such a run: the next start stores its report under it. A
    # table of its own, not a column of ending_runs: an earlier version's positional INSERT into
    # ending_runs keeps working on a file this version opened (that version ignores the table)
    """CREATE TABLE IF NOT EXISTS answered_reports (
        run_id TEXT PRIMARY KEY, report_id TEXT NOT NULL)""",
    # a run start_run opened, written at once: until its first field is stored, the only trace of
    # its specimen id and target (an earlier version opening the file ignores the table)
    """CREATE TABLE IF NOT EXISTS started_runs (
        run_id TEXT PRIMARY KEY, started_at REAL NOT NULL, started_by TEXT NOT NULL,
        target_wbc INTEGER NOT NULL, specimen_id TEXT)""",
    # a run start_run opened that ended without a field (an earlier version ignores the table)
    """CREATE TABLE IF NOT EXISTS runs_without_fields (
        run_id TEXT PRIMARY KEY, end_reason TEXT NOT NULL, started_at REAL NOT NULL, started_by TEXT NOT NULL,
        target_wbc INTEGER NOT NULL, specimen_id TEXT, after_closed INTEGER NOT NULL)""",
    VERIFICATIONS_SCHEMA,
    # each run's number on this station (an earlier version ignores the table: its runs have none)
    """CREATE TABLE IF NOT EXISTS run_numbers (run_id TEXT PRIMARY KEY, number INTEGER NOT NULL UNIQUE)""",
)
#: Closed runs whose cells are kept (for verify_run, also after a restart).
KEEP_CLOSED_RUNS = 4
#: Run numbers kept (run id -> number); the highest given is always among them.
KEEP_RUN_NUMBERS = 1000
#: Inputs remembered at most (a folder's files analysed; older ones cannot come back after days).
MAX_INPUTS = 100_000
#: Inputs taken for analysis remembered in memory (StationState.taken), far more than can wait.
MAX_TAKEN = 10_000


def same_file(stored_field: str, frame_id: str) -> bool:
    """Whether the field stored for an input (`StationState.stored_field`) is the frame's own file:
    a source's frame id is `source:name@key`, the key its size and time, which a file keeps
    unless rewritten; "" is a field stored before field ids were kept (taken as the same file).
    The names are compared as shown (device.ingest.shown): a field stored by a version that
    carried a format character (U+202E) as it is is the same file as its frame id now escapes."""
    stored = stored_field.rsplit("@", 1)[0]
    return stored == "" or shown(stored) == shown(frame_id.rsplit("@", 1)[0])


@dataclass(frozen=True)
class RunMeta:
    """What a field's row says about its run."""

    run_id: str
    started_at: float
    started_by: StartedBy
    target_wbc: int
    specimen_id: str | None = None


def _add_columns(conn: sqlite3.Connection) -> None:
    """Files written before fields' flags (or an input's field, or a run's specimen id) were kept
    get the column, empty for their rows."""
    if "flags" not in [row[1] for row in conn.execute("PRAGMA table_info(specimen_fields)")]:
        conn.execute("ALTER TABLE specimen_fields ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'")
    if "field_id" not in [row[1] for row in conn.execute("PRAGMA table_info(station_inputs)")]:
        conn.execute("ALTER TABLE station_inputs ADD COLUMN field_id TEXT NOT NULL DEFAULT ''")
    if "specimen_id" not in [row[1] for row in conn.execute("PRAGMA table_info(specimen_fields)")]:
        conn.execute("ALTER TABLE specimen_fields ADD COLUMN specimen_id TEXT")
    # the smearscope version that analysed the field (NULL: stored before it was kept, NOT_RECORDED)
    if "software_version" not in [row[1] for row in conn.execute("PRAGMA table_info(specimen_fields)")]:
        conn.execute("ALTER TABLE specimen_fields ADD COLUMN software_version TEXT")


class StationState:
    """The station's durable state in an open outbox (tables made on open)."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        outbox.write(lambda conn: [conn.execute(statement) for statement in _SCHEMA])
        outbox.write(_add_columns)
        try:  # a run stopped before any of its fields was stored (a full disk may refuse: left for later)
            outbox.write(lambda conn: (conn.execute(
                "DELETE FROM ending_runs WHERE run_id NOT IN (SELECT run_id FROM specimen_fields)"), conn.execute(
                "DELETE FROM answered_reports WHERE run_id NOT IN (SELECT run_id FROM ending_runs)")))
        except (sqlite3.Error, OSError) as exc:
            logger.warning("stopped runs without fields not dropped: %s", exc)
        #: Inputs taken for analysis by this process (input key -> frame id; the analysis
        #: thread's), the last MAX_TAKEN: a copy that comes while its original is analysed or
        #: waits to be stored is a copy all the same.
        self._taken: dict[str, str] = {}

    def stored_field(self, input_key: str) -> str | None:
        """The field (frame id) whose message stored this input, or that is being analysed ("" for
        one stored before field ids were kept); None when it was neither."""
        if input_key in self._taken:
            return self._taken[input_key]
        row = self.outbox.read(lambda conn: conn.execute(
            "SELECT field_id FROM station_inputs WHERE input_key = ?", (input_key,)).fetchone())
        return None if row is None else str(row[0])

    def taken(self, input_key: str, frame_id: str) -> None:
        """An input taken for analysis (see `stored_field`)."""
        self._taken[input_key] = frame_id
        while len(self._taken) > MAX_TAKEN:
            del self._taken[next(iter(self._taken))]

    def released(self, input_key: str) -> None:
        """An input taken whose analysis failed: it was not stored, a copy is not one."""
        self._taken.pop(input_key, None)

    def field_stored(self, *, report_id: str, input_key: str | None, run: RunMeta | None,
                     field_id: str, cells: Sequence[ClassifiedCell], records: Sequence[CellRecord],
                     models: dict[str, ModelInfo], software_version: str | None,
                     flags: Sequence[Flag] = ()) -> StateWriter:
        """The state a stored field message brings: its input, and its cells (and the flags its
        run's report carries on, FIELD_FLAGS, and the version that analysed it) in its run."""
        carried = json.dumps([[f.code, f.severity] for f in flags if f.code in FIELD_FLAGS])
        now = time.time()

        def write(conn: sqlite3.Connection, seqs: list[int]) -> None:
            if input_key is not None:
                conn.execute("INSERT OR REPLACE INTO station_inputs (input_key, report_id, stored_at, field_id) "
                             "VALUES (?, ?, ?, ?)", (input_key, report_id, now, field_id))
                conn.execute("DELETE FROM station_inputs WHERE rowid <= "
                             "(SELECT MAX(rowid) FROM station_inputs) - ?", (MAX_INPUTS,))
            if run is not None:  # its start is in its fields' rows from now on
                conn.execute("DELETE FROM started_runs WHERE run_id = ?", (run.run_id,))
                position = conn.execute("SELECT COUNT(*) FROM specimen_fields WHERE run_id = ?",
                                        (run.run_id,)).fetchone()[0]
                conn.execute(
                    "INSERT OR IGNORE INTO specimen_fields (run_id, field_id, position, started_at, started_by, "
                    "target_wbc, models, cells, stored_at, flags, specimen_id, software_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.run_id, field_id, position, run.started_at, run.started_by,
                     run.target_wbc, json.dumps({k: m.model_dump() for k, m in models.items()}),
                     json.dumps([cell_json(c, r) for c, r in zip(cells, records)]), now, carried, run.specimen_id,
                     software_version))

        return write

    def run_closed(self, report: Report) -> StateWriter:
        """The state a stored final (or verified) specimen report brings: its run is closed, kept
        with the last closed ones (a verified report replaces the run's report, its place kept);
        older closed runs go with their fields."""
        slim = report.model_copy(update={"cells": [], "cell_detail": None}).model_dump_json()

        def write(conn: sqlite3.Connection, seqs: list[int]) -> None:
            conn.execute("DELETE FROM ending_runs WHERE run_id = ?", (report.run_id or "",))
            conn.execute("DELETE FROM answered_reports WHERE run_id = ?", (report.run_id or "",))
            conn.execute("DELETE FROM started_runs WHERE run_id = ?", (report.run_id or "",))
            conn.execute("DELETE FROM answered_verifications WHERE report_id = ?", (report.report_id,))
            conn.execute("INSERT INTO closed_runs VALUES (?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                         "report = excluded.report", (report.run_id or "", report.end_reason or "restart", slim,
                                                      time.time()))
            # by rowid, which only grows (the newest row is never pruned): a clock set back must
            # not make the run just closed the oldest; nor one whose verification waits to be stored
            old = [r[0] for r in conn.execute(
                "SELECT run_id FROM closed_runs WHERE run_id NOT IN (SELECT run_id FROM answered_verifications) "
                "ORDER BY rowid DESC LIMIT -1 OFFSET ?", (KEEP_CLOSED_RUNS,)).fetchall()]
            for run_id in old:
                conn.execute("DELETE FROM specimen_fields WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM closed_runs WHERE run_id = ?", (run_id,))

        return write

    def _runs(self, closed: bool, only: str | None = None,
              unreadable: dict[str, str] | None = None) -> list[SpecimenRun]:
        """The open (or closed) runs' fields and cells as stored; with `only`, that one of them.
        With `unreadable`, a run whose rows this code cannot read (another version's) is left out
        and put there with the reason; without, the error is raised."""
        where = f"run_id {'' if closed else 'NOT '}IN (SELECT run_id FROM closed_runs)"
        where, params = (f"{where} AND run_id = ?", (only,)) if only is not None else (where, ())
        rows = self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, field_id, started_at, started_by, target_wbc, models, cells, stored_at, flags, specimen_id, "
            f"software_version FROM specimen_fields WHERE {where} ORDER BY run_id, position", params).fetchall())
        runs: dict[str, SpecimenRun] = {}
        for run_id, *row in rows:
            if unreadable is not None and run_id in unreadable:
                continue
            try:
                self._add_row(runs, run_id, *row)
            except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
                if unreadable is None:
                    raise
                unreadable[run_id] = " ".join(str(exc).split())
                runs.pop(run_id, None)
        numbers = self.run_numbers() if runs else {}
        return [dataclasses.replace(run, run_seq=numbers.get(run.run_id)) if run.run_id in numbers else run
                for run in runs.values()]

    @staticmethod
    def _add_row(runs: dict[str, SpecimenRun], run_id: str, field_id: str, started_at: float, started_by: StartedBy,
                 target: int, models: str, cells: str, stored_at: float, flags: str, specimen_id: str | None,
                 software: str | None) -> None:
        run = runs.get(run_id)
        if run is None:
            run = SpecimenRun(target_wbc=int(target), started_at=float(started_at), started_by=started_by,
                              run_id=run_id, specimen_id=None if specimen_id is None else str(specimen_id),
                              models={k: ModelInfo.model_validate(v) for k, v in json.loads(models).items()})
        for item in json.loads(cells):
            cell, record = cell_from_json(item, field_id)
            run.cells.append(cell)
            run.records.append(record)
            run.classified_wbc += is_classified_wbc(cell)
        run.field_ids.append(field_id)
        run.field_software.append(NOT_RECORDED if software is None else str(software))
        run.last_field_at = float(stored_at)
        run.count_field_flags((str(code), str(severity)) for code, severity in json.loads(flags))
        runs[run_id] = run

    def run_cells(self, run_id: str) -> SpecimenRun | None:
        """One closed run's fields and cells as stored (the last `KEEP_CLOSED_RUNS` are), for a
        verification: the station keeps them here, not in memory. None when none are stored or
        this code cannot read them."""
        try:
            runs = self._runs(closed=True, only=run_id)
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("closed run %s: its cells cannot be read (%s); it cannot be verified", run_id, exc)
            return None
        return runs[0] if runs else None

    def open_runs(self, models: Mapping[str, ModelInfo] | None = None) -> list[SpecimenRun]:
        """The runs a previous process left open (crash, or a stop that could not store), each
        with the end a technician asked for, if any (`end_requested`); one analysed with other
        `models` than the analyzer's now (an update brought other models or another calibration,
        or the backend or station means changed) ends with the restart, never taken back: its
        fields and the next ones would be counted as one specimen under its first field's models.
        Under the same models it is taken back after an update of smearscope alone, and its reports
        name every version that analysed its fields (Report.analysis_software).
        A run whose rows this code cannot read (stored by a newer version: a station put back) is
        left out, logged, and left in the file as it is: the station starts, and the version that
        stored it reads it. A run start_run opened whose first field was never stored comes back
        with no field (`started_runs`)."""
        ending = dict(self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, end_reason FROM ending_runs").fetchall()))
        unreadable: dict[str, str] = {}
        runs = self._runs(closed=False, unreadable=unreadable)
        runs += self._started_runs()
        for run_id, reason in unreadable.items():
            logger.error("run %s, left open in %s, cannot be read by this version (%s): a newer version's? It is "
                         "neither taken back nor closed, and stays in the file for the version that stored it",
                         run_id, self.outbox.path, reason[:300])
        # a closed run begun after a run's last field: the next slide's, run by a version put back that could not read it
        later, later_at = self.outbox.read(lambda conn: conn.execute("SELECT run_id, MAX(started_at) FROM specimen_fields "
                                                                     "WHERE run_id IN (SELECT run_id FROM closed_runs)").fetchone())
        for run in runs:
            run.end_requested = ending.get(run.run_id)
            if run.end_requested is None and later_at is not None and later_at > run.last_activity:
                run.end_requested = "restart"
                logger.warning("run %s, left open, was followed by run %s, begun %.0f s after its last field and closed "
                               "since: closed (restart), not taken back", run.run_id, later, later_at - run.last_activity)
                continue
            # a run stored before models named their classes (schema 1.3) is taken back under the same models
            same = {k: v.model_copy(update={"classes": run.models[k].classes}) if k in run.models else v
                    for k, v in (models or {}).items()}
            if models and run.models == same:  # goes on under them: its report names their classes (zero rows)
                run.models = dict(models)
            elif models and run.models and run.end_requested is None:
                run.end_requested = "restart"
                changed = sorted(k for k in {*same, *run.models} if same.get(k) != run.models.get(k))
                logger.warning("run %s, left open, was analysed with other models than this start's (%s: another "
                               "model, calibration, backend or station means): closed (restart), not taken back",
                               run.run_id, ", ".join(changed))
        return runs

    def _started_runs(self) -> list[SpecimenRun]:
        """The runs start_run opened whose first field was never stored (none of their fields
        has a row): no fields, no models (nothing was analysed under any), their idle timeout
        counted from their start (`SpecimenRun.last_activity`)."""
        rows = self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, started_at, started_by, target_wbc, specimen_id FROM started_runs WHERE run_id NOT IN "
            "(SELECT run_id FROM specimen_fields) AND run_id NOT IN (SELECT run_id FROM closed_runs) "
            "ORDER BY started_at").fetchall())
        numbers = self.run_numbers() if rows else {}
        return [SpecimenRun(target_wbc=int(target), started_at=float(at), started_by=by, run_id=str(run_id),
                            specimen_id=None if specimen is None else str(specimen), run_seq=numbers.get(str(run_id)))
                for run_id, at, by, target, specimen in rows]

    def number_run(self, run_id: str) -> int | None:
        """Run `run_id`'s number on this station (SpecimenTracker.start, as it opens): one more than
        the highest given, kept at once. None when the write fails (a full disk): the run has no
        number (a start then tells the order by start times) and none is given twice."""
        def write(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT OR IGNORE INTO run_numbers VALUES (?, (SELECT COALESCE(MAX(number), 0) + 1 FROM "
                         "run_numbers))", (run_id,))
            conn.execute("DELETE FROM run_numbers WHERE number <= (SELECT MAX(number) FROM run_numbers) - ?",
                         (KEEP_RUN_NUMBERS,))
            return int(conn.execute("SELECT number FROM run_numbers WHERE run_id = ?", (run_id,)).fetchone()[0])

        try:
            return self.outbox.write(write)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("run %s: no run number could be kept (%s); it goes without one", run_id, exc)
            return None

    def run_numbers(self) -> dict[str, int]:
        """The runs' numbers kept (run id -> number), the highest given among them."""
        return {str(r): int(n) for r, n in self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, number FROM run_numbers").fetchall())}

    def run_started(self, run: SpecimenRun) -> None:
        """start_run opened `run` (on the analysis thread): kept at once, so a restart before its
        first field is stored takes it back (or closes it, saying so) rather than forget its
        specimen id. A write that fails (a full disk) is logged: such a run lives in memory only
        until its first field is stored."""
        try:
            self.outbox.write(lambda conn: conn.execute(
                "INSERT OR REPLACE INTO started_runs VALUES (?, ?, ?, ?, ?)",
                (run.run_id, run.started_at, run.started_by, run.target_wbc, run.specimen_id)))
        except (sqlite3.Error, OSError) as exc:
            logger.warning("run %s: its start could not be kept (%s); a restart before its first field is "
                           "stored loses it", run.run_id, exc)

    def run_ended_without_fields(self, closed: ClosedRun) -> None:
        """A run ended with no field (stop_run, idle timeout, shutdown, or closed at a start): its
        start goes, and one that published its state (start_run's, `has_states`) is kept among the
        runs without fields. A write that fails (a full disk) is logged: the next start finds the
        run again and takes it back within its idle timeout, or closes it."""
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM started_runs WHERE run_id = ?", (closed.run_id,))
            if not has_states(closed.started_by, 0):
                return
            conn.execute("INSERT OR REPLACE INTO runs_without_fields VALUES (?, ?, ?, ?, ?, ?, "
                         "(SELECT COALESCE(MAX(rowid), 0) FROM closed_runs))",
                         (closed.run_id, closed.end_reason, closed.started_at or 0.0, closed.started_by,
                          closed.target_wbc, closed.specimen_id))
            conn.execute("DELETE FROM runs_without_fields WHERE rowid <= (SELECT MAX(rowid) FROM "
                         "runs_without_fields) - ?", (KEEP_CLOSED_RUNS,))

        try:
            self.outbox.write(write)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("run %s ended without fields, but its start could not be deleted (%s); a restart "
                           "within its idle timeout would take it back", closed.run_id, exc)

    def runs_without_fields(self) -> tuple[list[ClosedRun], bool]:
        """The last runs start_run opened that ended without a field, oldest first (report None), and
        whether the newest of them ended after every closed run with a report (its state is the
        station's last)."""
        rows = self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, end_reason, started_at, started_by, target_wbc, specimen_id, after_closed, "
            "(SELECT COALESCE(MAX(rowid), 0) FROM closed_runs) FROM runs_without_fields ORDER BY rowid").fetchall())
        numbers = self.run_numbers() if rows else {}
        runs = [ClosedRun(str(run_id), reason, 0, 0, int(target), None, None, float(at), by,
                          None if specimen is None else str(specimen), numbers.get(str(run_id)))
                for run_id, reason, at, by, target, specimen, _, _ in rows]
        return runs, bool(rows) and rows[-1][6] >= rows[-1][7]

    def run_ending(self, run_id: str, end_reason: str, report_id: str | None = None) -> bool:
        """A technician ended the run (on the analysis thread, before its report is queued and the
        command answered): kept at once with the id of its report (`report_id`, None for a run
        without a field), so a crash before the report is stored never takes the run back, and the
        start that closes it stores the report under the id the answer named. False when the write
        fails (a full disk; logged): the run is then treated as any run left open."""
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO ending_runs VALUES (?, ?, ?)", (run_id, end_reason, time.time()))
            if report_id is not None:
                conn.execute("INSERT OR REPLACE INTO answered_reports VALUES (?, ?)", (run_id, report_id))

        try:
            self.outbox.write(write)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("run %s: its end (%s) could not be kept before its report (%s); a restart before the "
                           "report is stored would take the run back, or close it under another report id",
                           run_id, end_reason, exc)
            return False
        return True

    def ending_report_ids(self) -> dict[str, str]:
        """The runs stop_run ended whose report is not stored yet -> the id its answer named (none
        for a run an earlier version stopped)."""
        return dict(self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, report_id FROM answered_reports WHERE run_id IN (SELECT run_id FROM ending_runs)"
        ).fetchall()))

    def closed_runs(self, cells: bool = True) -> list[ClosedRun]:
        """The last closed runs, oldest first: their cells and latest report (without cells).
        `cells=False`: without their cells too (`run` None; fields counted, classified white cells
        from the report), for a station that reads a run back only when it is verified
        (`run_cells`). Rows this code cannot read (another version's) are left out with an error
        logged: the station starts, those runs cannot be verified."""
        try:
            # the run's start and who started it, as each of its fields' rows keeps them
            if cells:
                runs = {r.run_id: (len(r.field_ids), r.target_wbc, r.started_at, r.started_by, r)
                        for r in self._runs(closed=True)}
            else:
                runs = {run_id: (int(n), int(target), float(at), by, None) for run_id, n, target, at, by in
                        self.outbox.read(lambda conn: conn.execute(
                            "SELECT run_id, COUNT(*), MAX(target_wbc), MIN(started_at), MAX(started_by) FROM "
                            "specimen_fields WHERE run_id IN (SELECT run_id FROM closed_runs) GROUP BY run_id"
                        ).fetchall())}
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("closed runs kept for verification cannot be read (%s); none can be verified", exc)
            return []
        rows = self.outbox.read(lambda conn: conn.execute(
            "SELECT run_id, end_reason, report FROM closed_runs ORDER BY rowid").fetchall())
        out = []
        numbers = self.run_numbers() if rows else {}
        for run_id, end_reason, text in rows:
            if run_id not in runs:
                continue
            fields, target, started_at, started_by, run = runs[run_id]
            try:
                report = Report.model_validate_json(text)
            except ValueError as exc:
                logger.error("closed run %s: its report cannot be read (%s); it cannot be verified", run_id, exc)
                continue
            classified = run.classified_wbc if run is not None else sum(
                s.count for s in report.wbc_differential if s.label != UNIDENTIFIED)
            out.append(ClosedRun(run_id, end_reason, fields, classified, target, report, run, started_at, started_by,
                                 report.specimen_id, numbers.get(run_id)))
        return out
