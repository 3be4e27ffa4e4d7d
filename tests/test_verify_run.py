"""A technician verifies a closed run: its report again, with the types they gave its cells.

`SpecimenRun.verified` on real analyses of rendered fields (the cells mapped by field and index,
the differential recounted, the analyzer's label kept for audit, the run itself untouched), and
the verified report's FHIR bundle (final, signed). The command end to end, from the dashboard,
is in tests/test_dashboard.py."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from realdata import DATA, needs_models
from test_dashboard import needs_chromium
from test_fhir import validate
from test_station_means import _fields
from test_typed_cells import _config_text, _station

from smearscope.device.frame import Frame
from smearscope.service.analysis.aggregate import AggregateThresholds
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.records import CellKind
from smearscope.service.analysis.report import Verification, software_version
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.station.clinic import _left_to_review
from smearscope.service.station.review import needs_review
from smearscope.service.station.specimen import ClosedRun, SpecimenRun, cell_keys
from smearscope.service.station.typed_cells import TypeableCell


def store_run(state, outbox, r: SpecimenRun, run_id: str) -> None:
    """`r`'s fields written to the station state as the daemon writes them, one outbox write each."""
    from smearscope.service.station.durable import RunMeta

    meta = RunMeta(run_id, r.started_at, r.started_by, r.target_wbc, r.specimen_id)
    for fid in r.field_ids:
        idx = [i for i, rec in enumerate(r.records) if rec.field_id == fid]
        w = state.field_stored(report_id=f"{run_id}-{fid}", input_key=None, run=meta, field_id=fid,
                               cells=[r.cells[i] for i in idx], records=[r.records[i] for i in idx],
                               models=r.models, software_version=dict(zip(r.field_ids, r.field_software)).get(fid))
        outbox.write(lambda conn, w=w: w(conn, []))


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    """A run of four rendered fields, and the station's clinic feed (typing on)."""
    tmp = tmp_path_factory.mktemp("verify")
    _, analyzer, feed = _station(tmp)
    out = SpecimenRun(run_id="r", started_at=0.0, started_by="command", target_wbc=100)
    try:
        for image, _ in _fields(tmp, range(500, 504)):
            pixels = cv2.imread(str(image))
            assert out.add(analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=0.1)), 1.0)
    finally:
        analyzer.close()
    yield out, feed
    feed.close()


@pytest.fixture(scope="module")
def run(station):
    return station[0]


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
    verified, changed, typed = run.verified({(third, k): ("wbc", new), (third, same): ("wbc", in_field[same].label)})
    assert typed == 2 and [(c.field_id, c.cell, c.machine_label, c.label) for c in changed] == [
        (third, k, in_field[k].label, new)]
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    g = run.records.index(in_field[k])
    assert after.cells[g].label == new and after.cells[g].machine_label == in_field[k].label
    assert after.cells[g].atypical is False
    assert _count(after, new) == _count(before, new) + 1
    # the signed report names the software that made it, as the preliminary one does
    assert after.software_version == before.software_version == software_version() != "(not installed)"
    # the cell counted as classified now, whatever the analyzer made of it
    assert verified.classified_wbc == run.classified_wbc + (in_field[k].label == "unidentified")
    # the run itself is untouched
    assert run.records[g].label == in_field[k].label and run.cells[g].label == in_field[k].label
    # typed as the analyzer had it: typed, not reclassified
    same_run, changed3, typed3 = run.verified({(third, k): ("wbc", in_field[k].label)})
    assert changed3 == [] and typed3 == 1 and same_run.records[g].machine_label is None


