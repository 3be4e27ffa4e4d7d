"""Red cells too blurred to judge their shape: the field's morphology is not graded, its red cells
still counted, and a specimen grades morphology on its sharp fields only (service.analysis.rbc_focus)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import pytest
from test_fhir import resources
from test_specimen import cell_pair, field_of, tracker

from smearscope.cli.summary import summarize
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.aggregate import aggregate
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.rbc_focus import MAX_EDGE_WIDTH_UM, RBC_OUT_OF_FOCUS
from smearscope.service.analysis.records import CellKind
from smearscope.service.analysis.report import Flag, Report
from smearscope.service.config.analysis import AnalysisConfig
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.station.durable import _cell_from_json, _cell_json

ROOT = Path(__file__).resolve().parents[1]
needs_models = pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")


@pytest.fixture(scope="module")
def analyzer():
    a = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    yield a
    a.close()


@needs_models
def test_a_rendered_field_blurred_by_a_micrometre_is_not_graded_and_the_sharp_one_is(analyzer):
    f = render_field(931, width=1024, height=768, microns_per_pixel=0.1, n_wbc=2)
    at = lambda px: type(f.frame)(pixels=px, frame_id="x", source="t", microns_per_pixel=0.1)
    sharp = analyzer.analyze(at(f.frame.pixels)).report
    blurred = analyzer.analyze(at(cv2.GaussianBlur(f.frame.pixels, (0, 0), 1.0 / 0.1))).report  # SD 1 um
    assert sharp.rbc_focus is not None and sharp.rbc_focus.judged and sharp.rbc_focus.cells >= 10
    assert sharp.rbc_focus.edge_width_um is not None and sharp.rbc_focus.edge_width_um < MAX_EDGE_WIDTH_UM
    assert RBC_OUT_OF_FOCUS not in {fl.code for fl in sharp.flags}
    assert all(s.assessable for s in sharp.rbc_morphology) and any(s.grade for s in sharp.rbc_morphology)
    focus = blurred.rbc_focus
    assert focus is not None and not focus.judged and focus.edge_width_um > MAX_EDGE_WIDTH_UM
    assert {fl.code: fl.severity for fl in blurred.flags}[RBC_OUT_OF_FOCUS] == "warning"
    assert blurred.counts.rbc > 0 and blurred.rbc_morphology  # counted, rows kept for audit
    assert all(not s.assessable and s.grade is None for s in blurred.rbc_morphology)
    assert sum(s.count for s in blurred.rbc_morphology) == blurred.counts.rbc
    assert "RBC morphology not assessable: the red cells were too blurred" in summarize(blurred)
    absent = [o["dataAbsentReason"]["coding"][0]["code"] for o in resources(report_bundle(blurred), "Observation")
              if "dataAbsentReason" in o]
    assert absent.count("rbc-out-of-focus") == sum(s.label != "normal" for s in blurred.rbc_morphology) > 0
    assert "size-not-assessable" not in absent  # a calibrated scale: sizes are read
    off = Analyzer(analyzer.segmenter, analyzer.rbc_head, analyzer.wbc_head,
                   AnalyzerOptions(rbc_max_edge_width_um=None), analyzer.models)
    ungated = off.analyze(at(cv2.GaussianBlur(f.frame.pixels, (0, 0), 10.0))).report
    assert ungated.rbc_focus.max_edge_width_um is None and ungated.rbc_focus.judged
    assert RBC_OUT_OF_FOCUS not in {fl.code for fl in ungated.flags} and any(s.grade for s in ungated.rbc_morphology)


def _blurred(pairs):
    return [(replace(c, shape_judged=False), r) for c, r in pairs]


def test_blurred_red_cells_are_counted_but_in_no_grade_or_flag():
    targets = [cell_pair(CellKind.RBC, "target", calibrated=True, i=i) for i in range(60)]
    schisto = [cell_pair(CellKind.RBC, "schistocyte", 0.9, calibrated=True, i=60 + i) for i in range(10)]
    agg = aggregate([c for c, _ in _blurred(targets + schisto)])
    assert agg.counts.rbc == 70
    assert {s.label: (s.count, s.assessable, s.grade) for s in agg.rbc_morphology} == {
        "target": (60, False, None), "schistocyte": (10, False, None)}
    assert "schistocytes_present" not in {f.code for f in agg.flags}


def test_a_specimen_grades_morphology_on_its_sharp_fields_and_says_how_many_were_left_out():
    def run(blurred_fields: set[int]) -> Report:
        t = tracker(target=1000)
        run_id = t.run_for_next_field()
        for i in range(3):
            label = "target" if i in blurred_fields else "normal"
            pairs = [cell_pair(CellKind.RBC, label, calibrated=True, i=k) for k in range(100)]
            result = field_of(f"f{i}", _blurred(pairs) if i in blurred_fields else pairs, run_id)
            if i in blurred_fields:
                flag = Flag(code=RBC_OUT_OF_FOCUS, severity="warning", message="blurred")
                result = replace(result, report=result.report.model_copy(update={"flags": [flag]}))
            t.add(result)
        report = t.interim_report()
        assert report is not None
        return report

    some = run({1})
    assert some.counts.rbc == 300
    rows = {s.label: s for s in some.rbc_morphology}
    assert set(rows) == {"normal"} and rows["normal"].percent == 100.0 and rows["normal"].of_cells == 200
    assert rows["normal"].assessable
    flag = {f.code: f for f in some.flags}[RBC_OUT_OF_FOCUS]
    assert flag.severity == "warning" and flag.message.startswith("1 of 3 fields:")
    none_sharp = run({0, 1, 2})
    assert none_sharp.counts.rbc == 300
    assert [(s.label, s.count, s.assessable, s.grade) for s in none_sharp.rbc_morphology] == [("target", 300, False, None)]
    assert {f.code: f for f in none_sharp.flags}[RBC_OUT_OF_FOCUS].message.startswith("3 of 3 fields:")
    assert RBC_OUT_OF_FOCUS not in {f.code for f in run(set()).flags}


def test_a_red_cell_of_a_blurred_field_keeps_its_mark_through_the_durable_store_and_a_technician_judges_it():
    c, r = _blurred([cell_pair(CellKind.RBC, "target")])[0]
    assert not _cell_from_json(_cell_json(c, r), "f0")[0].shape_judged
    legacy = _cell_json(c, r)
    legacy.pop("shape_judged")  # stored before focus was judged
    assert _cell_from_json(legacy, "f0")[0].shape_judged
    t = tracker(target=1000)
    run_id = t.run_for_next_field()
    t.add(field_of("f0", _blurred([cell_pair(CellKind.RBC, "target", i=k) for k in range(5)]), run_id))
    run = t.open_run()
    verified, _, typed = run.verified({("f0", 0): ("rbc", "normal")})
    assert typed == 1 and verified.cells[0].shape_judged and not verified.cells[1].shape_judged


def test_the_station_configs_default_bound_is_the_analyzers():
    assert AnalysisConfig.model_fields["rbc_max_edge_width_um"].default == MAX_EDGE_WIDTH_UM
    assert AnalyzerOptions().rbc_max_edge_width_um == MAX_EDGE_WIDTH_UM
