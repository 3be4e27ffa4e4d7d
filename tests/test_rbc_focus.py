"""Red cells too blurred to judge their shape: the field's morphology is not graded, its red cells
still counted, and a specimen grades morphology on its sharp fields only (service.analysis.rbc_focus)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
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
from smearscope.service.station.cell_json import cell_from_json, cell_json

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


def _specimen(blurred_fields: set[int], calibrated: bool, blurred_label: str = "normal") -> Report:
    """The interim specimen report of three fields of 100 red cells each, typed normal (those of
    `blurred_fields`: `blurred_label`, their shape not judged and the field flagged out of focus)."""
    t = tracker(target=1000)
    run_id = t.run_for_next_field()
    for i in range(3):
        label = blurred_label if i in blurred_fields else "normal"
        pairs = [cell_pair(CellKind.RBC, label, calibrated=calibrated, i=k) for k in range(100)]
        result = field_of(f"f{i}", _blurred(pairs) if i in blurred_fields else pairs, run_id)
        if i in blurred_fields:
            flag = Flag(code=RBC_OUT_OF_FOCUS, severity="warning", message="blurred")
            result = replace(result, report=result.report.model_copy(update={"flags": [flag]}))
        t.add(result)
    report = t.interim_report()
    assert report is not None
    return report


def test_a_specimen_grades_morphology_on_its_sharp_fields_and_says_how_many_were_left_out():
    def run(blurred_fields: set[int]) -> Report:
        return _specimen(blurred_fields, calibrated=True, blurred_label="target")

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


def test_a_specimen_at_an_estimated_scale_with_one_blurred_field_reads_its_size_rows_as_sizes_not_focus():
    """Three fields at an estimated scale, one blurred: the specimen carries the focus flag and
    grades its shapes on the two sharp fields; its size-based rows are not assessable for the
    scale, not the focus. The summary said 'RBC morphology not assessable: the red cells were too
    blurred' beside a graded share, and the FHIR bundle gave the size rows rbc-out-of-focus. With
    every field blurred, every row is out of focus (the size rows still for their scale)."""
    def run(blurred_fields: set[int]) -> Report:
        report = _specimen(blurred_fields, calibrated=False)
        assert RBC_OUT_OF_FOCUS in {f.code for f in report.flags}
        return report

    def reasons(report: Report) -> dict[str, str]:
        return {o["code"]["coding"][0]["display"].split(" ")[0]: o["dataAbsentReason"]["coding"][0]["code"]
                for o in resources(report_bundle(report), "Observation") if "dataAbsentReason" in o
                and "Blood by Light microscopy" in o["code"]["coding"][0]["display"]}

    some = run({1})
    text = summarize(some)
    assert "  RBC: normal 100.0%" in text and "RBC morphology not assessable" not in text, text
    assert ("  RBC macrocyte 0, microcyte 0, spherocyte 0: not assessable at an estimated scale (those cells "
            "are counted by their shape)") in text.splitlines(), text
    assert reasons(some) == {"Macrocytes": "size-not-assessable", "Microcytes": "size-not-assessable",
                             "Spherocytes": "size-not-assessable"}
    none_sharp = run({0, 1, 2})
    assert [(s.label, s.count, s.assessable) for s in none_sharp.rbc_morphology] == [
        ("normal", 300, False), ("macrocyte", 0, False), ("microcyte", 0, False), ("spherocyte", 0, False)]
    text = summarize(none_sharp)
    assert "RBC morphology not assessable: the red cells were too blurred to judge their shape (300 counted)" in text
    assert "not assessable at an estimated scale" in text, text
    assert reasons(none_sharp) == {"Macrocytes": "size-not-assessable", "Microcytes": "size-not-assessable",
                                   "Spherocytes": "size-not-assessable"}  # 'normal' is no finding of its own


def test_a_red_cell_of_a_blurred_field_keeps_its_mark_through_the_durable_store_and_a_technician_judges_it():
    c, r = _blurred([cell_pair(CellKind.RBC, "target")])[0]
    assert not cell_from_json(cell_json(c, r), "f0")[0].shape_judged
    legacy = cell_json(c, r)
    legacy.pop("shape_judged")  # stored before focus was judged
    assert cell_from_json(legacy, "f0")[0].shape_judged
    t = tracker(target=1000)
    run_id = t.run_for_next_field()
    t.add(field_of("f0", _blurred([cell_pair(CellKind.RBC, "target", i=k) for k in range(5)]), run_id))
    run = t.open_run()
    verified, _, typed = run.verified({("f0", 0): ("rbc", "normal")})
    assert typed == 1 and verified.cells[0].shape_judged and not verified.cells[1].shape_judged


def test_the_station_configs_default_bound_is_the_analyzers():
    assert AnalysisConfig.model_fields["rbc_max_edge_width_um"].default == MAX_EDGE_WIDTH_UM
    assert AnalyzerOptions().rbc_max_edge_width_um == MAX_EDGE_WIDTH_UM


def _reference_edge_widths(pixels, detections, max_cells=64):
    """The edge width as rbc_focus' docstring defines it, written plainly: each whole red cell's own
    window, 3x3 dilations and erosions repeated, numpy's quantiles."""
    from smearscope.service.analysis import rbc_focus as rf
    cells = [d for d in detections if d.mask is not None]
    whole = [d for d in cells if rf._whole(d, pixels.shape)]
    if len(whole) > max_cells:
        whole = [whole[i] for i in np.linspace(0, len(whole) - 1, max_cells).round().astype(int)]
    pad, k = rf._GLASS_PX + 1, np.ones((3, 3), np.uint8)
    out = []
    for d in whole:
        m = np.pad(d.mask.astype(np.uint8), pad)
        y0, x0 = int(d.box.y0) - pad, int(d.box.x0) - pad
        y1, x1 = y0 + m.shape[0], x0 + m.shape[1]
        if y0 < 0 or x0 < 0 or y1 > pixels.shape[0] or x1 > pixels.shape[1]:
            continue
        g = pixels[y0:y1, x0:x1].astype(np.float32).mean(axis=2, dtype=np.float32)
        grad = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)) / 8.0
        others = np.zeros(m.shape, bool)
        for o in cells:
            if o is d:
                continue
            full = np.zeros(pixels.shape[:2], bool)
            oy, ox = int(o.box.y0), int(o.box.x0)
            full[oy:oy + o.mask.shape[0], ox:ox + o.mask.shape[1]] = o.mask[:pixels.shape[0] - oy, :pixels.shape[1] - ox]
            others |= full[y0:y1, x0:x1]
        outer = cv2.dilate(m, k, iterations=rf._BAND_PX) > 0
        band = outer & (cv2.erode(m, k, iterations=rf._BAND_PX) == 0)
        glass = (cv2.dilate(m, k, iterations=rf._GLASS_PX) > 0) & ~outer & ~others
        if glass.sum() < rf.MIN_GLASS_PX:
            continue
        contrast = np.quantile(g[glass], 0.5) - np.quantile(g[m > 0], 0.1)
        steepest = np.quantile(grad[band], 0.9)
        if contrast >= rf.MIN_CONTRAST and steepest > 0:
            out.append(contrast / steepest)
    return out


