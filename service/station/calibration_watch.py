"""Does the station's calibration hold over its runs? A watch over the calibration checks.

The calibration check (service.analysis.calibration_check) judges one field: it is suspect only
1.8 times or more off, because one field's own estimate lies 0.62 to 1.31 times its known scale. A
calibration 1.5 times off (0.11 um/px where the true scale is 0.072: another station's config, a
60x objective calibrated at 100x... seen from the other side) passes every field, and the reports
grade macrocytes or microcytes that are not there. Over many fields of many specimens the median of
(own estimate / calibrated scale) is near 1 for a right calibration, whatever one patient's cells
do; this watch keeps the ratio of each run's first 3 checked fields across runs (in the outbox file, table
`calibration_ratios`, until the calibration changes) and puts the warning
`calibration_drift_suspected` on calibrated reports while that median is out of bounds.

Measured on validation fields of six labs (`python -m training.calibration_check --factors 1,1.5`,
12 fields per lab, each at its known scale; the checks with at least `MIN_RBC_FOR_SCALE` whole red
cells at the own scale): each lab's median own / known lay 0.91 (the Raspberry Pi station) to 1.18
(Chula RBC-12; BCCD 1.03, TXL-PBC 1.01 to 1.11). A calibration 1.5 times too coarse moved them to
0.61-0.79, 1.5 times too fine to 1.37-1.77 (the own estimate does not depend on the calibration).
`LOW_MEDIAN` 0.85 is the midpoint (geometric) between those extremes (0.91 right, 0.79 wrong).
`HIGH_MEDIAN` was the midpoint too, 1.27 (1.18 right, 1.37 wrong), and is 1.32: simulated stations
of 100 runs over each lab's held-out fields, every check through `kept_ratio`, `with_check` and
`verdict` below (`python -m training.calibration_check --watch-trials`, docs/STATION.md), flagged
a right calibration of Chula RBC-12, whose groups of fields (red-cell disorders) read 1.3-1.5, on
1.4 % (runs of any fields) and 14.3 % (a run from one specimen) of its stations at 1.27, on none
and 1.6 % at 1.32; a calibration 1.5 or 2 times off either way is still flagged on every station
within 25 runs. 1.32 misses more calibrations 1.25 times too fine (docs/STATION.md's table).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from smearscope.service.analysis.aggregate import CALIBRATION_DRIFT_SUSPECTED, sizes_in_doubt
from smearscope.service.analysis.calibration_check import CalibrationCheck
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.report import Flag
from smearscope.service.analysis.scale_search import MIN_RBC_FOR_SCALE
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.outbox_schema import open_to_read

logger = logging.getLogger(__name__)

#: The median own estimate / calibrated scale below this, or above `HIGH_MEDIAN`, is suspect.
LOW_MEDIAN = 0.85
HIGH_MEDIAN = 1.32
#: The median is over the last this many checks (older ones are deleted).
WINDOW = 48
#: Each run's first this many checks are kept, no more: the bounds were measured on runs of 3 (the
#: default calibration_check_fields), and a run checking more fields (up to 1000) would otherwise
#: let one patient's red cells decide the median, or fill the window with too few runs to judge.
RUN_CHECKS = 3

TABLE = """CREATE TABLE IF NOT EXISTS calibration_ratios (
    run_id TEXT NOT NULL, field_id TEXT NOT NULL, ratio REAL NOT NULL, calibration TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (run_id, field_id))"""


def calibration_key(microns_per_pixel: float | None, calibrated_on: object) -> str:
    """What identifies a calibration: its scale and the day it was measured (a new one resets the watch)."""
    return f"{microns_per_pixel!r} {calibrated_on}"


@dataclass(frozen=True)
class DriftVerdict:
    """The watch's reading: the median over the `fields` checks kept (from `runs` runs), and
    whether it puts the calibration in doubt."""

    median: float | None
    fields: int
    runs: int
    suspected: bool

    def describe(self) -> str:
        if self.median is None:
            return "no calibration check kept since the calibration was set"
        how = "below" if self.median < LOW_MEDIAN else "above" if self.median > HIGH_MEDIAN else "within"
        return (f"the red cells' own scale over the calibrated one has a median of {self.median:.2f} over the last "
                f"{self.fields} checked fields of {self.runs} runs, {how} what a right calibration gives "
                f"({LOW_MEDIAN:g} to {HIGH_MEDIAN:g})")


def verdict(rows: Sequence[tuple[str, float]], min_fields: int, min_runs: int) -> DriftVerdict:
    """The reading over `rows` (run id, ratio), oldest first: the last `WINDOW`; suspected only with
    at least `min_fields` of them (0: never) from at least `min_runs` runs."""
    kept = rows[-WINDOW:]
    if not kept:
        return DriftVerdict(None, 0, 0, False)
    median = statistics.median(r for _, r in kept)
    runs = len({run for run, _ in kept})
    beyond = median < LOW_MEDIAN or median > HIGH_MEDIAN
    return DriftVerdict(median, len(kept), runs, beyond and 0 < min_fields <= len(kept) and runs >= min_runs)


def kept_ratio(check: CalibrationCheck | None) -> float | None:
    """What the watch keeps of a field's calibration check: its own / calibrated scale where the own
    scale showed at least `MIN_RBC_FOR_SCALE` whole red cells; None where it keeps nothing."""
    if check is None or check.ratio is None or check.own_rbc < MIN_RBC_FOR_SCALE:
        return None
    return check.ratio


def with_check(rows: Sequence[tuple[str, float]], run_id: str, ratio: float) -> list[tuple[str, float]] | None:
    """`rows` (run id, ratio), oldest first, with a run's check added (the last `WINDOW` kept); None
    where that run has already given its `RUN_CHECKS`."""
    if sum(1 for run, _ in rows if run == run_id) >= RUN_CHECKS:
        return None
    return [*rows, (run_id, ratio)][-WINDOW:]


def published(v: DriftVerdict, min_fields: int, min_runs: int) -> dict[str, object]:
    """The reading as the station's telemetry says it (`calibration_watch`): the median (null before
    the first check), the checks and runs it is over, the bounds, what it waits for, the verdict."""
    return {"median": None if v.median is None else round(v.median, 3), "checks": v.fields, "runs": v.runs,
            "low": LOW_MEDIAN, "high": HIGH_MEDIAN, "needs_checks": min_fields, "needs_runs": min_runs,
            "suspected": v.suspected}


def reading_check(v: DriftVerdict, min_fields: int, min_runs: int) -> tuple[str, str, str]:
    """`smearscope doctor`'s calibration watch line for a reading: WARN when it is suspect."""
    if v.suspected:
        return ("WARN", "calibration watch", (f"{v.describe()}: the calibration is probably off; reports are "
                "flagged calibration_drift_suspected until it is measured again (smearscope calibrate-scale)"))
    if v.fields < min_fields or v.runs < min_runs:
        return ("OK", "calibration watch", f"{v.describe()}; judged from {min_fields} checked fields of {min_runs} runs")
    return ("OK", "calibration watch", v.describe())


