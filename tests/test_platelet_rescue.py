"""Faint platelets confirmed by their colour (service.analysis.platelet_rescue).

Fields are painted as the lamp correction leaves them: neutral glass at 235, red cells pink (blue
about red), platelets violet (blue well above red): a platelet's granules are a few dense pixels
in a paler body, so its colour is read from the bright end (95th percentile) of its box."""

from __future__ import annotations

import numpy as np
import pytest
from realdata import BCCD, BCCD_MICRONS_PER_PIXEL, ROOT, bccd_truth, needs_bccd, needs_models
from test_merge import det
from test_yolo_decode import _FakeEngine, _pred

from smearscope.device.frame import Frame
from smearscope.service.analysis.platelet_rescue import (
    PlateletRescue,
    blue_excess,
    rescue_platelets,
)
from smearscope.service.analysis.records import CellDetection, CellKind, Tile
from smearscope.service.analysis.roi import RoiFilter

RULE = PlateletRescue()
FLOOR = 0.25  # the detector's usual threshold (AnalyzerOptions.detector_conf)
GLASS = (235, 235, 235)
PINK = (178, 150, 175)  # BGR: blue - red = 3, as a red cell after the lamp correction
PLATELET = (100, 100, 114, 114)


def _field() -> np.ndarray:
    return np.full((200, 300, 3), GLASS, np.uint8)