def test_a_verified_reports_bundle_is_final_and_signed(run):
    report = run.report(station_id="s1", now=2.0, end_reason="stopped")
    assert report_bundle(report)["entry"][0]["resource"]["status"] == "preliminary"
    verified = report.model_copy(update={"verification": Verification(
        verified_by="AB", verified_at=3.0, supersedes="r-0", typed_cells=2, reclassified=[])})
    bundle = report_bundle(verified)
    validate(bundle)
    dr = bundle["entry"][0]["resource"]
    (practitioner,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Practitioner"]
    assert dr["status"] == "final" and dr["performer"] == [{"reference": practitioner["fullUrl"], "display": "AB"}]
    # both versions of the run's report carry its run id
    assert {"system": codes.ID_RUN, "value": "r"} in dr["identifier"]
    assert {"system": codes.ID_RUN, "value": "r"} in report_bundle(report)["entry"][0]["resource"]["identifier"]
    assert "Verified by AB" in dr["conclusion"] and "r-0" in dr["conclusion"]
    assert all(e["resource"]["status"] == "final" for e in bundle["entry"]
               if e["resource"]["resourceType"] == "Observation")


def _a_white_cell_typed_anew(run) -> tuple[str, int, str]:
    """The first classified white cell of the run's third field: the field, its index in that field's report,
    and a class the analyzer did not give it (basophil, or eosinophil for a basophil)."""
    third = run.field_ids[2]
    in_field = [r for r in run.records if r.field_id == third]
    k = next(k for k, r in enumerate(in_field) if r.kind == "wbc" and r.label is not None)
    return third, k, "basophil" if in_field[k].label != "basophil" else "eosinophil"


def _results(bundle) -> dict[str, dict]:
    """The bundle's Observations by their result identifier (each has one, none shared)."""
    out = {}
    for e in bundle["entry"]:
        obs = e["resource"]
        if obs["resourceType"] != "Observation":
            continue
        (identifier,) = [i for i in obs["identifier"] if i["system"] == codes.ID_RESULT]
        assert identifier["value"] not in out
        out[identifier["value"]] = obs
    return out


def test_a_verified_and_an_amended_report_update_the_preliminary_results_never_add_copies(run):
    """A verified report is a new report (new report id, new resource ids); each of its Observations has the
    identifier of the same result in the run's preliminary report, so a FHIR server updating on it (a
    conditional PUT, as the DiagnosticReport on the run id) keeps one neutrophil share per run, now final:
    not the preliminary one beside the verified one. The run's flags keep theirs by code, whatever their place."""
    third, k, new = _a_white_cell_typed_anew(run)
    typed_run, changed, typed = run.verified({(third, k): ("wbc", new)})
    preliminary = run.report(station_id="s1", now=2.0, end_reason="stopped")
    verified = typed_run.report(station_id="s1", now=3.0, end_reason="stopped")
    verified = verified.model_copy(update={"verification": Verification(
        verified_by="AB", verified_at=3.0, supersedes=preliminary.report_id, typed_cells=typed, reclassified=changed)})
    amended = typed_run.report(station_id="s1", now=4.0, end_reason="stopped")
    amended = amended.model_copy(update={"verification": Verification(
        verified_by="CD", verified_at=4.0, supersedes=verified.report_id, typed_cells=typed, reclassified=changed,
        supersedes_verified_by="AB", supersedes_verified_at=3.0)})
    assert len({preliminary.report_id, verified.report_id, amended.report_id}) == 3
    bundles = [report_bundle(r) for r in (preliminary, verified, amended)]
    for bundle in bundles:
        validate(bundle)
    first, *later = (_results(b) for b in bundles)
    assert [b["entry"][0]["resource"]["status"] for b in bundles] == ["preliminary", "final", "corrected"]
    assert any("/flag/" in key for key in first)  # the run's flags are results too
    for results in later:
        assert set(results) == set(first)  # every result of the run, each once, under the same identifier
        for key, obs in results.items():
            assert obs["code"] == first[key]["code"] and obs["id"] != first[key]["id"]
            assert key.startswith(f"{run.run_id}/")
    # the typed white cell moved a share: the same result, a new value
    share = f"{run.run_id}/wbc/{new}"
    assert later[0][share]["valueQuantity"]["value"] > first[share]["valueQuantity"]["value"]
    # another run's results are other results
    other = run.report(station_id="s1", now=2.0, end_reason="stopped").model_copy(update={"run_id": "r-other"})
    assert not set(_results(report_bundle(other))) & set(first)


def test_a_verified_bundles_conclusion_counts_one_typed_cell_in_the_singular(run):
    third, k, new = _a_white_cell_typed_anew(run)
    _, changed, typed = run.verified({(third, k): ("wbc", new)})
    report = run.report(station_id="s1", now=2.0, end_reason="stopped")
    verified = report.model_copy(update={"verification": Verification(
        verified_by="AB", verified_at=3.0, supersedes="r-0", typed_cells=typed, reclassified=changed)})
    dr = report_bundle(verified)["entry"][0]["resource"]
    assert dr["conclusion"].startswith("Verified by AB: every cell sent to review was typed; 1 typed by a "
                                       "technician; 1 reclassified; replaces report r-0. "), dr["conclusion"]


def test_a_typed_cell_is_counted_where_its_type_belongs(run):
    first = run.field_ids[0]
    in_field = [r for r in run.records if r.field_id == first]
    wbc = [k for k, r in enumerate(in_field) if r.kind == "wbc" and r.label is not None]
    rbc = next(k for k, r in enumerate(in_field) if r.kind == "rbc")
    assert len(wbc) >= 2
    # one of them made a nucleated red cell, as the analyzer counts an erythroblast
    g_nrbc = run.records.index(in_field[wbc[0]])
    cells, records = list(run.cells), list(run.records)
    cells[g_nrbc] = replace(cells[g_nrbc], detection=replace(cells[g_nrbc].detection, kind=CellKind.NRBC),
                            label="erythroblast")
    records[g_nrbc] = records[g_nrbc].model_copy(update={"kind": "nrbc", "label": "erythroblast"})
    base = replace(run, cells=cells, records=records)
    before = base.report(station_id=None, now=2.0, end_reason="stopped")
    g_wbc = base.records.index(in_field[wbc[1]])
    types = {(first, wbc[0]): ("wbc", "lymphocyte"), (first, wbc[1]): ("wbc", "platelet"),
             (first, rbc): ("wbc", "lymphocyte")}
    verified, _, typed = base.verified(types)
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    assert typed == 2  # a white-cell type on a red cell is ignored
    assert after.cells[g_nrbc].kind == "wbc" and after.cells[g_nrbc].label == "lymphocyte"
    assert after.cells[g_wbc].kind == "platelet" and after.cells[g_wbc].label is None
    assert after.cells[g_wbc].machine_label == in_field[wbc[1]].label
    assert verified.cells[g_wbc].detected_as is CellKind.WBC
    assert after.counts.nrbc == before.counts.nrbc - 1 and after.counts.platelet == before.counts.platelet + 1
    assert after.counts.wbc == before.counts.wbc  # one in, one out
    assert _count(after, "lymphocyte") == _count(before, "lymphocyte") + 1
    assert not any(s.label == "platelet" for s in after.wbc_differential)


def test_an_object_typed_artefact_leaves_every_count_but_its_own(run):
    """Debris or a red cell the analyzer called a white cell, and debris it called a red cell: typed
    `artefact`, they leave the WBC count, the differential and the red-cell morphology."""
    keys = list(cell_keys(run.records))
    g = next(i for i, r in enumerate(run.records) if r.kind == "wbc" and r.label not in (None, "unidentified"))
    h = next(i for i, r in enumerate(run.records) if r.kind == "rbc")
    before = run.report(station_id=None, now=2.0, end_reason="stopped")
    verified, changed, typed = run.verified({keys[g]: ("wbc", "artefact"), keys[h]: ("rbc", "artefact")})
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    assert typed == 2 and {((c.field_id, c.cell), c.label) for c in changed} == {(keys[g], "artefact"),
                                                                                (keys[h], "artefact")}
    assert after.counts.artefact == 2 and before.counts.artefact == 0
    assert after.counts.wbc == before.counts.wbc - 1 and after.counts.rbc == before.counts.rbc - 1
    label = run.records[g].label
    assert _count(after, label) == _count(before, label) - 1
    assert sum(s.count for s in after.wbc_differential) == sum(s.count for s in before.wbc_differential) - 1
    assert sum(s.count for s in after.rbc_morphology) == sum(s.count for s in before.rbc_morphology) - 1
    assert after.cells[g].kind == "artefact" and after.cells[g].label is None
    assert after.cells[g].machine_label == label
    validate(report_bundle(after))


def test_verifying_again_starts_from_the_analyzers_run_and_only_the_last_closed_run_moves_the_live_state(station):
    run, feed = station
    first = run.field_ids[1]
    in_field = [r for r in run.records if r.field_id == first]
    k = next(k for k, r in enumerate(in_field) if r.kind == "wbc" and r.label not in (None, "basophil"))
    g = run.records.index(in_field[k])
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
    report = final(run, "stopped")
    feed.run_closed(ClosedRun("r", "stopped", 4, run.classified_wbc, 100, report, run), None)
    store = feed._open_store()
    typing = feed.gallery.typing
    store.put("r", first, k, "basophil", TypeableCell(np.zeros(4, np.float32), np.zeros((1, 4), np.float32),
                                                     in_field[k].label, {}, typing.model_sha256, typing.views, 0.1))
    one, live, answer = feed.verify("r", "AB", final, None)
    assert answer["ok"] and answer["typed_cells"] == 1 and answer["reclassified"] == 1 and live
    # the cells sent to review that were not typed: signed with them, and said so
    to_review = sum(needs_review(r) is not None for r in run.records)
    left = to_review - (needs_review(in_field[k]) is not None)
    assert to_review > 0 and answer["left_to_review"] == left
    # the signed report itself says so, and its FHIR conclusion
    assert one.report.verification.left_to_review == left
    assert f": {left} cells left as the analyzer called them" in report_bundle(one.report)["entry"][0][
        "resource"]["conclusion"]
    g2 = next(i for i, r in enumerate(run.records) if needs_review(r) is not None and r.kind == "wbc" and i != g)
    fid2 = run.records[g2].field_id
    k2 = [i for i, r in enumerate(run.records) if r.field_id == fid2].index(g2)
    store.put("r", fid2, k2, "lymphocyte", TypeableCell(np.zeros(4, np.float32), np.zeros((1, 4), np.float32),
                                                       run.records[g2].label, {}, typing.model_sha256, typing.views, 0.1))
    assert feed.verify("r", "AB", final, None)[2]["left_to_review"] == left - 1  # one of them typed
    assert store.remove("r", fid2, k2)
    assert one.report.cells[g].label == "basophil" and one.report.verification.supersedes == report.report_id
    feed.run_closed(one, None, live)
    assert feed.closed_run("r").report.report_id == one.report.report_id
    # the type removed, verified again: the analyzer's label is back, nothing reclassified
    assert store.remove("r", first, k)
    two, _, answer = feed.verify("r", "AB", final, None)
    assert answer["typed_cells"] == 0 and two.report.verification.reclassified == []
    assert two.report.cells[g].label == in_field[k].label and two.report.cells[g].machine_label is None
    assert two.report.verification.supersedes == one.report.report_id
    # the audit trail: the first signature replaced the analyzer's report, the second amends the first
    assert one.report.verification.supersedes_verified_by is None
    assert (two.report.verification.supersedes_verified_by, two.report.verification.supersedes_verified_at) == (
        "AB", one.report.verification.verified_at)
    first_dr = report_bundle(one.report)["entry"][0]["resource"]
    amended = report_bundle(two.report)
    validate(amended)
    dr = amended["entry"][0]["resource"]
    assert (first_dr["status"], dr["status"]) == ("final", "corrected") and dr["performer"][0]["display"] == "AB"
    assert f"replaces report {one.report.report_id}, verified by AB at " in dr["conclusion"]
    assert all(e["resource"]["status"] == "corrected" for e in amended["entry"]
               if e["resource"]["resourceType"] == "Observation")
    assert _count(two.report, "basophil") == _count(report, "basophil")
    feed.run_closed(two, None, False)
    # a run open, or a later run closed: the retained live state stays theirs
    assert feed.verify("r", "AB", final, "r-open")[1] is False
    assert feed.verify("r-open", "AB", final, "r-open")[2]["error"] == "run_open"
    assert feed.verify("nope", "AB", final, None)[2]["error"] == "unknown_run"
    later = final(run, "stopped").model_copy(update={"run_id": "r2"})
    feed.run_closed(ClosedRun("r2", "stopped", 4, run.classified_wbc, 100, later, run), None)
    assert feed.verify("r", "AB", final, None)[1] is False


def test_a_red_cell_typed_by_the_technician_is_counted_in_the_morphology(run):
    second = run.field_ids[1]
    in_field = [r for r in run.records if r.field_id == second]
    k = next(k for k, r in enumerate(in_field) if r.kind == "rbc" and r.label not in (None, "normal"))
    w = next(k for k, r in enumerate(in_field) if r.kind == "wbc")
    before = run.report(station_id=None, now=2.0, end_reason="stopped")
    verified, changed, typed = run.verified({(second, k): ("rbc", "normal"), (second, w): ("rbc", "normal")})
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    assert typed == 1 and [(c.cell, c.machine_label, c.label) for c in changed] == [(k, in_field[k].label, "normal")]
    rbc_count = lambda r, label: next((s.count for s in r.rbc_morphology if s.label == label), 0)
    assert rbc_count(after, "normal") == rbc_count(before, "normal") + 1
    assert rbc_count(after, in_field[k].label) == rbc_count(before, in_field[k].label) - 1
    assert after.counts == before.counts  # still a red cell


def test_sickle_cells_the_technician_confirms_count_as_sure(run):
    # five red cells typed sickle: confirmed by a person, they raise the critical flag whatever
    # the head's confidence was (its threshold: AggregateThresholds.sickle_min_confidence)
    rbc = [(r.field_id, k) for f in run.field_ids
           for k, r in enumerate([r for r in run.records if r.field_id == f]) if r.kind == "rbc"][:5]
    before = run.report(station_id=None, now=2.0, end_reason="stopped")
    assert "sickle_cells_present" not in {f.code for f in before.flags}
    verified, _, typed = run.verified({key: ("rbc", "sickle") for key in rbc})
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    assert typed == 5 and "sickle_cells_present" in {f.code for f in after.flags if f.severity == "critical"}
    g = [i for i, r in enumerate(after.cells) if r.label == "sickle"]
    assert len(g) >= 5 and all(after.cells[i].label_score == 1.0 for i in g if after.cells[i].machine_label)
    # the signed report says a person confirmed them, and asks no review of the cells they typed
    (flag,) = [f for f in after.flags if f.code == "sickle_cells_present"]
    assert flag.message.startswith(f"{len(g)} sickle cells seen (5 confirmed by a technician"), flag.message
    assert flag.message.endswith(": review the others" if len(g) > 5 else "technician)"), flag.message


def test_a_confirmed_sickle_call_counts_as_sure(run):
    # five red cells the analyzer called sickle, unsure (below the critical flag's confidence):
    # confirmed by the technician with the same type, they count as sure
    rbc = [i for i, r in enumerate(run.records) if r.kind == "rbc"][:5]
    cells, records = list(run.cells), list(run.records)
    for i in rbc:
        cells[i] = replace(cells[i], label="sickle", label_score=0.5)
        records[i] = records[i].model_copy(update={"label": "sickle", "label_score": 0.5})
    base = replace(run, cells=cells, records=records)
    before = base.report(station_id=None, now=2.0, end_reason="stopped")
    assert "sickle_cells_present" not in {f.code for f in before.flags}
    assert "sickle_cells_review" in {f.code for f in before.flags}
    position = {}
    keys = []
    for i, r in enumerate(base.records):
        k = position.get(r.field_id, 0)
        position[r.field_id] = k + 1
        if i in rbc:
            keys.append((r.field_id, k))
    verified, changed, typed = base.verified({key: ("rbc", "sickle") for key in keys})
    after = verified.report(station_id=None, now=3.0, end_reason="stopped")
    assert typed == 5 and changed == []
    assert "sickle_cells_present" in {f.code for f in after.flags if f.severity == "critical"}
    # the analyzer's own sickle calls (this run has some) are still left to review, by name
    others = [r.label_score for r in after.cells if r.label == "sickle" and r.label_score is not None and r.label_score < 1.0]
    n, sure_others = 5 + len(others), sum(score >= AggregateThresholds().sickle_min_confidence for score in others)
    (unsure,) = [f.message for f in before.flags if f.code == "sickle_cells_review"]
    assert unsure == (f"{n} possible sickle cells, {sure_others} at confidence 0.8 or more, fewer than the 5 a critical "
                      "flag needs: review the listed cells")
    (sure,) = [f.message for f in after.flags if f.code == "sickle_cells_present"]
    assert sure == (f"{n} sickle cells seen (5 confirmed by a technician" + (
        f", {sure_others} more at confidence 0.8 or more): review the others" if sure_others else ")")), sure
    assert all(after.cells[i].label_score == 1.0 and after.cells[i].machine_label is None for i in rbc)


def test_a_size_based_type_is_not_taken_at_an_estimated_scale(run):
    f = run.field_ids[0]
    in_field = [r for r in run.records if r.field_id == f]
    k = next(k for k, r in enumerate(in_field) if r.kind == "rbc" and r.label not in (None, "normal", "target"))
    g = run.records.index(in_field[k])
    cells, records = list(run.cells), list(run.records)
    cells[g] = replace(cells[g], size_calibrated=False, unassessed_label="spherocyte")
    records[g] = records[g].model_copy(update={"unassessed_label": "spherocyte"})
    base = replace(run, cells=cells, records=records)
    same, changed, typed = base.verified({(f, k): ("rbc", "microcyte")})
    assert typed == 0 and changed == [] and same.records[g].label == in_field[k].label
    typed_target, changed, typed = base.verified({(f, k): ("rbc", "target")})
    assert typed == 1 and typed_target.records[g].label == "target"
    # the analyzer's unassessed size call goes with its label
    assert typed_target.records[g].unassessed_label is None and typed_target.cells[g].unassessed_label is None
    # a cell to review whose only type does not count is left to review, as the signed report says
    from smearscope.service.station.clinic import _left_to_review

    records[g] = records[g].model_copy(update={"label": "unidentified"})
    cells[g] = replace(cells[g], label="unidentified")
    base = replace(run, cells=cells, records=records)
    left = _left_to_review(base, {})
    assert left >= 1 and _left_to_review(base, {(f, k): ("rbc", "microcyte")}) == left
    assert _left_to_review(base, {(f, k): ("rbc", "target")}) == left - 1


def test_the_last_closed_runs_survive_a_restart_for_verification(run, tmp_path, monkeypatch):
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.durable import KEEP_CLOSED_RUNS, StationState

    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r1")
        assert [o.run_id for o in state.open_runs()] == ["r1"] and state.closed_runs() == []
        report = replace(run, run_id="r1").report(station_id="s", now=5.0, end_reason="stopped")
        outbox.write(lambda conn: state.run_closed(report)(conn, []))
        # closed: no longer open (a restart does not close it again), kept for verification
        assert state.open_runs() == []
        (kept,) = state.closed_runs()
        assert kept.run_id == "r1" and kept.end_reason == "stopped" and kept.report.report_id == report.report_id
        (summary,) = state.closed_runs(cells=False)  # what the daemon starts with: no cells read
        assert summary.run is None and (summary.fields, summary.classified_wbc, summary.target_wbc) == (
            kept.fields, kept.classified_wbc, kept.target_wbc) == (4, run.classified_wbc, run.target_wbc)
        assert [r.label for r in kept.run.records] == [r.label for r in run.records]
        assert all(c.size_calibrated == o.size_calibrated for c, o in zip(kept.run.cells, run.cells))
        # the restored run verifies to the same counts as the analyzer's own
        again = kept.run.report(station_id="s", now=6.0, end_reason="stopped")
        assert again.wbc_differential == report.wbc_differential and again.rbc_morphology == report.rbc_morphology
        assert [(f.code, f.message) for f in again.flags] == [(f.code, f.message) for f in report.flags]
        # a verified report takes the run's place; older runs go, fields and all
        verified = report.model_copy(update={"report_id": "v1"})
        outbox.write(lambda conn: state.run_closed(verified)(conn, []))
        assert [(c.run_id, c.report.report_id) for c in state.closed_runs()] == [("r1", "v1")]
        for k in range(2, KEEP_CLOSED_RUNS + 2):
            store_run(state, outbox, run, f"r{k}")
            later = replace(run, run_id=f"r{k}").report(station_id="s", now=5.0 + k, end_reason="stopped")
            outbox.write(lambda conn, later=later: state.run_closed(later)(conn, []))
        ids = [c.run_id for c in state.closed_runs()]
        assert ids == [f"r{k}" for k in range(2, KEEP_CLOSED_RUNS + 2)]
        left = outbox.read(lambda conn: conn.execute("SELECT COUNT(*) FROM specimen_fields WHERE run_id='r1'").fetchone())
        assert left[0] == 0
        # a clock set back does not make the run just closed the oldest
        yesterday = time.time() - 86_400.0
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: yesterday)
            store_run(state, outbox, run, "late")
            late = replace(run, run_id="late").report(station_id="s", now=1.0, end_reason="stopped")
            outbox.write(lambda conn: state.run_closed(late)(conn, []))
        assert state.closed_runs()[-1].run_id == "late"
        # a kept row this code cannot read: left out, the rest still load
        outbox.write(lambda conn: conn.execute("UPDATE closed_runs SET report = '{\"unknown\": 1}' WHERE run_id = 'late'"))
        assert "late" not in [c.run_id for c in state.closed_runs()] and len(state.closed_runs()) == KEEP_CLOSED_RUNS - 1
    finally:
        outbox.close()


