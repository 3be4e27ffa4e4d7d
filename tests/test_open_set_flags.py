"""Heads decide, defer or refuse as a hematologist would; flags follow the evidence.

Calibrated confidence (the temperature is applied), `unidentified` below the threshold, the
open-set distance sends atypical cells to review, nucleated red cells are counted apart from the
white cells, size-based morphology needs a calibrated scale, ICSH grades, sickle flags by
evidence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from oracle import OracleSegmenter

from smearscope.device.synthetic import render_field
from smearscope.engines.manifest import (
    BatchProfile,
    CropInfo,
    ModelManifest,
    OpenSet,
    Preprocessing,
    TensorSpec,
)
from smearscope.service.analysis.aggregate import AggregateThresholds, aggregate
from smearscope.service.analysis.classify import UNIDENTIFIED, CropClassifier, softmax
from smearscope.service.analysis.morphology import icsh_grade
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.records import (
    Box,
    CellCrop,
    CellDetection,
    CellKind,
    ClassifiedCell,
)

WBC = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
RBC = ["normal", "microcyte", "spherocyte", "target", "sickle", "schistocyte"]


class _Head:
    """Engine double: every crop gets the same logits (and open-set distance)."""

    def __init__(self, logits: dict[str, float], classes=WBC, temperature=1.0, ood=None, threshold=10.0,
                 extent_um=25.6, size=96, energy_threshold=None) -> None:
        outputs = [TensorSpec(name="logits", shape=[-1, len(classes)])]
        open_set = None
        if ood is not None:
            outputs.append(TensorSpec(name="ood", shape=[-1]))
            open_set = OpenSet(method="mahalanobis", output="ood", threshold=threshold)
        if energy_threshold is not None:
            energy_test = OpenSet(method="energy", threshold=energy_threshold)
            open_set = [open_set, energy_test] if open_set is not None else energy_test
        self.manifest = ModelManifest(
            name="head", task="classification", file="x.onnx", sha256="0" * 64, opset=17,
            inputs=[TensorSpec(name="input", shape=[-1, 3, size, size])], outputs=outputs,
            batch=BatchProfile(min=1, opt=1, max=64), input_size=size, canonical_um_per_px=0.2,
            preprocessing=Preprocessing(), classes=list(classes), crop=CropInfo(extent_um=extent_um, input_size=size),
            temperature=temperature, open_set=open_set)
        self.output_names = [o.name for o in outputs]
        self.pads_to_opt = False
        self.logits = np.array([logits.get(c, 0.0) for c in classes], np.float32)
        self.ood = ood

    def run(self, batch):
        n = batch.shape[0]
        out = {"logits": np.repeat(self.logits[None], n, 0)}
        if self.ood is not None:
            out["ood"] = np.full(n, self.ood, np.float32)
        return out


def _crops(n=3, size=96):
    det = CellDetection(CellKind.WBC, Box(0, 0, 10, 10), 0.9)
    return [CellCrop(det, np.zeros((size, size, 3), np.uint8)) for _ in range(n)]


def test_temperature_is_applied_to_the_confidence():
    logits = {"neutrophil": 2.0}  # softmax at T=1: e^2/(e^2+7) = 0.51; at T=4: 0.19
    p1 = CropClassifier(_Head(logits), 0.5).classify(_crops())[0]
    p4 = CropClassifier(_Head(logits, temperature=4.0), 0.5).classify(_crops())[0]
    expected = softmax(np.array([[logits.get(c, 0.0) for c in WBC]]) / 4.0)[0].max()
    assert p1.label == "neutrophil" and p1.score == pytest.approx(math.exp(2) / (math.exp(2) + 7), rel=1e-5)
    assert p4.score == pytest.approx(expected, rel=1e-5)
    assert p4.label == UNIDENTIFIED  # the same logits, less sure once calibrated


def test_low_confidence_is_unidentified_never_a_guess():
    res = CropClassifier(_Head({"neutrophil": 1.0, "lymphocyte": 1.0}), 0.5).classify(_crops())
    assert all(r.label == UNIDENTIFIED and not r.atypical for r in res)
    assert all(len(r.probs) == len(WBC) and sum(r.probs) == pytest.approx(1.0) for r in res)


def test_open_set_distance_sends_a_confident_cell_to_review():
    confident = {"lymphocyte": 12.0}
    near = CropClassifier(_Head(confident, ood=4.0, threshold=10.0), 0.5).classify(_crops())
    far = CropClassifier(_Head(confident, ood=40.0, threshold=10.0), 0.5).classify(_crops())
    assert [r.label for r in near] == ["lymphocyte"] * 3 and not any(r.atypical for r in near)
    assert [r.label for r in far] == [UNIDENTIFIED] * 3 and all(r.atypical and r.score > 0.99 for r in far)
    assert far[0].ood == pytest.approx(40.0)


def test_energy_sends_a_cell_no_class_claims_strongly_to_review():
    """The energy test (the committed WBC head's): -logsumexp of the crop's logits above the
    threshold is atypical however sure the softmax is; large logits for one class pass."""
    weak = {"lymphocyte": 3.0, "neutrophil": -4.0}  # softmax 0.74 on lymphocyte, but no class claims it strongly
    strong = {"lymphocyte": 12.0}
    w = CropClassifier(_Head(weak, energy_threshold=-5.0), 0.5).classify(_crops())
    s = CropClassifier(_Head(strong, energy_threshold=-5.0), 0.5).classify(_crops())
    lw = np.array([[weak.get(c, 0.0) for c in WBC]])
    assert w[0].ood == pytest.approx(-float(np.log(np.exp(lw).sum())), rel=1e-5)
    assert w[0].score > 0.5 and all(r.label == UNIDENTIFIED and r.atypical for r in w)
    assert [r.label for r in s] == ["lymphocyte"] * 3 and not any(r.atypical for r in s)
    assert s[0].ood == pytest.approx(-12.0, abs=1e-2)
    # the same weak crop with no open-set test is typed
    assert CropClassifier(_Head(weak), 0.5).classify(_crops())[0].label == "lymphocyte"


def test_a_top_probability_exactly_at_the_minimum_confidence_is_typed():
    """Only a top probability *below* the head's threshold is unidentified: one exactly at it is typed."""
    logits = {"neutrophil": 2.0}
    p = CropClassifier(_Head(logits), 0.0).classify(_crops(1))[0].score
    at = CropClassifier(_Head(logits), p).classify(_crops(1))[0]
    above = CropClassifier(_Head(logits), float(np.nextafter(p, 1.0))).classify(_crops(1))[0]
    assert at.label == "neutrophil" and at.score == p
    assert above.label == UNIDENTIFIED and not above.atypical


def test_a_score_exactly_at_the_open_set_threshold_is_not_beyond_it():
    """Atypical means *beyond* a test's threshold (the calibrated quantile itself is in-set, as the
    station fit counts it); a hair above it is atypical."""
    confident = {"lymphocyte": 12.0}
    at = CropClassifier(_Head(confident, ood=10.0, threshold=10.0), 0.5).classify(_crops(1))[0]
    over = CropClassifier(_Head(confident, ood=10.001, threshold=10.0), 0.5).classify(_crops(1))[0]
    assert at.label == "lymphocyte" and not at.atypical
    assert over.label == UNIDENTIFIED and over.atypical


def test_the_energy_test_reads_the_logits_before_the_prior_shift():
    """A prior shift favouring a class must not make a crop no class claims strongly look
    claimed: the energy is of the head's own logits. Raw logits lymphocyte 3, neutrophil -4, six
    zeros: energy -log(e^3 + e^-4 + 6) = -3.26, beyond -5; shifted by +3 on lymphocyte it would
    read -log(e^6 + e^-4 + 6) = -6.01, inside."""
    weak = {"lymphocyte": 3.0, "neutrophil": -4.0}
    head = _Head(weak, energy_threshold=-5.0)
    head.manifest = head.manifest.model_copy(update={"class_log_prior_shift": {"lymphocyte": 3.0}})
    res = CropClassifier(head, 0.5).classify(_crops(2))
    raw = np.array([weak.get(c, 0.0) for c in WBC])
    assert res[0].ood == pytest.approx(-math.log(np.exp(raw).sum()), rel=1e-5)
    assert all(r.atypical and r.label == UNIDENTIFIED for r in res)
    # the shift does move the probabilities: lymphocyte now e^6 / (e^6 + e^-4 + 6)
    assert res[0].score == pytest.approx(math.exp(6) / (math.exp(6) + math.exp(-4) + 6), rel=1e-5)


def test_open_set_method_and_output_agree():
    with pytest.raises(ValueError, match="needs the graph output"):
        OpenSet(method="mahalanobis", threshold=1.0)
    with pytest.raises(ValueError, match="no output"):
        OpenSet(method="energy", output="ood", threshold=1.0)


def test_either_test_beyond_its_threshold_makes_the_cell_atypical():
    """With both tests (the committed WBC head's: the in-graph distance and the energy), a crop
    beyond either is atypical; `ood` is the first test's score."""
    strong, weak = {"lymphocyte": 12.0}, {"lymphocyte": 3.0, "neutrophil": -4.0}
    both_fine = CropClassifier(_Head(strong, ood=4.0, threshold=10.0, energy_threshold=-5.0), 0.5).classify(_crops())
    far = CropClassifier(_Head(strong, ood=40.0, threshold=10.0, energy_threshold=-5.0), 0.5).classify(_crops())
    weakly = CropClassifier(_Head(weak, ood=4.0, threshold=10.0, energy_threshold=-5.0), 0.5).classify(_crops())
    assert [r.label for r in both_fine] == ["lymphocyte"] * 3 and not any(r.atypical for r in both_fine)
    assert all(r.atypical and r.label == UNIDENTIFIED for r in far + weakly)
    assert far[0].ood == pytest.approx(40.0) and weakly[0].ood == pytest.approx(4.0)


def test_one_open_set_object_is_a_list_of_one():
    one = _Head({"lymphocyte": 12.0}, ood=1.0).manifest
    again = ModelManifest.model_validate({**one.model_dump(), "open_set": one.open_set[0].model_dump()})
    assert again.open_set == one.open_set and len(again.open_set) == 1
    assert ModelManifest.model_validate({**one.model_dump(), "open_set": None}).open_set == []


def test_the_committed_wbc_head_tests_distance_and_energy_at_their_fitted_thresholds():
    from smearscope.engines.manifest import load_manifest

    models = Path(__file__).resolve().parents[1] / "models"
    if not (models / "wbc_head.json").exists():
        pytest.skip("committed models absent")
    m = load_manifest(models / "wbc_head.json", verify_hash=False)
    assert [t.method for t in m.open_set] == ["mahalanobis", "energy"]
    for t in m.open_set:  # each threshold is the largest of the labs' fitted quantiles it records
        fitted = json.loads("{" + t.calibration.split("{", 1)[1].split("}", 1)[0] + "}")
        assert t.threshold == pytest.approx(max(fitted.values()), rel=1e-3, abs=2e-3)  # rounded in the record


def test_open_set_output_must_exist():
    head = _Head({"lymphocyte": 12.0}, ood=1.0)
    head.output_names = ["logits"]
    with pytest.raises(ValueError, match="open_set output"):
        CropClassifier(head, 0.5)


def test_atypical_white_cells_flag_the_specimen_through_the_analyzer():
    field = render_field(5, width=600, height=500, n_wbc=4)
    report = Analyzer(OracleSegmenter(field), None,
                      CropClassifier(_Head({"lymphocyte": 12.0}, ood=99.0), 0.5)).analyze(field.frame).report
    flag = next(f for f in report.flags if f.code == "atypical_wbc_present")
    assert flag.severity == "warning" and len(flag.cells) == report.counts.wbc == 4
    assert all(report.cells[i].atypical and report.cells[i].label == UNIDENTIFIED for i in flag.cells)
    clean = Analyzer(OracleSegmenter(field), None,
                     CropClassifier(_Head({"lymphocyte": 12.0}, ood=1.0), 0.5)).analyze(field.frame).report
    assert not any(f.code == "atypical_wbc_present" for f in clean.flags)


def test_nucleated_red_cells_are_counted_apart_from_white_cells():
    field = render_field(5, width=600, height=500, n_wbc=3)
    report = Analyzer(OracleSegmenter(field), None,
                      CropClassifier(_Head({"erythroblast": 12.0}), 0.5)).analyze(field.frame).report
    assert report.counts.nrbc == 3 and report.counts.wbc == 0
    assert report.wbc_differential == [] and report.nrbc_per_100_wbc is None
    assert {c.kind for c in report.cells if c.label == "erythroblast"} == {"nrbc"}
    assert any(f.code == "nucleated_rbc_present" for f in report.flags)
    single = render_field(5, width=600, height=500, n_wbc=1)
    one = Analyzer(OracleSegmenter(single), None,
                   CropClassifier(_Head({"erythroblast": 12.0}), 0.5)).analyze(single.frame).report
    flags = {f.code: f.message for f in report.flags}, {f.code: f.message for f in one.flags}
    assert flags[0]["nucleated_rbc_present"].startswith("3 nucleated red cells (erythroblasts) seen")
    assert flags[1]["nucleated_rbc_present"].startswith("1 nucleated red cell (erythroblast) seen"), flags[1]


def _cell(kind, label, score=0.95, calibrated=True, d_um=7.5, unassessed=None, atypical=False):
    det = CellDetection(kind, Box(0, 0, 10, 10), 0.9)
    return ClassifiedCell(det, label, score, d_um, math.pi * d_um**2 / 4, size_calibrated=calibrated,
                          unassessed_label=unassessed, atypical=atypical)


def test_nrbc_per_100_wbc_and_differential_without_them():
    cells = [_cell(CellKind.WBC, "neutrophil")] * 40 + [_cell(CellKind.NRBC, "erythroblast")] * 6
    a = aggregate(cells)
    assert a.counts.wbc == 40 and a.counts.nrbc == 6 and a.nrbc_per_100_wbc == 15.0
    assert [s.label for s in a.wbc_differential] == ["neutrophil"] and a.wbc_differential[0].percent == 100.0


def test_atypical_flag_needs_count_and_share():
    th = AggregateThresholds(atypical_wbc_min_count=3, atypical_wbc_share=0.10)
    two = [_cell(CellKind.WBC, UNIDENTIFIED)] * 2 + [_cell(CellKind.WBC, "neutrophil")] * 3
    few = [_cell(CellKind.WBC, UNIDENTIFIED)] * 3 + [_cell(CellKind.WBC, "neutrophil")] * 40
    many = [_cell(CellKind.WBC, UNIDENTIFIED, atypical=True)] * 5 + [_cell(CellKind.WBC, "neutrophil")] * 40
    codes = lambda cells: {f.code for f in aggregate(cells, th).flags}
    assert "atypical_wbc_present" not in codes(two) | codes(few)
    assert "atypical_wbc_present" in codes(many)


def test_sickle_flag_is_critical_only_with_enough_confident_cells():
    normal = [_cell(CellKind.RBC, "normal")] * 200
    one = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.99)])
    unsure = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.6)] * 8)
    sure = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.95)] * 5)
    assert {f.code: f.severity for f in one.flags}.get("sickle_cells_review") == "warning"
    assert not any(f.code == "sickle_cells_present" for f in one.flags + unsure.flags)
    review = next(f for f in unsure.flags if f.code == "sickle_cells_review")
    assert review.cells == list(range(200, 208))
    crit = next(f for f in sure.flags if f.code == "sickle_cells_present")
    assert crit.severity == "critical" and len(crit.cells) == 5