def _paint(img: np.ndarray, box: tuple[int, int, int, int], bgr: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = bgr


def _red_cells(img: np.ndarray, excesses: tuple[float, ...] = (3, 3, 3, 3, 3)) -> list[CellDetection]:
    """Red cells whose blue exceeds their red by `excesses` grey levels (PINK's is 3)."""
    boxes = [(10 + 45 * i, 10, 48 + 45 * i, 48) for i in range(len(excesses))]
    for b, e in zip(boxes, excesses):
        _paint(img, b, (int(PINK[2] + e), PINK[1], PINK[2]))
    return [det(CellKind.RBC, b, 0.9) for b in boxes]


def _platelet(img: np.ndarray, excess: float, box: tuple[int, int, int, int] = PLATELET) -> None:
    """A pale violet body with a cluster of dense granules (a sixth of the box) `excess` grey
    levels bluer than PINK's red cells; the body itself only a third as blue."""
    x0, y0, x1, y1 = box
    red = 140
    _paint(img, box, (int(red + (PINK[0] - PINK[2] + excess) / 3), 150, red))
    gx, gy = (x1 - x0) // 2, (y1 - y0) // 2
    _paint(img, (x0 + gx - 3, y0 + gy - 3, x0 + gx + 3, y0 + gy + 3), (int(red + PINK[0] - PINK[2] + excess), 120, red))


def test_a_faint_platelet_bluer_than_the_red_cells_is_counted_others_under_the_floor_dropped() -> None:
    img = _field()
    cells = _red_cells(img)
    _platelet(img, 60)
    _paint(img, (150, 100, 164, 114), PINK)  # a pink fragment of a red cell
    _paint(img, (200, 100, 238, 138), (int(140 + PINK[0] - PINK[2] + 60), 120, 140))  # violet, but called a red cell
    faint = [det(CellKind.PLATELET, PLATELET, 0.1), det(CellKind.PLATELET, (150, 100, 164, 114), 0.1),
             det(CellKind.RBC, (200, 100, 238, 138), 0.1)]
    out = rescue_platelets(cells + faint, img, RoiFilter(), FLOOR, RULE)
    assert out[: len(cells)] == cells  # counted cells untouched, in order
    assert [(d.kind, d.box.x0, d.score) for d in out[len(cells):]] == [(CellKind.PLATELET, 100.0, RULE.score)]
    assert RoiFilter().keep(out[-1])


def test_the_colour_is_read_from_the_dense_granules_not_the_pale_body() -> None:
    img = _field()
    _platelet(img, 60)
    assert blue_excess(img, PLATELET) == pytest.approx(PINK[0] - PINK[2] + 60, abs=1)
    # outside the frame: nothing to read
    assert blue_excess(img, (-30.0, -30.0, -5.0, -5.0)) == 0.0 == blue_excess(img, (400.0, 10.0, 420.0, 30.0))


@pytest.mark.parametrize(("excess", "rescued"), [(RULE.min_contrast + 4, True), (RULE.min_contrast - 4, False)])
def test_the_colour_is_judged_against_the_fields_own_red_cells(excess: float, rescued: bool) -> None:
    for shift in (0, 40):  # a lab whose red cells are bluer: its platelets must be bluer still
        img = _field()
        # the reference is the red cells' median: two bluish cells of five do not move it
        cells = _red_cells(img, (3 + shift, 3 + shift, 3 + shift + 35, 3 + shift + 35, 3 + shift))
        _platelet(img, excess + shift)
        out = rescue_platelets([*cells, det(CellKind.PLATELET, PLATELET, 0.1)], img, RoiFilter(), FLOOR, RULE)
        assert (len(out) == len(cells) + 1) is rescued, (excess, shift)


def test_without_red_cells_the_glass_is_the_reference() -> None:
    img = _field()
    _platelet(img, RULE.min_contrast + 15 - (PINK[0] - PINK[2]))  # that much bluer than the neutral glass
    out = rescue_platelets([det(CellKind.PLATELET, PLATELET, 0.1)], img, RoiFilter(), FLOOR, RULE)
    assert [d.score for d in out] == [RULE.score]


def test_too_faint_inside_or_overlapping_a_cell_implausible_or_a_stricter_station_is_not_rescued() -> None:
    img = _field()
    cells = _red_cells(img)
    wbc = det(CellKind.WBC, (150, 80, 230, 160), 0.9)
    _platelet(img, 60)
    _platelet(img, 60, (180, 110, 194, 124))  # a nucleus' lobe, as blue as a platelet
    _platelet(img, 60, (12, 12, 26, 26))  # on a counted red cell
    counted = [*cells, wbc]
    below = det(CellKind.PLATELET, PLATELET, RULE.min_score * 0.9)
    in_wbc = det(CellKind.PLATELET, (180, 110, 194, 124), 0.1)  # IoU with the white cell 0.03, all inside it
    overlapping = det(CellKind.PLATELET, (14, 12, 44, 44), 0.1)  # IoU with its red cell > 0.3
    tiny = det(CellKind.PLATELET, (105, 105, 108, 108), 0.1)  # under the ROI filter's smallest area
    assert rescue_platelets([*counted, below, in_wbc, overlapping, tiny], img, RoiFilter(), FLOOR, RULE) == counted
    # a dot on a red cell is not that cell: a platelet lying on a red cell is counted
    on_red = rescue_platelets([*counted, det(CellKind.PLATELET, (12, 12, 26, 26), 0.1)], img, RoiFilter(), FLOOR, RULE)
    assert [d.score for d in on_red[len(counted):]] == [RULE.score]
    # a station counting platelets from above the rule's precision keeps its own threshold
    strict = RoiFilter(platelet_min_confidence=RULE.score + 0.1)
    faint = det(CellKind.PLATELET, PLATELET, 0.1)
    assert rescue_platelets([*counted, faint], img, strict, FLOOR, RULE) == counted
    # already counted: left as it is
    sure = det(CellKind.PLATELET, PLATELET, 0.5)
    assert rescue_platelets([*counted, sure], img, RoiFilter(), FLOOR, RULE)[-1] is sure


def test_two_faint_boxes_of_one_platelet_count_it_once_the_surer_one() -> None:
    img = _field()
    _platelet(img, 60)
    a, b = det(CellKind.PLATELET, PLATELET, 0.1), det(CellKind.PLATELET, (103, 100, 117, 114), 0.2)  # IoU 0.65
    out = rescue_platelets([a, b], img, RoiFilter(), FLOOR, RULE)
    assert [(d.box.x0, d.score) for d in out] == [(103.0, RULE.score)]


def test_the_segmenter_keeps_platelets_from_their_own_lower_floor() -> None:
    from smearscope.service.analysis.yolo_decode import YoloSegmenter

    coeff = np.zeros(32, np.float32)
    pred = _pred([(60, 60, 40, 40, 0, 0.1, coeff), (150, 150, 14, 14, 2, 0.1, coeff), (200, 60, 14, 14, 2, 0.3, coeff)])
    tile = [Tile(0, 0, 0, np.zeros((256, 256, 3), np.uint8))]
    kept = lambda seg: sorted((d.kind.value, round(d.score, 2)) for d in seg.detect(tile, 256, 256))
    assert kept(YoloSegmenter(_FakeEngine(pred), conf_threshold=0.25)) == [("platelet", 0.3)]
    assert kept(YoloSegmenter(_FakeEngine(pred), conf_threshold=0.25, platelet_conf_threshold=0.05)) == [
        ("platelet", 0.1), ("platelet", 0.3)]


def test_without_a_lamp_corrected_frame_nothing_is_rescued_and_the_faint_are_dropped() -> None:
    img = _field()
    cells = _red_cells(img)
    _platelet(img, 60)
    faint = det(CellKind.PLATELET, PLATELET, 0.1)
    assert rescue_platelets([*cells, faint], None, RoiFilter(), FLOOR, RULE) == cells


@needs_models
def test_the_analyzer_counts_platelets_by_colour_and_leaves_nothing_under_the_detectors_threshold() -> None:
    """The segmenter hands the analyzer faint platelets; none under `detector_conf` reaches the
    report or the candidates, and the rule is what counts some of them (a rendered field's)."""
    from smearscope.device.synthetic import render_field
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    frame = render_field(101, width=1920, height=1080, microns_per_pixel=0.1).frame
    rescued = {}
    for rule in (RULE, None):
        analyzer = Analyzer.from_models_dir(ROOT / "models", options=AnalyzerOptions(platelet_rescue=rule))
        try:
            assert analyzer.segmenter.platelet_conf_threshold == (FLOOR if rule is None else RULE.min_score)
            res = analyzer.analyze(frame)
        finally:
            analyzer.close()
        scores = [c.detection.score for c in res.cells] + [d.score for d in res.candidates]
        assert min(scores) >= analyzer.options.detector_conf
        rescued[rule] = sum(c.detection.kind is CellKind.PLATELET and c.detection.score == RULE.score for c in res.cells)
    assert rescued[RULE] >= 1 and rescued[None] == 0, rescued


@needs_bccd
@needs_models
@pytest.mark.realdata
def test_on_bccd_val_the_rescued_platelets_are_labelled_ones() -> None:
    """The selection split (BCCD val, the scale given): the rule finds labelled platelets the
    detector scored under the count, and few that are not labelled."""
    import cv2

    from smearscope.service.analysis.boxes import box_iou
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    ids = (BCCD / "ImageSets" / "Main" / "val.txt").read_text().split()
    found, rescued, right = {}, 0, 0
    for on in (False, True):
        analyzer = Analyzer.from_models_dir(ROOT / "models", options=AnalyzerOptions(platelet_rescue=RULE if on else None))
        hits = 0
        for i in ids:
            px = cv2.imread(str(BCCD / "JPEGImages" / f"{i}.jpg"))
            cells = analyzer.analyze(Frame(px, i, "bccd", microns_per_pixel=BCCD_MICRONS_PER_PIXEL)).report.cells
            truth = np.array([b for k, b in bccd_truth(i) if k == "platelet"]).reshape(-1, 4)
            for c in cells:
                if c.kind != "platelet":
                    continue
                hit = bool(len(truth)) and box_iou(np.array(c.bbox), truth).max() >= 0.5
                hits += hit
                if on and c.score == RULE.score:
                    rescued, right = rescued + 1, right + hit
        analyzer.close()
        found[on] = hits
    assert found[True] >= found[False] + 5, found
    assert rescued >= 5 and right / rescued >= 0.6, (rescued, right)


def test_the_colour_in_a_box_is_read_as_over_the_whole_blurred_frame() -> None:
    """The blur inside a box sees the box's neighbours: the box's figure is the whole frame's
    3 x 3 blurred blue minus red, cut to the box, at its 95th percentile."""
    import cv2

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    full = cv2.GaussianBlur(img[..., 0].astype(np.float32) - img[..., 2], (3, 3), 0)
    for x0, y0, x1, y1 in [(10, 12, 24, 26), (30, 5, 41, 20), (0, 0, 9, 9), (70, 50, 80, 60)]:
        assert blue_excess(img, (x0, y0, x1, y1)) == pytest.approx(np.percentile(full[y0:y1, x0:x1], 95), abs=1e-3)


def test_a_detection_at_the_floor_is_kept() -> None:
    at_floor = det(CellKind.RBC, (10, 10, 48, 48), FLOOR)
    assert rescue_platelets([at_floor], None, RoiFilter(), FLOOR, RULE) == [at_floor]
