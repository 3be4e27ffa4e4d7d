"""Pure stages: scale, crops, ROI filter, confidence intervals, aggregation, report schema."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.aggregate import aggregate, wilson_interval
from smearscope.service.analysis.crops import RBC_CROP, WBC_CROP, CropSpec, crop_cell
from smearscope.service.analysis.records import Box, CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.report import report_json_schema
from smearscope.service.analysis.roi import RoiFilter, route
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    MAX_CANONICAL_PIXELS,
    MAX_UM_PER_PX,
    MIN_UM_PER_PX,
    NORMAL_RBC_DIAMETER_UM,
    estimate_scale_classical,
    first_scale_guess,
    resample_to_canonical,
    scale_from_rbc_diameters,
)
from smearscope.service.ingest import IngestError, RejectReason

ROOT = Path(__file__).resolve().parents[1]


def test_resample_to_canonical_sizes():
    img = np.zeros((480, 640, 3), np.uint8)
    assert resample_to_canonical(img, 0.1).shape == (240, 320, 3)
    assert resample_to_canonical(img, 0.4).shape == (960, 1280, 3)
    assert resample_to_canonical(img, CANONICAL_UM_PER_PX) is img


@pytest.mark.parametrize("mpp", [0.05, 0.072, 0.1, 0.15])
def test_shrinking_to_canonical_averages_areas_whatever_the_factor(mpp):
    """A frame shrunk to the canonical scale is the area average of its pixels: within a few grey
    levels of OpenCV's one-step area resize (halving first where the factor allows, for speed),
    exactly it at a factor of one half or more, and of the exact size."""
    field = render_field(5, width=644, height=482, microns_per_pixel=mpp)
    img = field.frame.pixels
    out = resample_to_canonical(img, mpp)
    size = (round(644 * mpp / CANONICAL_UM_PER_PX), round(482 * mpp / CANONICAL_UM_PER_PX))
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
    one_step = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    diff = np.abs(out.astype(int) - one_step)
    assert diff.max() <= 4 and diff.mean() < 0.6, (diff.max(), diff.mean())
    if mpp / CANONICAL_UM_PER_PX >= 0.5:
        np.testing.assert_array_equal(out, one_step)
    # a blank frame stays blank, a uniform colour stays that colour
    flat = np.full((480, 640, 3), (200, 180, 160), np.uint8)
    assert (resample_to_canonical(flat, mpp) == (200, 180, 160)).all()


def test_scale_from_rbc_diameters_uses_robust_centre():
    d = np.array([50.0] * 20 + [5.0, 6.0, 200.0])  # outliers: platelets, a clump
    assert scale_from_rbc_diameters(d) == pytest.approx(7.5 / 50.0)
    assert scale_from_rbc_diameters(np.array([50.0, 51.0])) is None


@pytest.mark.parametrize("mpp", [0.08, 0.12, 0.2, 0.3])
def test_classical_scale_estimate_on_rendered_fields(mpp):
    """The model-free estimate lands within 20% of the true scale on rendered smears."""
    errs = []
    for seed in range(3):
        field = render_field(seed, width=640, height=480, microns_per_pixel=mpp)
        est = estimate_scale_classical(np.asarray(field.frame.pixels))
        assert est is not None
        errs.append(est.microns_per_pixel / mpp - 1.0)
    assert abs(float(np.median(errs))) < 0.2, errs


def test_classical_scale_estimate_blank_field_is_none():
    assert estimate_scale_classical(np.full((200, 200, 3), 235, np.uint8)) is None


def test_a_frame_over_the_canonical_pixel_limit_is_refused_one_at_it_is_not():
    """The limit is on the frame's size at the canonical scale, inclusive; the default is the cap."""
    img = np.zeros((100, 100, 3), np.uint8)
    assert resample_to_canonical(img, 0.4, max_pixels=200 * 200).shape == (200, 200, 3)  # exactly at it
    with pytest.raises(IngestError) as err:
        resample_to_canonical(img, 0.4, max_pixels=200 * 200 - 1)
    assert err.value.code is RejectReason.TOO_LARGE_AT_SCALE
    # the default cap: a 4760x3570 field at 0.2 um/px is under it, 5000x4200 is not (no pixels needed)
    at_cap = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (3570, 4760, 3))
    assert 4760 * 3570 <= MAX_CANONICAL_PIXELS < 5000 * 4200
    assert resample_to_canonical(at_cap, CANONICAL_UM_PER_PX) is at_cap
    with pytest.raises(IngestError):
        resample_to_canonical(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (4200, 5000, 3)), CANONICAL_UM_PER_PX)


