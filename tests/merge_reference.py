"""The cross-tile merge's per-group loop as it stood before its rewrite as Python lists (commit
6bc0ce1's parent), kept as a plain reference for tests/test_merge_reference.py: the candidates
of a box as arrays, every pair compared (no grid), and the masks' overlap measured for every
candidate before both thresholds are asked."""

from __future__ import annotations

import numpy as np

from smearscope.service.analysis.merge import (
    _checked_mask,
    _Group,
    _mask_ios,
    _pairs_iou_ios,
    box_iou_ios,
)
from smearscope.service.analysis.records import CellDetection


def reference_merge(dets: list[CellDetection], iou_threshold: float = 0.5,
                    ios_threshold: float = 0.5) -> list[CellDetection]:
    out: list[CellDetection] = []
    for kind in dict.fromkeys(d.kind for d in dets):
        out.extend(_merge_one_kind([d for d in dets if d.kind == kind], iou_threshold, ios_threshold))
    return out


def _all_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = boxes[:, None, :], boxes[None, :, :]
    return np.nonzero((np.minimum(a[..., 2], b[..., 2]) > np.maximum(a[..., 0], b[..., 0]))
                      & (np.minimum(a[..., 3], b[..., 3]) > np.maximum(a[..., 1], b[..., 1])))


def _merge_one_kind(dets: list[CellDetection], iou_threshold: float,
                    ios_threshold: float) -> list[CellDetection]:
    n = len(dets)
    if n == 0:
        return []
    boxes = np.array([d.box.as_list() for d in dets], dtype=np.float64).reshape(n, 4)
    windows = [tuple(w) for w in np.concatenate([np.floor(boxes[:, [1, 0]]), np.ceil(boxes[:, [3, 2]])],
                                                 axis=1).astype(np.int64).tolist()]
    masks = [_checked_mask(d, w) for d, w in zip(dets, windows)]
    cut = np.array([d.cut_by_tile_edge for d in dets], bool)
    scores = np.array([d.score for d in dets], np.float64)
    tiles = np.array([d.tile_index if d.tile_index >= 0 else -1 - i for i, d in enumerate(dets)])
    order = np.lexsort((np.arange(n), -scores, cut))
    if (tiles == tiles[0]).all():
        return [dets[i] for i in order]
    rank = np.empty(n, np.intp)
    rank[order] = np.arange(n)
    pair_i, pair_j = _all_pairs(boxes)
    row = np.searchsorted(pair_i, np.arange(n + 1))
    pair_iou, pair_ios = _pairs_iou_ios(boxes[pair_i], boxes[pair_j])
    alone = np.ones(n, bool)
    alone[pair_i[tiles[pair_i] != tiles[pair_j]]] = False
    areas = [None if m is None else np.count_nonzero(m) for m in masks]
    by_x0 = np.argsort(boxes[:, 0], kind="stable")
    x0_sorted = boxes[by_x0, 0]
    widest = float(np.max(boxes[:, 2] - boxes[:, 0]))
    consumed = np.zeros(n, bool)

    result: list[CellDetection] = []
    for i in order:
        if consumed[i]:
            continue
        consumed[i] = True
        if alone[i]:
            result.append(dets[i])
            continue
        group = _Group(dets[i], boxes[i].copy(), masks[i], {int(tiles[i])})
        while True:
            if not group.united:
                cand, iou, ios = (a[row[i] : row[i + 1]] for a in (pair_j, pair_iou, pair_ios))
                keep = ~consumed[cand] & (tiles[cand] != tiles[i])
                cand, iou, ios = cand[keep], iou[keep], ios[keep].copy()
            else:
                lo = np.searchsorted(x0_sorted, group.box[0] - widest, side="right")
                hi = np.searchsorted(x0_sorted, group.box[2], side="left")
                cand = by_x0[lo:hi]
                cand = cand[~consumed[cand] & ~np.isin(tiles[cand], list(group.tiles))]
                iou, ios = box_iou_ios(group.box, boxes[cand])
                keep = iou > 0
                cand, iou, ios = cand[keep], iou[keep], ios[keep]
            if cand.size == 0:
                break
            if group.mask is not None:
                win = group.window
                area = areas[i] if not group.united else None
                for k, j in enumerate(cand.tolist()):
                    if masks[j] is not None:
                        ios[k] = _mask_ios(group.mask, win, masks[j], windows[j], area, areas[j])
            match = (iou >= iou_threshold) | (ios >= ios_threshold)
            cand, iou = cand[match], iou[match]
            if cand.size == 0:
                break
            best: dict[int, int] = {}
            for k in np.lexsort((rank[cand], -iou)):
                best.setdefault(int(tiles[cand[k]]), int(cand[k]))
            grown = False
            for j in sorted(best.values(), key=lambda j: rank[j]):
                consumed[j] = True
                group.tiles.add(int(tiles[j]))
                if group.det.cut_by_tile_edge or group.united:
                    group.unite(dets[j], masks[j])
                    grown = True
            if not grown:
                break
        result.append(group.result())
    return result
