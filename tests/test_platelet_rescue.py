"""Faint platelets confirmed by their colour (service.analysis.platelet_rescue).

Fields are painted as the lamp correction leaves them: neutral glass at 235, red cells pink (blue
about red), platelets violet (blue well above red)."""

from __future__ import annotations

import numpy as np
import pytest
from realdata import BCCD, BCCD_MICRONS_PER_PIXEL, ROOT, bccd_truth, needs_bccd, needs_models
from test_yolo_decode import _FakeEngine, _pred

from smearscope.service.analysis.platelet_rescue import (
    MIN_CONTRAST,
    MIN_SCORE,
    RESCUED_SCORE,
    rescue_platelets,
)
from smearscope.service.analysis.records import Box, CellDetection, CellKind, Tile
from smearscope.service.analysis.roi import RoiFilter

FLOOR = 0.25  # the detector's usual threshold (AnalyzerOptions.detector_conf)
GLASS = (235, 235, 235)
PINK = (178, 150, 175)  # BGR: blue - red = 3, as a red cell after the lamp correction


def _field() -> np.ndarray:
    return np.full((200, 300, 3), GLASS, np.uint8)


def _paint(img: np.ndarray, box: tuple[int, int, int, int], bgr: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = bgr


def _det(kind: CellKind, box: tuple[int, int, int, int], score: float) -> CellDetection:
    return CellDetection(kind, Box(*map(float, box)), score)


def _red_cells(img: np.ndarray, bgr: tuple[int, int, int] = PINK) -> list[CellDetection]:
    boxes = [(10 + 45 * i, 10, 48 + 45 * i, 48) for i in range(5)]
    for b in boxes:
        _paint(img, b, bgr)
    return [_det(CellKind.RBC, b, 0.9) for b in boxes]


def _violet(excess: float) -> tuple[int, int, int]:
    """A platelet's colour `excess` grey levels bluer (blue - red) than PINK's red cells."""
    red = 140
    return (int(red + PINK[0] - PINK[2] + excess), 120, red)


def test_a_faint_platelet_bluer_than_the_red_cells_is_counted_others_under_the_floor_dropped() -> None:
    img = _field()
    cells = _red_cells(img)
    _paint(img, (100, 100, 114, 114), _violet(60))  # violet: a platelet
    _paint(img, (150, 100, 164, 114), PINK)  # a pink fragment of a red cell
    _paint(img, (200, 100, 238, 138), _violet(60))  # violet, but the detector's faint call is a red cell
    faint = [_det(CellKind.PLATELET, (100, 100, 114, 114), 0.1), _det(CellKind.PLATELET, (150, 100, 164, 114), 0.1),
             _det(CellKind.RBC, (200, 100, 238, 138), 0.1)]
    out = rescue_platelets(cells + faint, img, RoiFilter(), FLOOR)
    assert out[: len(cells)] == cells  # counted cells untouched, in order
    assert [(d.kind, d.box.x0, d.score) for d in out[len(cells):]] == [(CellKind.PLATELET, 100.0, RESCUED_SCORE)]
    assert RoiFilter().keep(out[-1])


@pytest.mark.parametrize(("excess", "rescued"), [(MIN_CONTRAST + 4, True), (MIN_CONTRAST - 4, False)])
def test_the_colour_is_judged_against_the_fields_own_red_cells(excess: float, rescued: bool) -> None:
    for shift in (0, 40):  # a lab whose red cells are bluer: its platelets must be bluer still
        img = _field()
        red = (PINK[0] + shift, PINK[1], PINK[2])
        cells = _red_cells(img, red)
        b, g, r = _violet(excess)
        _paint(img, (100, 100, 114, 114), (b + shift, g, r))
        out = rescue_platelets([*cells, _det(CellKind.PLATELET, (100, 100, 114, 114), 0.1)], img, RoiFilter(), FLOOR)
        assert (len(out) == len(cells) + 1) is rescued, (excess, shift)


def test_without_red_cells_the_glass_is_the_reference() -> None:
    img = _field()
    _paint(img, (100, 100, 114, 114), (int(140 + MIN_CONTRAST + 15), 150, 140))  # bluer than the neutral glass
    out = rescue_platelets([_det(CellKind.PLATELET, (100, 100, 114, 114), 0.1)], img, RoiFilter(), FLOOR)
    assert [d.score for d in out] == [RESCUED_SCORE]


def test_too_faint_overlapping_a_counted_cell_or_a_stricter_station_is_not_rescued() -> None:
    img = _field()
    cells = _red_cells(img)
    _paint(img, (100, 100, 114, 114), _violet(60))
    _paint(img, (12, 12, 26, 26), _violet(60))  # inside a counted red cell (a dot on it)
    below = _det(CellKind.PLATELET, (100, 100, 114, 114), MIN_SCORE * 0.9)
    overlapping = _det(CellKind.PLATELET, (14, 12, 44, 44), 0.1)  # IoU with its red cell > 0.3
    assert rescue_platelets([*cells, below, overlapping], img, RoiFilter(), FLOOR) == cells
    # a station counting platelets from above the rule's precision keeps its own threshold
    strict = RoiFilter(platelet_min_confidence=RESCUED_SCORE + 0.1)
    faint = _det(CellKind.PLATELET, (100, 100, 114, 114), 0.1)
    assert rescue_platelets([*cells, faint], img, strict, FLOOR) == cells
    # already counted: left as it is
    counted = _det(CellKind.PLATELET, (100, 100, 114, 114), 0.5)
    assert rescue_platelets([*cells, counted], img, RoiFilter(), FLOOR)[-1] is counted


def test_the_segmenter_keeps_platelets_from_their_own_lower_floor() -> None:
    from smearscope.service.analysis.yolo_decode import YoloSegmenter

    coeff = np.zeros(32, np.float32)
    pred = _pred([(60, 60, 40, 40, 0, 0.1, coeff), (150, 150, 14, 14, 2, 0.1, coeff), (200, 60, 14, 14, 2, 0.3, coeff)])
    tile = [Tile(0, 0, 0, np.zeros((256, 256, 3), np.uint8))]
    kept = lambda seg: sorted((d.kind.value, round(d.score, 2)) for d in seg.detect(tile, 256, 256))
    assert kept(YoloSegmenter(_FakeEngine(pred), conf_threshold=0.25)) == [("platelet", 0.3)]
    assert kept(YoloSegmenter(_FakeEngine(pred), conf_threshold=0.25, platelet_conf_threshold=0.05)) == [
        ("platelet", 0.1), ("platelet", 0.3)]


@needs_bccd
@needs_models
@pytest.mark.realdata
def test_on_bccd_val_the_rescued_platelets_are_labelled_ones() -> None:
    """The selection split (BCCD val, the scale given): the rule finds labelled platelets the
    detector scored under the count, and few that are not labelled."""
    import cv2

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.boxes import box_iou
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    ids = (BCCD / "ImageSets" / "Main" / "val.txt").read_text().split()
    found, rescued, right = {}, 0, 0
    for on in (False, True):
        analyzer = Analyzer.from_models_dir(ROOT / "models", options=AnalyzerOptions(platelet_rescue=on))
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
                if on and c.score == RESCUED_SCORE:
                    rescued, right = rescued + 1, right + hit
        analyzer.close()
        found[on] = hits
    assert found[True] >= found[False] + 5, found
    assert rescued >= 5 and right / rescued >= 0.6, (rescued, right)