def drift_flag(v: DriftVerdict) -> Flag:
    return Flag(code=CALIBRATION_DRIFT_SUSPECTED, severity="warning",
                message=f"{v.describe()}: the calibration is probably off (a changed objective, camera or "
                        "station?). Sizes and size-based morphology are not to be read until it is measured "
                        "again (smearscope calibrate-scale)")


class CalibrationWatch:
    """The calibration checks of the station's fields under one calibration, kept in its outbox file."""

    def __init__(self, outbox: Outbox, calibration: str) -> None:
        self.outbox, self.calibration = outbox, calibration
        self._warned = False

        def open_table(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            conn.execute(TABLE)
            gone = conn.execute("DELETE FROM calibration_ratios WHERE calibration != ?", (calibration,)).rowcount
            if gone:
                logger.info("calibration watch: %d checks of an earlier calibration dropped", gone)
            return [(str(run), float(r)) for run, r in conn.execute(
                "SELECT run_id, ratio FROM calibration_ratios ORDER BY rowid DESC LIMIT ?", (WINDOW,)).fetchall()][::-1]
        self._rows = outbox.write(open_table)

    def reading(self, min_fields: int, min_runs: int) -> DriftVerdict:
        return verdict(self._rows, min_fields, min_runs)

    def observe(self, result: FieldResult, min_fields: int, min_runs: int) -> FieldResult:
        """Keep the field's calibration check (one whose own scale showed at least
        `MIN_RBC_FOR_SCALE` whole red cells, in a run, among its first `RUN_CHECKS`), and return the
        field with the warning `calibration_drift_suspected` when its scale is the calibrated one and
        the reading is suspect (said in the log once; its end once at INFO, with why)."""
        report, ratio = result.report, kept_ratio(result.calibration_check)
        if ratio is not None and report.run_id is not None:
            self._keep(report.run_id, report.source.frame_id if report.source else report.report_id, ratio)
        v = self.reading(min_fields, min_runs)
        if not v.suspected:
            if self._warned and v.median is not None and LOW_MEDIAN <= v.median <= HIGH_MEDIAN:
                # the later checks outvote those that pointed away: said, as the WARNING was
                logger.info("calibration watch back within bounds: %s. Reports are no longer flagged "
                            "calibration_drift_suspected", v.describe())
            elif self._warned:  # a reload asked for more checks or runs, or turned the watch off
                logger.info("calibration watch no longer judges (it asks %d checked fields of %d runs; 0: off): "
                            "%s. Reports are no longer flagged calibration_drift_suspected",
                            min_fields, min_runs, v.describe())
            self._warned = False
            return result
        if not self._warned:
            logger.warning("calibration drift suspected: %s. Reports at the calibrated scale are flagged "
                           "calibration_drift_suspected until it is measured again (smearscope calibrate-scale) "
                           "or later checks bring the median back within bounds. If the stage micrometer gives "
                           "the same scale again, this lab's patients' red cells differ from the labs the bounds "
                           "were measured on (e.g. a clinic of mostly microcytic or macrocytic patients): set "
                           "[specimen] calibration_watch_fields = 0", v.describe())
            self._warned = True
        if report.scale.method != "given":
            return result
        flags = [*report.flags, drift_flag(v)]
        return dataclasses.replace(result, report=report.model_copy(
            update={"flags": flags, "rbc_morphology": sizes_in_doubt(report.rbc_morphology, flags)}))

    def _keep(self, run_id: str, field_id: str, ratio: float) -> None:
        rows = with_check(self._rows, run_id, ratio)
        if rows is None:
            return
        self._rows = rows

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO calibration_ratios VALUES (?, ?, ?, ?, ?)",
                         (run_id, field_id, ratio, self.calibration, time.time()))
            conn.execute("DELETE FROM calibration_ratios WHERE rowid NOT IN "
                         "(SELECT rowid FROM calibration_ratios ORDER BY rowid DESC LIMIT ?)", (WINDOW,))
        try:
            self.outbox.write(write)
        except (sqlite3.Error, OSError) as exc:  # a full disk: the watch goes on in memory
            logger.warning("calibration watch: the check of field %s could not be kept (%s)", field_id, exc)


