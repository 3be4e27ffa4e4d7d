"""Stage 6: merge detections of overlapping tiles into one detection per cell (pure functions).

A greedy non-maximum merge in the manner of SAHI's `greedy_nmm` (obss/sahi
`sahi/postprocess/combine.py`), with two rules a tiled cell detector needs:

* Whole views win. Detections are visited whole-first (`cut_by_tile_edge` False), then by score;
  a visited whole detection absorbs the views of the same cell from other tiles, including a
  partial view cut by a tile edge, which lies inside it (caught by intersection over the smaller
  area, IoS, where IoU would be low). IoS is measured on the masks when both views have one
  (masks cover the box rounded outward, see `mask_window`), otherwise on the boxes.
* A cell larger than the tile overlap is seen whole by no tile. Its cut views are united (box,
  and mask when every view has one), keeping the highest score and clearing the cut flag.

Two detections from the SAME tile are never merged: the detector's own NMS has already decided
they are different cells, and touching or overlapping cells must stay apart. Each other tile
contributes at most one view to a cell: the matching view with the highest IoU. Detections with
`tile_index < 0` (unknown tile) count as coming from a tile of their own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from smearscope.service.analysis.boxes import overlapping_pairs
from smearscope.service.analysis.records import Box, CellDetection

logger = logging.getLogger(__name__)

DEFAULT_IOU_THRESHOLD = 0.5
#: Low enough for two halves of a cell about twice the overlap wide, which share only the
#: overlap strip; two slightly overlapping distinct cells stay well below it.
DEFAULT_IOS_THRESHOLD = 0.5


def mask_window(box: Box) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), end exclusive, that a detection's mask covers: the box rounded
    outward to whole pixels (equal to int(y0)..ceil(y1) for the non-negative frame coordinates)."""
    return (
        math.floor(box.y0),
        math.floor(box.x0),
        math.ceil(box.y1),
        math.ceil(box.x1),
    )