@needs_models
@pytest.mark.parametrize("size", [(640, 480, 0.072), (1600, 1200, 0.1)])
def test_each_red_cells_edge_width_is_the_one_its_definition_gives(size):
    """The measure, made fast (the windows' filters, one sort per quantile), gives for every cell
    what the docstring's definition gives, on a rendered field's own detections."""
    from smearscope.service.analysis import pipeline, rbc_focus
    w, h, mpp = size
    a = Analyzer.from_models_dir(ROOT / "models", warmup=False,
                                 options=AnalyzerOptions(detector_views=("identity",), rbc_views=("identity",),
                                                         wbc_views=("identity",)))
    seen = []
    spy = lambda px, dets: seen.append((px, list(dets))) or rbc_focus.measure_rbc_focus(px, dets)
    orig, pipeline.measure_rbc_focus = pipeline.measure_rbc_focus, spy
    try:
        a.analyze(render_field(77, width=w, height=h, microns_per_pixel=mpp).frame)
    finally:
        pipeline.measure_rbc_focus = orig
        a.close()
    (pixels, dets), = seen
    widths = rbc_focus.cell_edge_widths(pixels, dets)
    assert len(widths) >= 3 and len(widths) <= rbc_focus.MAX_MEASURED_CELLS
    assert widths == pytest.approx(_reference_edge_widths(pixels, dets), rel=1e-5)