def test_icsh_grades():
    assert [icsh_grade("spherocyte", p) for p in (4.9, 5.0, 20.0, 21.0, 50.0, 50.1)] == \
        ["none", "1+", "1+", "2+", "2+", "3+"]
    assert [icsh_grade("microcyte", p) for p in (10.0, 11.0, 21.0, 51.0)] == ["none", "1+", "2+", "3+"]
    assert [icsh_grade("schistocyte", p) for p in (0.0, 0.5, 1.0, 2.0, 2.5)] == ["none", "1+", "2+", "2+", "3+"]
    cells = [_cell(CellKind.RBC, "normal")] * 70 + [_cell(CellKind.RBC, "target")] * 30
    target = next(s for s in aggregate(cells).rbc_morphology if s.label == "target")
    assert target.grade == "2+" and target.grade_ci_low in ("1+", "2+") and target.count == 30


def test_size_based_morphology_needs_a_calibrated_scale():
    field = render_field(6, width=600, height=500, n_wbc=1)
    rbc_head = CropClassifier(_Head({"spherocyte": 6.0, "target": 3.0}, RBC, extent_um=11.2, size=40), 0.3)
    analyzer = Analyzer(OracleSegmenter(field), rbc_head, None)
    given = analyzer.analyze(field.frame).report
    frame = type(field.frame)(field.frame.pixels, "f", "test", microns_per_pixel=None)
    estimated = analyzer.analyze(frame).report
    assert given.scale.method == "given" and estimated.scale.method != "given"
    sph = next(s for s in given.rbc_morphology if s.label == "spherocyte")
    # every whole red cell (a cell cut by the frame's edge has no size to judge: typed by its shape)
    assert sph.assessable and sph.count == sph.of_cells == given.rbc_size.n < given.counts.rbc and sph.grade == "3+"
    assert given.rbc_size.calibrated and given.rbc_size.histogram is not None
    assert not any(f.code == "size_not_assessable_without_calibration" for f in given.flags)
    # estimated scale: the size call is withheld; a spherocyte's outline is normal (its probability
    # joins normal's, far above the runner-up target)
    labels = {c.label for c in estimated.cells if c.kind == "rbc"}
    assert labels == {"normal"} and {c.unassessed_label for c in estimated.cells if c.kind == "rbc"} == {"spherocyte"}
    row = next(s for s in estimated.rbc_morphology if s.label == "spherocyte")
    assert not row.assessable and row.count == estimated.counts.rbc and row.grade is None
    assert not estimated.rbc_size.calibrated and estimated.rbc_size.mean_diameter_um is None
    assert any(f.code == "size_not_assessable_without_calibration" for f in estimated.flags)