def box_iou_ios(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection-over-smaller-area of one (4,) box against (n, 4) boxes."""
    box = np.asarray(box, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    union = area + areas - inter
    smaller = np.minimum(area, areas)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return iou, ios


def _pairs_iou_ios(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and IoS of boxes a[k] and b[k], computed as `box_iou_ios` computes each of them."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    smaller = np.minimum(area_a, area_b)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return iou, ios


def _checked_mask(det: CellDetection, window: tuple[int, int, int, int]) -> np.ndarray | None:
    """The detection's mask as bool, checked to cover `window` (its `mask_window`)."""
    if det.mask is None:
        return None
    r0, c0, r1, c1 = window
    if det.mask.shape != (r1 - r0, c1 - c0):
        raise ValueError(
            f"mask shape {det.mask.shape} does not cover box {det.box} "
            f"(expected {(r1 - r0, c1 - c0)})"
        )
    return det.mask.astype(bool, copy=False)


def _mask_ios(a: np.ndarray, a_win: tuple[int, int, int, int], b: np.ndarray, b_win,
              a_area: int | None = None, b_area: int | None = None) -> float:
    """Intersection over the smaller mask area of two masks placed in frame coordinates (the
    masks' areas may be given when known)."""
    r0, c0 = max(a_win[0], b_win[0]), max(a_win[1], b_win[1])
    r1, c1 = min(a_win[2], b_win[2]), min(a_win[3], b_win[3])
    smaller = min(np.count_nonzero(a) if a_area is None else a_area, np.count_nonzero(b) if b_area is None else b_area)
    if r0 >= r1 or c0 >= c1 or smaller == 0:
        return 0.0
    sa = a[r0 - a_win[0] : r1 - a_win[0], c0 - a_win[1] : c1 - a_win[1]]
    sb = b[r0 - b_win[0] : r1 - b_win[0], c0 - b_win[1] : c1 - b_win[1]]
    return np.count_nonzero(sa & sb) / smaller


@dataclass
class _Group:
    """The cell being built around one kept detection (mutable while merging only)."""

    det: CellDetection
    box: np.ndarray
    mask: np.ndarray | None
    tiles: set[int] = field(default_factory=set)
    united: bool = False

    @property
    def window(self) -> tuple[int, int, int, int]:
        return mask_window(Box(*self.box.tolist()))

    def unite(self, other: CellDetection, other_mask: np.ndarray | None) -> None:
        ob = np.array(other.box.as_list())
        new_box = np.concatenate(
            [np.minimum(self.box[:2], ob[:2]), np.maximum(self.box[2:], ob[2:])]
        )
        if self.mask is not None and other_mask is not None:
            old_win, o_win = self.window, mask_window(other.box)
            self.box = new_box
            win = self.window
            out = np.zeros((win[2] - win[0], win[3] - win[1]), bool)
            for m, w in ((self.mask, old_win), (other_mask, o_win)):
                out[w[0] - win[0] : w[2] - win[0], w[1] - win[1] : w[3] - win[1]] |= m
            self.mask = out
        else:
            self.box, self.mask = new_box, None
        self.det = replace(self.det, score=max(self.det.score, other.score))
        self.united = True

    def result(self) -> CellDetection:
        if not self.united:
            return self.det
        return replace(
            self.det, box=Box(*self.box.tolist()), mask=self.mask, cut_by_tile_edge=False
        )


def merge_detections(
    dets: Sequence[CellDetection],
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    ios_threshold: float = DEFAULT_IOS_THRESHOLD,
) -> list[CellDetection]:
    """One detection per cell from the detections of all tiles (see the module docstring).

    Detections of different kinds never merge. The result is in visiting order: whole cells by
    descending score, then united or lone cut cells.
    """
    out: list[CellDetection] = []
    for kind in dict.fromkeys(d.kind for d in dets):
        out.extend(
            _merge_one_kind([d for d in dets if d.kind == kind], iou_threshold, ios_threshold)
        )
    logger.debug("merged %d detections into %d cells", len(dets), len(out))
    return out


def _merge_one_kind(
    dets: list[CellDetection], iou_threshold: float, ios_threshold: float
) -> list[CellDetection]:
    n = len(dets)
    if n == 0:
        return []
    boxes = np.array([d.box.as_list() for d in dets], dtype=np.float64).reshape(n, 4)
    # mask_window of every box at once (floor of y0, x0; ceil of y1, x1)
    windows = [tuple(w) for w in np.concatenate([np.floor(boxes[:, [1, 0]]), np.ceil(boxes[:, [3, 2]])],
                                                 axis=1).astype(np.int64).tolist()]
    masks = [_checked_mask(d, w) for d, w in zip(dets, windows)]
    cut = np.array([d.cut_by_tile_edge for d in dets], bool)
    scores = np.array([d.score for d in dets], np.float64)
    # An unknown tile (-1) is a tile of its own, so such detections can merge with anything.
    tiles = np.array([d.tile_index if d.tile_index >= 0 else -1 - i for i, d in enumerate(dets)])
    order = np.lexsort((np.arange(n), -scores, cut))  # whole first, then score, then input order
    if (tiles == tiles[0]).all():  # one tile (a small field): nothing to merge, only the order
        return [dets[i] for i in order]
    rank = np.empty(n, np.intp)
    rank[order] = np.arange(n)

    # Candidates of a detection's own box: every overlapping pair, found at once through a grid
    # (boxes.overlapping_pairs) with their IoU / IoS. A group whose box grew (united cut views)
    # looks again among boxes sorted by x0: a box can only meet [x0, x1) if its x0 lies in
    # (x0 - widest box, x1).
    pair_i, pair_j = overlapping_pairs(boxes)
    row = np.searchsorted(pair_i, np.arange(n + 1))
    pair_iou, pair_ios = _pairs_iou_ios(boxes[pair_i], boxes[pair_j])
    # Most detections overlap no detection of another tile: they stand alone, without a search.
    alone = np.ones(n, bool)
    alone[pair_i[tiles[pair_i] != tiles[pair_j]]] = False
    areas = [None if m is None else np.count_nonzero(m) for m in masks]
    by_x0 = np.argsort(boxes[:, 0], kind="stable")
    x0_sorted = boxes[by_x0, 0]
    widest = float(np.max(boxes[:, 2] - boxes[:, 0]))
    # A detection's own candidates are walked as Python lists: they are one to three views of
    # the same cell, too few for array operations to pay their fixed cost.
    consumed_flags = bytearray(n)
    consumed = np.frombuffer(consumed_flags, bool)  # the same flags, for the array searches
    tile_of, rank_of = tiles.tolist(), rank.tolist()
    pj, piou, pios, row_of = pair_j.tolist(), pair_iou.tolist(), pair_ios.tolist(), row.tolist()

    result: list[CellDetection] = []
    for i in order.tolist():
        if consumed_flags[i]:
            continue
        consumed_flags[i] = 1
        if alone[i]:
            result.append(dets[i])
            continue
        group = _Group(dets[i], boxes[i].copy(), masks[i], {tile_of[i]})
        while True:
            if not group.united:  # the detection's own box: its precomputed overlaps
                views = _own_views(i, row_of, pj, piou, pios, consumed_flags, tile_of, masks, windows,
                                   areas, iou_threshold, ios_threshold)
            else:
                views = _grown_views(group, by_x0, x0_sorted, widest, boxes, consumed, tiles, masks,
                                     windows, iou_threshold, ios_threshold)
            if not views:
                break
            # Per tile, the best-overlapping view; ties go to the higher-priority detection.
            best: dict[int, int] = {}
            for _, _, j in sorted((-iou, rank_of[j], j) for j, iou in views):
                best.setdefault(tile_of[j], j)
            grown = False
            for j in sorted(best.values(), key=rank_of.__getitem__):
                consumed_flags[j] = 1
                group.tiles.add(tile_of[j])
                if group.det.cut_by_tile_edge or group.united:
                    # Only cut views are left when a cut detection is visited: unite them.
                    group.unite(dets[j], masks[j])
                    grown = True
            if not grown:
                break  # a whole view only absorbs duplicates; its box does not change
        result.append(group.result())
    return result


def _own_views(i: int, row_of: list[int], pj: list[int], piou: list[float], pios: list[float],
               consumed: bytearray, tile_of: list[int], masks: list, windows: list, areas: list,
               iou_threshold: float, ios_threshold: float) -> list[tuple[int, float]]:
    """(j, IoU) of the unconsumed detections of other tiles that match detection i's own box:
    IoU at least `iou_threshold`, or IoS at least `ios_threshold` (on the masks when both have
    one; only asked where the IoU alone does not decide)."""
    out = []
    for k in range(row_of[i], row_of[i + 1]):
        j = pj[k]
        if consumed[j] or tile_of[j] == tile_of[i]:
            continue
        iou = piou[k]
        if iou < iou_threshold:
            ios = pios[k]
            if masks[i] is not None and masks[j] is not None:
                ios = _mask_ios(masks[i], windows[i], masks[j], windows[j], areas[i], areas[j])
            if not ios >= ios_threshold:
                continue
        out.append((j, iou))
    return out


def _grown_views(group: _Group, by_x0: np.ndarray, x0_sorted: np.ndarray, widest: float,
                 boxes: np.ndarray, consumed: np.ndarray, tiles: np.ndarray, masks: list,
                 windows: list, iou_threshold: float, ios_threshold: float) -> list[tuple[int, float]]:
    """`_own_views` of a group whose box grew (united cut views), among boxes sorted by x0: a box
    can only meet [x0, x1) if its x0 lies in (x0 - widest box, x1)."""
    lo = np.searchsorted(x0_sorted, group.box[0] - widest, side="right")
    hi = np.searchsorted(x0_sorted, group.box[2], side="left")
    cand = by_x0[lo:hi]
    cand = cand[~consumed[cand] & ~np.isin(tiles[cand], list(group.tiles))]
    iou, ios = box_iou_ios(group.box, boxes[cand])
    keep = iou > 0  # boxes must really overlap
    out = []
    win = group.window if group.mask is not None else None
    for j, o, s in zip(cand[keep].tolist(), iou[keep].tolist(), ios[keep].tolist()):
        if o < iou_threshold and win is not None and masks[j] is not None:
            s = _mask_ios(group.mask, win, masks[j], windows[j])
        if o >= iou_threshold or s >= ios_threshold:
            out.append((j, o))
    return out