def _packed_discs(sigma_px):
    """Six dark discs (r 30 px) on bright glass, eight cells as dark packed round one of them, 1 px
    off it, blurred by a Gaussian of SD `sigma_px`: the field and its detections."""
    from smearscope.service.analysis.records import Box, CellDetection
    img = np.full((240, 360), 220.0, np.float32)
    centres = [(60, 60), (60, 180), (60, 300), (180, 60), (180, 180), (180, 300)]
    yy, xx = np.mgrid[:240, :360]
    packed = [(180 + 43 * np.sin(a), 180 + 43 * np.cos(a)) for a in np.arange(8) * np.pi / 4]
    cells = [*((cy, cx, 30) for cy, cx in centres), *((cy, cx, 12) for cy, cx in packed)]
    for cy, cx, r in cells:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = 120.0
    blurred = cv2.GaussianBlur(img, (0, 0), sigma_px)
    pixels = np.repeat(np.clip(blurred.round(), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    dets = []
    for cy, cx, r in cells:
        box = Box(int(cx - r - 1), int(cy - r - 1), int(cx + r + 2), int(cy + r + 2))
        sub_y, sub_x = yy[int(box.y0):int(box.y1), int(box.x0):int(box.x1)], xx[int(box.y0):int(box.y1), int(box.x0):int(box.x1)]
        kind = CellKind.RBC if r == 30 else CellKind.PLATELET
        dets.append(CellDetection(kind, box, 0.9, (sub_y - cy) ** 2 + (sub_x - cx) ** 2 <= r ** 2))
    return pixels, dets


@pytest.mark.parametrize("sigma_px", [1.5, 3.0, 5.0])
def test_a_blurred_step_measures_as_wide_as_physics_says(sigma_px):
    """Dark discs on bright glass blurred by a Gaussian of SD s: their edges measure sqrt(2 pi) s;
    the cells packed around one disc, touching it, are not read as its glass (read as glass, they
    make it 1.7 to 3.8 times as wide as the others; a lone neighbour 17 px off, as this test had,
    reached no disc's window and could not tell)."""
    from smearscope.service.analysis.rbc_focus import cell_edge_widths
    widths = cell_edge_widths(*_packed_discs(sigma_px))
    assert len(widths) == 6
    assert np.median(widths) == pytest.approx(np.sqrt(2 * np.pi) * sigma_px, rel=0.12)
    # the packed disc as the free ones, within what the neighbours' blurred edges add (at most 6 %)
    assert max(widths) / min(widths) < 1.15


@pytest.mark.parametrize("as_mask", [lambda m: m.astype(np.uint8), lambda m: m.astype(np.uint8) * 255,
                                     lambda m: m.astype(np.int64), lambda m: m.astype(np.float32)],
                         ids=["uint8", "uint8x255", "int64", "float32"])
def test_masks_of_0_and_1_or_255_measure_as_boolean_ones(as_mask):
    """Masks as numbers, not bools (an engine's 0/1 or 0/255): each cell measures as with boolean
    masks. A neighbour's 0/1 integer mask indexed its window's rows 0 and 1 instead (no error, other
    widths); 0/255 or float ones raised IndexError."""
    from smearscope.service.analysis.rbc_focus import cell_edge_widths
    pixels, dets = _packed_discs(3.0)
    widths = cell_edge_widths(pixels, dets)
    assert cell_edge_widths(pixels, [replace(d, mask=as_mask(d.mask)) for d in dets]) == pytest.approx(widths, rel=1e-6)


def test_a_cell_with_no_glass_around_it_is_left_out_and_the_others_keep_their_own_figures():
    """A red cell wholly covered round by another detection has no glass to read its contrast
    against: it is left out, and every other cell still measures as the definition gives (the
    cells' figures are computed together, so a cell left out must take its pixels with it)."""
    from smearscope.service.analysis.rbc_focus import cell_edge_widths
    from smearscope.service.analysis.records import Box, CellDetection
    pixels, dets = _packed_discs(3.0)
    first = cell_edge_widths(pixels, dets)
    blanket = CellDetection(CellKind.PLATELET, Box(140, 20, 220, 100), 0.9, np.ones((80, 80), bool))
    widths = cell_edge_widths(pixels, [*dets, blanket])  # over the second disc (60, 180)
    assert len(widths) == len(first) - 1 == 5
    assert widths == pytest.approx(_reference_edge_widths(pixels, [*dets, blanket]), rel=1e-5)
    assert widths == pytest.approx(first[:1] + first[2:], rel=1e-6)