def _fake_pass(true_mpp: float, cells_px: float | None = None):
    """A detection pass that finds whole red cells only near the true scale, sized as a detector sees them."""
    from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
    from smearscope.service.analysis.scale_search import DETECTED_RBC_DIAMETER_UM, Attempt

    calls = []
    cells_px = DETECTED_RBC_DIAMETER_UM / CANONICAL_UM_PER_PX if cells_px is None else cells_px

    def detect_at(mpp: float, quick: bool):
        calls.append((round(mpp, 4), quick))
        ratio = true_mpp / mpp
        n = 20 if 0.8 < ratio < 1.25 else 0
        size = cells_px * (mpp / true_mpp) ** 0.5  # resampled too large, seen nearer the canonical size
        dets = [CellDetection(CellKind.RBC, Box(0, 0, size, size), 0.9) for _ in range(n)]
        return Attempt(mpp, dets, None, quick)

    return detect_at, calls


def test_scale_search_finds_a_scale_far_from_the_first_guess_and_says_so():
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import PLAUSIBLE_UM_PER_PX, find_scale

    detect_at, calls = _fake_pass(0.3)
    out = find_scale(detect_at, ScaleEstimate(0.02, "rbc_size_classical"), 1_000_000)
    assert out.estimate.microns_per_pixel == pytest.approx(0.3, rel=0.1)  # refined to within its 5 % tolerance
    assert out.uncertain and "search" in out.reason
    assert not out.attempt.quick  # the analysis itself runs every view
    assert all(PLAUSIBLE_UM_PER_PX[0] <= m <= PLAUSIBLE_UM_PER_PX[1] for m, _ in calls)
    # a good first guess: no search, refined to the truth, not uncertain
    detect_at, calls = _fake_pass(0.1)
    near = find_scale(detect_at, ScaleEstimate(0.09, "rbc_size_classical"), 1_000_000)
    assert near.estimate.microns_per_pixel == pytest.approx(0.1, rel=0.1) and not near.uncertain
    assert len(calls) <= 4


