"""Stages 4-5b: tile the canonical frame, detect in each test-time view, merge and fuse the views.

`detect_views` is what the pipeline calls once per detection pass. Every view on the whole
frame (`where = "everywhere"`), or the first view everywhere and the others only where the first
was unsure (`where = "unsure"`, service.analysis.tta): on whole tiles placed around the unsure
cells, or (`windows = True`) on small windows around them packed into tiles
(service.analysis.view_windows), whichever needs fewer detector inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from smearscope.service.analysis.merge import merge_detections
from smearscope.service.analysis.records import CellDetection, Tile
from smearscope.service.analysis.segment import Segmenter
from smearscope.service.analysis.tiling import StainedArea, tile_grid
from smearscope.service.analysis.tta import (
    Coverage,
    boxes_in_view,
    frame_window,
    fuse_views,
    place_tiles,
    tiles_for_boxes,
    unview,
    view_frame,
    view_tile_at,
    view_tiles,
    view_window,
)
from smearscope.service.analysis.view_windows import (
    judged_region,
    kept_by_unpack,
    packed_tiles,
    plan_windows,
    unpack,
)


@dataclass(frozen=True)
class ViewSettings:
    """How the views run: the detection part of pipeline.AnalyzerOptions (which holds the defaults)."""

    tile_size: int
    tile_overlap: float
    where: Literal["everywhere", "unsure"]
    unsure_band: tuple[float, float]
    unsure_kinds: tuple[str, ...]
    windows: bool
    window_margin: int


def view_cells(raw: list[CellDetection], k: int, view: str, stride: int, w: int, h: int) -> list[CellDetection]:
    """View `k`'s raw detections (tile indices offset by k x `stride`) merged across its tiles and
    mapped back to the frame."""
    return [unview(d, view, w, h) for d in merge_detections([d for d in raw if d.tile_index // stride == k])]


def grid_size(w: int, h: int, s: ViewSettings) -> int:
    """Tiles in one view's grid: a view's tile indices are offset by this times its number."""
    return len(tile_grid(max(w, s.tile_size), max(h, s.tile_size), s.tile_size, s.tile_overlap))


def detect_views(segmenter: Segmenter, canonical: np.ndarray, views: tuple[str, ...],
                 s: ViewSettings) -> list[CellDetection]:
    """The frame's cells: raw scores (every detection above the detector's fixed floor) through the
    merge and the fusion of the views (service.analysis.tta; one view fuses to itself); the
    calibrated threshold comes last, so it changes nothing above it. The views' tiles are cut
    lazily and streamed through the engine together (a small field's views share one batch), so
    memory stays linear in the frame; a tile's index says its view, so the merge never joins two
    views."""
    if len(views) > 1 and s.where == "unsure":
        return _where_unsure(segmenter, canonical, views, s)
    h, w = canonical.shape[:2]
    grid = grid_size(w, h, s)
    stained = StainedArea(canonical)
    tiles = itertools.chain.from_iterable(
        (dataclasses.replace(t, index=k * grid + t.index)
         for t in view_tiles(canonical, v, s.tile_size, s.tile_overlap, stained=stained))
        for k, v in enumerate(views))
    raw = segmenter.detect(tiles, w, h, calibrate=False)
    per_view = [view_cells(raw, k, v, grid, w, h) for k, v in enumerate(views)]
    return segmenter.finish(fuse_views(per_view))


def _where_unsure(segmenter: Segmenter, canonical: np.ndarray, views: tuple[str, ...],
                  s: ViewSettings) -> list[CellDetection]:
    """The first view everywhere, the others only where it showed an unsure cell whole.

    Unsure: a calibrated score in `unsure_band`, or a cell the merge left cut by a tile edge (the
    other views' grids show it whole and, when it is a piece, vote it down). What each extra view
    ran is recorded (tta.Coverage); its cells cut by a tile edge (at the border of the region it
    ran) or not seen whole are dropped, and each fused cell's score is divided by the number of
    views that saw it whole."""
    h, w = canonical.shape[:2]
    grid = grid_size(w, h, s)
    stained = StainedArea(canonical)
    first_raw = segmenter.detect(view_tiles(canonical, views[0], s.tile_size, s.tile_overlap, stained=stained),
                                 w, h, calibrate=False)
    first = view_cells(first_raw, 0, views[0], grid, w, h)
    low, high = s.unsure_band
    kinds = set(s.unsure_kinds)
    unsure = np.array([d.box.as_list() for d, calibrated in zip(first, _calibrated(segmenter, first))
                       if d.kind.value in kinds and (d.cut_by_tile_edge or low <= calibrated < high)],
                      float).reshape(-1, 4)
    if not len(unsure):
        return segmenter.finish(first)
    extra = range(1, len(views))
    plan = plan_windows([boxes_in_view(unsure, views[k], w, h) for k in extra], w, h, s.tile_size,
                        s.window_margin) if s.windows else None
    stride = grid + (len(plan.placements) if plan is not None else 0)  # room for the windows' indices

    def whole_tiles(k: int, boxes: np.ndarray) -> list[Tile]:
        """View k's tiles that show `boxes` (frame coordinates) whole: the fewer of tiles placed
        around them and the grid's tiles that hold them (windows of the frame, not copies)."""
        if not len(boxes):
            return []
        placed = place_tiles(boxes_in_view(boxes, views[k], w, h), w, h, s.tile_size)
        grid_tiles = list(view_tiles(canonical, views[k], s.tile_size, s.tile_overlap, stained=stained))
        on_grid = tiles_for_boxes([view_window(t, views[k], s.tile_size, w, h) for t in grid_tiles], boxes)
        if len(placed) < len(on_grid):
            return [view_tile_at(canonical, k * stride + j, x, y, s.tile_size, views[k]) for j, (x, y) in enumerate(placed)]
        return [dataclasses.replace(grid_tiles[i], index=k * stride + grid_tiles[i].index) for i in on_grid]

    tiled = {k: whole_tiles(k, unsure if plan is None else unsure[list(plan.left_over[k - 1])]) for k in extra}
    if plan is not None:
        everywhere = {k: whole_tiles(k, unsure) for k in extra}
        if plan.n_tiles + sum(map(len, tiled.values())) >= sum(map(len, everywhere.values())):
            plan, tiled = None, everywhere  # windows save no detector input here; whole tiles give more context
    coverage = Coverage(w, h, len(views))
    coverage.add(0, (0, 0, w, h))
    for k in extra:
        for t in tiled[k]:
            coverage.add(k, view_window(t, views[k], s.tile_size, w, h))
    raw = segmenter.detect(itertools.chain.from_iterable(tiled[k] for k in extra), w, h, calibrate=False)
    if plan is not None:
        first_index = len(views) * stride  # beyond every view's indices
        pixels = [_ViewPixels(canonical, views[k]) for k in extra]
        packed = segmenter.detect(packed_tiles(pixels, plan, s.tile_size, first_index), s.tile_size, s.tile_size,
                                  calibrate=False, wanted=kept_by_unpack(plan, first_index, w, h))
        index_of = [(p.view_index + 1) * stride + grid + n for n, p in enumerate(plan.placements)]
        for p in plan.placements:
            coverage.add(p.view_index + 1, frame_window(judged_region(p.window, w, h), views[p.view_index + 1], w, h))
        for dets in unpack(packed, plan, first_index, w, h, index_of):
            raw += dets
    per_view = [first] + [_seen_whole(merge_detections([d for d in raw if d.tile_index // stride == k]), coverage, k,
                                      views[k], w, h) for k in extra]
    return segmenter.finish(fuse_views(per_view, seen_by=coverage.views_seeing_whole))


def _seen_whole(dets: list[CellDetection], coverage: Coverage, k: int, view: str, w: int,
                h: int) -> list[CellDetection]:
    """View k's cells (merged, in the view's coordinates) not cut by a tile edge that the region
    it ran shows whole, mapped back to the frame: only those kept are mapped (about half)."""
    whole = [d for d in dets if not d.cut_by_tile_edge]
    boxes = boxes_in_view(np.array([d.box.as_list() for d in whole], float).reshape(-1, 4), view, w, h)
    return [unview(d, view, w, h) for d, s in zip(whole, coverage.seen_whole(k, boxes).tolist()) if s]


def _calibrated(segmenter: Segmenter, dets: list[CellDetection]) -> list[float]:
    """Each detection's calibrated score, computed per kind at once (segmenter.calibrated)."""
    kinds = np.array([d.kind.value for d in dets], object)
    raw = np.array([d.score for d in dets], np.float64)
    out = raw.copy()
    for kind in dict.fromkeys(kinds.tolist()):
        sel = kinds == kind
        out[sel] = segmenter.calibrated(kind, raw[sel])
    return out.tolist()


class _ViewPixels:
    """A view of the frame that reads windows without mirroring the whole frame, nor copying a
    window: packed_tiles copies it once, into its tile."""

    def __init__(self, frame: np.ndarray, view: str) -> None:
        self.frame, self.view = frame, view

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        h, w = self.frame.shape[:2]
        x0, y0, x1, y1 = frame_window((cols.start, rows.start, cols.stop, rows.stop), self.view, w, h)
        return view_frame(self.frame[y0:y1, x0:x1], self.view, contiguous=False)