def test_a_run_stopped_before_its_report_was_stored_is_closed_as_stopped_not_taken_back(run, tmp_path):
    """stop_run keeps the run's end at once: a crash (or a full disk) before its report is stored
    leaves it open in the file, and the next start closes it as stopped instead of resuming it."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.durable import StationState
    from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker

    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "r1")
        (left,) = StationState(outbox).open_runs()  # a crash before the stop: taken back
        assert left.end_requested is None
        tracker = SpecimenTracker(SpecimenPolicy(10_000, 1e9, False), clock=lambda: left.last_activity + 1)
        assert tracker.resume_one([left]) == [] and tracker.open_run() is left
        assert state.run_ending("r1", "stopped", "report-of-r1")
        (left,) = StationState(outbox).open_runs()  # a crash after it: closed, for that reason
        assert left.end_requested == "stopped" and state.ending_report_ids() == {"r1": "report-of-r1"}
        tracker = SpecimenTracker(SpecimenPolicy(10_000, 1e9, False), clock=lambda: left.last_activity + 1)
        assert tracker.resume_one([left]) == [left] and tracker.open_run() is None
        assert tracker.final_report(left, left.end_requested or "restart").end_reason == "stopped"
        report = replace(run, run_id="r1").report(station_id="s", now=5.0, end_reason="stopped")
        outbox.write(lambda conn: state.run_closed(report)(conn, []))  # its report stored: the mark goes
        assert outbox.read(lambda conn: conn.execute("SELECT COUNT(*) FROM ending_runs").fetchone()[0]) == 0
        assert outbox.read(lambda conn: conn.execute("SELECT COUNT(*) FROM answered_reports").fetchone()[0]) == 0
        state.run_ending("r0", "stopped", "report-of-r0")  # stopped before any field of it was stored: dropped at open
        # a report id whose run's end an earlier version deleted with the report it stored: dropped at open
        outbox.write(lambda conn: conn.execute("INSERT INTO answered_reports VALUES ('r9', 'report-of-r9')"))
        StationState(outbox)
        assert outbox.read(lambda conn: conn.execute("SELECT COUNT(*) FROM ending_runs").fetchone()[0]) == 0
        assert outbox.read(lambda conn: conn.execute("SELECT COUNT(*) FROM answered_reports").fetchone()[0]) == 0
    finally:
        outbox.close()


def test_with_the_station_state_a_closed_run_is_verified_from_the_database_not_from_memory(station, tmp_path):
    """The daemon hands the clinic `StationState.run_cells`: a closed run's cells stay in the outbox
    file, not in memory, and a verification reads them back; a run whose fields are not all
    stored cannot be verified (its recount would be short)."""
    import tomllib

    from smearscope.service.config import parse_config
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.clinic import ClinicFeed
    from smearscope.service.station.durable import StationState

    run = station[0]
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        store_run(state, outbox, run, "db")
        final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
        report = final(replace(run, run_id="db"), "stopped")
        outbox.write(lambda conn: state.run_closed(report)(conn, []))
        db_feed = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
        db_feed.start(None, [], state.run_cells)
        db_feed.run_closed(ClosedRun("db", "stopped", 4, run.classified_wbc, 100, report, run), None, False)
        kept = db_feed.closed_run("db")
        assert kept.run is None and kept.report.cells == []  # nothing held: the file has them
        assert kept.report.report_id == report.report_id and len(report.cells) > 100
        verified, _, answer = db_feed.verify("db", "AB", final, None)
        assert answer["ok"] and answer["typed_cells"] == 0 and answer["supersedes"] == report.report_id
        assert verified.report.wbc_differential == report.wbc_differential
        assert verified.report.rbc_morphology == report.rbc_morphology
        assert [c.label for c in verified.report.cells] == [c.label for c in report.cells]
        # a run whose last field is not in the file yet (the writer behind): refused, not recounted short
        short = replace(run, field_ids=run.field_ids[:3],
                        records=[r for r in run.records if r.field_id in run.field_ids[:3]])
        short = replace(short, cells=run.cells[:len(short.records)])
        store_run(state, outbox, short, "short")
        behind = final(replace(run, run_id="short"), "stopped")
        outbox.write(lambda conn: state.run_closed(behind)(conn, []))
        db_feed.run_closed(ClosedRun("short", "stopped", 4, run.classified_wbc, 100, behind, run), None, False)
        answer = db_feed.verify("short", "AB", final, None)[2]
        assert answer["error"] == "run_not_stored" and "3 of its 4 fields" in answer["message"]
        assert db_feed.verify("nope", "AB", final, None)[2]["error"] == "unknown_run"
        db_feed.close()
    finally:
        outbox.close()


def test_an_open_runs_field_flags_survive_a_restart_and_an_old_file_opens(run, tmp_path):
    """A field analysed at a guessed scale: the restored run's report still says so. A file written
    before flags were kept gets the column and opens (its rows carry none); its cells, stored
    before whether their scale was calibrated was kept, read as measured at an estimated scale:
    no sizes reported from them, and no size-based type a technician gives them counts."""
    import json
    import sqlite3

    from smearscope.service.analysis.report import Flag
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.durable import RunMeta, StationState

    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as conn:  # the table as an earlier version made it
        conn.execute("CREATE TABLE specimen_fields (run_id TEXT NOT NULL, field_id TEXT NOT NULL, position INTEGER "
                     "NOT NULL, started_at REAL NOT NULL, started_by TEXT NOT NULL, target_wbc INTEGER NOT NULL, "
                     "models TEXT NOT NULL, cells TEXT NOT NULL, stored_at REAL NOT NULL, PRIMARY KEY (run_id, field_id))")
        # a red cell as that version stored it: its record, nothing said of its scale
        g = next(i for i, c in enumerate(run.cells) if c.detection.kind is CellKind.RBC and c.size_calibrated
                 and not c.touches_frame_edge and run.records[i].label not in (None, "microcyte"))
        conn.execute("INSERT INTO specimen_fields VALUES ('r0', 'f', 0, 1.0, 'auto', 100, '{}', ?, 2.0)",
                     (json.dumps([run.records[g].model_dump(mode="json", exclude={"field_id"})]),))
        conn.execute("CREATE TABLE station_inputs (input_key TEXT PRIMARY KEY, report_id TEXT NOT NULL, "
                     "stored_at REAL NOT NULL)")
        conn.execute("INSERT INTO station_inputs VALUES ('k-old', 'r', 1.0)")
    outbox = Outbox(old)
    try:
        state = StationState(outbox)
        assert state.stored_field("k-old") == ""  # stored before fields were kept: taken as the same file
        (restored,) = state.open_runs()
        assert restored.run_id == "r0" and restored.field_flags == {}
        assert [c.size_calibrated for c in restored.cells] == [False]
        sizes = restored.report(station_id="s", now=9.0, end_reason="restart").rbc_size
        assert sizes.n == 1 and sizes.calibrated is False and sizes.mean_diameter_um is None
        assert restored.verified({("f", 0): ("rbc", "microcyte")})[2] == 0  # not counted: no one can judge it
        meta = RunMeta("r1", run.started_at, run.started_by, run.target_wbc)
        fid = run.field_ids[0]
        idx = [i for i, rec in enumerate(run.records) if rec.field_id == fid]
        w = state.field_stored(report_id="x", input_key=None, run=meta, field_id=fid, cells=[run.cells[i] for i in idx],
                               records=[run.records[i] for i in idx], models=run.models,
                               software_version=run.field_software[0],
                               flags=[Flag(code="scale_uncertain", severity="warning", message="searched"),
                                      Flag(code="too_few_wbc_for_differential", severity="info", message="3 WBC")])
        outbox.write(lambda conn: w(conn, []))
        r1 = next(r for r in state.open_runs() if r.run_id == "r1")
        assert r1.field_flags == {"scale_uncertain": ("warning", 1)}
        report = r1.report(station_id="s", now=9.0, end_reason="restart")
        assert any(f.code == "scale_uncertain" and f.message.startswith("1 of 1 field:") for f in report.flags)
    finally:
        outbox.close()


def test_a_run_closed_at_restart_keeps_its_place_is_announced_once_and_can_be_signed(station, tmp_path):
    """At a start the runs closed before come oldest first, the one a crash left open (closed at
    this start) last: it takes the newest place, so a run that closes next pushes out the oldest,
    not it; and only it publishes its retained live state (closed, restart)."""
    import json
    from types import SimpleNamespace

    import tomllib

    from smearscope.service.config import parse_config
    from smearscope.service.station.clinic import ClinicFeed

    run = station[0]
    published = []
    publisher = SimpleNamespace(config=SimpleNamespace(topic_prefix="smearscope"), station_id="s",
                                publish_many=lambda items, also=None, extra=(): published.extend(extra) or [len(published)])
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)

    def closed(run_id: str, end: str) -> ClosedRun:
        r = replace(run, run_id=run_id)
        return ClosedRun(run_id, end, 4, run.classified_wbc, 100, final(r, end), r)

    feed = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    try:
        feed.start(None, [closed("a", "stopped"), closed("b", "stopped"), closed("c", "stopped"),
                          closed("r", "restart")], None, publisher, announce=["r"])
        states = [json.loads(m.payload) for m in published]
        assert [(s["run_id"], s["state"], s["end_reason"]) for s in states] == [("r", "closed", "restart")]
        assert all(m.retain and m.topic == "smearscope/s/run" for m in published)
        feed.run_closed(closed("n", "stopped"), None, live=False)  # the next run ends: the oldest goes
        assert feed.closed_run("a") is None and feed.closed_run("r") is not None
        answer = feed.verify("r", "AB", final, None)[2]
        assert answer["ok"] and answer["run_id"] == "r", answer
    finally:
        feed.close()


def test_get_runs_lists_the_last_closed_runs_newest_first_each_with_its_latest_report(station, tmp_path):
    """What a dashboard shows of runs that are no longer the station's current one: the last 4
    closed, newest first, as closed run states without cells; a verified run's entry carries its
    verified report in the same place; an answer over the message bound leaves the oldest out."""
    import json

    import tomllib

    from smearscope.service.config import parse_config
    from smearscope.service.station.clinic import ClinicFeed
    from smearscope.service.station.commands import COMMAND_NAMES
    from smearscope.service.station.durable import KEEP_CLOSED_RUNS

    run = station[0]
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
    feed = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    try:
        assert feed.get_runs() == {"ok": True, "runs": [], "omitted": 0} and "get_runs" in COMMAND_NAMES
        ids = [f"run-{i}" for i in range(KEEP_CLOSED_RUNS + 2)]
        for i, run_id in enumerate(ids):
            r = replace(run, run_id=run_id, specimen_id=f"H-{i}" if i % 2 else None)
            feed.run_closed(ClosedRun(run_id, "stopped", 4, run.classified_wbc, 100 + i, final(r, "stopped"), r,
                                      started_at=1_764_660_000.0 + i, started_by="command" if i % 2 else "auto",
                                      specimen_id=r.specimen_id, run_seq=i + 1), None)
        answer = feed.get_runs()
        newest = ids[::-1][:KEEP_CLOSED_RUNS]
        assert answer["ok"] and answer["omitted"] == 0 and [s["run_id"] for s in answer["runs"]] == newest
        for s in answer["runs"]:
            assert s["state"] == "closed" and s["end_reason"] == "stopped" and s["report"]["run_id"] == s["run_id"]
            assert s["updated_at"] == s["report"]["created_at"]  # the same answer for the same runs
            assert "cells" not in s["report"] and s["report"]["verification"] is None
            i = ids.index(s["run_id"])
            assert s["progress"] == {"run_id": s["run_id"], "started_by": "command" if i % 2 else "auto",
                                     "started_at": 1_764_660_000.0 + i, "fields": 4,
                                     "classified_wbc": run.classified_wbc, "target_wbc": 100 + i,
                                     "specimen_id": f"H-{i}" if i % 2 else None, "run_seq": i + 1}
            assert s["report"]["specimen_id"] == s["progress"]["specimen_id"]
        # an older run signed: its entry keeps its place and carries the verified report
        older = newest[2]
        verified, live, signed = feed.verify(older, "AB", final, None)
        assert signed["ok"] and not live
        feed.run_closed(verified, None, live)
        again = feed.get_runs()["runs"]
        assert [s["run_id"] for s in again] == newest
        assert again[2]["report"]["report_id"] == signed["report_id"]
        assert again[2]["report"]["verification"]["verified_by"] == "AB"
        assert again[2]["progress"] == answer["runs"][2]["progress"]  # when and by whom it was started
        assert all(s["report"]["verification"] is None for k, s in enumerate(again) if k != 2)
        # a bound that holds two of them: the two newest, the others counted
        feed.max_state_bytes = len(json.dumps(again[:2])) + 256 + 1
        bounded = feed.get_runs()
        assert [s["run_id"] for s in bounded["runs"]] == newest[:2] and bounded["omitted"] == KEEP_CLOSED_RUNS - 2
    finally:
        feed.close()


def test_a_live_run_state_over_the_message_bound_is_not_published(station, tmp_path, caplog):
    """A broker that takes packets of 4 KB at most (`max_packet_size`): a run state over the bound
    it leaves (the topic, properties and envelope need room) is not sent, said in the log, rather
    than have the broker drop the station's connection over it; under the bound it goes out."""
    import json
    from types import SimpleNamespace

    import tomllib

    from smearscope.service.config import parse_config
    from smearscope.service.station.clinic import ClinicFeed

    run = station[0]
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
    published = []
    publisher = SimpleNamespace(config=SimpleNamespace(topic_prefix="smearscope"), station_id="s",
                                publish_many=lambda items, also=None, extra=(): published.extend(extra) or [len(published)])
    r = replace(run, run_id="big")
    closed = ClosedRun("big", "stopped", 4, run.classified_wbc, 100, final(r, "stopped"), r)
    text = _config_text(tmp_path, 'white_cells = "all"')
    small = ClinicFeed(parse_config(tomllib.loads(text + "[mqtt]\nmax_packet_size = 4096\n"), environ={}))
    roomy = ClinicFeed(parse_config(tomllib.loads(text), environ={}))
    try:
        assert small.max_state_bytes == 4096 - 1024
        size = len(json.dumps(small.run_state("big", closed.report, "closed", {}, "stopped")))
        assert small.max_state_bytes < size < roomy.max_state_bytes
        with caplog.at_level("WARNING", logger="smearscope.service.station.clinic"):
            small.run_closed(closed, publisher)
        assert published == [] and any("not sent" in m.getMessage() for m in caplog.records)
        assert small.closed_run("big") is not None  # kept for verification all the same
        roomy.run_closed(closed, publisher)
        (state,) = published
        assert json.loads(state.payload)["run_id"] == "big" and state.retain
    finally:
        small.close()
        roomy.close()


