"""The cross-tile merge against its earlier form (tests/merge_reference.py) on seeded random
tilings: the rewrite measures the masks' overlap only where the box IoU does not already decide,
and walks a detection's own candidates as Python lists; every merge must come out the same
(boxes, scores, masks, cut flags, order), at the edges too: identical boxes, a box inside
another, an IoU or IoS exactly at the threshold, boxes of zero area, cut cells at tile borders,
many overlapping tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from merge_reference import reference_merge

from smearscope.service.analysis.boxes import _grid_pairs
from smearscope.service.analysis.merge import mask_window, merge_detections
from smearscope.service.analysis.records import Box, CellDetection, CellKind


def _disc(box: Box, cx: float, cy: float, r: float) -> np.ndarray:
    r0, c0, r1, c1 = mask_window(box)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r


def _tiled_detections(seed: int) -> list[CellDetection]:
    """Cells (discs) on a frame, seen through tiles whose overlap is often larger than half a
    tile (a cell in up to 9 tiles): each tile reports the part of each cell it shows, cut where
    a tile's interior edge crosses it, its box sometimes jittered, snapped to whole or half
    pixels (ties and IoU / IoS exactly at 0.5), or copied (identical boxes), with or without a
    mask; a few boxes of zero area and detections of unknown tile."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(120, 260)), int(rng.integers(120, 260))
    tile = int(rng.integers(40, 90))
    step = max(8, int(tile * rng.uniform(0.3, 0.8)))
    snap = rng.choice([1.0, 0.5, 0.0])  # whole, half or free coordinates
    with_masks = rng.uniform()
    cells = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 40), list(CellKind)[int(rng.integers(len(CellKind)))])
             for _ in range(int(rng.integers(5, 30)))]
    dets: list[CellDetection] = []
    t = 0
    for ty in range(0, max(1, height - tile) + step, step):
        for tx in range(0, max(1, width - tile) + step, step):
            t += 1
            for cx, cy, r, kind in cells:
                if rng.uniform() < 0.1:
                    continue  # the detector missed it in this tile
                x0, y0 = max(cx - r, tx, 0), max(cy - r, ty, 0)
                x1, y1 = min(cx + r, tx + tile, width), min(cy + r, ty + tile, height)
                if x1 - x0 < 1 or y1 - y0 < 1:
                    continue
                cut = (x0 == tx > 0) or (y0 == ty > 0) or (x1 == tx + tile < width) or (y1 == ty + tile < height)
                if rng.uniform() < 0.3:
                    x0, y0 = x0 + rng.normal(0, 1.5), y0 + rng.normal(0, 1.5)
                    x1, y1 = x1 + rng.normal(0, 1.5), y1 + rng.normal(0, 1.5)
                if snap:
                    x0, y0, x1, y1 = (round(v / snap) * snap for v in (x0, y0, x1, y1))
                x0, y0 = max(x0, 0.0), max(y0, 0.0)
                if rng.uniform() < 0.03:
                    x1 = x0  # a box of zero area
                box = Box(float(x0), float(y0), float(max(x1, x0)), float(max(y1, y0)))
                mask = _disc(box, cx, cy, r) if rng.uniform() < with_masks else None
                score = float(rng.choice([0.5, 0.7, 0.9])) if rng.uniform() < 0.3 else float(rng.uniform(0.3, 1))
                tile_index = -1 if rng.uniform() < 0.03 else t
                dets.append(CellDetection(kind, box, score, mask, tile_index=tile_index, cut_by_tile_edge=cut))
                if rng.uniform() < 0.1:  # the same box again, from the next tile
                    dets.append(CellDetection(kind, box, float(rng.uniform(0.3, 1)), mask, tile_index=t + 1,
                                              cut_by_tile_edge=cut))
    rng.shuffle(dets)
    return dets


def _record(d: CellDetection) -> tuple:
    mask = None if d.mask is None else (d.mask.shape, np.packbits(d.mask).tobytes())
    return d.kind, d.box.as_list(), d.score, d.cut_by_tile_edge, d.tile_index, mask


@pytest.mark.parametrize("thresholds", [(0.5, 0.5), (0.3, 0.7), (0.7, 0.3), (1 / 3, 0.25)])
def test_the_merge_is_its_earlier_form_on_random_tilings(thresholds: tuple[float, float]) -> None:
    merged_somewhere = united_somewhere = 0
    for seed in range(60):
        dets = _tiled_detections(seed)
        new = merge_detections(dets, *thresholds)
        old = reference_merge(dets, *thresholds)
        assert [_record(d) for d in new] == [_record(d) for d in old], f"seed {seed}"
        merged_somewhere += len(new) < len(dets)
        given = {id(d) for d in dets}
        united_somewhere += any(id(d) not in given for d in new)
    assert merged_somewhere >= 50 and united_somewhere >= 20  # the cases were really there