def test_scale_with_no_red_cells_anywhere_stays_plausible_and_uncertain():
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import PLAUSIBLE_UM_PER_PX, Attempt, find_scale

    out = find_scale(lambda mpp, quick: Attempt(mpp, [], None, quick), ScaleEstimate(0.01, "rbc_size_classical"), 10**6)
    assert PLAUSIBLE_UM_PER_PX[0] <= out.estimate.microns_per_pixel <= PLAUSIBLE_UM_PER_PX[1]
    assert out.uncertain and not out.attempt.quick
    # nothing was measured: the report says scale_unknown, not a scale "from red-cell size" of 0 cells
    assert out.estimate.method == "default" and out.estimate.rbc_count == 0


def test_a_sparse_field_keeps_its_guess_when_the_searched_cells_do_not_settle():
    """Two whole red cells at the first guess. The search runs, and far away (where a pass upsamples
    the field: other labs' sparse fields, TXL-PBC) a detector finds many "red cells" that are
    pieces, sized alike at any scale, so refining from them never settles: the guess stands,
    flagged as resting on two cells."""
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import Attempt, find_scale

    calls = []

    def detect_at(mpp: float, quick: bool):
        calls.append(mpp)
        if abs(mpp / 0.05 - 1) < 0.01:
            dets = [CellDetection(CellKind.RBC, Box(0, 0, 37.5, 37.5), 0.9) for _ in range(2)]
        else:  # pieces: 20 px whatever the scale
            dets = [CellDetection(CellKind.RBC, Box(0, 0, 20, 20), 0.9) for _ in range(30 if mpp > 0.3 else 0)]
        return Attempt(mpp, dets, None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.05, "rbc_size_classical"), 10**6)
    assert max(calls) > 0.3  # searched
    assert out.estimate.microns_per_pixel == pytest.approx(0.05)
    assert out.uncertain and "only 2 whole red cells" in out.reason and "search" not in out.reason


