"""Specimen runs: one slide analysed field by field until enough white cells are classified.

A `SpecimenRun` accumulates the classified cells of the fields a technician moves through; its
report is the aggregates of all of them, kept as a running tally (`CellTally`: each field's cells
counted once; the differential's Wilson 95% intervals narrow as cells accumulate). A run starts
by command or automatically on the first field (`auto_start`), and ends when its target of
classified WBC is reached, by command, after `idle_timeout_s` without a field, or at shutdown;
only the target makes it complete. `SpecimenTracker` holds at most one open run and applies that
policy; it is driven by one thread (the daemon's analysis thread) and may be read from any
thread. Time comes from an injected clock, so all of this is testable without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from smearscope.service.analysis.aggregate import (
    AggregateThresholds,
    CellTally,
    is_classified_wbc,
    sizes_in_doubt,
)
from smearscope.service.analysis.morphology import SIZE_BASED
from smearscope.service.analysis.pipeline import KIND_FROM_HEAD_LABEL, FieldResult
from smearscope.service.analysis.records import ARTEFACT, CellKind, ClassifiedCell
from smearscope.service.analysis.report import (
    NOT_RECORDED,
    CellRecord,
    Flag,
    ModelInfo,
    Reclassified,
    Report,
    analysed_in_order,
    software_version,
)
from smearscope.service.analysis.specimen_scale import SpecimenScale
from smearscope.service.analysis.wording import counted
from smearscope.service.config import SpecimenConfig
from smearscope.service.station.run_records import ClosedRun, EndReason, RunProgress, StartedBy

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = AggregateThresholds()


class RunAlreadyOpen(RuntimeError):
    """start() while a run is open: the technician must stop it first."""


@dataclass(frozen=True)
class SpecimenPolicy:
    """When runs start and end. `auto_start`: the first field without an open run starts one."""

    target_wbc: int = 100
    idle_timeout_s: float = 300.0
    auto_start: bool = True
    #: A run that reaches this many fields without its target ends ("field_limit"): an open run
    #: holds every cell of its fields in memory (about 1.5 kB each), so this bounds it.
    max_fields: int = 1000
    #: The first this many calibrated fields of a run check the calibration (calibration_check).
    calibration_check_fields: int = 3
    #: The calibration watch's least checks and runs (service.station.calibration_watch; 0 fields: off).
    calibration_watch_fields: int = 18
    calibration_watch_runs: int = 4

    def __post_init__(self) -> None:
        if self.target_wbc < 1 or self.idle_timeout_s <= 0 or self.max_fields < 1 or self.calibration_check_fields < 0:
            raise ValueError("target_wbc and max_fields must be >= 1, idle_timeout_s > 0, "
                             "calibration_check_fields >= 0")

    @classmethod
    def from_config(cls, specimen_config: SpecimenConfig) -> SpecimenPolicy:
        """From `StationConfig.specimen` (whose `target_wbc_count` is the policy's `target_wbc`)."""
        return cls(
            target_wbc=specimen_config.target_wbc_count,
            idle_timeout_s=specimen_config.idle_timeout_s,
            auto_start=specimen_config.auto_start,
            max_fields=specimen_config.max_fields_per_run,
            calibration_check_fields=specimen_config.calibration_check_fields,
            calibration_watch_fields=specimen_config.calibration_watch_fields,
            calibration_watch_runs=specimen_config.calibration_watch_runs,
        )


#: What a field's own flags say that its specimen's report must say too (the pooled cells cannot):
#: how the scale was found and how the frame was prepared.
FIELD_FLAGS = {
    "scale_unknown": "no scale could be measured; a default was assumed (sizes and counts may be off)",
    "scale_uncertain": "the scale estimate was uncertain (sizes and counts may be off): calibrate the station",
    "scale_from_specimen": "analysed at the scale the specimen's fields agree on, not their own estimate",
    "stain_normalization_skipped": "too little stained material to normalize the stain",
    "no_background_found": "no lit glass to measure the lamp on; used as it came",
    "uneven_illumination": "the lamp lit the field unevenly (corrected): check the condenser and lamp",
    "greyscale_input": "no colour in the image: cells found and typed from shape and density only",
    "rbc_morphology_out_of_focus": "red cells too blurred to judge their shape: counted, left out of the morphology "
                                   "grades (graded on the other fields' red cells; none sharp: not assessable)",
    "calibration_suspect": "the red cells pointed to a scale far from the calibration (a run's first fields are "
                           "checked): check the objective and the calibration (smearscope calibrate-scale)",
    "calibration_drift_suspected": "the calibration checks of the station's recent runs point away from the "
                                   "calibration: measure it again (smearscope calibrate-scale)",
}


def field_id_of(report: Report) -> str:
    return report.source.frame_id if report.source is not None else report.report_id


def type_applies(cell: ClassifiedCell, head: str, new: str) -> bool:
    """Whether a technician's type (`head` "wbc" or "rbc", the type) counts for this cell: a head's
    types on its own kind of cell only, and no size-based class on a red cell at an estimated
    scale or cut by the frame's edge (no one can judge its size; the report says so)."""
    kind = cell.detection.kind
    if (head == "rbc") != (kind is CellKind.RBC) or kind not in (CellKind.WBC, CellKind.NRBC, CellKind.RBC):
        return False
    return not (head == "rbc" and new in SIZE_BASED and not (cell.size_calibrated and not cell.touches_frame_edge))


def cell_keys(records: Sequence[CellRecord]) -> Iterator[tuple[str, int]]:
    """Each cell's key as technicians' types name it: (its field id, its index in that field's report)."""
    position: dict[str, int] = {}
    for rec in records:
        fid = rec.field_id or ""
        position[fid] = position.get(fid, -1) + 1
        yield fid, position[fid]


@dataclass
class SpecimenRun:
    """The fields of one slide and their cells, in arrival order."""

    target_wbc: int
    started_at: float
    started_by: StartedBy = "auto"
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: The lab's identifier of the specimen (start_run's specimen_id; None: none given).
    specimen_id: str | None = None
    #: Its number on this station (1, 2, 3, ...), given as it opened (service.station.durable); None: none.
    run_seq: int | None = None
    field_ids: list[str] = field(default_factory=list)
    #: The smearscope version that analysed each field (NOT_RECORDED: stored before it was kept), as field_ids.
    field_software: list[str] = field(default_factory=list)
    cells: list[ClassifiedCell] = field(default_factory=list)
    records: list[CellRecord] = field(default_factory=list)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    classified_wbc: int = 0
    last_field_at: float | None = None
    #: The scale its fields agree on, for an uncalibrated station (service.analysis.specimen_scale).
    scale: SpecimenScale = field(default_factory=SpecimenScale)
    #: Field-level flags the specimen report carries on (FIELD_FLAGS): code -> (severity, fields).
    field_flags: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: A run left open by a previous process: the end a technician had asked for (StationState).
    end_requested: EndReason | None = None
    #: `cells` counted so far for the report (caught up at each report: one pass over new cells only).
    tally: CellTally | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.classified_wbc >= self.target_wbc

    @property
    def last_activity(self) -> float:
        return self.started_at if self.last_field_at is None else self.last_field_at

    def add(self, result: FieldResult, now: float) -> bool:
        """Accumulate one field; False (and nothing counted) for a field already in the run."""
        report = result.report
        fid = field_id_of(report)
        if fid in self.field_ids:
            logger.warning("run %s: field %s already counted; ignored", self.run_id, fid)
            return False
        if len(report.cells) != len(result.cells):
            raise ValueError(
                f"field {fid}: {len(report.cells)} records for {len(result.cells)} cells")
        self.field_ids.append(fid)
        self.field_software.append(report.software_version or NOT_RECORDED)
        # a run keeps its cells until it closes, without what its report and a verification do not
        # read: the masks (1.2 kB per cell on average, as much again as the rest of the cell) and the
        # WBC head's features (kept for typing by the review gallery, a few kB per white cell)
        self.cells.extend(replace(c, head_features=None, detection=replace(c.detection, mask=None))
                          for c in result.cells)
        self.records.extend(r.model_copy(update={"field_id": fid}) for r in report.cells)
        self.classified_wbc += sum(1 for c in result.cells if is_classified_wbc(c))
        self.models = self.models or dict(report.models)
        self.last_field_at = now
        self.scale.add_report(report.scale)
        self.count_field_flags((f.code, f.severity) for f in report.flags)
        return True

    def count_field_flags(self, flags: Iterable[tuple[str, str]]) -> None:
        """One field's (code, severity) flags: those the specimen report carries on are counted."""
        for code, severity in flags:
            if code in FIELD_FLAGS:
                self.field_flags[code] = (severity, self.field_flags.get(code, (severity, 0))[1] + 1)

    def verified(self, types: dict[tuple[str, int], tuple[str, str]]
                 ) -> tuple[SpecimenRun, list[Reclassified], int]:
        """A copy of the run with the types a technician gave its cells, keyed (field id, the
        cell's index in its field report) -> (kind, type): "wbc" types on white cells and
        nucleated red cells, each counted where its type belongs (`platelet` a platelet,
        `erythroblast` a nucleated red cell, as the analyzer counts the WBC head's own calls);
        "rbc" types on red cells; `artefact` on any of them: no cell, in no count but its own.
        Returns the cells whose type differs from the analyzer's and how many typed cells it holds; a type of one kind on a cell of another is ignored. The
        run must be the analyzer's (never an earlier verified copy): `machine_label` is its label."""
        cells, records = list(self.cells), list(self.records)
        changed: list[Reclassified] = []
        typed = 0
        for g, ((fid, k), rec) in enumerate(zip(cell_keys(records), records)):
            kind_and_type = types.get((fid, k))
            c = cells[g]
            if kind_and_type is None:
                continue
            head, new = kind_and_type
            if not type_applies(c, head, new):
                continue
            typed += 1
            kind = (CellKind.ARTEFACT if new == ARTEFACT else CellKind.RBC if head == "rbc"
                    else KIND_FROM_HEAD_LABEL.get(new, CellKind.WBC))
            label = new if kind in (CellKind.WBC, CellKind.NRBC, CellKind.RBC) else None
            # the technician's type is certain: confidence 1 (a sickle cell they confirm counts
            # toward the critical flag however unsure the head was); a platelet has no label
            score = 1.0 if label is not None else None
            # the detector's kind is kept when the technician's type moves the cell to another one
            detected_as = (c.detected_as or c.detection.kind) if kind is not c.detection.kind else c.detected_as
            # a red cell the technician typed otherwise drops the analyzer's unassessed size call
            unassessed = c.unassessed_label if new == rec.label else None
            # a red cell the technician typed is judged, however blurred its field (rbc_focus)
            cells[g] = replace(c, detection=replace(c.detection, kind=kind), label=label, label_score=score,
                               atypical=False, detected_as=detected_as, unassessed_label=unassessed,
                               shape_judged=c.shape_judged or head == "rbc", typed=True)
            records[g] = rec.model_copy(update={"kind": kind.value, "label": label, "label_score": score,
                                                "atypical": False, "unassessed_label": unassessed,
                                                "machine_label": rec.label if new != rec.label else None})
            if new != rec.label:
                changed.append(Reclassified(field_id=fid, cell=k, machine_label=rec.label, label=new))
        run = replace(self, cells=cells, records=records, field_ids=list(self.field_ids),
                      field_software=list(self.field_software),
                      classified_wbc=sum(1 for c in cells if is_classified_wbc(c)))
        return run, changed, typed

    def report(
        self,
        *,
        station_id: str | None,
        now: float,
        end_reason: EndReason | None = None,
        thresholds: AggregateThresholds = DEFAULT_THRESHOLDS,
        with_cells: bool = True,
        elapsed_s: float | None = None,
    ) -> Report:
        """The specimen report over every cell so far; `end_reason` None gives an interim one;
        without `with_cells`, without the cell list (the live run state: the list's records cost
        about 10 ms at 300 000 cells)."""
        self.tally = CellTally.caught_up(self.tally, self.cells)
        agg = self.tally.aggregates(thresholds, self.models)
        flags = list(agg.flags)
        flags += [Flag(code=code, severity=severity, message=f"{n} of {counted(len(self.field_ids), 'field')}: {FIELD_FLAGS[code]}")
                  for code, (severity, n) in self.field_flags.items()]
        progress = (f"{self.classified_wbc} of {self.target_wbc} target WBC classified in "
                    f"{len(self.field_ids)} fields")
        if self.complete:
            flags.append(Flag(code="specimen_complete", severity="info", message=progress))
        elif end_reason is not None:
            flags.append(Flag(code="specimen_incomplete", severity="warning",
                              message=f"run ended ({end_reason}) with {progress}: review"))
        else:
            flags.append(Flag(code="specimen_in_progress", severity="info", message=progress))
        return Report(
            report_id=str(uuid.uuid4()), kind="specimen", created_at=now, station_id=station_id,
            # made now, by this version; analysed by those of its fields (a verified report's results too)
            software_version=software_version(), analysis_software=analysed_in_order(self.field_software) or None,
            run_id=self.run_id, specimen_id=self.specimen_id, fields_analyzed=len(self.field_ids), source=None,
            models=self.models, counts=agg.counts, wbc_differential=agg.wbc_differential,
            rbc_morphology=sizes_in_doubt(agg.rbc_morphology, flags), rbc_size=agg.rbc_size,
            nrbc_per_100_wbc=agg.nrbc_per_100_wbc, ratios=agg.ratios, flags=flags, review=agg.review,
            cells=list(self.records) if with_cells else [],
            timing_ms={"run_ms": round(1000.0 * (now - self.started_at if elapsed_s is None else elapsed_s), 1)},
            end_reason=end_reason,
        )


