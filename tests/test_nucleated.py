"""Stage 7b (service.analysis.nucleated): red-cell detections with a nucleus' density get the WBC
head's opinion, and a pale station's lymphocytes are counted as white cells again."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from oracle import AlteredOracle
from realdata import DATA

from smearscope.device.frame import Frame
from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.classify import HeadResult
from smearscope.service.analysis.nucleated import (
    accepts,
    dense_interiors,
    diameter_um,
    interior_densities,
    interior_density,
)
from smearscope.service.analysis.records import Box, CellCrop, CellDetection, CellKind

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_interior_densities_of_a_field_are_each_cells_median_density():
    """The field's medians come from one 2-D histogram; each must equal np.median of its own
    cell's red values (odd and even counts, masks cut by the frame, a cell without a mask, an
    empty mask)."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    crops = []
    for _ in range(60):
        x0, y0 = (int(v) for v in rng.integers(-6, 150, 2))
        w, h = (int(v) for v in rng.integers(1, 25, 2))
        mask = rng.random((h, w)) < rng.uniform(0.0, 1.0)
        det = CellDetection(CellKind.RBC, Box(x0, y0, x0 + w, y0 + h), 0.9, mask=mask)
        crops.append(CellCrop(det, np.zeros((1, 1, 3), np.uint8)))
    crops.append(CellCrop(CellDetection(CellKind.RBC, Box(5, 5, 20, 20), 0.9), np.zeros((1, 1, 3), np.uint8)))
    got = interior_densities(img, crops)
    for c, d in zip(crops, got):
        b, m = c.detection.box, c.detection.mask
        if m is None:
            assert d is None
            continue
        full = np.zeros(img.shape[:2], bool)  # the mask placed in the frame, what lies outside dropped
        ys, xs = np.nonzero(m)
        ys, xs = ys + int(b.y0), xs + int(b.x0)
        keep = (ys >= 0) & (xs >= 0) & (ys < img.shape[0]) & (xs < img.shape[1])
        full[ys[keep], xs[keep]] = True
        inside = img[..., 2][full]
        if inside.size == 0:
            assert d is None
        else:
            assert d == pytest.approx(-np.log(min(float(np.median(inside)) + 1.0, 236.0) / 236.0), abs=1e-12)


def _disc_field(reds: list[int], radius: int = 14) -> tuple[np.ndarray, list[CellCrop]]:
    """Lamp-white glass with one stained disc per entry of `reds` (its red channel)."""
    n = len(reds)
    img = np.full((64, 40 * n + 24, 3), 235, np.uint8)
    crops = []
    yy, xx = np.mgrid[: 2 * radius + 1, : 2 * radius + 1]
    mask = (xx - radius) ** 2 + (yy - radius) ** 2 <= radius**2
    for k, red in enumerate(reds):
        x0, y0 = 12 + 40 * k, 12
        patch = img[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1]
        patch[mask] = (150, 120, red)  # BGR: haemoglobin absorbs green, a nucleus red too
        det = CellDetection(CellKind.RBC, Box(x0, y0, x0 + 2 * radius + 1, y0 + 2 * radius + 1), 0.9, mask=mask)
        crops.append(CellCrop(det, np.zeros((1, 1, 3), np.uint8)))
    return img, crops


def test_only_the_dense_interior_is_rechecked():
    reds = [215, 210, 220, 212, 218, 214, 216, 211, 213, 219, 90, 200]
    img, crops = _disc_field(reds)
    assert dense_interiors(img, crops) == [10]
    # the densities are the red channel's optical density against the corrected white
    assert interior_density(img, crops[10]) == pytest.approx(-np.log(91 / 236), abs=1e-6)
    assert interior_density(img, crops[0]) == pytest.approx(-np.log(216 / 236), abs=1e-6)


