"""The cells awaiting a technician's review, counted in the report (`review`, schema 1.4).

On a real run of rendered fields (the analyzer's heads, the station's review gallery with
`[review] white_cells = "all"`): the preliminary specimen report counts, per kind and reason, the
cells whose labels and flags send them to review (the cells the flags list, the gallery's cells to
review), not the gallery's crops, which with "all" hold every white cell; a verified report counts
those left (0 when all are typed) and the cells typed. A report of schema 1.3 has no count and is
said "not counted", not 0, by `smearscope analyze` and by its FHIR conclusion. The dashboard's line,
on screen and on paper, is in tests/test_dashboard_print.py."""

from __future__ import annotations

import json

import cv2
import pytest
from realdata import needs_models
from test_station_means import _fields
from test_typed_cells import _gallery_cells, _station

from smearscope.cli.summary import summarize
from smearscope.device.frame import Frame
from smearscope.service.analysis.report import Report, ReviewSummary
from smearscope.service.analysis.review_counts import review_reason
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.hl7.oru import oru_r01
from smearscope.service.station.clinic import _left_to_review
from smearscope.service.station.review import needs_review
from smearscope.service.station.specimen import SpecimenRun, cell_keys

pytestmark = needs_models


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    """Six rendered fields (four white cells each) analysed into one run and into the review gallery."""
    tmp = tmp_path_factory.mktemp("review_counts")
    _, analyzer, feed = _station(tmp)
    run = SpecimenRun(run_id="r", started_at=0.0, started_by="command", target_wbc=100)
    fields = []
    try:
        for image, _ in _fields(tmp, range(500, 506)):
            pixels = cv2.imread(str(image))
            result = analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1))
            assert run.add(result, 1.0)
            fields.append(result.report)
            feed.gallery.add_field("r", pixels, result)
    finally:
        analyzer.close()
    yield run, feed, fields
    feed.close()


def _flagged(report: Report, code: str) -> set[int]:
    return {i for f in report.flags if f.code == code for i in (f.cells or [])}


def test_a_preliminary_report_counts_the_cells_its_labels_and_flags_send_to_review(station):
    run, feed, fields = station
    report = run.report(station_id="s", now=2.0, end_reason="stopped")
    rv, cells = report.review, report.cells
    assert rv is not None and report.verification is None and rv.reviewed == 0
    kinds = lambda kind, test: sum(c.kind == kind and test(c) for c in cells)
    assert rv.wbc_unidentified == kinds("wbc", lambda c: c.label == "unidentified" and not c.atypical)
    assert rv.wbc_atypical == kinds("wbc", lambda c: c.atypical)
    assert rv.wbc_rare == kinds("wbc", lambda c: c.label == "ig")
    assert rv.nrbc == report.counts.nrbc == len(_flagged(report, "nucleated_rbc_present"))
    assert rv.rbc_unidentified == kinds("rbc", lambda c: c.label == "unidentified")
    sickle = {i for i, c in enumerate(cells) if c.kind == "rbc" and c.label == "sickle"}
    schisto = {i for i, c in enumerate(cells) if c.kind == "rbc" and c.label == "schistocyte"}
    assert rv.rbc_flagged == len(sickle) + len(schisto)
    # the cells the flags list for review are those counted
    assert _flagged(report, "sickle_cells_review") | _flagged(report, "sickle_cells_present") == sickle
    unidentified_wbc = {i for i, c in enumerate(cells) if c.kind == "wbc" and c.label == "unidentified"}
    if any(f.code == "atypical_wbc_present" for f in report.flags):
        assert _flagged(report, "atypical_wbc_present") == unidentified_wbc
    assert rv.cells == sum(needs_review(c) is not None for c in cells) == (
        rv.wbc_unidentified + rv.wbc_atypical + rv.wbc_rare + rv.nrbc + rv.rbc_unidentified + rv.rbc_flagged)
    # a run with white cells and red cells to review, some white cells typed with confidence
    assert rv.wbc_unidentified + rv.wbc_atypical > 0 and rv.rbc_flagged > 0, rv
    assert kinds("wbc", lambda c: needs_review(c) is None) > 0
    # the gallery's crops ([review] white_cells = "all") are every white cell besides: not the count
    crops, _ = _gallery_cells(feed, "r")
    assert len(crops) > rv.cells
    assert sum(review_reason(c["kind"], c["label"], c["atypical"]) is not None for c in crops) == rv.cells
    # each field report counts its own cells: together, the run's
    assert sum(r.review.cells for r in fields) == rv.cells
    white = rv.wbc_unidentified + rv.wbc_atypical + rv.wbc_rare
    text = summarize(report)
    assert f"  Preliminary: {white} white cell{'s' if white != 1 else ''}" in text, text
    assert f"{rv.rbc_flagged + rv.rbc_unidentified} red cell" in text and "await review (" in text, text
    conclusion = report_bundle(report)["entry"][0]["resource"]["conclusion"]
    assert conclusion.startswith(f"Preliminary, machine result; a qualified person must review it. {white} white "), conclusion
    # the HL7 message carries the conclusion in its NTE
    notes = [s.split("|")[3] for s in oru_r01(report).split("\r") if s.startswith("NTE|")]
    assert any(f"{white} white cell" in n and "await review" in n for n in notes), notes