def test_a_wrong_guess_with_a_few_red_cells_gives_way_to_a_search_that_settles():
    """A pale low-cost camera: the first guess reads a third of the true scale and a detector finds
    two "red cells" there; near the true scale it finds twenty whose size agrees with the scale."""
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import Attempt, find_scale

    near_truth, _ = _fake_pass(0.135)

    def detect_at(mpp: float, quick: bool):
        if abs(mpp / 0.042 - 1) < 0.45:  # the guess and its neighbours
            return Attempt(mpp, [CellDetection(CellKind.RBC, Box(0, 0, 30, 30), 0.9) for _ in range(2)], None, quick)
        return near_truth(mpp, quick)

    out = find_scale(detect_at, ScaleEstimate(0.042, "rbc_size_classical"), 10**6)
    assert out.estimate.microns_per_pixel == pytest.approx(0.135, rel=0.1)
    assert out.uncertain and "search" in out.reason and not out.attempt.quick


@pytest.mark.parametrize(("n_far", "taken"), [(40, True), (12, False)])
def test_a_searched_scale_that_keeps_moving_is_taken_only_with_many_red_cells(n_far, taken):
    """Refining from the searched scale's cells never settles (the detector sees them 15 % large
    at any scale). With many whole red cells it is still far nearer than the guess and is taken,
    flagged; with a dozen (pieces of a sparse field's cells, upsampled) the guess stands."""
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import Attempt, find_scale

    def detect_at(mpp: float, quick: bool):
        if abs(mpp / 0.042 - 1) < 0.45:
            return Attempt(mpp, [CellDetection(CellKind.RBC, Box(0, 0, 30, 30), 0.9) for _ in range(2)], None, quick)
        n = n_far if 0.07 < mpp < 0.3 else 0
        return Attempt(mpp, [CellDetection(CellKind.RBC, Box(0, 0, 43, 43), 0.9) for _ in range(n)], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.042, "rbc_size_classical"), 10**6)
    if taken:
        assert 0.07 < out.estimate.microns_per_pixel < 0.3
        assert "search" in out.reason and "did not settle" in out.reason
    else:
        assert out.estimate.microns_per_pixel == pytest.approx(0.042)


