"""Tiling -> oracle segmentation -> merge finds every true cell exactly once.

The oracle returns each cell as every tile sees it (whole, cut by a tile edge, or cut by the
frame edge), so the raw detections hold duplicates and partial views; only a correct merge turns
them back into one detection per cell with the cell's true box and mask.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from oracle import OracleSegmenter

from smearscope.device.synthetic import SyntheticField, TruthCell, render_field
from smearscope.service.analysis.merge import mask_window, merge_detections
from smearscope.service.analysis.records import Box, CellDetection
from smearscope.service.analysis.tiling import make_tiles

TILE = 256
WIDTH, HEIGHT = 600, 500


@dataclass(frozen=True)
class Run:
    field: SyntheticField
    raw: list[CellDetection]
    merged: list[CellDetection]
    n_tiles: int


def _run(seed: int, overlap: float, **render_kwargs) -> Run:
    kwargs = {"width": WIDTH, "height": HEIGHT, "n_wbc": 4, "touching_fraction": 0.35}
    kwargs.update(render_kwargs)
    field = render_field(seed, **kwargs)
    tiles = make_tiles(field.frame.pixels, TILE, overlap)
    raw = OracleSegmenter(field).detect(tiles, WIDTH, HEIGHT)
    return Run(field, raw, merge_detections(raw), len(tiles))


def _iou(a: Box, b: tuple[int, int, int, int]) -> float:
    iw = max(0.0, min(a.x1, b[2]) - max(a.x0, b[0]))
    ih = max(0.0, min(a.y1, b[3]) - max(a.y0, b[1]))
    inter = iw * ih
    union = a.area + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match(dets: list[CellDetection], cells: tuple[TruthCell, ...], min_iou: float = 0.9):
    """Greedy one-to-one matching by IoU >= min_iou within each kind.

    Returns (pairs, unmatched detections, unmatched truth cells)."""
    cand = [
        (_iou(d.box, c.bbox), di, ci)
        for di, d in enumerate(dets)
        for ci, c in enumerate(cells)
        if d.kind.value == c.kind
    ]
    cand = sorted((x for x in cand if x[0] >= min_iou), reverse=True)
    used_d: set[int] = set()
    used_c: set[int] = set()
    pairs = []
    for _, di, ci in cand:
        if di not in used_d and ci not in used_c:
            used_d.add(di)
            used_c.add(ci)
            pairs.append((di, ci))
    missed_d = [d for i, d in enumerate(dets) if i not in used_d]
    missed_c = [c for i, c in enumerate(cells) if i not in used_c]
    return pairs, missed_d, missed_c


def _views_per_cell(run: Run) -> list[list[CellDetection]]:
    """For every true cell, the raw detections that are views of it (boxes inside its bbox,
    masks equal to the truth mask on that window)."""
    views: list[list[CellDetection]] = []
    for cell in run.field.cells:
        x0, y0, x1, y1 = cell.bbox
        mine = []
        for d in run.raw:
            if d.kind.value != cell.kind:
                continue
            if not (d.box.x0 >= x0 and d.box.y0 >= y0 and d.box.x1 <= x1 and d.box.y1 <= y1):
                continue
            r0, c0, r1, c1 = mask_window(d.box)
            if np.array_equal(cell.mask[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0], d.mask):
                mine.append(d)
        views.append(mine)
    return views


@pytest.mark.parametrize("overlap", [0.1, 0.15, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_cell_found_exactly_once(seed: int, overlap: float) -> None:
    run = _run(seed, overlap)
    cells = run.field.cells
    assert run.n_tiles >= 4
    # The raw detections must hold duplicates, or this test could not tell merge from no merge.
    assert len(run.raw) > len(cells)

    pairs, extra, missed = _match(run.merged, cells)
    assert not missed, f"{len(missed)} cells missed, e.g. {[(c.kind, c.bbox) for c in missed[:3]]}"
    assert not extra, f"{len(extra)} extra detections, e.g. {[(d.kind, d.box) for d in extra[:3]]}"
    assert len(run.merged) == len(cells)
    for di, ci in pairs:
        det, cell = run.merged[di], cells[ci]
        # A perfect detector seen through the tiles, merged, gives the true cell back exactly.
        assert det.box == Box(*map(float, cell.bbox))
        assert det.mask is not None and np.array_equal(det.mask, cell.mask)
        assert not det.cut_by_tile_edge


@pytest.mark.parametrize("overlap", [0.1, 0.15, 0.2])
def test_scenario_covers_the_hard_cases(overlap: float) -> None:
    """The fields above hold duplicates, cut views, touching cells and frame-edge cells."""
    views = []
    cells: list[TruthCell] = []
    for seed in (0, 1, 2):
        run = _run(seed, overlap)
        views += _views_per_cell(run)
        cells += list(run.field.cells)
    # Every raw detection is a view of some true cell: the oracle is honest.
    assert sum(len(v) for v in views) >= sum(1 for v in views if v)
    assert all(views), "some true cell has no view at all"
    seen_twice = sum(len(v) >= 2 for v in views)
    cut_and_whole = sum(
        any(d.cut_by_tile_edge for d in v) and not all(d.cut_by_tile_edge for d in v) for v in views
    )
    assert seen_twice >= 20
    assert cut_and_whole >= 10
    assert sum(c.cut_by_frame_edge for c in cells) >= 10
    kinds = Counter(c.kind for c in cells)
    assert kinds["rbc"] > 100 and kinds["wbc"] >= 3 and kinds["platelet"] >= 3
    touching = 0
    for i, a in enumerate(cells):
        for b in cells[i + 1 :]:
            if (
                a.kind == b.kind == "rbc"
                and a.bbox[0] < b.bbox[2]
                and b.bbox[0] < a.bbox[2]
                and a.bbox[1] < b.bbox[3]
                and b.bbox[1] < a.bbox[3]
            ):
                touching += 1
    assert touching >= 10


def test_red_cells_cut_twice_at_minimum_overlap() -> None:
    """At overlap 0.1 (26 px) a 37 px red cell straddling the strip is cut in both tiles."""
    run = _run(3, 0.1)
    views = _views_per_cell(run)
    rbc_never_whole = [
        c
        for c, v in zip(run.field.cells, views)
        if c.kind == "rbc" and len(v) >= 2 and all(d.cut_by_tile_edge for d in v)
    ]
    assert len(rbc_never_whole) >= 3
    _, extra, missed = _match(run.merged, run.field.cells)
    assert not extra and not missed


@pytest.mark.parametrize("overlap", [0.1, 0.15, 0.2])
def test_white_cells_wider_than_the_overlap_are_united(overlap: float) -> None:
    """A white cell (50-80 px) straddling the overlap strip is seen whole by no tile; its cut
    views must be united into the whole cell, not kept as two half cells."""
    never_whole_wbc = 0
    for seed in (0, 1, 2):
        run = _run(seed, overlap, n_wbc=30)
        views = _views_per_cell(run)
        never_whole_wbc += sum(
            c.kind == "wbc" and len(v) >= 2 and all(d.cut_by_tile_edge for d in v)
            for c, v in zip(run.field.cells, views)
        )
        pairs, extra, missed = _match(run.merged, run.field.cells)
        assert not extra and not missed
        for di, ci in pairs:
            assert np.array_equal(run.merged[di].mask, run.field.cells[ci].mask)
    assert never_whole_wbc >= 1


@pytest.mark.parametrize("overlap", [0.1, 0.2])
def test_without_masks_boxes_still_merge(overlap: float) -> None:
    """Engines that give boxes only: the same cells come out, judged by box overlap alone."""
    run = _run(4, overlap)
    boxes_only = [
        CellDetection(d.kind, d.box, d.score, None, d.tile_index, d.cut_by_tile_edge)
        for d in run.raw
    ]
    merged = merge_detections(boxes_only)
    pairs, extra, missed = _match(merged, run.field.cells)
    assert not extra and not missed
    assert all(run.merged[0].mask is not None and d.mask is None for d in merged)
    assert all(merged[di].box == Box(*map(float, run.field.cells[ci].bbox)) for di, ci in pairs)


@pytest.mark.parametrize("factor", [2.0, 2.5])
def test_the_reports_boxes_are_in_the_input_images_pixels(factor):
    """A field drawn at the canonical scale and enlarged `factor` times (a camera at a finer scale):
    the analyzer works at the canonical scale, and each cell of its report is the true cell's box
    enlarged by the same factor, clipped to the input image."""
    import cv2

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
    from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX

    field = render_field(11, width=400, height=300, n_wbc=3)
    # one row and column short: the canonical frame the analyzer makes of it reaches past the
    # input's edge by a fraction of a pixel, and the boxes are clipped to the input image
    big = cv2.resize(field.frame.pixels, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)[:-1, :-1]
    h, w = big.shape[:2]
    frame = Frame(pixels=big, frame_id="big", source="test", microns_per_pixel=CANONICAL_UM_PER_PX / factor)
    report = Analyzer(OracleSegmenter(field), None, None, AnalyzerOptions(stain_method="none")).analyze(frame).report
    truth = [(c.kind, np.minimum(np.array(c.bbox, float) * factor, (w, h, w, h))) for c in field.cells]
    assert len(report.cells) > 0.9 * len(truth) > 20  # slivers at the frame edge are not reported
    for c in report.cells:
        err = min((np.abs(np.array(c.bbox) - box).max() for kind, box in truth if kind == c.kind), default=np.inf)
        assert err <= 0.011, (c.kind, c.bbox)  # the report rounds to 0.01 px