def test_scale_from_rbc_diameters_counts_only_real_sizes_and_stays_in_range():
    normal = NORMAL_RBC_DIAMETER_UM
    assert scale_from_rbc_diameters(np.array([50.0] * 5), min_cells=5) == pytest.approx(normal / 50.0)  # just enough
    assert scale_from_rbc_diameters(np.array([50.0] * 4), min_cells=5) is None
    # zero, negative and missing sizes are no cells: four real ones are too few
    assert scale_from_rbc_diameters(np.array([50.0] * 4 + [0.0, -3.0, np.nan, np.inf]), min_cells=5) is None
    # the median of the middle half (41..60 here: 43), not its mean (46)
    d = np.array([10.0, 40.0, 41.0, 42.0, 43.0, 44.0, 60.0, 61.0, 200.0])
    assert scale_from_rbc_diameters(d) == pytest.approx(normal / 43.0)
    # sizes no microscope gives are held to the plausible range
    assert scale_from_rbc_diameters(np.array([1.0] * 10)) == MAX_UM_PER_PX
    assert scale_from_rbc_diameters(np.array([1000.0] * 10)) == MIN_UM_PER_PX


def _discs(radii: list[int], bgr=(180, 120, 200), size=(480, 640)) -> np.ndarray:
    """Glass at 235 with one filled disc of each radius, laid out on a grid without touching."""
    img = np.full((*size, 3), 235, np.uint8)
    step = 2 * max(radii) + 12
    cols = (size[1] - 6) // step
    for k, r in enumerate(radii):
        cx, cy = 6 + step // 2 + step * (k % cols), 6 + step // 2 + step * (k // cols)
        cv2.circle(img, (cx, cy), r, bgr, -1)
    return img


def test_classical_estimate_needs_stain_and_three_blobs():
    """Blobs 7 grey levels darker than the glass and colourless are not stain; fewer than three
    stained blobs are no estimate; three are, read from their radius (7.5 um over the diameter)."""
    assert estimate_scale_classical(_discs([20] * 12, bgr=(228, 228, 228))) is None
    assert estimate_scale_classical(_discs([20, 20])) is None
    est = estimate_scale_classical(_discs([20, 20, 20]))
    assert est is not None and est.rbc_count == 3
    assert est.microns_per_pixel == pytest.approx(NORMAL_RBC_DIAMETER_UM / 40.0, rel=0.1)


def test_classical_estimate_weighs_blobs_by_area_so_red_cells_outvote_platelets():
    """Ten red cells of radius 20 px and thirty platelets of radius 5: the area-weighted median
    radius is the red cells' (the plain median would be a platelet's, four times too small)."""
    est = estimate_scale_classical(_discs([20] * 10 + [5] * 30))
    assert est is not None and est.rbc_count == 40
    assert est.microns_per_pixel == pytest.approx(NORMAL_RBC_DIAMETER_UM / 40.0, rel=0.1)


def test_the_first_guess_on_a_large_frame_is_at_the_frames_own_scale():
    """A frame over the guess's size is reduced for it; the guess is still in the frame's um/px."""
    from smearscope.service.analysis.illumination import Illumination

    field = np.asarray(render_field(1, width=640, height=480, microns_per_pixel=0.1).frame.pixels)
    big = np.tile(field, (4, 4, 1))  # 2560x1920: reduced to 2 MP for the guess
    guess = first_scale_guess(big, Illumination(None, reason="no_lit_background"))
    own = estimate_scale_classical(field)
    assert guess is not None and own is not None
    assert guess.microns_per_pixel == pytest.approx(own.microns_per_pixel, rel=0.1)