def test_a_connection_that_keeps_dropping_adds_no_copies_of_the_run_state(station, tmp_path):
    """After each reconnect the last run state goes out again, unless its copy still waits in the
    outbox: a connection dropping every second would otherwise fill the outbox with copies that
    push out real field messages."""
    import json
    from types import SimpleNamespace

    import tomllib

    from smearscope.service.config import parse_config
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.clinic import ClinicFeed

    run = station[0]
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
    outbox = Outbox(tmp_path / "o.sqlite3")
    publisher = SimpleNamespace(config=SimpleNamespace(topic_prefix="smearscope"), station_id="s", outbox=outbox,
                                on_reconnected=None,
                                publish_many=lambda items, also=None, extra=(): outbox.put_many(list(extra), also))
    feed = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    try:
        r = replace(run, run_id="a")
        feed.start(None, [ClosedRun("a", "stopped", 4, run.classified_wbc, 100, final(r, "stopped"), r)], None,
                   publisher)  # a start with no run left open: the last closed run's state goes out
        (first,) = outbox.pending(limit=10)
        assert json.loads(first.payload)["run_id"] == "a" and first.retain and first.topic == "smearscope/s/run"
        for _ in range(5):  # reconnects while it still waits: no copy
            publisher.on_reconnected()
        assert [m.seq for m in outbox.pending(limit=10)] == [first.seq]
        outbox.ack(first.seq)  # delivered; the broker may lose it: the next reconnect sends it again
        publisher.on_reconnected()
        (again,) = outbox.pending(limit=10)
        assert again.seq != first.seq and again.payload == first.payload
        # a newer state whose store failed (a full disk): the next reconnect sends it, not skips it
        put_many = publisher.publish_many
        publisher.publish_many = lambda items, also=None, extra=(): (_ for _ in ()).throw(OSError("disk full"))
        b = replace(run, run_id="b")
        feed.run_closed(ClosedRun("b", "stopped", 4, run.classified_wbc, 100, final(b, "stopped"), b), publisher)
        publisher.publish_many = put_many
        publisher.on_reconnected()
        assert [json.loads(m.payload)["run_id"] for m in outbox.pending(limit=10)] == ["a", "b"]
    finally:
        feed.close()
        outbox.close()