def test_interior_density_is_the_density_of_the_median_red_inside_the_mask():
    rng = np.random.default_rng(3)
    for _ in range(20):
        img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        mask = rng.random((30, 30)) < rng.uniform(0.05, 1.0)
        det = CellDetection(CellKind.RBC, Box(3, 4, 33, 34), 0.9, mask=mask)
        red = float(np.median(img[4:34, 3:33, 2][mask]))  # odd and even counts alike
        assert interior_density(img, CellCrop(det, img)) == pytest.approx(-np.log(min(red + 1, 236) / 236), abs=1e-9)


def test_no_reference_no_recheck():
    img, crops = _disc_field([215, 210, 90])
    assert dense_interiors(img, crops) == []  # three red cells are no field median
    assert dense_interiors(img, crops, min_reference=3) == [2]
    maskless = [CellCrop(CellDetection(CellKind.RBC, c.detection.box, 0.9), c.pixels) for c in crops]
    assert dense_interiors(img, maskless, min_reference=1) == []


def _disc(diameter_um: float) -> CellDetection:
    r = diameter_um / 0.2 / 2
    yy, xx = np.mgrid[: int(2 * r) + 1, : int(2 * r) + 1]
    mask = (xx - r) ** 2 + (yy - r) ** 2 <= r**2
    return CellDetection(CellKind.RBC, Box(0, 0, mask.shape[1], mask.shape[0]), 0.9, mask=mask)


def test_a_type_is_accepted_only_where_the_cells_size_allows_it():
    rbc_sized, large = _disc(8.0), _disc(10.0)
    assert diameter_um(rbc_sized) == pytest.approx(8.0, abs=0.15)
    assert accepts(HeadResult("lymphocyte", 0.95), rbc_sized, 15.0)
    assert accepts(HeadResult("erythroblast", 0.9), rbc_sized, 15.0)
    assert not accepts(HeadResult("lymphocyte", 0.95), _disc(16.0), 15.0)  # a clump, not a lymphocyte
    assert accepts(HeadResult("lymphocyte", 0.95), _disc(16.0), None)
    assert not accepts(HeadResult("lymphocyte", 0.95, atypical=True), rbc_sized, 15.0)
    assert not accepts(HeadResult("neutrophil", 0.99), rbc_sized, 15.0)  # a red cell's size: stays a red cell
    assert accepts(HeadResult("neutrophil", 0.99), large, 15.0)
    assert accepts(HeadResult("monocyte", 0.99), large, 15.0)
    assert not accepts(HeadResult("platelet", 0.99), large, 15.0)
    assert not accepts(HeadResult("unidentified", 0.3), large, 15.0)


def test_the_size_bounds_take_a_cell_exactly_at_them():
    """A red-cell sized type is taken up to and including the largest lymphocyte's width (as the
    size gate keeps a lymphocyte exactly that wide), a larger type from exactly 8.8 um. A box
    without a mask is its inscribed ellipse: a w x w box is w px across, 0.2 um a pixel."""
    at_8_8 = CellDetection(CellKind.RBC, Box(0, 0, 44, 44), 0.9)  # 44 px = 8.8 um
    at_15 = CellDetection(CellKind.RBC, Box(0, 0, 75, 75), 0.9)  # 75 px = 15.0 um
    assert diameter_um(at_8_8) == 8.8 and diameter_um(at_15) == 15.0
    assert accepts(HeadResult("neutrophil", 0.99), at_8_8, 15.0)
    assert accepts(HeadResult("monocyte", 0.99), at_8_8, 15.0)
    assert accepts(HeadResult("lymphocyte", 0.95), at_15, 15.0)
    assert accepts(HeadResult("erythroblast", 0.95), at_15, 15.0)
    assert not accepts(HeadResult("lymphocyte", 0.95), at_15, 14.99)