def watch_checks(outbox_path: Path, calibration: str, min_fields: int, min_runs: int) -> list[tuple[str, str, str]]:
    """`smearscope doctor`'s line: the watch's reading from the outbox file (read, nothing in it or beside it
    changed; a running station holds it), WARN when it is suspect; none without a file, a table or a watch."""
    if min_fields == 0 or not outbox_path.exists():
        return []
    try:  # as the station opens it, or read-only by a user who may not write there (then maybe without its -wal)
        with open_to_read(Path(outbox_path), 1.0) as (conn, _, unseen_wal):
            rows = conn.execute("SELECT run_id, ratio FROM calibration_ratios WHERE calibration = ? "
                                "ORDER BY rowid DESC LIMIT ?", (calibration, WINDOW)).fetchall()[::-1]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        return [("WARN", "calibration watch", f"{outbox_path} cannot be read: {exc}")]
    status, what, text = reading_check(verdict([(str(r), float(x)) for r, x in rows], min_fields, min_runs),
                                       min_fields, min_runs)
    if unseen_wal:
        text += (f" (read without {outbox_path.name}-wal, which this user cannot: the station's last checks may "
                 "be missing)")
    return [(status, what, text)]


def telemetry_checks(sample: dict[str, object]) -> list[tuple[str, str, str]]:
    """`smearscope doctor`'s calibration watch line beside a running station, from its telemetry
    sample's `calibration_watch`; none where it has none (no watch, uncalibrated, an older version)."""
    w = sample.get("calibration_watch")
    if not isinstance(w, dict) or not isinstance(w.get("checks"), int) or not isinstance(w.get("runs"), int):
        return []
    median = w.get("median")
    v = DriftVerdict(float(median) if isinstance(median, (int, float)) else None, w["checks"], w["runs"],
                     w.get("suspected") is True)
    needs_checks, needs_runs = w.get("needs_checks"), w.get("needs_runs")
    check = reading_check(v, needs_checks if isinstance(needs_checks, int) else 0,
                          needs_runs if isinstance(needs_runs, int) else 0)
    return [(check[0], check[1], f"{check[2]} (the running station's telemetry, host {sample.get('host', '?')})")]