def test_a_verification_is_signed_with_a_name_of_1_to_64_printable_characters(tmp_path):
    """verify_run's signature goes into the verified report and its FHIR bundle (performer, conclusion):
    a blank name, one over 64 characters or one holding a control character (DEL too) is refused
    before anything is looked up; a name of 1 to 64 characters, spaces around it, goes on to the run."""
    import threading

    import tomllib

    from smearscope.service.config import parse_config
    from smearscope.service.station.clinic import ClinicFeed
    from smearscope.service.station.commands import MAX_VERIFIED_BY, StationCommands
    from smearscope.service.station.requests import RequestQueue
    from smearscope.service.station.specimen import SpecimenPolicy, SpecimenTracker

    feed = ClinicFeed(parse_config(tomllib.loads(_config_text(tmp_path, 'white_cells = "all"')), environ={}))
    analysis, stop = RequestQueue("requests"), threading.Event()

    def analysis_thread() -> None:  # the analysis thread, serving commands between its fields
        while not stop.is_set():
            analysis.serve_pending()
            stop.wait(0.01)

    owner = threading.Thread(target=analysis_thread, daemon=True)
    owner.start()
    commands = StationCommands(workers=None, tracker=SpecimenTracker(SpecimenPolicy()),  # type: ignore[arg-type]
                               analysis=analysis, status=dict, reload=dict, clinic=feed)
    try:
        def verify(by: str) -> str:
            return commands.handle("verify_run", {"run_id": "nope", "verified_by": by})["error"]

        assert MAX_VERIFIED_BY == 64
        for by in ("AB", " AB ", "A" * 64, " " + "A" * 64 + " ", "Dr. Ana María O'Neil-Lund"):  # checked: on to the run (none here)
            assert verify(by) == "unknown_run", by
        for by in ("", "   ", "\t", "A" * 65, " " + "A" * 64 + "B", "A\x7fB", "AB\x7f", "A\x1fB", "A\nB"):
            assert verify(by) == "bad_arguments", repr(by)
    finally:
        stop.set()
        owner.join(2)
        analysis.close()
        feed.close()