def test_crop_has_fixed_physical_extent_and_pads_at_borders():
    img = np.zeros((300, 300, 3), np.uint8)
    img[140:160, 140:160] = 255
    c = crop_cell(img, (150, 150), CropSpec(extent_um=11.2, input_size=56))
    assert c.shape == (56, 56, 3)
    assert c[28, 28].max() == 255 and c[0, 0].max() == 0
    corner = crop_cell(img, (0, 0), RBC_CROP)  # padded by replication, still full size
    assert corner.shape == (RBC_CROP.input_size, RBC_CROP.input_size, 3)
    assert WBC_CROP.extent_px == 128 and RBC_CROP.extent_px == 56


def test_a_crop_is_the_window_centred_on_the_nearest_pixel_and_full_size_at_every_border():
    """Unresized (input size = extent), a crop is exactly the frame's window starting at
    round(centre - side / 2), and padded to full size past the right and bottom borders too."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    spec = CropSpec(extent_um=11.2, input_size=56)
    side = spec.extent_px
    c = crop_cell(img, (100.7, 80.6), spec)  # window from x = round(72.7) = 73, y = round(52.6) = 53
    np.testing.assert_array_equal(c, img[53:53 + side, 73:73 + side])
    corner = crop_cell(img, (299.0, 199.0), spec)  # 27 columns and rows lie past the frame
    assert corner.shape == (side, side, 3)
    np.testing.assert_array_equal(corner[:side - 27, :side - 27], img[199 - 28:, 299 - 28:])
    np.testing.assert_array_equal(corner[-1, -1], img[-1, -1])  # padded by replicating the edge


def test_a_crop_past_one_border_is_padded_on_that_side_only():
    """Unresized: near the left border (x0 = round(10 - 28) = -18, y0 = 72) the first 18 columns
    replicate the frame's first column and the rest is the frame; near the top (y0 = round(5 - 28)
    = -23, x0 = 122) the same with rows."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    spec = CropSpec(extent_um=11.2, input_size=56)
    left = crop_cell(img, (10.0, 100.0), spec)
    assert left.shape == (56, 56, 3)
    np.testing.assert_array_equal(left[:, 18:], img[72:128, 0:38])
    np.testing.assert_array_equal(left[:, :18], np.repeat(img[72:128, :1], 18, axis=1))
    top = crop_cell(img, (150.0, 5.0), spec)
    assert top.shape == (56, 56, 3)
    np.testing.assert_array_equal(top[23:], img[0:33, 122:178])
    np.testing.assert_array_equal(top[:23], np.repeat(img[:1, 122:178], 23, axis=0))


def test_a_crop_wholly_past_the_right_or_bottom_border_is_still_full_size():
    img = np.random.default_rng(2).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    spec = CropSpec(extent_um=11.2, input_size=56)  # unresized: the padding alone makes the size
    for centre in [(400.0, 100.0), (150.0, 300.0), (400.0, 300.0)]:
        assert crop_cell(img, centre, spec).shape == (56, 56, 3), centre


def test_a_crop_wholly_past_the_left_or_top_border_is_full_size_and_blank_as_past_the_others():
    """A centre more than half a crop before the left or top border: a slice end below 0 would
    count from the frame's far side (a 256 x 356 crop of the far corner); the crop is blank and
    full size, as one wholly past the right or bottom border is."""
    img = np.random.default_rng(2).integers(1, 256, (200, 300, 3), dtype=np.uint8)
    spec = CropSpec(extent_um=11.2, input_size=56)
    for centre in [(-100.0, -100.0), (-100.0, 100.0), (150.0, -60.0), (400.0, -100.0), (400.0, 300.0)]:
        crop = crop_cell(img, centre, spec)
        assert crop.shape == (56, 56, 3) and not crop.any(), centre


def test_a_crop_shrunk_to_the_heads_size_averages_the_area_each_pixel_covers():
    """WBC crops shrink 128 -> 96 px: each output pixel covers 4/3 of a column, so 1-px stripes of
    0 and 255 average to between a third and two thirds of mixed (64..191), none keeps one stripe."""
    img = np.zeros((300, 300, 3), np.uint8)
    img[:, ::2] = 255
    c = crop_cell(img, (150, 150), WBC_CROP)
    assert c.shape == (WBC_CROP.input_size, WBC_CROP.input_size, 3)
    assert c.min() >= 63 and c.max() <= 192