def test_a_box_past_the_frames_top_left_reads_only_its_visible_part():
    img, crops = _disc_field([90, 215])  # the dense disc's box starts at x = 12
    det = crops[0].detection
    cut = img[:, 22:]  # in this frame its box starts at x = -10: 10 mask columns lie before it
    moved = CellDetection(CellKind.RBC, Box(det.box.x0 - 22, det.box.y0, det.box.x1 - 22, det.box.y1), 0.9,
                          mask=det.mask)
    assert interior_density(cut, CellCrop(moved, crops[0].pixels)) == pytest.approx(-np.log(91 / 236), abs=1e-9)


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "chula_wbc_rpi").is_dir(), reason=f"chula_wbc_rpi not found under {DATA}")
@pytest.mark.skipif(not (MODELS / "seg.json").exists(), reason="committed models absent")
def test_a_pale_stations_lymphocytes_are_counted_as_white_cells():
    """rpi validation fields at the given scale: with the recheck, most labelled lymphocytes are
    counted white cells typed lymphocyte; without it, most are lost among the red cells (committed
    detector: 0.73 with it, 0.36 without)."""
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
    from training.lab_table import lab_images

    images = [im for im in lab_images("rpi", "val") if any(t.cls == "lymphocyte" for t in im.extra)][:10]
    found = {}
    for on in (True, False):
        analyzer = Analyzer.from_models_dir(MODELS, options=AnalyzerOptions(nucleated_recheck=on), warmup=False)
        hits = total = 0
        try:
            for im in images:
                pixels = cv2.imread(str(im.path))
                rep = analyzer.analyze(Frame(pixels, im.path.name, "rpi", microns_per_pixel=im.known_mpp)).report
                lymph = [c.bbox for c in rep.cells if c.kind == "wbc" and c.label == "lymphocyte"]
                truth = [[t.box.x0, t.box.y0, t.box.x1, t.box.y1] for t in im.extra if t.cls == "lymphocyte"]
                total += len(truth)
                if lymph:
                    hits += int((box_iou(np.array(truth), np.array(lymph)).max(1) >= 0.5).sum())
        finally:
            analyzer.close()
        found[on] = hits / total
    assert total >= 10
    assert found[True] >= 0.6 and found[True] - found[False] >= 0.25, found


class _WhiteCellsAsRed(AlteredOracle):
    """The oracle detector, except that it reports every white cell as a red cell (a detector that
    takes a pale station's white cells for red cells)."""

    def alter(self, found):
        import dataclasses

        return [dataclasses.replace(d, kind=CellKind.RBC) if d.kind is CellKind.WBC else d for d in found]


@pytest.mark.parametrize("winner, recounted_as", [("lymphocyte", "wbc"), ("erythroblast", "nrbc"),
                                                  ("neutrophil", "wbc"), ("platelet", None)])
@pytest.mark.parametrize("with_rbc_head", [True, False])
def test_red_cell_detections_with_a_nucleus_are_recounted_once(winner, recounted_as, with_rbc_head):
    """Rendered field, white cells reported as red cells: with the recheck they are counted as what
    the WBC head types them as (never twice, never lost); a type the head may not move them to
    (platelet) leaves them red cells; without the recheck they stay red cells."""
    from test_reclassify import RBC_CLASSES, _FixedHead

    from smearscope.device.synthetic import render_field
    from smearscope.engines.manifest import Preprocessing
    from smearscope.service.analysis.classify import CropClassifier
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    field = render_field(5, width=600, height=500, n_wbc=3)
    truth = {k: sum(c.kind == k for c in field.cells) for k in ("rbc", "wbc", "platelet")}
    assert truth["wbc"] == 3

    def lamp_corrected(head):  # the recheck reads densities against a lamp-corrected white
        head.manifest = head.manifest.model_copy(update={"preprocessing": Preprocessing(illumination="flatfield")})
        return head

    def run(recheck: bool, detector=_WhiteCellsAsRed):
        rbc_head = (CropClassifier(lamp_corrected(_FixedHead("normal", RBC_CLASSES, 11.2, 40)), 0.3)
                    if with_rbc_head else None)
        analyzer = Analyzer(detector(field), rbc_head, CropClassifier(lamp_corrected(_FixedHead(winner)), 0.5),
                            options=AnalyzerOptions(nucleated_recheck=recheck, max_lymphocyte_diameter_um=None))
        return analyzer.analyze(field.frame).report

    from oracle import OracleSegmenter

    plain = run(False, OracleSegmenter)  # the white cells found as white cells
    n = plain.counts.wbc + plain.counts.nrbc + plain.counts.platelet - truth["platelet"] if winner != "platelet" else 3
    on, off = run(True), run(False)
    assert (off.counts.rbc, off.counts.wbc, off.counts.nrbc) == (plain.counts.rbc + 3, 0, 0)
    assert on.counts.rbc == off.counts.rbc - (n if recounted_as else 0)
    moved = {"wbc": on.counts.wbc, "nrbc": on.counts.nrbc}
    assert moved == {k: (n if k == recounted_as else 0) for k in moved}
    assert n == 3
    assert len(on.cells) == len(off.cells)
    if recounted_as == "wbc":
        assert [s.label for s in on.wbc_differential] == [winner]