def test_the_edges_of_the_box_decision_merge_as_before() -> None:
    """Hand-made pairs at the edges: identical boxes, a box inside another (IoU 0.25, IoS 1),
    IoU exactly 0.5, IoU a rounding below and above it, a zero-area box, each with masks that
    overlap little (so the masks, where asked, say no) and without masks."""
    near_half = math.nextafter(20.0, 0.0)
    pairs = [((0, 0, 40, 40), (0, 0, 40, 40)), ((0, 0, 40, 40), (10, 10, 30, 30)),
             ((0, 0, 30, 10), (10, 0, 40, 10)), ((0, 0, 30, 10), (near_half - 10, 0, 40, 10)),
             ((0, 0, 30, 10), (math.nextafter(10.0, 20.0), 0, 40, 10)), ((0, 0, 40, 40), (10, 10, 10, 30)),
             ((0.1, 0.2, 30.3, 10.7), (10.1, 0.2, 40.3, 10.7))]
    for a, b in pairs:
        for cut in (False, True):
            for masked in (False, True):
                dets = []
                for t, box in enumerate((Box(*map(float, a)), Box(*map(float, b)))):
                    mask = None
                    if masked:  # one pixel column at the box's own left edge
                        r0, c0, r1, c1 = mask_window(box)
                        mask = np.zeros((r1 - r0, c1 - c0), bool)
                        mask[:, :1] = True
                    dets.append(CellDetection(CellKind.RBC, box, 0.9 - t / 10, mask, tile_index=t,
                                              cut_by_tile_edge=cut))
                assert ([_record(d) for d in merge_detections(dets)]
                        == [_record(d) for d in reference_merge(dets)]), (a, b, cut, masked)


def test_a_united_cells_next_piece_at_exactly_the_iou_threshold_joins_as_before() -> None:
    """Two cut halves unite into (0, 0, 30, 10); a third cut piece (10, 0, 40, 10) meets that
    box at IoU 200 / 400 = 0.5 exactly while its mask (its right third) touches neither the
    first half's mask nor the united mask: the box IoU alone decides, inclusively, and the piece
    joins; the same with the earlier form."""
    boxes = ((0, 0, 20, 10), (10, 0, 30, 10), (10, 0, 40, 10))
    right = np.zeros((10, 30), bool)
    right[:, 20:] = True
    masks = (np.ones((10, 20), bool), np.ones((10, 20), bool), right)
    dets = [CellDetection(CellKind.RBC, Box(*map(float, b)), 0.9 - t / 10, m, tile_index=t, cut_by_tile_edge=True)
            for t, (b, m) in enumerate(zip(boxes, masks))]
    merged = merge_detections(dets)
    assert [d.box.as_list() for d in merged] == [[0, 0, 40, 10]]
    assert [_record(d) for d in merged] == [_record(d) for d in reference_merge(dets)]


def _grid_pairs_by_unique(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """boxes._grid_pairs as it stood before the sort: the distinct (i, j) by np.unique."""
    n = len(boxes)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cell = max(1.0, 2.0 * float(np.median(side)))
    g = np.floor(boxes / cell).astype(np.int64)
    g[:, 2] = np.maximum(g[:, 2], g[:, 0])
    g[:, 3] = np.maximum(g[:, 3], g[:, 1])
    nx, ny = g[:, 2] - g[:, 0] + 1, g[:, 3] - g[:, 1] + 1
    counts = nx * ny
    owner = np.repeat(np.arange(n), counts)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    cx = g[owner, 0] + k % nx[owner] - g[:, 0].min()
    cy = g[owner, 1] + k // nx[owner] - g[:, 1].min()
    cell_id = cy * (int(cx.max()) + 1) + cx
    order = np.argsort(cell_id, kind="stable")
    members, cell_id = owner[order], cell_id[order]
    _, start, size = np.unique(cell_id, return_index=True, return_counts=True)
    per_entry = np.repeat(size, size)
    first = np.repeat(start, size)
    left = np.repeat(members, per_entry)
    offset = np.arange(len(left)) - np.repeat(np.cumsum(per_entry) - per_entry, per_entry)
    right = members[np.repeat(first, per_entry) + offset]
    key = np.unique(left.astype(np.int64) * n + right)
    i, j = key // n, key % n
    a, b = boxes[i], boxes[j]
    overlap = (np.minimum(a[:, 2], b[:, 2]) > np.maximum(a[:, 0], b[:, 0])) & (
        np.minimum(a[:, 3], b[:, 3]) > np.maximum(a[:, 1], b[:, 1]))
    return i[overlap], j[overlap]


def test_a_64_megapixel_fields_overlap_pairs_are_np_uniques() -> None:
    """The overlap grid's distinct pairs by a sort are np.unique's on a 64 MP (8000 x 8000)
    field's worth of detections at the canonical scale: 60,000 boxes of 30 to 45 px (red cells
    at 0.2 um/px, three views' worth overlapping), so the pair key i * n + j reaches 3.6e9, past
    a 32-bit integer; each cell's boxes span several grid cells, so keys repeat."""
    rng = np.random.default_rng(64)
    n = 60_000
    xy = rng.uniform(0, 8000, (n, 2))
    wh = rng.uniform(30, 45, (n, 2))
    wh[rng.random(n) < 0.02] *= 4  # a few large (white cells, united pieces)
    boxes = np.concatenate([xy, xy + wh], 1)
    i, j = _grid_pairs(boxes)
    want_i, want_j = _grid_pairs_by_unique(boxes)
    assert (want_i.max() * n + want_j.max()) > np.iinfo(np.int32).max
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(j, want_j)