def _det(kind, x0, y0, x1, y1, score=0.9):
    return CellDetection(kind=kind, box=Box(x0, y0, x1, y1), score=score)


def test_roi_filter_rules():
    f = RoiFilter(min_confidence=0.5, min_area_um2=2.0, max_aspect=5.0, red_cell_min_confidence=None)
    good = _det(CellKind.RBC, 0, 0, 37, 37)
    assert f.keep(good)
    assert not f.keep(_det(CellKind.RBC, 0, 0, 37, 37, score=0.49))
    assert not f.keep(_det(CellKind.PLATELET, 0, 0, 5, 5))  # ~0.8 um^2 < 2 um^2
    assert not f.keep(_det(CellKind.RBC, 0, 0, 60, 10))  # aspect 6
    assert f.apply([good, _det(CellKind.RBC, 0, 0, 60, 10)]) == [good]


def test_roi_candidates_are_plausible_cells_below_the_confidence_only():
    f = RoiFilter(min_confidence=0.5, min_area_um2=2.0, max_aspect=5.0)
    unsure = _det(CellKind.RBC, 0, 0, 37, 37, score=0.2)
    dets = [_det(CellKind.RBC, 0, 0, 37, 37), unsure, _det(CellKind.PLATELET, 0, 0, 5, 5, score=0.2),
            _det(CellKind.RBC, 0, 0, 60, 10, score=0.2)]
    assert f.below_confidence(dets) == [unsure]  # not the counted one, not the tiny or elongated ones
    assert not set(map(id, f.apply(dets))) & set(map(id, f.below_confidence(dets)))


def test_platelets_are_counted_from_their_own_threshold():
    """Platelets (small, faint: scored lower by the detector) count from `platelet_min_confidence`;
    cells keep `min_confidence`; a platelet between the two is counted, not a candidate."""
    f = RoiFilter(min_confidence=0.5, min_area_um2=2.0, max_aspect=5.0, platelet_min_confidence=0.35,
                  red_cell_min_confidence=None)
    plt = _det(CellKind.PLATELET, 0, 0, 12, 12, score=0.4)  # ~4.5 um^2
    rbc = _det(CellKind.RBC, 0, 0, 37, 37, score=0.4)
    faint = _det(CellKind.PLATELET, 0, 0, 12, 12, score=0.3)
    assert f.apply([plt, rbc, faint]) == [plt]
    assert f.below_confidence([plt, rbc, faint]) == [rbc, faint]
    assert f.lowest_threshold == 0.35
    same = RoiFilter(min_confidence=0.5, platelet_min_confidence=None, red_cell_min_confidence=None)
    assert same.apply([plt, rbc]) == [] and same.lowest_threshold == 0.5
    reds = RoiFilter(min_confidence=0.5, platelet_min_confidence=None, red_cell_min_confidence=0.35)
    wbc = _det(CellKind.WBC, 0, 0, 60, 60, score=0.4)
    assert reds.apply([plt, rbc, wbc]) == [rbc] and reds.below_confidence([plt, rbc, wbc]) == [plt, wbc]
    every = RoiFilter.every_kind_from(0.01)
    assert every.apply([plt, rbc, wbc, faint]) == [plt, rbc, wbc, faint] and every.lowest_threshold == 0.01


def test_the_station_config_counts_platelets_as_the_analyzer_does():
    from smearscope.service.analysis.roi import (
        CELL_MIN_CONFIDENCE,
        PLATELET_MIN_CONFIDENCE,
        RED_CELL_MIN_CONFIDENCE,
    )
    from smearscope.service.config.analysis import AnalysisConfig

    assert AnalysisConfig().platelet_min_confidence == PLATELET_MIN_CONFIDENCE == RoiFilter().platelet_min_confidence
    assert AnalysisConfig().red_cell_min_confidence == RED_CELL_MIN_CONFIDENCE == RoiFilter().red_cell_min_confidence
    assert AnalysisConfig().min_confidence == CELL_MIN_CONFIDENCE == RoiFilter().min_confidence