class SpecimenTracker:
    """At most one open run, started and ended by the policy; mutated by a single thread."""

    def __init__(
        self,
        policy: SpecimenPolicy,
        station_id: str | None = None,
        thresholds: AggregateThresholds = DEFAULT_THRESHOLDS,
        clock: Callable[[], float] = time.time,
        idle_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._station_id = station_id
        self._thresholds = thresholds
        self._clock = clock
        #: The idle timeout is measured on a clock that never steps: a wall clock set back between
        #: two slides must not keep a run open for the next patient's fields (nor one set forward
        #: end a run mid-slide). `_active_at`: that clock at the open run's start or last field.
        self._idle_clock = idle_clock
        self._active_at = 0.0
        self._opened_at = 0.0  # that clock at the open run's start: its reports' run_ms
        self._lock = threading.Lock()
        self._run: SpecimenRun | None = None
        #: Fields analysed with no run open (auto-start off) or whose run ended meanwhile: in no specimen report.
        self.fields_outside_runs = 0
        self._outside_said = False  # said once until a run opens
        self._checks_claimed: tuple[str | None, int] = (None, 0)  # calibration checks handed to a run
        #: Gives an opening run its number on this station (StationState.number_run; None: none).
        self.number_run: Callable[[str], int | None] | None = None

    @property
    def policy(self) -> SpecimenPolicy:
        return self._policy

    def set_policy(self, policy: SpecimenPolicy) -> None:
        """New target applies to runs started from now on; the idle timeout and the field limit apply
        at once (a lowered limit ends the open run at its next field)."""
        with self._lock:
            self._policy = policy

    def open_run(self) -> SpecimenRun | None:
        """The open run itself (for the analysis thread, which owns it)."""
        with self._lock:
            return self._run

    def progress(self) -> RunProgress | None:
        with self._lock:
            run = self._run
            if run is None:
                return None
            return RunProgress(run.run_id, run.started_by, run.started_at, len(run.field_ids),
                               run.classified_wbc, run.target_wbc, run.specimen_id, run.run_seq)

    def claim_calibration_check(self, run_id: str | None) -> bool:
        """Whether a calibrated field handed to run `run_id` (`run_for_next_field`) checks its calibration
        (calibration_check): the first `calibration_check_fields` fields handed to a run, counted as they are
        handed out, so fields analysed at once (concurrent_fields) claim no more checks than that; a resumed
        run counts the fields it holds. A field outside any run (auto_start off, no run open) never checks."""
        with self._lock:
            if run_id is None or self._policy.calibration_check_fields == 0:
                return False
            if self._checks_claimed[0] != run_id:
                held = self._run.field_ids if self._run is not None and self._run.run_id == run_id else ()
                self._checks_claimed = (run_id, len(held))
            claimed = self._checks_claimed[1]
            if claimed >= self._policy.calibration_check_fields:
                return False
            self._checks_claimed = (run_id, claimed + 1)
            return True

    def release_calibration_check(self, run_id: str | None) -> None:
        """A field that claimed a check for run `run_id` and failed gives it back: the run's next
        field handed out checks instead (if the run is still the one claiming)."""
        with self._lock:
            if run_id is not None and self._checks_claimed[0] == run_id and self._checks_claimed[1] > 0:
                self._checks_claimed = (run_id, self._checks_claimed[1] - 1)

    def specimen_scale(self) -> float | None:
        """The scale the open run's fields agree on so far (None: no run, or too few estimates)."""
        with self._lock:
            run = self._run
        return None if run is None else run.scale.scale()

    def interim_report(self, with_cells: bool = True) -> Report | None:
        """The open run's report so far (the live run state, `with_cells` False)."""
        with self._lock:
            if self._run is None:
                return None
            return self._run.report(station_id=self._station_id, now=self._clock(), thresholds=self._thresholds,
                                    with_cells=with_cells, elapsed_s=self._idle_clock() - self._opened_at)

    def start(self, started_by: StartedBy = "command", target_wbc: int | None = None,
              specimen_id: str | None = None) -> str:
        """Open a run (for the specimen `specimen_id`, the lab's identifier, where given) and return
        its id; RunAlreadyOpen if one is open."""
        with self._lock:
            if self._run is not None:
                raise RunAlreadyOpen(f"run {self._run.run_id} is open; stop it first")
            target = self._policy.target_wbc if target_wbc is None else int(target_wbc)
            if target < 1:
                raise ValueError("target_wbc must be >= 1")
            self._run = SpecimenRun(target_wbc=target, started_at=self._clock(),
                                    started_by=started_by, specimen_id=specimen_id)
            if self.number_run is not None:  # kept before the run is used anywhere: never given twice
                self._run.run_seq = self.number_run(self._run.run_id)
            self._active_at = self._opened_at = self._idle_clock()
            self._outside_said = False
            logger.info("specimen run %s started (%s, target %d WBC)",
                        self._run.run_id, started_by, target)
            return self._run.run_id

    def resume_one(self, left_open: Sequence[SpecimenRun]) -> list[SpecimenRun]:
        """Of the runs a previous process left open (a crash, a power cut), take the latest back as
        the open run when it would still be open had that process lived: its last field within the
        idle timeout, its target and field limit not reached, no run open here. The technician goes
        on with the same slide and its fields join the same report; never one a technician stopped.
        The others are returned, to be closed (end reason restart, or the end asked for)."""
        runs = sorted(left_open, key=lambda r: r.last_activity)
        with self._lock:
            last = runs[-1] if runs and self._run is None else None
            # a clock behind the run's last field (no RTC, no network time yet) proves nothing: closed
            if (last is not None and last.end_requested is None
                    and 0 <= self._clock() - last.last_activity < self._policy.idle_timeout_s
                    and not last.complete and len(last.field_ids) < self._policy.max_fields):
                self._run = last
                self._active_at = self._idle_clock() - (self._clock() - last.last_activity)
                self._opened_at = self._idle_clock() - (self._clock() - last.started_at)
                logger.info("specimen run %s resumed: left open by the previous process %.0f s ago, "
                            "%d fields, %d/%d WBC classified", last.run_id, self._clock() - last.last_activity,
                            len(last.field_ids), last.classified_wbc, last.target_wbc)
                return runs[:-1]
        return runs

    def run_for_next_field(self) -> str | None:
        """The run the next field joins: the open one, or a new one when auto-start is on."""
        with self._lock:
            if self._run is not None:
                return self._run.run_id
            if not self._policy.auto_start:
                return None
        return self.start(started_by="auto")

    def add(self, result: FieldResult, handed_to: str | None = None) -> tuple[FieldResult, ClosedRun | None]:
        """Add a field to the open run (stamping its report with the run id), closing it at its target. With no
        run open it stands alone, as does one handed to a run (`handed_to`) that ended meanwhile (its slide's)."""
        with self._lock:
            run = self._run
        if run is None or handed_to not in (None, run.run_id):
            if result.report.run_id is not None:
                result = replace(result, report=result.report.model_copy(update={"run_id": None}))
            self.fields_outside_runs += 1
            if handed_to is not None:
                logger.info("field %s was analysed while its run %s ended: in no specimen report (not in the next "
                            "slide's run)", field_id_of(result.report), handed_to)
            elif not self._outside_said:
                self._outside_said = True
                logger.warning("field %s analysed with no specimen run open (specimen.auto_start = false): it is in "
                               "no specimen report; start_run before the next slide's fields (said once until a "
                               "run opens)", field_id_of(result.report))
            return result, None
        if result.report.run_id != run.run_id:  # handed over with none open, a run opened while it was analysed
            result = replace(result, report=result.report.model_copy(update={"run_id": run.run_id}))
        with self._lock:
            counted = run.add(result, self._clock())
            if counted:
                self._active_at = self._idle_clock()
        if not counted:  # a field the run holds (a source replaying its frame ids after a restart): on its own
            return replace(result, report=result.report.model_copy(update={"run_id": None})), None
        if run.complete:
            return result, self.stop("target_reached")
        if len(run.field_ids) >= self._policy.max_fields:
            return result, self.stop("field_limit")
        return result, None

    def check_idle(self) -> ClosedRun | None:
        """End the open run if no field arrived for the idle timeout."""
        with self._lock:
            run = self._run
            if run is None or self._idle_clock() - self._active_at < self._policy.idle_timeout_s:
                return None
        return self.stop("idle_timeout")

    def final_report(self, run: SpecimenRun, end_reason: EndReason) -> Report:
        """The final report of a run this tracker does not hold (one restored after a crash): it
        lasted until now, the time down included, never less than nothing (a board without a clock
        battery can come back with its wall clock before the run's start)."""
        now = self._clock()
        return run.report(station_id=self._station_id, now=now, end_reason=end_reason,
                          thresholds=self._thresholds, elapsed_s=max(0.0, now - run.started_at))

    def stop(self, end_reason: EndReason = "stopped") -> ClosedRun | None:
        """Close the open run and build its final report; None when no run is open."""
        with self._lock:
            run, self._run = self._run, None
            elapsed = self._idle_clock() - self._opened_at
        if run is None:
            return None
        report = None
        if run.field_ids:
            report = run.report(station_id=self._station_id, now=self._clock(),
                                end_reason=end_reason, thresholds=self._thresholds, elapsed_s=elapsed)
        logger.info("specimen run %s ended (%s): %d fields, %d/%d WBC classified%s",
                    run.run_id, end_reason, len(run.field_ids), run.classified_wbc,
                    run.target_wbc, "" if report else "; no fields, no report")
        return ClosedRun(run.run_id, end_reason, len(run.field_ids), run.classified_wbc,
                         run.target_wbc, report, run, run.started_at, run.started_by, run.specimen_id, run.run_seq)