@needs_models
@pytest.mark.realdata
def test_schistocyte_calls_are_sent_to_review_like_sickle_calls():
    """Chula RBC-12 field 119: the RBC head calls red cells of it schistocytes (1 or 2 of 91 with the
    heads committed, ICSH 2+ to 3+, a thrombotic microangiopathy's clue). They were not cells to
    review: the gallery never offered them, and a run signed without anyone seeing them said 'left to
    review: 0' of them."""
    image = DATA / "chula_rbc12" / "Dataset" / "119.jpg"
    if not image.is_file():
        pytest.skip(f"Chula RBC-12 not found under {DATA} (set SMEARSCOPE_DATA)")
    analyzer = Analyzer.from_models_dir(Path(__file__).resolve().parents[1] / "models", warmup=False)
    result = analyzer.analyze(Frame(cv2.imread(str(image)), image.name, str(image)))
    schisto = [i for i, c in enumerate(result.report.cells) if c.label == "schistocyte"]
    assert schisto
    assert all(needs_review(result.report.cells[i]) is not None for i in schisto)
    run = SpecimenRun(run_id="s", started_at=0.0, started_by="command", target_wbc=100)
    assert run.add(result, 1.0)
    unsent = sum(needs_review(r) is not None for r in run.records if r.label != "schistocyte")
    assert _left_to_review(run, {}) == unsent + len(schisto)


