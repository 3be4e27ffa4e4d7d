"""A technician verifies a closed run: its report again, with the types they gave its cells.

`SpecimenRun.verified` on real analyses of rendered fields (the cells mapped by field and index,
the differential recounted, the analyzer's label kept for audit, the run itself untouched), and
the verified report's FHIR bundle (final, signed). The command end to end, from the dashboard,
is in tests/test_dashboard.py."""

from __future__ import annotations

import cv2
import pytest
from test_fhir import validate
from test_station_means import _fields
from test_typed_cells import _station

from smearscope.device.frame import Frame
from smearscope.service.analysis.report import Verification
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.station.specimen import SpecimenRun


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    _, analyzer, _ = _station(tmp)
    out = SpecimenRun(run_id="r", started_at=0.0, started_by="command", target_wbc=100)
    try:
        for image, _ in _fields(tmp, range(500, 504)):
            pixels = cv2.imread(str(image))
            assert out.add(analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1)), 1.0)
    finally:
        analyzer.close()
    return out


def _count(report, label) -> int:
    return next((s.count for s in report.wbc_differential if s.label == label), 0)


def test_typed_cells_are_counted_as_typed_and_the_analyzers_label_is_kept(run):
    # the second white cell of the third field (its index in that field's report), and one typed as the analyzer had it
    third = run.field_ids[2]
    in_field = [r for r in run.records if r.field_id == third]
    wbc = [k for k, r in enumerate(in_field) if r.kind == "wbc" and r.label is not None]
    assert len(wbc) >= 2
    k, same = wbc[1], wbc[0]
    before = run.report(station_id=None, now=2.0, end_reason="stopped")
    new = "basophil" if in_field[k].label != "basophil" else "eosinophil"
    verified, changed, typed = run.verified({(third, k): new, (third, same): in_field[same].label})
    assert typed == 2 and [(c.field_id, c.cell, c.machine_label, c.label) for c in changed] == [
        (third, k, in_field[k].label, new)]
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    g = run.records.index(in_field[k])
    assert after.cells[g].label == new and after.cells[g].machine_label == in_field[k].label
    assert after.cells[g].atypical is False
    assert _count(after, new) == _count(before, new) + 1
    # the cell counted as classified now, whatever the analyzer made of it
    assert verified.classified_wbc == run.classified_wbc + (in_field[k].label == "unidentified")
    # the run itself is untouched
    assert run.records[g].label == in_field[k].label and run.cells[g].label == in_field[k].label
    # typed again: the analyzer's label stays the one recorded; typed back to it, no longer reclassified
    again, changed2, _ = verified.verified({(third, k): "monocyte" if new != "monocyte" else "neutrophil"})
    assert again.records[g].machine_label == in_field[k].label and changed2[0].machine_label == in_field[k].label
    back, changed3, _ = verified.verified({(third, k): in_field[k].label})
    assert changed3 == [] and back.records[g].machine_label is None and back.records[g].label == in_field[k].label


def test_a_verified_reports_bundle_is_final_and_signed(run):
    report = run.report(station_id="s1", now=2.0, end_reason="stopped")
    assert report_bundle(report)["entry"][0]["resource"]["status"] == "preliminary"
    verified = report.model_copy(update={"verification": Verification(
        verified_by="AB", verified_at=3.0, supersedes="r-0", typed_cells=2, reclassified=[])})
    bundle = report_bundle(verified)
    validate(bundle)
    dr = bundle["entry"][0]["resource"]
    assert dr["status"] == "final" and dr["performer"] == [{"display": "AB"}]
    assert "Verified by AB" in dr["conclusion"] and "r-0" in dr["conclusion"]
    assert all(e["resource"]["status"] == "final" for e in bundle["entry"]
               if e["resource"]["resourceType"] == "Observation")
