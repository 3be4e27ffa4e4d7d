"""Contracts of the specimen report, its crash-safe state and its FHIR bundle that no test held:
a specimen report carries NRBC per 100 WBC, ratios, models and the atypical / nucleated flags its
cells raise; erythroblasts do not count toward the WBC target; blank fields still close a run; a
restored run keeps every cell attribute (a confident sickle cell stays confident) and its fields'
arrival order; a stored input is remembered; unreadable closed-run rows do not stop the station;
verification leaves platelets alone and keeps the detector's kind and held size calls; the FHIR
bundle's denominators, units, effective time, station identifier, critical-first conclusion and
LOINC codes (as docs/FHIR.md lists them). Each test was written against a mutation of the code it
guards that the suite let pass."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
from pathlib import Path

import pytest
from test_fhir import (
    as_sent,
    by_code,
    component,
    current_report,
    graded_report,
    resources,
    validate,
)
from test_sources import _folder, _png
from test_specimen import FakeClock, cell_pair, field_of, tracker
from test_verify_run import store_run

from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.records import CellKind
from smearscope.service.analysis.report import (
    ClassShare,
    Counts,
    Flag,
    ModelInfo,
    Verification,
)
from smearscope.service.fhir import codes, report_view
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.station.durable import StationState, same_file
from smearscope.service.station.specimen import SpecimenPolicy, SpecimenRun, SpecimenTracker


def cell(kind, label, score=0.95, *, calibrated=True, **kw):
    """`cell_pair` with a confident, calibrated cell by default."""
    return cell_pair(kind, label, score, calibrated=calibrated, **kw)


MODELS = {"seg": ModelInfo(name="seg-v1", sha256="ab" * 32, backend="onnx")}


def field(frame_id, pairs):
    return field_of(frame_id, pairs, models=MODELS)


def wbcs(n, label="neutrophil", start=0, **kw):
    return [cell(CellKind.WBC, label, i=start + i, **kw) for i in range(n)]


def rbcs(n, label="normal", start=100, **kw):
    return [cell(CellKind.RBC, label, i=start + i, **kw) for i in range(n)]


# -- specimen.py
def test_nrbc_do_not_count_toward_the_wbc_target():
    run = SpecimenRun(target_wbc=10, started_at=0.0)
    run.add(field("f0", wbcs(8) + [cell(CellKind.NRBC, "erythroblast", i=50 + i) for i in range(5)]), 1.0)
    assert run.classified_wbc == 8 and not run.complete


def test_specimen_report_carries_nrbc_ratios_models_and_flags():
    run = SpecimenRun(target_wbc=1000, started_at=0.0)
    pairs = (wbcs(20) + wbcs(10, "lymphocyte", start=20) + wbcs(5, "unidentified", start=40, atypical=True)
             + [cell(CellKind.NRBC, "erythroblast", i=60 + i) for i in range(2)] + rbcs(50))
    run.add(field("f0", pairs), 1.0)
    rep = run.report(station_id="s", now=2.0, end_reason="stopped")
    assert rep.nrbc_per_100_wbc == round(100 * 2 / 35, 2)
    assert rep.ratios["neutrophil_lymphocyte"] == 2.0
    assert rep.models == MODELS
    codes_ = {f.code for f in rep.flags}
    assert {"atypical_wbc_present", "nucleated_rbc_present"} <= codes_
    nrbc = by_code(report_bundle(rep), codes.LOINC, "58413-6")
    assert nrbc["valueQuantity"]["value"] == as_sent(rep.nrbc_per_100_wbc)


def test_a_run_of_fields_without_cells_still_reports():
    t = SpecimenTracker(SpecimenPolicy(10, 60.0, True), clock=lambda: 5.0)
    t.start()
    t.add(field("blank", []))
    closed = t.stop()
    assert closed.report is not None and closed.report.fields_analyzed == 1


def test_incomplete_is_a_warning():
    run = SpecimenRun(target_wbc=100, started_at=0.0)
    run.add(field("f0", wbcs(3)), 1.0)
    flag = run.report(station_id=None, now=2.0, end_reason="stopped").flags[-1]
    assert flag.code == "specimen_incomplete" and flag.severity == "warning"


def test_a_run_closed_at_restart_is_reported_incomplete_for_that_reason():
    t = SpecimenTracker(SpecimenPolicy(100, 30.0, True), clock=lambda: 5.0)
    run = SpecimenRun(target_wbc=100, started_at=0.0)
    run.add(field("f0", wbcs(3)), 1.0)
    rep = t.final_report(run, "restart")
    flag = rep.flags[-1]
    assert rep.end_reason == "restart" and rep.kind == "specimen"
    assert flag.code == "specimen_incomplete" and flag.severity == "warning" and "restart" in flag.message


def test_idle_timeout_at_exactly_the_timeout():
    now = [0.0]
    t = SpecimenTracker(SpecimenPolicy(100, 30.0, True), clock=lambda: now[0], idle_clock=lambda: now[0])
    t.run_for_next_field()
    t.add(field("f0", wbcs(1)))
    now[0] = 30.0
    assert t.check_idle() is not None


def test_auto_started_runs_say_so():
    t = SpecimenTracker(SpecimenPolicy(100, 30.0, True), clock=lambda: 0.0)
    t.run_for_next_field()
    assert t.progress().started_by == "auto"


def test_records_and_cells_must_match():
    r = field("f0", wbcs(2))
    bad = FieldResult(r.report, r.cells[:1], 1.0)
    with pytest.raises(ValueError):
        SpecimenRun(target_wbc=10, started_at=0.0).add(bad, 1.0)


def test_a_platelet_detection_is_not_typed():
    plt = cell(CellKind.PLATELET, None, None, i=70)
    run = SpecimenRun(target_wbc=10, started_at=0.0)
    run.add(field("f0", wbcs(2) + [plt]), 1.0)
    v, changed, typed = run.verified({("f0", 2): ("wbc", "lymphocyte")})
    assert typed == 0 and changed == [] and v.records[2].kind == "platelet"


def test_the_detectors_kind_survives_a_second_move():
    # the WBC head called a white-cell detection an erythroblast (kind NRBC, detected_as WBC);
    # the technician types it a platelet: it was found as a white cell -> platelet clump flag
    nrbc = cell(CellKind.NRBC, "erythroblast", detected_as=CellKind.WBC, i=80)
    run = SpecimenRun(target_wbc=10, started_at=0.0)
    run.add(field("f0", wbcs(2) + [nrbc]), 1.0)
    v, _, typed = run.verified({("f0", 2): ("wbc", "platelet")})
    assert typed == 1 and v.cells[2].detected_as is CellKind.WBC
    assert "platelet_clumps_suspected" in {f.code for f in v.report(station_id=None, now=1.0).flags}


def test_confirming_the_shape_keeps_the_unassessed_size_call():
    # estimated scale: the head's spherocyte call is held as unassessed, the label is the shape class
    c = cell(CellKind.RBC, "normal", calibrated=False, unassessed="spherocyte", i=90)
    run = SpecimenRun(target_wbc=10, started_at=0.0)
    run.add(field("f0", wbcs(2, calibrated=False) + rbcs(5, calibrated=False) + [c]), 1.0)
    v, changed, typed = run.verified({("f0", 7): ("rbc", "normal")})
    assert typed == 1 and changed == []
    assert v.records[7].unassessed_label == "spherocyte" and v.cells[7].unassessed_label == "spherocyte"
    share = next(s for s in v.report(station_id=None, now=1.0).rbc_morphology if s.label == "spherocyte")
    assert share.assessable is False and share.count == 1


def test_a_specimens_sickle_cells_read_present_with_the_flag_over_all_its_fields():
    """Over a specimen's fields, sickle cells are "present" once a sure call is seen, never graded
    1+ to 3+ however their share grows (4 sure of 78 red cells, 5 %, is 3+ on the schistocyte
    scale); the flag turns critical at the fifth sure call in all (a third field's), and the
    first field's unsure calls alone read "none"."""
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")

    def sickle(label_score, n, start):
        return [cell(CellKind.RBC, "sickle", label_score, i=start + i) for i in range(n)]

    def read():
        report = run.report(station_id=None, now=1.0)
        row = next(s for s in report.rbc_morphology if s.label == "sickle")
        return (row.grade, row.grade_ci_low, row.grade_ci_high), {
            (f.code, f.severity) for f in report.flags if f.code.startswith("sickle")}

    run.add(field("f0", wbcs(2) + rbcs(36) + sickle(0.5, 2, 200)), 1.0)
    assert read() == (("none", None, None), {("sickle_cells_review", "warning")})
    run.add(field("f1", wbcs(2) + rbcs(34) + sickle(0.95, 4, 200)), 1.0)
    assert read() == (("present", None, None), {("sickle_cells_review", "warning")})  # 4 sure of 78: 5 %
    run.add(field("f2", wbcs(2) + rbcs(37) + sickle(0.95, 1, 200)), 1.0)
    assert read() == (("present", None, None), {("sickle_cells_present", "critical")})


# -- durable.py


def test_restored_run_keeps_every_cell_attribute(tmp_path):
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    pairs = (wbcs(10) + rbcs(20, calibrated=False) + [cell(CellKind.RBC, "normal", calibrated=False, unassessed="spherocyte", i=300)]
             + [cell(CellKind.RBC, "sickle", 0.95, calibrated=False, i=200 + i) for i in range(5)]
             + [cell(CellKind.RBC, "normal", d=12.0, edge=True, calibrated=False, i=250)]
             + [cell(CellKind.PLATELET, None, None, detected_as=CellKind.WBC, i=260)])
    run.add(field("f0", pairs), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = state.open_runs()
        for a, b in zip(back.cells, run.cells):
            assert (a.detected_as, a.touches_frame_edge, a.unassessed_label, a.label_score) == \
                   (b.detected_as, b.touches_frame_edge, b.unassessed_label, b.label_score)
        before = run.report(station_id=None, now=1.0, end_reason="restart")
        after = back.report(station_id=None, now=1.0, end_reason="restart")
        assert [(f.code, f.severity) for f in after.flags] == [(f.code, f.severity) for f in before.flags]
        assert after.rbc_morphology == before.rbc_morphology and after.rbc_size == before.rbc_size
    finally:
        outbox.close()



@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "models" / "seg.json").exists(),
                    reason="models/seg.json not present")
