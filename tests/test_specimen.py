"""Specimen runs with hand-made field results: accumulation, target, idle timeout, CIs, policy."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.records import Box, CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.report import (
    CellRecord,
    Counts,
    Flag,
    ImageInfo,
    ModelInfo,
    Report,
    SizeStats,
    SourceInfo,
)
from smearscope.service.station.specimen import (
    RunAlreadyOpen,
    SpecimenPolicy,
    SpecimenRun,
    SpecimenTracker,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cell_pair(kind: CellKind, label: str | None, score: float | None = 0.9, *, d: float = 7.5, edge: bool = False,
              detected_as: CellKind | None = None, atypical: bool = False, calibrated: bool = False,
              unassessed: str | None = None, i: int = 0) -> tuple[ClassifiedCell, CellRecord]:
    """One cell as the analyzer hands it on and as its field report lists it, the `i`-th box of a row."""
    box = Box(10.0 * i, 0.0, 10.0 * i + 8.0, 8.0)
    c = ClassifiedCell(CellDetection(kind, box, 0.9), label, score, d, 44.0, touches_frame_edge=edge,
                       detected_as=detected_as, atypical=atypical, size_calibrated=calibrated,
                       unassessed_label=unassessed)
    r = CellRecord(kind=kind.value, bbox=box.as_list(), score=0.9, label=label, label_score=score,
                   diameter_um=d, area_um2=44.0, atypical=atypical, unassessed_label=unassessed)
    return c, r


def field_of(frame_id: str, pairs: list[tuple[ClassifiedCell, CellRecord]], run_id: str | None = None,
             models: Mapping[str, ModelInfo] | None = None) -> FieldResult:
    """A field result of these (cell, record) pairs (`cell_pair`)."""
    kinds = [c.detection.kind for c, _ in pairs]
    report = Report(
        report_id=str(uuid.uuid4()), kind="field", created_at=0.0, run_id=run_id,
        source=SourceInfo(frame_id=frame_id, source="test", captured_at=0.0,
                          image=ImageInfo(width=640, height=480)),
        models=dict(models or {}),
        counts=Counts(rbc=kinds.count(CellKind.RBC), wbc=kinds.count(CellKind.WBC), platelet=kinds.count(CellKind.PLATELET)),
        wbc_differential=[], rbc_morphology=[], rbc_size=SizeStats(n=0, mean_diameter_um=None, sd_um=None,
                                                                   cv_percent=None, median_diameter_um=None),
        ratios={}, flags=[], cells=[r for _, r in pairs],
    )
    return FieldResult(report, tuple(c for c, _ in pairs), 1.0)


def fake_field(frame_id: str, wbc: Mapping[str, int], rbc: int = 10,
               run_id: str | None = None) -> FieldResult:
    """A field whose cells are `rbc` normal red cells and WBC with the given labels."""
    kinds = [(CellKind.RBC, "normal")] * rbc + [
        (CellKind.WBC, label) for label, n in wbc.items() for _ in range(n)]
    return field_of(frame_id, [cell_pair(kind, label, i=i) for i, (kind, label) in enumerate(kinds)], run_id)


MIX = {"neutrophil": 6, "lymphocyte": 3, "monocyte": 1}


def tracker(target: int = 30, idle: float = 60.0, auto: bool = True,
            clock: FakeClock | None = None) -> SpecimenTracker:
    clock = clock or FakeClock()
    return SpecimenTracker(SpecimenPolicy(target, idle, auto), station_id="st", clock=clock, idle_clock=clock)


def test_fields_accumulate_into_one_specimen_report_with_field_ids() -> None:
    t = tracker(target=30)
    run_id = t.run_for_next_field()
    assert run_id is not None
    for i in range(2):
        result, closed = t.add(fake_field(f"f{i}", MIX))
        assert closed is None and result.report.run_id == run_id
    report = t.interim_report()
    assert report is not None and report.kind == "specimen" and report.run_id == run_id
    assert report.fields_analyzed == 2
    assert report.counts == Counts(rbc=20, wbc=20, platelet=0)
    assert [c.field_id for c in report.cells].count("f0") == 20
    assert {s.label: s.count for s in report.wbc_differential} == {
        "neutrophil": 12, "lymphocyte": 6, "monocyte": 2}
    assert report.flags[-1].code == "specimen_in_progress"


def test_target_reached_closes_the_run_and_the_next_field_starts_another() -> None:
    t = tracker(target=25)
    first = t.run_for_next_field()
    closed = None
    for i in range(3):
        _, closed = t.add(fake_field(f"f{i}", MIX))
        if closed:
            break
    assert closed is not None and closed.complete and closed.run_id == first
    assert closed.fields == 3 and closed.classified_wbc == 30
    assert closed.report is not None and closed.report.flags[-1].code == "specimen_complete"
    assert closed.report.fields_analyzed == 3
    assert t.progress() is None
    second = t.run_for_next_field()
    assert second is not None and second != first


def test_unidentified_white_cells_do_not_count_toward_the_target() -> None:
    t = tracker(target=10)
    t.run_for_next_field()
    _, closed = t.add(fake_field("f0", {UNIDENTIFIED: 30, "neutrophil": 9}))
    assert closed is None
    progress = t.progress()
    assert progress is not None and progress.classified_wbc == 9
    _, closed = t.add(fake_field("f1", {"lymphocyte": 1}))
    assert closed is not None and closed.complete
    assert closed.report is not None and closed.report.counts.wbc == 40


def test_confidence_intervals_narrow_as_cells_accumulate() -> None:
    t = tracker(target=1000)
    t.run_for_next_field()
    widths = []
    for i in range(6):
        t.add(fake_field(f"f{i}", MIX))
        report = t.interim_report()
        assert report is not None
        share = next(s for s in report.wbc_differential if s.label == "neutrophil")
        assert share.percent == 60.0
        assert share.ci95_low is not None and share.ci95_high is not None
        widths.append(share.ci95_high - share.ci95_low)
    assert all(a > b for a, b in itertools.pairwise(widths)), widths


def test_idle_timeout_ends_the_run_as_incomplete() -> None:
    clock = FakeClock()
    t = tracker(target=100, idle=30.0, clock=clock)
    t.run_for_next_field()
    t.add(fake_field("f0", MIX))
    clock.now += 29.0
    assert t.check_idle() is None
    t.add(fake_field("f1", MIX))  # activity restarts the idle clock
    clock.now += 29.0
    assert t.check_idle() is None
    clock.now += 2.0
    closed = t.check_idle()
    assert closed is not None and closed.end_reason == "idle_timeout" and not closed.complete
    assert closed.report is not None
    flag = closed.report.flags[-1]
    assert flag.code == "specimen_incomplete" and "idle_timeout" in flag.message
    assert closed.report.timing_ms["run_ms"] == 60_000.0
    assert t.check_idle() is None


def test_a_wall_clock_stepped_between_slides_does_not_move_the_idle_timeout() -> None:
    """The wall clock set back (an operator correcting it, a board without a clock battery) after a
    slide's last field must not keep its run open for the next slide's fields; set forward, it must
    not end a run mid-slide: idleness, and a run's duration in its reports, are measured on the
    monotonic clock."""
    wall, steady = FakeClock(), FakeClock()
    t = SpecimenTracker(SpecimenPolicy(100, 30.0, True), station_id="st", clock=wall, idle_clock=steady)
    first = t.run_for_next_field()
    t.add(fake_field("slide1-f0", MIX))
    wall.now -= 3600.0  # set back an hour
    wall.now += 31.0
    steady.now += 31.0
    closed = t.check_idle()
    assert closed is not None and closed.end_reason == "idle_timeout"
    assert closed.report is not None and closed.report.timing_ms["run_ms"] == 31_000.0  # not 31 s less an hour
    second = t.run_for_next_field()
    assert second != first
    t.add(fake_field("slide2-f0", MIX))
    wall.now += 7200.0  # set forward two hours mid-slide
    steady.now += 5.0
    assert t.check_idle() is None and t.open_run() is not None and t.open_run().run_id == second
    assert t.interim_report().timing_ms["run_ms"] == 5_000.0
    # a run taken back after a restart keeps the idle time its last field had left
    left = t.open_run()
    t._run = None  # the process died with it open
    again = SpecimenTracker(SpecimenPolicy(100, 30.0, True), station_id="st", clock=wall, idle_clock=steady)
    wall.now, steady.now = left.last_activity + 20.0, 50_000.0
    assert again.resume_one([left]) == [] and again.check_idle() is None
    steady.now += 10.0
    assert again.check_idle() is not None


def test_a_run_left_open_by_a_crash_goes_on_within_its_idle_timeout() -> None:
    """After a crash the latest run left open is taken back when it would still be open (a field
    within the idle timeout, target and field limit not reached); the others are to be closed."""
    clock = FakeClock()
    before = tracker(target=100, idle=30.0, clock=clock)
    runs = []
    for name in ("older", "latest"):
        before.start()
        before.add(fake_field(f"{name}-f0", MIX))
        runs.append(before.open_run())
        before._run = None  # the process died with it open
        clock.now += 10.0
    older, latest = runs
    t = tracker(target=100, idle=30.0, clock=clock)
    assert t.resume_one([latest, older]) == [older]
    assert t.open_run() is latest and t.run_for_next_field() == latest.run_id
    result, _ = t.add(fake_field("latest-f1", MIX))  # its next field joins the same run
    assert result.report.run_id == latest.run_id and t.interim_report().fields_analyzed == 2
    # a run already open here: nothing taken back
    assert t.resume_one([older]) == [older] and t.open_run() is latest
    # its last field longer ago than the idle timeout: closed, not resumed
    stale = tracker(target=100, idle=30.0, clock=clock)
    clock.now += 30.0
    assert stale.resume_one([older, latest]) == [older, latest] and stale.open_run() is None
    # its target reached (the process died before closing it): closed
    clock.now = latest.last_activity + 1.0
    reached = replace(latest, target_wbc=latest.classified_wbc)
    done = tracker(target=100, idle=30.0, clock=clock)
    assert done.resume_one([reached]) == [reached] and done.open_run() is None
    assert tracker(target=100, idle=30.0, clock=clock).resume_one([latest]) == []
    # a clock set back (a station without a real-time clock, before network time): closed
    clock.now = latest.last_activity - 3600.0
    assert tracker(target=100, idle=30.0, clock=clock).resume_one([latest]) == [latest]


def test_a_run_left_open_at_its_field_limit_is_closed_not_taken_back() -> None:
    """A crash just after a run's last allowed field (before the field limit closed it), or a limit
    lowered since: the next start closes it (field_limit bounds a run's memory), however recent."""
    clock = FakeClock()
    policy = SpecimenPolicy(target_wbc=1000, idle_timeout_s=30.0, max_fields=3)
    before = SpecimenTracker(replace(policy, max_fields=10), station_id="st", clock=clock)
    before.start()
    for i in range(3):
        before.add(fake_field(f"f{i}", MIX))
    left = before.open_run()  # the process died with it open
    clock.now += 1.0
    assert SpecimenTracker(replace(policy, max_fields=4), station_id="st", clock=clock).resume_one([left]) == []
    at_limit = SpecimenTracker(policy, station_id="st", clock=clock)
    assert at_limit.resume_one([left]) == [left] and at_limit.open_run() is None
    lowered = SpecimenTracker(replace(policy, max_fields=2), station_id="st", clock=clock)
    assert lowered.resume_one([left]) == [left] and lowered.open_run() is None


def test_the_run_taken_back_is_the_one_with_the_latest_field_not_the_latest_start() -> None:
    """Of the runs left open, the one whose last field is newest is the slide on the stage: a run
    started earlier but still fed fields is taken back, not a later one that went quiet."""
    clock = FakeClock()
    long = SpecimenRun(target_wbc=1000, started_at=clock.now, started_by="command", run_id="long")
    quiet = SpecimenRun(target_wbc=1000, started_at=clock.now + 5.0, started_by="command", run_id="quiet")
    quiet.add(fake_field("q0", MIX), clock.now + 5.0)
    for i, t in enumerate((10.0, 25.0, 40.0)):
        long.add(fake_field(f"l{i}", MIX), clock.now + t)
    clock.now += 45.0  # the long run's last field 5 s ago, the quiet one's 40 s
    t = tracker(target=1000, idle=30.0, clock=clock)
    assert t.resume_one([long, quiet]) == [quiet] and t.open_run() is long
    assert tracker(target=1000, idle=30.0, clock=clock).resume_one([quiet, long]) == [quiet]


def test_fields_with_no_run_open_are_counted_and_said_once_per_stretch(caplog: pytest.LogCaptureFixture) -> None:
    t = tracker(auto=False)
    with caplog.at_level("WARNING", logger="smearscope.service.station.specimen"):
        for i in range(2):
            result, closed = t.add(fake_field(f"loose-{i}", MIX))
            assert result.report.run_id is None and closed is None
        t.start()
        t.add(fake_field("in-run", MIX))
        t.stop()
        t.add(fake_field("loose-2", MIX))
    assert t.fields_outside_runs == 3
    said = [r.getMessage() for r in caplog.records if "no specimen run open" in r.getMessage()]
    assert len(said) == 2 and "loose-0" in said[0] and "loose-2" in said[1]


def test_a_run_that_reaches_its_field_limit_ends_incomplete_and_keeps_no_masks() -> None:
    """The field limit bounds an open run's memory: a run short of its target ends there, and the
    cells it holds carry no masks (the report and a verification never read them)."""
    t = SpecimenTracker(SpecimenPolicy(target_wbc=100, max_fields=3), station_id="st", clock=FakeClock())
    run_id = t.run_for_next_field()
    closed = None
    for i in range(3):
        c, r = cell_pair(CellKind.RBC, "normal")
        masked = FieldResult(field_of(f"f{i}", [(c, r)]).report,
                             (replace(c, detection=replace(c.detection, mask=np.ones((8, 8), bool))),), 1.0)
        assert closed is None
        _, closed = t.add(masked)
        if closed is None:
            assert all(x.detection.mask is None for x in t.open_run().cells)
    assert closed is not None and closed.run_id == run_id and closed.end_reason == "field_limit"
    assert not closed.complete and closed.fields == 3
    flag = closed.report.flags[-1]
    assert flag.code == "specimen_incomplete" and "field_limit" in flag.message
    assert all(x.detection.mask is None for x in closed.run.cells)
    assert t.progress() is None and t.run_for_next_field() != run_id
    with pytest.raises(ValueError):
        SpecimenPolicy(max_fields=0)


def test_a_run_without_fields_ends_without_a_report() -> None:
    clock = FakeClock()
    t = tracker(idle=5.0, clock=clock)
    t.start()
    clock.now += 6.0
    closed = t.check_idle()
    assert closed is not None and closed.report is None and closed.fields == 0


def test_commands_start_and_stop_runs() -> None:
    t = tracker(auto=False)
    result, closed = t.add(fake_field("alone", MIX, run_id="stale"))
    assert result.report.run_id is None and closed is None  # no run, no auto-start
    assert t.run_for_next_field() is None
    run_id = t.start(target_wbc=5)
    with pytest.raises(RunAlreadyOpen):
        t.start()
    progress = t.progress()
    assert progress is not None and progress.target_wbc == 5 and progress.started_by == "command"
    t.add(fake_field("f0", {"neutrophil": 2}))
    closed = t.stop()
    assert closed is not None and closed.run_id == run_id and closed.end_reason == "stopped"
    assert t.stop() is None


def test_field_analysed_across_a_run_change_joins_the_open_run() -> None:
    t = tracker()
    old = t.run_for_next_field()
    t.stop()
    new = t.start()
    result, _ = t.add(fake_field("f0", MIX, run_id=old))
    assert result.report.run_id == new != old


def test_the_same_field_is_counted_once() -> None:
    run = SpecimenRun(target_wbc=100, started_at=0.0)
    field = fake_field("f0", MIX)
    assert run.add(field, 1.0) and not run.add(field, 2.0)
    assert run.field_ids == ["f0"] and run.classified_wbc == 10


def test_a_field_the_open_run_holds_already_is_published_as_no_part_of_it() -> None:
    """A source that replays its frame ids after a restart (simulated, replay): the run ignores the
    field it already counted, and the field's report no longer carries the run's id (it did, so a
    consumer read it as part of a run that did not count it)."""
    t = tracker(auto=False)
    run_id = t.start(target_wbc=100)
    first, _ = t.add(fake_field("f0", MIX))
    again, closed = t.add(fake_field("f0", MIX))
    assert first.report.run_id == run_id and again.report.run_id is None and closed is None
    progress = t.progress()
    assert progress is not None and progress.fields == 1


def test_policy_from_station_config_defaults_auto_start() -> None:
    from smearscope.service.config import SpecimenConfig

    policy = SpecimenPolicy.from_config(SpecimenConfig(target_wbc_count=200, idle_timeout_s=90,
                                                       max_fields_per_run=400))
    assert policy == SpecimenPolicy(target_wbc=200, idle_timeout_s=90.0, auto_start=True, max_fields=400)
    with pytest.raises(ValueError):
        SpecimenPolicy(target_wbc=0)
    manual = SpecimenPolicy.from_config(SpecimenConfig(auto_start=False))
    assert manual.auto_start is False
    assert SpecimenTracker(manual).run_for_next_field() is None  # fields stand alone


def test_a_fields_scale_and_preparation_flags_reach_the_specimen_report() -> None:
    """The pooled cells cannot say a field's scale was guessed: the specimen report must."""
    t = tracker(target=30)
    assert t.run_for_next_field() is not None
    plain = fake_field("f0", MIX)
    guessed = fake_field("f1", MIX)
    flagged = guessed.report.model_copy(update={"flags": [
        Flag(code="scale_unknown", severity="warning", message="assumed 0.1 um/px"),
        Flag(code="too_few_wbc_for_differential", severity="info", message="10 WBC")]})
    t.add(plain)
    t.add(FieldResult(flagged, guessed.cells, 1.0))
    report = t.interim_report()
    carried = [f for f in report.flags if f.code == "scale_unknown"]
    assert len(carried) == 1 and carried[0].severity == "warning" and carried[0].message.startswith("1 of 2 fields")
    # a field's own count flags are recomputed over the pooled cells, not carried
    assert sum(f.code == "too_few_wbc_for_differential" for f in report.flags) == 1
    alone = tracker(target=30)  # a run of one field says "1 of 1 field", not "1 of 1 fields"
    assert alone.run_for_next_field() is not None
    alone.add(FieldResult(flagged, guessed.cells, 1.0))
    (one,) = [f for f in alone.interim_report().flags if f.code == "scale_unknown"]
    assert one.message.startswith("1 of 1 field: "), one.message


def test_interim_reports_at_every_field_count_each_cell_once_at_its_place_in_the_run() -> None:
    """The run's tally adds each field's cells once: counts and the cells a flag lists (positions in
    the run) match the run's cells however often a report was made."""
    t = tracker(target=10**6)
    t.run_for_next_field()
    for i in range(4):
        t.add(fake_field(f"f{i}", {"neutrophil": 2, UNIDENTIFIED: 3}, rbc=3 + i))
        report = t.interim_report(with_cells=i % 2 == 0)
        assert report is not None and report.counts.rbc == sum(3 + k for k in range(i + 1))
        assert report.counts.wbc == 5 * (i + 1) and len(report.cells) == (len(t.open_run().cells) if i % 2 == 0 else 0)
        atypical = next(f for f in report.flags if f.code == "atypical_wbc_present")
        assert atypical.cells == [g for g, c in enumerate(t.open_run().cells) if c.label == UNIDENTIFIED]
    assert {s.label: s.count for s in report.wbc_differential} == {"neutrophil": 8, UNIDENTIFIED: 12}


def test_a_runs_first_fields_check_the_calibration_and_its_report_carries_a_suspect_one() -> None:
    """The first `calibration_check_fields` fields of a run check their calibration (a scale
    search each), the field that opens a run too, not a field that stands alone (auto_start off, no
    run open); a field's calibration_suspect flag stays on its specimen's report with the number of
    fields that raised it. 0 never checks."""
    policy = SpecimenPolicy(1000, 60.0, True, calibration_check_fields=2)
    t = SpecimenTracker(policy, station_id="st", clock=FakeClock())
    run_id = t.run_for_next_field()  # the field that opens a run is one of its first
    assert run_id is not None
    # Fields are claimed as they are handed out: four analysed at once claim two checks, not four.
    assert [t.claim_calibration_check(run_id) for _ in range(4)] == [True, True, False, False]
    for i in range(4):
        result = fake_field(f"f{i}", MIX)
        if i == 1:
            flag = Flag(code="calibration_suspect", severity="warning", message="its red cells fit 0.08 um/px")
            result = replace(result, report=result.report.model_copy(update={"flags": [flag]}))
        t.add(result)
    report = t.interim_report()
    assert report is not None
    (carried,) = [f for f in report.flags if f.code == "calibration_suspect"]
    assert carried.severity == "warning" and carried.message.startswith("1 of 4 fields")
    t.stop()
    again = t.run_for_next_field()
    assert again not in (None, run_id) and t.claim_calibration_check(again)  # a new run checks again
    # A run holding fields already (resumed after a restart) counts them: one of its two is left.
    held = SpecimenTracker(policy, station_id="st", clock=FakeClock())
    resumed = held.run_for_next_field()
    held.add(fake_field("g0", MIX))
    assert [held.claim_calibration_check(resumed) for _ in range(2)] == [True, False]
    off = SpecimenTracker(replace(policy, calibration_check_fields=0), station_id="st", clock=FakeClock())
    assert not off.claim_calibration_check(off.run_for_next_field())
    alone = SpecimenTracker(replace(policy, auto_start=False), station_id="st", clock=FakeClock())
    assert alone.run_for_next_field() is None
    assert not alone.claim_calibration_check(None)  # a field with no run open stands alone: not a run's first field
    with pytest.raises(ValueError, match="calibration_check_fields"):
        SpecimenPolicy(calibration_check_fields=-1)


def test_a_failed_field_gives_its_calibration_check_back_to_its_run() -> None:
    """A field that claimed a check and failed gives it back: the run's next field checks instead.
    Only to the run it was claimed for, never below none claimed, and nothing for no run."""
    policy = SpecimenPolicy(1000, 60.0, True, calibration_check_fields=2)
    t = SpecimenTracker(policy, station_id="st", clock=FakeClock())
    run_id = t.run_for_next_field()
    assert run_id is not None
    assert [t.claim_calibration_check(run_id) for _ in range(2)] == [True, True]
    assert not t.claim_calibration_check(run_id)
    t.release_calibration_check(run_id)  # one of the two failed
    assert [t.claim_calibration_check(run_id) for _ in range(2)] == [True, False]
    t.release_calibration_check("another-run")  # a field of a run that is no longer claiming
    t.release_calibration_check(None)
    assert not t.claim_calibration_check(run_id)
    fresh = SpecimenTracker(policy, station_id="st", clock=FakeClock())
    opened = fresh.run_for_next_field()
    assert fresh.claim_calibration_check(opened)
    fresh.release_calibration_check(opened)
    fresh.release_calibration_check(opened)  # given back twice, claimed once: two to claim, not three
    assert [fresh.claim_calibration_check(opened) for _ in range(3)] == [True, True, False]


def test_a_specimen_with_a_calibration_in_doubt_grades_no_size_based_call() -> None:
    """A field that raised calibration_suspect puts its specimen's calibration in doubt: the
    specimen report's size-based rows (spherocytes here) are not assessable and carry no grade,
    their count kept for audit, while shape classes keep their grades; the same run without the
    flag grades both."""
    def run(suspect: bool) -> Report:
        t = tracker(target=1000)
        run_id = t.run_for_next_field()
        for i in range(3):
            pairs = ([cell_pair(CellKind.RBC, "normal", calibrated=True, i=k) for k in range(30)]
                     + [cell_pair(CellKind.RBC, "spherocyte", calibrated=True, i=30 + k) for k in range(15)]
                     + [cell_pair(CellKind.RBC, "target", calibrated=True, i=45 + k) for k in range(15)])
            result = field_of(f"f{i}", pairs, run_id)
            if suspect and i == 1:
                flag = Flag(code="calibration_suspect", severity="warning", message="its red cells fit 0.08 um/px")
                result = replace(result, report=result.report.model_copy(update={"flags": [flag]}))
            t.add(result)
        report = t.interim_report()
        assert report is not None
        return report

    rows = {s.label: s for s in run(True).rbc_morphology}
    assert not rows["spherocyte"].assessable and rows["spherocyte"].grade is None and rows["spherocyte"].count == 45
    assert rows["target"].assessable and rows["target"].grade == "2+"
    plain = {s.label: s for s in run(False).rbc_morphology}
    assert plain["spherocyte"].assessable and plain["spherocyte"].grade == "2+"


def test_a_run_closed_after_a_restart_with_the_clock_set_back_never_lasts_less_than_nothing() -> None:
    """A run left open by a power cut is closed at the next start; a board without a clock battery
    may come back with its wall clock before the run's start: its duration is 0, not negative (a
    negative run_ms put the FHIR effective time after the report's issue)."""
    clock = FakeClock()
    clock.now = 10_000.0
    t = tracker(clock=clock)
    run_id = t.run_for_next_field()
    t.add(fake_field("f0", MIX, run_id=run_id))
    closed = t.stop("shutdown")
    assert closed is not None
    clock.now = 6_400.0
    report = t.final_report(closed.run, "restart")
    assert report.timing_ms["run_ms"] == 0.0 and report.end_reason == "restart"
    clock.now = 10_031.0  # the clock right: the time down counts
    assert t.final_report(closed.run, "restart").timing_ms["run_ms"] == 31_000.0