def test_the_summary_says_the_counts_in_the_words_of_the_printed_report():
    """`smearscope analyze` says them as the dashboard's card does (tests/test_dashboard_print.py)."""
    from test_dashboard import _specimen

    waiting = ReviewSummary(cells=44, wbc_unidentified=38, wbc_atypical=3, wbc_rare=0, nrbc=0, rbc_unidentified=0,
                            rbc_flagged=3)
    report = _specimen("ward-p", "run-p", [], 1.0).model_copy(update={"review": waiting})
    assert ("  Preliminary: 41 white cells and 3 red cells await review (38 white cells unidentified, 3 white cells "
            "atypical, 3 red cells called sickle or schistocyte)") in summarize(report).splitlines()
    one = waiting.model_copy(update={"cells": 1, "wbc_unidentified": 0, "wbc_atypical": 0, "rbc_flagged": 0, "nrbc": 1})
    assert "  Preliminary: 1 nucleated red cell awaits review (1 nucleated red cell)" in summarize(
        report.model_copy(update={"review": one})).splitlines()


def test_a_verified_report_counts_the_cells_left_and_those_typed(station):
    run, _, _ = station
    keys = list(cell_keys(run.records))
    review = [(key, rec) for key, rec in zip(keys, run.records) if needs_review(rec) is not None]
    # a technician confirms the sickle call and the erythroblast (their labels still send cells to
    # review: typed, they await nothing) and types the white cells lymphocytes
    confirm = {"rbc": ("rbc", "sickle"), "nrbc": ("wbc", "erythroblast"), "wbc": ("wbc", "lymphocyte")}
    types = {key: ("rbc", rec.label) if rec.kind == "rbc" else confirm[rec.kind] for key, rec in review}
    assert {rec.kind for _, rec in review} == {"wbc", "nrbc", "rbc"}
    every, _, typed = run.verified(types)
    signed = every.report(station_id="s", now=3.0, end_reason="stopped")
    assert typed == len(review) > 0
    assert signed.review.cells == 0 == _left_to_review(run, types) and signed.review.reviewed == typed
    assert "Verified: every cell sent to review was typed; " + str(typed) + " typed by a technician" in summarize(
        signed.model_copy(update={"verification": _signature(typed, 0)}))
    some = dict(list(types.items())[: len(types) // 2])
    half, _, typed = run.verified(some)
    left = half.report(station_id="s", now=3.0, end_reason="stopped").review
    assert left.cells == _left_to_review(run, some) == len(review) - len(some) > 0 and left.reviewed == typed


def _signature(typed: int, left: int):
    from smearscope.service.analysis.report import Verification

    return Verification(verified_by="AB", verified_at=3.0, supersedes="r-0", typed_cells=typed, reclassified=[],
                        left_to_review=left)


def test_a_report_of_schema_1_3_reads_not_counted_not_zero(station):
    run, _, _ = station
    stored = json.loads(run.report(station_id="s", now=2.0, end_reason="stopped").model_dump_json())
    del stored["review"]
    stored["schema_version"] = "1.3"
    old = Report.model_validate_json(json.dumps(stored))
    assert old.review is None
    text = summarize(old)
    assert "  Cells awaiting review: not counted (report schema 1.3)" in text.splitlines(), text
    assert "await review" not in text
    assert "await" not in report_bundle(old)["entry"][0]["resource"]["conclusion"]