def test_a_drifting_refinement_keeps_the_scale_that_showed_the_most_red_cells():
    """A pale camera (a Raspberry Pi station): the first guess reads a tenth of the scale and finds
    two "red cells"; the search finds many whole ones near the true scale, but the detector sees
    them larger than they are, so each refinement moves the scale further down while the cells
    thin out, never settling. The pass that showed the most whole red cells is kept (flagged
    uncertain), not the absurd guess."""
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import find_scale

    true = 0.135

    def detect_at(mpp: float, quick: bool):
        from smearscope.service.analysis.scale_search import Attempt

        r = mpp / true
        n = 2 if r < 0.4 else max(0, round(45 - 120 * abs(np.log(r))))  # most near the truth
        size = 37.5 / r * 1.2 if r >= 0.4 else 37.5  # seen 20 % large: refining pulls the scale down
        return Attempt(mpp, [CellDetection(CellKind.RBC, Box(0, 0, size, size), 0.9) for _ in range(n)], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.02, "rbc_size_classical"), 10**6)
    assert out.estimate.microns_per_pixel == pytest.approx(true, rel=0.2)
    assert out.uncertain and "search" in out.reason
    assert not out.attempt.quick


def test_a_withheld_size_call_scores_its_shape_class_with_the_size_calls_probability():
    """At an estimated scale a spherocyte call is reported as normal (its outline): the label's
    score is the shape class' probability, which holds the spherocyte's own and normal's, so it
    is above the spherocyte's score at a given scale (mutation audit)."""
    field = render_field(6, width=600, height=500, n_wbc=1)
    rbc_head = CropClassifier(_Head({"spherocyte": 6.0, "target": 3.0}, RBC, extent_um=11.2, size=40), 0.3)
    analyzer = Analyzer(OracleSegmenter(field), rbc_head, None)
    report = analyzer.analyze(field.frame).report
    # at the given scale, the whole red cells (those the frame cuts have no size: their call is withheld)
    given = [c for c in report.cells if c.kind == "rbc" and c.unassessed_label is None]
    # no WBC head: the rendered white cell is still counted, untyped
    assert report.counts.wbc == 1 and [c.label for c in report.cells if c.kind == "wbc"] == [None]
    frame = type(field.frame)(field.frame.pixels, "f", "test", microns_per_pixel=None)
    estimated = [c for c in analyzer.analyze(frame).report.cells if c.kind == "rbc"]
    probs = softmax(np.array([[{"spherocyte": 6.0, "target": 3.0}.get(k, 0.0) for k in RBC]]))[0]
    p = dict(zip(RBC, probs))
    assert {c.label for c in given} == {"spherocyte"} and {c.label for c in estimated} == {"normal"}
    assert all(c.label_score == pytest.approx(p["spherocyte"], abs=1e-4) for c in given)
    # a microcyte, macrocyte or spherocyte has a normal outline: their probabilities are normal's
    shape_normal = p["normal"] + p["microcyte"] + p["spherocyte"]
    assert all(c.label_score == pytest.approx(shape_normal, abs=1e-4) for c in estimated)