def test_a_restored_run_reads_the_confidences_its_live_report_counted(tmp_path):
    """A rendered field of sickle cells analysed, its run stored and taken back (a restart; the run a
    verification reads once it is no longer in memory): every cell's confidence is the one its
    record shows (4 decimals), so a sickle call at 0.79996 is under the critical flag's 0.8 in the
    live report and after, not under it live and 0.8 (sure) once read back from its record."""
    from smearscope.device.synthetic import render_field
    from smearscope.service.analysis.pipeline import Analyzer

    analyzer = Analyzer.from_models_dir(Path(__file__).resolve().parents[1] / "models", warmup=False)
    field = render_field(3, width=640, height=480, microns_per_pixel=0.1, rbc_mix={"normal": 0.6, "sickle": 0.4},
                         n_wbc=1).frame
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    assert run.add(analyzer.analyze(field), 1.0)
    assert all(c.label_score == r.label_score for c, r in zip(run.cells, run.records))
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = state.open_runs()
        assert [c.label_score for c in back.cells] == [c.label_score for c in run.cells]
    finally:
        outbox.close()

def test_edge_cells_stay_out_of_sizes_after_restore(tmp_path):
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    run.add(field("f0", wbcs(2) + rbcs(20) + [cell(CellKind.RBC, "normal", d=12.0, edge=True, i=250)]), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = state.open_runs()
        assert back.report(station_id=None, now=1.0).rbc_size == run.report(station_id=None, now=1.0).rbc_size
    finally:
        outbox.close()


def test_a_restored_run_keeps_its_specimen_id_and_a_file_from_before_gets_the_column(tmp_path):
    """The lab's identifier of the specimen (start_run) is kept with each field's row: a run taken
    back after a restart still names its specimen, in its progress and its report; a file written
    before the column existed gets it, its runs naming none."""
    import sqlite3

    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r", started_by="command", specimen_id="H-2026-0412")
    run.add(field("f0", wbcs(2) + rbcs(5)), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = state.open_runs()
        assert back.specimen_id == "H-2026-0412"
        assert back.report(station_id=None, now=1.0).specimen_id == "H-2026-0412"
    finally:
        outbox.close()
    conn = sqlite3.connect(tmp_path / "o.sqlite3")  # as a file from before: no such column
    conn.execute("ALTER TABLE specimen_fields DROP COLUMN specimen_id")
    conn.commit()
    conn.close()
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        (old,) = StationState(outbox).open_runs()
        assert old.specimen_id is None and old.field_ids == ["f0"]
    finally:
        outbox.close()


def test_a_run_an_earlier_version_went_on_with_is_taken_back_naming_its_specimen(tmp_path):
    """Going back and forth: an earlier version put back takes this version's open run back and
    adds its fields' rows without the specimen id (it knows no such column: NULL); this version,
    started again on the file, takes the run back with every field and still names its specimen,
    as the run's first rows keep it (docs/STATION.md, "Updating a station, and going back")."""
    from smearscope.service.station.durable import RunMeta

    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r", started_by="command", specimen_id="H-1")
    run.add(field("f0", wbcs(2) + rbcs(5)), 1.0)
    later = field("f1", wbcs(3))
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        earlier_versions = RunMeta("r", run.started_at, run.started_by, run.target_wbc)  # no specimen id
        write = state.field_stored(report_id="r-f1", input_key=None, run=earlier_versions, field_id="f1",
                                   cells=list(later.cells), records=list(later.report.cells), models=run.models,
                                   software_version=None)
        outbox.write(lambda conn: write(conn, []))
        assert outbox.read(lambda conn: conn.execute(
            "SELECT field_id, specimen_id FROM specimen_fields ORDER BY position").fetchall()) == [
            ("f0", "H-1"), ("f1", None)]
    finally:
        outbox.close()
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        (back,) = StationState(outbox).open_runs()
        assert back.field_ids == ["f0", "f1"] and back.specimen_id == "H-1"
        assert back.report(station_id=None, now=2.0).specimen_id == "H-1"
    finally:
        outbox.close()


def test_a_run_left_open_that_an_earlier_version_ran_past_is_closed_not_taken_back(tmp_path, caplog):
    """Going back and forth: an earlier version put back could not read this version's open run (a
    report schema it does not know), left its rows in the file and ran the next slide's run to its
    end; this version, started again within the open run's idle timeout, took the open run back and
    the next field (another slide's) joined it (tools.version_switch from 8f8a911 and a return to
    this version: the report named the first specimen with the new field in it). A run closed that
    began after the open run's last field means the slide changed: closed (restart), not taken back."""
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r", started_by="command", specimen_id="H-1")
    run.add(field("f0", wbcs(2)), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (alone,) = state.open_runs()
        assert alone.end_requested is None  # nothing ran after it: taken back, as before
        last_field = alone.last_activity
        later = SpecimenRun(target_wbc=100, started_at=last_field + 30.0, run_id="later")
        later.add(field("g0", wbcs(2)), last_field + 40.0)
        store_run(state, outbox, later, "later")
        report = later.report(station_id=None, now=last_field + 50.0, end_reason="shutdown")
        outbox.write(lambda conn: state.run_closed(report)(conn, []))
        with caplog.at_level(logging.WARNING, logger="smearscope.service.station.durable"):
            (left,) = state.open_runs()
        assert left.run_id == "r" and left.end_requested == "restart"
        clock = FakeClock()
        clock.now = last_field + 60.0  # within the idle timeout of the run's last field
        t = tracker(target=100, idle=3600.0, clock=clock)
        assert t.resume_one([left]) == [left] and t.open_run() is None
        assert t.final_report(left, left.end_requested).specimen_id == "H-1"
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("run r, left open, was followed by run later, begun 30 s after its last field")
    finally:
        outbox.close()


def test_restored_fields_keep_arrival_order(tmp_path):
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    for fid in ("f9", "f10", "a1"):
        run.add(field(fid, wbcs(1)), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = state.open_runs()
        assert back.field_ids == ["f9", "f10", "a1"]
    finally:
        outbox.close()


def test_a_stored_input_is_remembered(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        assert state.stored_field("k1") is None
        for k in ("k1", "k2"):
            w = state.field_stored(report_id="r-" + k, input_key=k, run=None, field_id="f-" + k, cells=[], records=[],
                                   models={}, software_version=None)
            outbox.write(lambda conn, w=w: w(conn, []))
        assert (state.stored_field("k1"), state.stored_field("k2"), state.stored_field("k3")) == ("f-k1", "f-k2", None)
        # taken for analysis and not stored yet: a copy that comes meanwhile is one too, until it fails
        state.taken("k3", "scope:a.png@1")
        assert state.stored_field("k3") == "scope:a.png@1"
        state.released("k3")
        assert state.stored_field("k3") is None
    finally:
        outbox.close()
    assert same_file("scope:a@b.png@111", "scope:a@b.png@222") and same_file("", "scope:x.png@1")
    assert not same_file("scope:a@b.png@111", "scope:a@c.png@111")


def test_a_field_stored_with_a_format_character_in_its_name_is_the_same_file_when_found_again(tmp_path):
    """A watched-folder file named with U+202E whose field an earlier version stored (its frame id
    carried the character as it is), found again after the upgrade (a crash before the move, or a
    move that failed): its frame id now shows \\u202e, and it is still this very file (skipped,
    moved to done), not a copy of it (rejected as duplicate_content)."""
    src = _folder(tmp_path, decode_grace_s=0.0)
    (src._root / "a\u202egnp.png").write_bytes(_png(1))
    frame = src.scan_once()
    assert frame is not None and frame.input_key is not None and "\\u202e" in frame.frame_id
    earlier = frame.frame_id.replace("\\u202e", "\u202e")  # as the earlier version stored it
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        w = state.field_stored(report_id="r1", input_key=frame.input_key, run=None, field_id=earlier, cells=[],
                               records=[], models={}, software_version=None)
        outbox.write(lambda conn: w(conn, []))
        stored = state.stored_field(frame.input_key)
        assert stored == earlier and same_file(stored, frame.frame_id)
        other = frame.frame_id.replace("a\\u202egnp", "b\\u202egnp")  # another name: a copy still
        assert not same_file(stored, other)
    finally:
        outbox.close()
        src.close()


def test_the_inputs_remembered_are_bounded_newest_kept(tmp_path, monkeypatch):
    """A watched folder fed for months: the station remembers its last MAX_INPUTS inputs, not
    every file it ever analysed (the outbox file would grow without end); the newest are the ones
    a crash or a copy can bring back."""
    from smearscope.service.station import durable

    monkeypatch.setattr(durable, "MAX_INPUTS", 3)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        keys = [f"k{i}" for i in range(6)]
        for k in keys:
            w = state.field_stored(report_id="r-" + k, input_key=k, run=None, field_id="f-" + k, cells=[], records=[],
                                   models={}, software_version=None)
            outbox.write(lambda conn, w=w: w(conn, []))
        assert [state.stored_field(k) for k in keys] == [None, None, None, "f-k3", "f-k4", "f-k5"]
        assert outbox.read(lambda conn: conn.execute("SELECT COUNT(*) FROM station_inputs").fetchone()[0]) == 3
    finally:
        outbox.close()


@contextlib.contextmanager
def _closed_run_stored(tmp_path):
    """A run of two white cells stored field by field and closed, in an outbox: (outbox, state)."""
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    run.add(field("f0", wbcs(2)), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        rep = run.report(station_id=None, now=1.0, end_reason="stopped")
        outbox.write(lambda conn: state.run_closed(rep)(conn, []))
        yield outbox, state
    finally:
        outbox.close()


def test_unreadable_closed_run_fields_do_not_stop_the_station(tmp_path):
    with _closed_run_stored(tmp_path) as (outbox, state):
        outbox.write(lambda conn: conn.execute("UPDATE specimen_fields SET cells = '[{\"kind\": \"alien\"}]'"))
        assert state.closed_runs() == []


def test_closed_report_is_stored_without_cells(tmp_path):
    with _closed_run_stored(tmp_path) as (_, state):
        (kept,) = state.closed_runs()
        assert kept.report.cells == [] and len(kept.run.records) == 2


# -- fhir
@pytest.mark.parametrize("code", ["rbc_size_implausible", "calibration_suspect"])
def test_sizes_of_a_calibration_in_doubt_are_not_read(code):
    """With rbc_size_implausible (a calibration no blood fits) or calibration_suspect (the red
    cells point to another scale) the diameters and the size-based morphology are not assessable:
    the FHIR diameter has a dataAbsentReason, a spherocyte share no grade, the dashboard's grades
    say so; shape classes keep theirs."""
    flag = Flag(code=code, severity="warning", message="median 15.0 um")
    plain, odd = graded_report(), graded_report([flag])
    assert report_view.rbc_grades(plain)["spherocyte"] != report_view.NOT_ASSESSABLE
    grades = report_view.rbc_grades(odd)
    assert grades["spherocyte"] == report_view.NOT_ASSESSABLE and grades["schistocyte"] != report_view.NOT_ASSESSABLE
    bundle = report_bundle(odd)
    validate(bundle)
    diameter = by_code(bundle, codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert "dataAbsentReason" in diameter and "valueQuantity" not in diameter
    assert "valueQuantity" in by_code(report_bundle(plain), codes.LOCAL_OBSERVATION, "rbc-diameter")
    # and the lines a technician reads
    from smearscope.cli.summary import summarize

    assert "RBC diameter" in summarize(plain) and "RBC diameter" not in summarize(odd)
    assert ("RBC spherocyte 60, macrocyte 0, microcyte 0: not assessable with a calibration in doubt "
            "(60 of 1000 red cells, left out of the shares above)") in summarize(odd), summarize(odd)
    # every size-based class not assessable, whether or not a cell was given it (the report has a
    # spherocyte row only): none reads as "none seen"
    for label in ("microcyte", "macrocyte", "spherocyte"):
        loinc = codes.RBC_LOINC[label].code
        seen = by_code(bundle, codes.LOINC, loinc)
        assert seen["dataAbsentReason"]["coding"][0]["code"] == "size-not-assessable", label
        assert "valueCodeableConcept" not in seen and "valueQuantity" not in seen, label
        assert component(seen, "count")["valueInteger"] == (60 if label == "spherocyte" else 0), label
        assert grades[label] == report_view.NOT_ASSESSABLE, label
    assert "dataAbsentReason" not in by_code(report_bundle(plain), codes.LOINC, "802-9")


def test_effective_is_the_run_start():
    b = report_bundle(graded_report())          # created 2e9, run_ms 60 000
    dr = b["entry"][0]["resource"]
    assert dr["effectiveDateTime"] == "2033-05-18T03:32:20.000+00:00" and dr["issued"] == "2033-05-18T03:33:20.000+00:00"


def test_conclusion_lists_flags_critical_first_also_when_verified():
    flags = [Flag(code="i", severity="info", message="info-msg"), Flag(code="w", severity="warning", message="warn-msg"),
             Flag(code="c", severity="critical", message="crit-msg")]
    rep = graded_report(flags)
    dr = report_bundle(rep)["entry"][0]["resource"]
    assert dr["conclusion"].index("crit-msg") < dr["conclusion"].index("warn-msg") < dr["conclusion"].index("info-msg")
    assert [c["coding"][0]["code"] for c in dr["conclusionCode"]] == ["c", "w", "i"]
    v = rep.model_copy(update={"verification": Verification(verified_by="AB", verified_at=1.0, supersedes="r-0",
                                                             typed_cells=1, reclassified=[])})
    assert "critical: crit-msg" in report_bundle(v)["entry"][0]["resource"]["conclusion"]


def test_device_names_the_station():
    (dev,) = resources(report_bundle(graded_report()), "Device")
    assert dev["identifier"][0] == {"system": codes.ID_STATION, "value": "lab-7"}
    assert [i["system"] for i in dev["identifier"]] == [codes.ID_STATION, codes.ID_DEVICE]


def test_denominators_and_counts():
    b = report_bundle(current_report())          # counts rbc 1000, wbc 105, nrbc 5
    assert component(by_code(b, codes.LOINC, "770-8"), "denominator")["valueInteger"] == 105
    assert component(by_code(b, codes.LOINC, "800-3"), "denominator")["valueInteger"] == 1000
    assert component(by_code(b, codes.LOINC, "738-5"), "count")["valueInteger"] == 7


def test_normal_is_not_a_finding():
    b = report_bundle(graded_report())
    assert not any(c["code"] == "normal" for o in resources(b, "Observation") for c in o["code"]["coding"])


def test_unidentified_red_cells_carry_their_share():
    rep = graded_report()
    rep = rep.model_copy(update={"rbc_morphology": [*rep.rbc_morphology, ClassShare(label="unidentified", count=20, percent=2.0)]})
    obs = by_code(report_bundle(rep), codes.LOCAL_OBSERVATION, "rbc-unidentified")
    assert obs["valueQuantity"] == {"value": 2.0, "unit": "%", "system": codes.UCUM, "code": "%"}


def test_size_components_units_and_values():
    size = by_code(report_bundle(graded_report()), codes.LOCAL_OBSERVATION, "rbc-diameter")
    assert component(size, "cv")["valueQuantity"] == {"value": 8.1, "unit": "%", "system": codes.UCUM, "code": "%"}
    assert component(size, "median")["valueQuantity"]["value"] == 7.3
    assert component(size, "sd")["valueQuantity"] == {"value": 0.6, "unit": "um", "system": codes.UCUM, "code": "um"}


def test_only_erythroblasts_is_not_measurable():
    rep = graded_report()
    rep = rep.model_copy(update={"counts": Counts(rbc=10, wbc=3, platelet=0),
                                 "wbc_differential": [ClassShare(label="erythroblast", count=3, percent=100.0)]})
    assert report_view.nrbc_per_100_wbc(rep) is None
    validate(report_bundle(rep))


def test_rbc_grades_say_not_assessable_at_an_estimated_scale():
    flag = Flag(code="size_not_assessable_without_calibration", severity="info", message="estimated")
    g = report_view.rbc_grades(graded_report([flag]))
    assert g["spherocyte"] == "not assessable" and g["schistocyte"] == "2+"


def test_code_tables_match_docs():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FHIR.md").read_text()
    rows = dict(re.findall(r"^\| (\w+)(?: \(\w+\))? \| (\d+-\d) \|", doc, re.MULTILINE))
    for table in (codes.WBC_LOINC, codes.RBC_LOINC):
        for label, code in table.items():
            if label == "echinocyte":
                continue
            assert rows[label] == code.code, label


def test_field_reports_carry_no_run_identifier():
    rep = graded_report().model_copy(update={"kind": "field", "run_id": "run-1"})
    ids = report_bundle(rep)["entry"][0]["resource"]["identifier"]
    assert ids == [{"system": codes.ID_REPORT, "value": "r-1"}]


def test_a_report_says_its_schema_version_and_a_stored_one_of_the_version_before_is_still_read():
    """Reports are "1.3" since their models name their classes ("1.2": they name their software
    version and specimen; "1.1":
    sickle cells read "present"; a consumer holding the 1.0 schema would refuse that grade); a "1.0"
    report kept by a station or a consumer, sickle cells graded 3+, still validates against the
    committed schema, loads, and reads "present" in FHIR."""
    import json

    import jsonschema

    from smearscope.service.analysis.report import SCHEMA_VERSION, ClassShare, Report

    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "report.schema.json").read_text())
    new = current_report()
    assert SCHEMA_VERSION == new.schema_version == "1.5"
    assert any(s.grade == "present" for s in new.rbc_morphology)
    jsonschema.validate(json.loads(new.model_dump_json()), schema)
    old = graded_report()
    graded = ClassShare(label="sickle", count=4, percent=3.51, grade="3+", grade_ci_low="2+", grade_ci_high="3+")
    stored = json.loads(old.model_copy(update={"rbc_morphology": [*old.rbc_morphology, graded]}).model_dump_json())
    stored["schema_version"] = "1.0"
    jsonschema.validate(stored, schema)
    back = Report.model_validate_json(json.dumps(stored))
    assert back.schema_version == "1.0"
    obs = by_code(report_bundle(back), codes.LOINC, "801-1")
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "present"
    stored["schema_version"] = "2.0"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(stored, schema)
    with pytest.raises(ValueError):
        Report.model_validate_json(json.dumps(stored))


def test_a_run_left_open_by_a_newer_version_is_left_out_and_kept_not_a_failed_start(tmp_path, caplog):
    """Downgrade: a run a newer version left open, stored with a key this version's models do
    not know (as this version's manifest_sha256 is to the versions before it), made the start fail
    ("station failed to start", a ValidationError; the unit restarted it every 10 s for ever). It
    is now left out with an error naming it, its rows stay in the file as they are, and the
    readable run left open beside it is taken back."""
    newer, ours = (SpecimenRun(target_wbc=100, started_at=0.0, run_id=r) for r in ("newer", "ours"))
    newer.add(field("f0", wbcs(2)), 1.0)
    ours.add(field("f1", wbcs(3)), 1.0)
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path)
    try:
        state = StationState(outbox)
        store_run(state, outbox, newer, "newer")
        store_run(state, outbox, ours, "ours")

        def a_newer_versions_key(conn: sqlite3.Connection) -> None:
            (models,) = conn.execute("SELECT models FROM specimen_fields WHERE run_id = 'newer'").fetchone()
            models = {k: {**v, "calibration_sha256": "ab" * 32} for k, v in json.loads(models).items()}
            conn.execute("UPDATE specimen_fields SET models = ? WHERE run_id = 'newer'", (json.dumps(models),))

        outbox.write(a_newer_versions_key)
        stored = outbox.read(lambda conn: conn.execute("SELECT * FROM specimen_fields ORDER BY run_id").fetchall())
        with caplog.at_level(logging.ERROR, logger="smearscope.service.station.durable"):
            (back,) = state.open_runs()
        assert back.run_id == "ours" and len(back.cells) == len(ours.cells)
        (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert error.startswith("run newer, left open in ") and "calibration_sha256" in error
        assert outbox.read(lambda conn: conn.execute("SELECT * FROM specimen_fields ORDER BY run_id").fetchall()) \
            == stored
    finally:
        outbox.close()


def test_a_run_left_open_under_other_models_is_closed_at_the_start_not_taken_back(tmp_path, caplog):
    """An update that brings another calibration of a model (its manifest_sha256; the same ONNX
    file): the run left open before it was taken back, and its fields and the next ones made one
    specimen report under the first field's models (seen live: 6 fields of one red-cell calibration
    and 1 of another). Under other models it now ends with the restart; under the same models it
    is taken back as before, also by a version whose models name their classes (schema 1.3) where
    the run was stored without them."""
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    run.add(field("f0", wbcs(3)), 1.0)
    recalibrated = {"seg": MODELS["seg"].model_copy(update={"manifest_sha256": "cd" * 32})}
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (same,) = state.open_runs(MODELS)
        clock = FakeClock()
        clock.now = same.last_activity + 10.0  # within the idle timeout of the run's last field
        assert same.end_requested is None
        assert tracker(target=100, idle=60.0, clock=clock).resume_one([same]) == []  # taken back
        named = {k: v.model_copy(update={"classes": ["rbc", "wbc", "platelet"]}) for k, v in MODELS.items()}
        (upgraded,) = state.open_runs(named)
        assert upgraded.end_requested is None and upgraded.models == named  # goes on under them
        with caplog.at_level(logging.WARNING, logger="smearscope.service.station.durable"):
            (other,) = state.open_runs(recalibrated)
        assert other.end_requested == "restart"
        t = tracker(target=100, idle=60.0, clock=clock)
        assert t.resume_one([other]) == [other] and t.open_run() is None  # to be closed
        assert t.final_report(other, other.end_requested).end_reason == "restart"
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("run r, left open, was analysed with other models than this start's (seg:")
    finally:
        outbox.close()


def test_a_run_stored_before_models_named_their_classes_and_taken_back_lists_every_class_in_its_report(tmp_path):
    """A run left open by the version before schema 1.3 (its fields' models name no classes) is
    taken back by a version whose same models name them: the run goes on under those, so its
    final report names the WBC head's classes and lists one no cell was given at 0 %, as a run
    begun under this version does. It kept the stored models: a 1.3 report without a zero row."""
    head = ModelInfo(name="wbc-v1", sha256="cd" * 32, backend="onnx")
    before = {**MODELS, "wbc_head": head}
    named = {**MODELS, "wbc_head": head.model_copy(update={"classes": ["lymphocyte", "neutrophil"]})}
    run = SpecimenRun(target_wbc=100, started_at=0.0, run_id="r")
    run.add(field_of("f0", wbcs(3), models=before), 1.0)
    outbox = Outbox(tmp_path / "o.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r")
        (back,) = state.open_runs(named)
        assert back.end_requested is None  # taken back, not closed
        assert back.models == named
        clock = FakeClock()
        clock.now = back.last_activity + 10.0
        t = tracker(target=100, idle=60.0, clock=clock)
        assert t.resume_one([back]) == []
        report = t.final_report(back, "stopped")
        rows = {s.label: (s.count, s.percent) for s in report.wbc_differential}
        assert rows == {"neutrophil": (3, 100.0), "lymphocyte": (0, 0.0)}, rows
        assert report.models["wbc_head"].classes == ["lymphocyte", "neutrophil"]
    finally:
        outbox.close()


def test_a_reports_specimen_id_is_held_to_start_runs_bounds_in_the_model_and_the_schema():
    """A consumer validating against the committed schema knows a specimen id is 1 to 64
    characters, as start_run admits them; the model refuses others as well."""
    import json

    from pydantic import ValidationError

    from smearscope.service.analysis.report import MAX_SPECIMEN_ID, Report

    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "report.schema.json").read_text())
    field = next(s for s in schema["properties"]["specimen_id"]["anyOf"] if s.get("type") == "string")
    assert (field["minLength"], field["maxLength"]) == (1, MAX_SPECIMEN_ID) == (1, 64)
    base = current_report()
    assert Report.model_validate({**base.model_dump(), "specimen_id": "H" * 64}).specimen_id == "H" * 64
    for bad in ("", "H" * 65):
        with pytest.raises(ValidationError):
            Report.model_validate({**base.model_dump(), "specimen_id": bad})