def test_a_field_whose_red_cells_absorb_nothing_is_no_reference():
    """Red cells as white as the corrected glass: their median density is 0, nothing is 1.8 times it."""
    img, crops = _disc_field([235] * 12)
    assert dense_interiors(img, crops) == []


def test_an_interior_brighter_than_the_white_point_reads_no_density():
    img, crops = _disc_field([250, 215])
    assert interior_density(img, crops[0]) == 0.0


def test_larger_white_cells_are_taken_from_8_8_um_of_every_such_type():
    assert accepts(HeadResult("neutrophil", 0.99), _disc(9.0), 15.0)  # a shrunk neutrophil (8.9 to 10.1 um seen)
    assert not accepts(HeadResult("neutrophil", 0.99), _disc(8.5), 15.0)
    for label in ("eosinophil", "basophil", "monocyte", "ig"):
        assert accepts(HeadResult(label, 0.99), _disc(10.0), 15.0), label


def _recheck_run(winner: str, lamp_corrected_heads: bool, recheck: bool, max_lymphocyte_um: float | None):
    """The rendered field of the test above, its white cells reported as red cells (mutation audit)."""
    from test_reclassify import _FixedHead

    from smearscope.device.synthetic import render_field
    from smearscope.engines.manifest import Preprocessing
    from smearscope.service.analysis.classify import CropClassifier
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    field = render_field(5, width=600, height=500, n_wbc=3)
    head = _FixedHead(winner)
    if lamp_corrected_heads:
        head.manifest = head.manifest.model_copy(update={"preprocessing": Preprocessing(illumination="flatfield")})
    analyzer = Analyzer(_WhiteCellsAsRed(field), None, CropClassifier(head, 0.5),
                        options=AnalyzerOptions(nucleated_recheck=recheck,
                                                max_lymphocyte_diameter_um=max_lymphocyte_um))
    return analyzer.analyze(field.frame).report


def test_the_recheck_needs_the_lamp_corrected_frame():
    """Densities are read against a lamp-corrected white ("Needs the lamp correction"): a WBC head
    fed uncorrected frames gives no second opinion, every red-cell detection stays a red cell."""
    on = _recheck_run("neutrophil", lamp_corrected_heads=False, recheck=True, max_lymphocyte_um=None)
    off = _recheck_run("neutrophil", lamp_corrected_heads=False, recheck=False, max_lymphocyte_um=None)
    assert (on.counts.rbc, on.counts.wbc) == (off.counts.rbc, 0)
    # the same heads on the lamp-corrected frame do recount them (the test above)
    assert _recheck_run("neutrophil", lamp_corrected_heads=True, recheck=True, max_lymphocyte_um=None).counts.wbc == 3


def test_a_red_cell_detection_wider_than_a_lymphocyte_is_not_recounted_as_one():
    """The size gate bounds what the recheck may call a lymphocyte (nucleated.accepts): with a bound
    below every rendered white cell's width, a lymphocyte call leaves them red cells."""
    free = _recheck_run("lymphocyte", lamp_corrected_heads=True, recheck=True, max_lymphocyte_um=None)
    gated = _recheck_run("lymphocyte", lamp_corrected_heads=True, recheck=True, max_lymphocyte_um=5.0)
    assert free.counts.wbc == 3
    assert (gated.counts.rbc, gated.counts.wbc) == (free.counts.rbc + 3, 0)