def test_a_verified_report_keeps_the_start_its_run_had_when_the_wall_clock_stepped(station):
    """A run's reports give its start as created_at less run_ms (the FHIR bundle's effective time,
    the dashboard's list of runs), run_ms on the monotonic clock. The signed report took the wall
    clock's now less the run's stored start: with the clock set back an hour during a 31 s run and
    the run signed 10 minutes later, run_ms -2 969 000 and an effective time after the report's
    issue. It keeps the start of the report it supersedes."""
    run, feed = station
    moved = replace(run, run_id="r-clock", started_at=10_000.0)  # its start on the wall clock of then
    stopped_at = 10_000.0 + 31.0 - 3600.0  # the wall clock set back an hour during its 31 s
    report = moved.report(station_id="s", now=stopped_at, end_reason="stopped", elapsed_s=31.0)
    feed.run_closed(ClosedRun("r-clock", "stopped", 4, moved.classified_wbc, 100, report, moved), None, live=False)
    final = lambda r, end: r.report(station_id="s", now=stopped_at + 600.0, end_reason=end)  # signed 10 min on
    signed, _, answer = feed.verify("r-clock", "AB", final, None)
    assert answer["ok"] and signed.report.timing_ms["run_ms"] == 631_000.0

    def diagnostic(r) -> dict:
        return next(e["resource"] for e in report_bundle(r)["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")

    assert diagnostic(signed.report)["effectiveDateTime"] == diagnostic(report)["effectiveDateTime"]
    assert diagnostic(signed.report)["effectiveDateTime"] < diagnostic(signed.report)["issued"]
    # signed again: the same start still
    feed.run_closed(signed, None, False)
    again, _, _ = feed.verify("r-clock", "AB", lambda r, end: r.report(station_id="s", now=stopped_at + 900.0,
                                                                     end_reason=end), None)
    assert again.report.timing_ms["run_ms"] == 931_000.0


def test_a_verified_report_signed_after_the_wall_clock_was_set_back_never_lasts_less_than_nothing(station):
    """The signed report's run_ms is the superseded report's plus the wall clock's time between
    them: with the clock set back an hour after the preliminary report (a 31 s run signed 10
    minutes on) that was 31 s - 50 min, a negative run_ms and a FHIR effective time after the
    report's issue. It is 0 there, as for a run closed at the next start."""
    run, feed = station
    moved = replace(run, run_id="r-back", started_at=10_000.0)
    report = moved.report(station_id="s", now=10_031.0, end_reason="stopped", elapsed_s=31.0)
    feed.run_closed(ClosedRun("r-back", "stopped", 4, moved.classified_wbc, 100, report, moved), None, live=False)
    signed_at = 10_031.0 - 3600.0 + 600.0  # the clock set back an hour since, signed 10 minutes on
    signed, _, answer = feed.verify("r-back", "AB", lambda r, end: r.report(station_id="s", now=signed_at,
                                                                            end_reason=end), None)
    assert answer["ok"] and signed.report.timing_ms["run_ms"] == 0.0
    diagnostic = next(e["resource"] for e in report_bundle(signed.report)["entry"]
                      if e["resource"]["resourceType"] == "DiagnosticReport")
    assert diagnostic["effectiveDateTime"] <= diagnostic["issued"]


def test_a_signed_report_waiting_to_be_stored_keeps_its_run_among_the_last_closed_until_it_is(run, tmp_path):
    """verify_run's signed report is kept whole before the answer (answered_verifications): read
    back as signed with the report its run holds; its run (the oldest of the last 4) is not pruned
    by a later run's report while it waits, and the signed report's own store takes it from the
    table (and the run then goes, as its place says)."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.station.durable import StationState
    from smearscope.service.station.verifications import keep_verification, waiting_verifications

    def closed_ids() -> list[str]:
        return [r[0] for r in outbox.read(lambda conn: conn.execute(
            "SELECT run_id FROM closed_runs ORDER BY rowid").fetchall())]

    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        state = StationState(outbox)
        reports = {}
        for i in range(4):
            store_run(state, outbox, run, f"r{i}")
            reports[i] = replace(run, run_id=f"r{i}").report(station_id="s", now=5.0 + i, end_reason="stopped")
            closing_write = state.run_closed(reports[i])
            outbox.write(lambda conn, w=closing_write: w(conn, []))
        signed = reports[0].model_copy(update={"report_id": "signed-r0", "verification": Verification(
            verified_by="Dr A. Okafor", verified_at=20.0, supersedes=reports[0].report_id, typed_cells=0,
            reclassified=[], left_to_review=3)})
        assert keep_verification(outbox, signed)
        (back, holds), = waiting_verifications(StationState(outbox).outbox)  # also after a restart's open
        assert back == signed and holds == reports[0].report_id
        store_run(state, outbox, run, "r4")
        fifth = replace(run, run_id="r4").report(station_id="s", now=10.0, end_reason="stopped")
        outbox.write(lambda conn: state.run_closed(fifth)(conn, []))
        assert closed_ids() == ["r0", "r1", "r2", "r3", "r4"]  # r0 waits for its signed report
        outbox.write(lambda conn: state.run_closed(signed)(conn, []))
        assert waiting_verifications(outbox) == []
        assert closed_ids() == ["r1", "r2", "r3", "r4"]
    finally:
        outbox.close()


@pytest.mark.broker
@needs_chromium
def test_a_run_signed_after_a_run_that_ended_without_a_field_shows_its_verified_counts_on_a_page_opened_after(
    station, tmp_path, ws_broker,
):
    """A run that opened by itself and ended with no field was never said to anyone: the broker's
    retained run state is still the run before it. That run signed then kept its preliminary state
    retained (the station took the empty run for the last one closed), and a dashboard opened after
    the signing showed the analyzer's counts. Its verified state is now retained: the page shows
    the technician's counts and says the report is verified."""
    import json
    from types import SimpleNamespace

    from selenium.webdriver.common.by import By
    from test_dashboard import _page_and_a_station, _wait

    run, feed = station
    published = []
    publisher = SimpleNamespace(config=SimpleNamespace(topic_prefix="smearscope"), station_id="s",
                                publish_many=lambda items, also=None, extra=(): published.extend(extra) or [1])
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
    signed = replace(run, run_id="r-after-empty")
    feed.run_closed(ClosedRun("r-after-empty", "stopped", 4, run.classified_wbc, 100, final(signed, "stopped"), signed),
                    publisher)
    # the next run opened by itself and ended before its first field: no state of it goes out
    feed.run_closed(ClosedRun("r-empty", "stopped", 0, 0, 100, None, started_by="auto"), publisher)
    assert [json.loads(m.payload)["run_id"] for m in published] == ["r-after-empty"]
    first = run.field_ids[0]
    in_field = [r for r in run.records if r.field_id == first]
    k = next(k for k, r in enumerate(in_field) if r.kind == "wbc" and r.label not in (None, "basophil"))
    typing = feed.gallery.typing
    store = feed._open_store()
    store.put("r-after-empty", first, k, "basophil", TypeableCell(
        np.zeros(4, np.float32), np.zeros((1, 4), np.float32), in_field[k].label, {}, typing.model_sha256,
        typing.views, 0.1))
    try:
        one, live, answer = feed.verify("r-after-empty", "AB", final, None)
        assert answer["ok"], answer
        feed.run_closed(one, publisher, live)  # as the command does (service.station.commands)
    finally:
        assert store.remove("r-after-empty", first, k)
    basophils = _count(one.report, "basophil")
    assert basophils == _count(final(signed, "stopped"), "basophil") + 1
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        for m in published:
            send("smearscope/s/run", m.payload.decode())
        driver.get(url)
        card = "[data-station='s']"
        line = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .review-line").text
        _wait("the run", lambda: driver.find_elements(By.CSS_SELECTOR, f"{card}[data-run-id='r-after-empty']"),
              20, [log])
        _wait("the verified report", lambda: line().startswith("Verified"), 20, [log])
        rows = driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((tr) => [...tr.cells].map((td) =>"
            " td.innerText.trim()))", f"{card} table.differential tbody tr")
        assert [r[1] for r in rows if r[0] == "basophil"] == [str(basophils)], rows
    state = json.loads(published[-1].payload)  # the retained state the page read: the signed report's
    assert state["run_id"] == "r-after-empty" and state["report"]["verification"]["verified_by"] == "AB", state


def test_a_start_after_a_run_that_ended_without_a_field_publishes_the_run_before_it_again(station, tmp_path):
    """The station starts; its last closed run opened by itself and ended before its first field (no
    state of it ever went out): the run before it is the last one closed, and its state goes out again
    as the last run closed does at every start (a broker restarted while the station was away may hold
    none), where nothing went out."""
    import json
    from types import SimpleNamespace

    run, _ = station
    _, analyzer, feed = _station(tmp_path)
    published = []
    publisher = SimpleNamespace(config=SimpleNamespace(topic_prefix="smearscope"), station_id="s",
                                publish_many=lambda items, also=None, extra=(): published.extend(extra) or [1])
    final = lambda r, end: r.report(station_id="s", now=time.time(), end_reason=end)
    before = replace(run, run_id="r-before")
    try:
        feed.start(analyzer, [ClosedRun("r-before", "stopped", 4, run.classified_wbc, 100, final(before, "stopped"),
                                        before),
                              ClosedRun("r-empty", "stopped", 0, 0, 100, None, started_by="auto")], publisher=publisher)
        assert [(json.loads(m.payload)["run_id"], json.loads(m.payload)["state"]) for m in published] == [
            ("r-before", "closed")]
        answer = feed.verify("r-before", "AB", final, None)
        assert answer[1] is True, answer[2]  # its signed state is the live one
    finally:
        analyzer.close()
        feed.close()