def test_overlay_marks_candidates_only_at_their_box_corners():
    from smearscope.service.analysis.overlay import draw_overlay

    img = np.full((200, 300, 3), 255, np.uint8)
    cand = _det(CellKind.WBC, 50, 40, 90, 80, score=0.3)  # canonical px; the input is 2x larger
    plain = draw_overlay(img, [], 0.5)
    marked = draw_overlay(img, [], 0.5, [cand])
    assert (plain == img).all()
    ys, xs = np.nonzero((marked != img).any(2))
    assert xs.min() >= 99 and xs.max() <= 181 and ys.min() >= 79 and ys.max() <= 161  # box 100..180 x 80..160
    assert (marked[120, 140] == 255).all()  # the box's middle is left clear for the eye
    assert not (marked[80, 140] != 255).any()  # the middle of an edge too: brackets, not a box


def test_overlay_labels_of_cells_at_the_frame_edge_are_drawn_whole():
    """A labelled cell touching the right edge of the input: its label is moved left, inside the
    image, not cut to `hypoc`; its number on adapt-wbc's overlay too. Measured on what is drawn:
    the label's columns span its full width, and at the cell's own x where there is room."""
    from smearscope.service.analysis.overlay import draw_numbered, draw_overlay

    img = np.full((240, 320, 3), 255, np.uint8)
    for x0, y0 in ((300, 100), (20, 100), (300, 0)):  # at the right edge, with room, at the top right corner
        cell = ClassifiedCell(_det(CellKind.RBC, x0, y0, 320, y0 + 30), "hypochromia", 0.9, 7.0, 38.0)
        drawn = draw_overlay(img, [cell], 1.0)
        thick = max(1, round(240 / 400))
        (width, _), _ = cv2.getTextSize("hypochromia", cv2.FONT_HERSHEY_SIMPLEX, 0.35 * thick + 0.05, thick)
        box = np.zeros(img.shape[:2], bool)
        cv2.rectangle(box.view(np.uint8), (x0, y0), (320, y0 + 30), 1, thick + 2)
        ys, xs = np.nonzero((drawn != img).any(2) & ~box)  # the label's pixels, the box's outline aside
        assert xs.max() - xs.min() + 1 >= width - 2, (x0, y0, xs.min(), xs.max(), width)
        assert ys.min() >= 0 and (x0 > 200 or xs.min() == pytest.approx(x0, abs=2)), (x0, xs.min())
    left = ClassifiedCell(_det(CellKind.WBC, 10, 150, 40, 185), "neutrophil", 0.9, 12.0, 110.0)
    edge = ClassifiedCell(_det(CellKind.WBC, 305, 60, 320, 95), "neutrophil", 0.9, 12.0, 110.0)
    numbered = draw_numbered(img, [left] * 11 + [edge], 1.0)  # cell 12, two digits, at the right edge
    (width, _), _ = cv2.getTextSize("12", cv2.FONT_HERSHEY_SIMPLEX, 0.6, 2)
    ys, xs = np.nonzero((numbered[:58] != 255).any(2))  # above the edge cell's box: its number alone
    assert xs.max() - xs.min() + 1 >= width - 2, (xs.min(), xs.max(), width)


def test_route_sends_kinds_to_their_heads():
    img = np.zeros((200, 200, 3), np.uint8)
    dets = [_det(CellKind.RBC, 10, 10, 47, 47), _det(CellKind.WBC, 50, 50, 110, 110), _det(CellKind.PLATELET, 5, 5, 15, 15)]
    r = route(img, img, dets, RBC_CROP, WBC_CROP)
    assert len(r.rbc) == 1 and len(r.wbc) == 1 and len(r.platelets) == 1
    assert r.rbc[0].pixels.shape[0] == RBC_CROP.input_size and r.wbc[0].pixels.shape[0] == WBC_CROP.input_size


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == 0.0 and hi0 == pytest.approx(0.1611, abs=1e-3)
    # narrows as cells accumulate
    assert (wilson_interval(60, 200)[1] - wilson_interval(60, 200)[0]) < (hi - lo)


def _cell(kind, label, d_um=7.5, edge=False, calibrated=True):
    det = _det(kind, 0, 0, 10, 10)
    return ClassifiedCell(det, label, 0.9 if label else None, d_um, math.pi * (d_um / 2) ** 2, touches_frame_edge=edge,
                          size_calibrated=calibrated)


def test_aggregate_counts_differential_flags():
    cells = ([_cell(CellKind.WBC, "neutrophil")] * 6 + [_cell(CellKind.WBC, "lymphocyte")] * 3
             + [_cell(CellKind.WBC, "unidentified")] + [_cell(CellKind.RBC, "normal", 7.0)] * 8
             + [_cell(CellKind.RBC, "sickle", 9.0), _cell(CellKind.RBC, "normal", 20.0, edge=True)]
             + [_cell(CellKind.PLATELET, None)] * 2)
    a = aggregate(cells)
    assert (a.counts.rbc, a.counts.wbc, a.counts.platelet) == (10, 10, 2)
    neut = next(s for s in a.wbc_differential if s.label == "neutrophil")
    assert neut.count == 6 and neut.percent == 60.0 and neut.ci95_low < 60 < neut.ci95_high
    assert a.ratios["neutrophil_lymphocyte"] == 2.0
    assert a.rbc_size.n == 9  # the edge-cut cell is left out of the size statistics
    assert a.rbc_size.mean_diameter_um == pytest.approx((8 * 7.0 + 9.0) / 9, abs=1e-3)
    codes = {f.code for f in a.flags}
    assert {"too_few_wbc_for_differential", "sickle_cells_review"} <= codes
    assert "sickle_cells_present" not in codes  # one sickle cell is a review, not a critical finding
    assert "many_unidentified_wbc" not in codes  # exactly 10% is not "many"


def test_red_cells_of_a_size_no_blood_has_flag_the_calibration():
    """A station calibrated 2x wrong measures normal red cells as 15 or 3.7 um: said, once enough
    whole red cells are measured at the calibrated scale; blood's own range is not flagged."""
    def codes(d_um, n=30, calibrated=True):
        return {f.code for f in aggregate([_cell(CellKind.RBC, "normal", d_um, calibrated=calibrated)] * n).flags}

    assert "rbc_size_implausible" in codes(15.0) and "rbc_size_implausible" in codes(3.7)
    assert not {"rbc_size_implausible"} & (codes(7.4) | codes(5.2) | codes(10.2))  # micro-, normo-, macrocytic
    assert "rbc_size_implausible" not in codes(15.0, n=19)  # too few to judge
    assert "rbc_size_implausible" in codes(15.0, n=20)  # 20 are enough
    # the range's ends are blood's own: 5 and 10.5 um pass, a little beyond does not
    assert not {"rbc_size_implausible"} & (codes(5.0) | codes(10.5))
    assert "rbc_size_implausible" in codes(4.95) and "rbc_size_implausible" in codes(10.55)
    assert "rbc_size_implausible" not in codes(15.0, calibrated=False)  # an estimated scale measures no size
    (flag,) = [f for f in aggregate([_cell(CellKind.RBC, "normal", 15.0)] * 30).flags if f.code == "rbc_size_implausible"]
    assert flag.severity == "warning" and "15.0 um" in flag.message and "calibrate-scale" in flag.message


def test_aggregate_empty_flags_no_cells():
    assert {f.code for f in aggregate([]).flags} >= {"no_cells_found"}


def test_committed_report_schema_matches_model():
    committed = json.loads((ROOT / "schemas" / "report.schema.json").read_text())
    assert committed == report_json_schema(), "run `smearscope schema --write` and commit the file"


def test_roi_limits_are_inclusive_and_the_aspect_is_judged_whichever_way_the_cell_lies():
    """A score equal to its kind's threshold is counted (so it is no candidate), an area equal to
    `min_area_um2` and an aspect equal to `max_aspect` are plausible; the aspect is the long side
    over the short one, so a tall cell is judged as a wide one."""
    f = RoiFilter(min_confidence=0.5, min_area_um2=2.0, max_aspect=5.0, red_cell_min_confidence=None)
    at = _det(CellKind.RBC, 0, 0, 37, 37, score=0.5)
    assert f.keep(at) and f.below_confidence([at]) == []
    under = _det(CellKind.RBC, 0, 0, 37, 37, score=0.4999)
    assert not f.keep(under) and f.below_confidence([under]) == [under]
    # area: a mask of exactly the minimum area (in canonical pixels) is plausible, one pixel less is not
    box = Box(0, 0, 10, 10)
    mask = np.zeros((10, 10), bool)
    mask.flat[:50] = True
    exact = RoiFilter(min_confidence=0.5, min_area_um2=50 * CANONICAL_UM_PER_PX**2)
    assert exact.plausible(CellDetection(CellKind.PLATELET, box, 0.9, mask))
    mask.flat[49] = False
    assert not exact.plausible(CellDetection(CellKind.PLATELET, box, 0.9, mask))
    # aspect: 5 is allowed, 6 is not, lying either way
    assert f.keep(_det(CellKind.RBC, 0, 0, 50, 10)) and f.keep(_det(CellKind.RBC, 0, 0, 10, 50))
    assert not f.keep(_det(CellKind.RBC, 0, 0, 60, 10)) and not f.keep(_det(CellKind.RBC, 0, 0, 10, 60))


def test_every_kind_from_counts_red_cells_and_platelets_from_that_score_too():
    """An evaluation that ranks every detection must see red cells and platelets below the
    station's own thresholds for them."""
    every = RoiFilter.every_kind_from(0.1)
    assert {k: every.threshold(k) for k in CellKind} == {k: 0.1 for k in CellKind}
    low = [_det(CellKind.RBC, 0, 0, 37, 37, score=0.2), _det(CellKind.PLATELET, 0, 0, 12, 12, score=0.2),
           _det(CellKind.WBC, 0, 0, 60, 60, score=0.2)]
    assert every.apply(low) == low and every.below_confidence(low) == []


def test_route_cuts_each_heads_crops_from_that_heads_frame_variant():
    rbc_image = np.full((200, 200, 3), 10, np.uint8)  # e.g. the raw canonical frame
    wbc_image = np.full((200, 200, 3), 200, np.uint8)  # e.g. the stain-normalized one
    dets = [_det(CellKind.RBC, 10, 10, 47, 47), _det(CellKind.WBC, 50, 50, 110, 110)]
    r = route(rbc_image, wbc_image, dets, RBC_CROP, WBC_CROP)
    assert (r.rbc[0].pixels == 10).all() and (r.wbc[0].pixels == 200).all()


def test_wilson_interval_of_no_cells_is_the_whole_range():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing counted: any share is possible


def test_caught_up_tally_of_another_list_starts_over():
    """A tally kept over one run's cells, handed a copy of the run with other cells of the same
    number (a technician's types), counts the copy's cells, not the first list's."""
    from smearscope.service.analysis.aggregate import CellTally

    first = [_cell(CellKind.WBC, "neutrophil")] * 4
    tally = CellTally.caught_up(None, first)
    other = [_cell(CellKind.WBC, "lymphocyte")] * 3 + [_cell(CellKind.WBC, "monocyte")]
    again = CellTally.caught_up(tally, other)
    assert {s.label: s.count for s in again.aggregates().wbc_differential} == {"lymphocyte": 3, "monocyte": 1}
    first.append(_cell(CellKind.WBC, "eosinophil"))  # the first list grown: only its new cell is added
    grown = CellTally.caught_up(tally, first)
    assert grown is tally and {s.label: s.count for s in grown.aggregates().wbc_differential} == {
        "neutrophil": 4, "eosinophil": 1}


@pytest.mark.parametrize("box", [(0.0, 40.0, 20.0, 60.0), (40.0, 1.0, 60.0, 21.0), (80.0, 40.0, 99.0, 60.0),
                                 (40.0, 79.0, 60.0, 99.0)], ids=["left", "top", "right", "bottom"])
def test_a_cell_at_any_of_the_four_borders_touches_the_frame(box):
    """A cell the frame cuts on any side is kept out of the sizes (mutation audit)."""
    from smearscope.service.analysis.pipeline import _touches_frame

    assert _touches_frame(CellDetection(CellKind.RBC, Box(*box), 0.9), (100, 100, 3))
    assert not _touches_frame(CellDetection(CellKind.RBC, Box(40.0, 40.0, 60.0, 60.0), 0.9), (100, 100, 3))


def test_sickle_calls_of_a_field_too_blurred_are_counted_awaiting_review_as_the_gallery_shows_them():
    """A field too blurred to judge red-cell shapes: its sickle calls are in no grade or flag, but
    the review gallery shows them (service.station.review.needs_review, by the cell's label) and
    verify_run counts them as left: the report's `review` counts them the same."""
    from smearscope.service.analysis.report import CellRecord
    from smearscope.service.station.review import needs_review

    blurred = dataclasses.replace(_cell(CellKind.RBC, "sickle"), shape_judged=False)
    a = aggregate([_cell(CellKind.RBC, "normal")] * 50 + [blurred] * 3)
    assert not any(f.cells for f in a.flags if f.code.startswith(("sickle", "schistocyte")))
    shown = needs_review(CellRecord(kind="rbc", bbox=[0, 0, 10, 10], score=0.9, label="sickle", label_score=0.9,
                                    diameter_um=7.5, area_um2=44.2))
    assert shown == 1
    assert a.review is not None and (a.review.rbc_flagged, a.review.cells) == (3, 3)


def test_a_frame_over_the_limit_is_told_what_to_do_with_a_crop_that_fits():
    """The refusal names a next step: check the scale, or crop into fields no larger than a size that
    does fit (the frame's shape at the limit), which is then analysed."""
    img = np.zeros((300, 400, 3), np.uint8)
    with pytest.raises(IngestError) as err:
        resample_to_canonical(img, 0.4, max_pixels=300 * 300)
    said = str(err.value)
    assert "check the scale" in said
    crop = re.search(r"crop it into fields of at most (\d+)x(\d+) px", said)
    assert crop is not None, said
    w, h = int(crop[1]), int(crop[2])
    assert 0.98 < (w / h) / (400 / 300) < 1.02  # the frame's own shape
    assert resample_to_canonical(img[:h, :w], 0.4, max_pixels=300 * 300).shape[:2] == (2 * h, 2 * w)
    with pytest.raises(IngestError):  # and not much smaller than what fits
        resample_to_canonical(np.zeros((h + 3, w + 4, 3), np.uint8), 0.4, max_pixels=300 * 300)


@pytest.mark.parametrize(("width", "height", "um_per_px", "limit"), [
    (969, 726, 0.0719, 300 * 300),  # the shape at the limit, in whole pixels, rounded up 0.2 % past it
    (1032, 774, 0.0719, 300 * 300),
    (13250, 9937, 0.0719, None),  # so at the real 17 MP limit: 13244x9933 px read 4761x3571, refused again
    (3, 4000, 0.4, 1000),  # a strip: its narrow side shrunk to the limit was 0 px
])
def test_the_crop_a_refusal_names_fits_for_each_shape(width: int, height: int, um_per_px: float,
                                                       limit: int | None) -> None:
    """A field cropped to the size the refusal names is analysed, not refused again (nor 0 px wide)."""
    smear = render_field(7, width=64, height=48, microns_per_pixel=um_per_px).frame.pixels
    frame = cv2.cvtColor(smear, cv2.COLOR_BGR2GRAY)  # grey: a third of the memory at 13244x9933
    with pytest.raises(IngestError) as err:
        resample_to_canonical(np.zeros((height, width, 3), np.uint8), um_per_px, max_pixels=limit)
    crop = re.search(r"crop it into fields of at most (\d+)x(\d+) px", str(err.value))
    assert crop is not None, str(err.value)
    w, h = int(crop[1]), int(crop[2])
    assert 1 <= w <= width and 1 <= h <= height
    field = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)  # a rendered smear at the crop's size
    resampled = resample_to_canonical(field, um_per_px, max_pixels=limit)
    assert resampled.shape[0] * resampled.shape[1] <= (limit or MAX_CANONICAL_PIXELS)
