"""Stages 5b and 8: test-time augmentation of the detector and the heads (pure functions).

Heads: with more than one view in a head's manifest (`tta`), each crop is classified in every
view (`view_crops`) and the logits are averaged (service.analysis.classify); the head's temperature is
fitted on those averaged logits (training.calibrate_head). A red cell has no orientation, so a
flipped crop is as good a sample of it as the original.

With more than one view in the detector's manifest (`tta`, e.g. identity + horizontal flip +
vertical flip), the pipeline runs tiling, detection and the cross-tile merge once per view of
the canonical frame, maps each view's cells back to the frame and fuses them here. Flipping the
whole frame (not each tile) also moves the tile grid, so a cell cut by a tile edge in one view is
seen whole in another.

Fusion is weighted box fusion (Solovyev, Wang and Gabruseva 2021, "Weighted boxes fusion"): per
class, the best-scoring unassigned cell leads a cluster and takes from every other view its
best-overlapping unassigned cell (IoU >= `FUSE_IOU`). The fused box is the score-weighted mean,
the mask a majority vote of the members' masks, and the score the SUM of the members' scores
divided by the number of views: a cell that only one view finds keeps a third of its score. The
detector's score calibration (training.calibrate_seg) is fitted on these fused scores.

White cells only: a cluster lying inside a larger one is a piece of it (a large monocyte that
one view found whole and another in two pieces), and its views vote for the larger one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import get_args

import numpy as np

from smearscope.engines.manifest import TestTimeView
from smearscope.service.analysis.boxes import inside_fraction, overlapping_pairs, pair_iou
from smearscope.service.analysis.merge import mask_window
from smearscope.service.analysis.records import Box, CellDetection, CellKind, Tile
from smearscope.service.analysis.tiling import iter_tiles

#: Views a model can run in (engines.manifest.TestTimeView); each is its own inverse.
VIEWS: tuple[str, ...] = get_args(TestTimeView)
#: One class's cells in different views are one cell when their boxes overlap this much.
FUSE_IOU = 0.55
#: Classes whose pieces are joined into the cluster that holds them (see `_absorb_pieces`).
ABSORB_KINDS: frozenset[CellKind] = frozenset({CellKind.WBC})
#: A cluster counts as a piece of a larger one when this fraction of its box lies inside it.
ABSORB_INSIDE = 0.8


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """The views as a tuple; unknown names or an empty list raise ValueError."""
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown:
        raise ValueError(f"test-time views must be a non-empty subset of {VIEWS}, got {views}")
    return views


def _flips(view: str) -> tuple[bool, bool]:
    return view in ("hflip", "rot180"), view in ("vflip", "rot180")


def view_frame(pixels: np.ndarray, view: str) -> np.ndarray:
    """The frame (H, W[, C]) as the detector sees it in `view` (contiguous, for the engines)."""
    fx, fy = _flips(view)
    return np.ascontiguousarray(pixels[:: -1 if fy else 1, :: -1 if fx else 1])


def view_tiles(pixels: np.ndarray, view: str, tile: int, overlap: float,
               skip_background: bool = True) -> Iterator[Tile]:
    """The tiles of `view_frame(pixels, view)`, lazily and without copying the frame
    (service.analysis.tiling.iter_tiles); offsets are in the view's coordinates."""
    fx, fy = _flips(view)
    return iter_tiles(pixels, tile, overlap, skip_background, flip_x=fx, flip_y=fy)


def view_crops(crops: np.ndarray, view: str) -> np.ndarray:
    """A stack of square crops (N, S, S[, C]) as a head sees them in `view` (a view of each crop)."""
    fx, fy = _flips(view)
    return crops[:, :: -1 if fy else 1, :: -1 if fx else 1]


def unview(det: CellDetection, view: str, frame_width: int, frame_height: int) -> CellDetection:
    """A cell found in `view` of a frame, mapped back to the frame (box and mask).

    The mask covers the box rounded outward; mirroring x -> W - x maps floor(x0)..ceil(x1) onto
    floor(W - x1)..ceil(W - x0) exactly, so the flipped mask covers the mapped box's window."""
    fx, fy = _flips(view)
    if not (fx or fy):
        return det
    b = det.box
    x0, x1 = (frame_width - b.x1, frame_width - b.x0) if fx else (b.x0, b.x1)
    y0, y1 = (frame_height - b.y1, frame_height - b.y0) if fy else (b.y0, b.y1)
    mask = det.mask
    if mask is not None:
        mask = np.ascontiguousarray(mask[:: -1 if fy else 1, :: -1 if fx else 1])
    return replace(det, box=Box(x0, y0, x1, y1), mask=mask)


def _vote(members: list[CellDetection], box: Box) -> np.ndarray | None:
    """Majority vote of the members' masks over the window of the fused `box`."""
    if any(m.mask is None for m in members):
        return None
    wins = [mask_window(m.box) for m in members]
    r0, c0 = min(w[0] for w in wins), min(w[1] for w in wins)
    r1, c1 = max(w[2] for w in wins), max(w[3] for w in wins)
    votes = np.zeros((r1 - r0, c1 - c0), np.float32)
    for m, (mr0, mc0, mr1, mc1) in zip(members, wins):
        mk = m.mask[: mr1 - mr0, : mc1 - mc0]  # never wider than its window
        votes[mr0 - r0 : mr0 - r0 + mk.shape[0], mc0 - c0 : mc0 - c0 + mk.shape[1]] += mk
    fr0, fc0, fr1, fc1 = mask_window(box)
    return np.ascontiguousarray(votes[fr0 - r0 : fr1 - r0, fc0 - c0 : fc1 - c0] >= len(members) / 2.0)


def fuse_views(per_view: Sequence[Sequence[CellDetection]], iou_threshold: float = FUSE_IOU,
               absorb_kinds: frozenset[CellKind] = ABSORB_KINDS) -> list[CellDetection]:
    """Fuse the cells each view found (all in frame coordinates) into one list."""
    n_views = len(per_view)
    if n_views == 1:
        return list(per_view[0])
    items = [(v, d) for v, dets in enumerate(per_view) for d in dets]
    out: list[CellDetection] = []
    for kind in sorted({d.kind for _, d in items}, key=lambda k: k.value):
        sel = sorted((it for it in items if it[1].kind == kind), key=lambda it: -it[1].score)
        partners = _partners(np.array([d.box.as_list() for _, d in sel], float), iou_threshold)
        taken = np.zeros(len(sel), bool)
        clusters: list[tuple[CellDetection, Box, np.ndarray | None, dict[int, float]]] = []
        for i in range(len(sel)):
            if taken[i]:
                continue
            taken[i] = True
            members, seen = [sel[i][1]], {sel[i][0]: sel[i][1].score}
            for j in partners[i]:
                if not taken[j] and sel[j][0] not in seen:
                    taken[j] = True
                    seen[sel[j][0]] = sel[j][1].score
                    members.append(sel[j][1])
            w = np.array([m.score for m in members])
            fused = (np.array([m.box.as_list() for m in members]) * w[:, None]).sum(0) / max(w.sum(), 1e-12)
            box = Box(*(float(v) for v in fused))
            clusters.append((members[0], box, _vote(members, box), seen))
        if kind in absorb_kinds:
            clusters = _absorb_pieces(clusters)
        out += [replace(lead, box=box, score=float(sum(votes.values()) / n_views), mask=mask)
                for lead, box, mask, votes in clusters]
    return out


def _partners(boxes: np.ndarray, iou_threshold: float) -> list[np.ndarray]:
    """For each box, the boxes overlapping it with IoU >= `iou_threshold` (itself included), best
    overlap first and ties in index order: the order a full IoU matrix sorted stably would give,
    found among overlapping boxes only (boxes.overlapping_pairs), so memory stays linear."""
    if iou_threshold <= 0:
        raise ValueError(f"fusion IoU threshold must be positive, got {iou_threshold}")
    i, j = overlapping_pairs(boxes)
    iou = pair_iou(boxes[i], boxes[j])
    keep = iou >= iou_threshold
    i, j, iou = i[keep], j[keep], iou[keep]
    order = np.lexsort((j, -iou, i))  # per box, best first, ties by index
    j = j[order]
    bounds = np.searchsorted(i[order], np.arange(len(boxes) + 1))
    return [j[bounds[k] : bounds[k + 1]] for k in range(len(boxes))]


def _absorb_pieces(clusters):
    """Join pieces of one large cell into the cluster whose box holds them.

    A large white cell (a monocyte) is sometimes found whole in one view and in two pieces in
    another; without this the whole cell keeps a third of its score and each piece another
    fraction, and the cell is lost below the threshold. A cluster whose box lies at least
    `ABSORB_INSIDE` inside a larger one of the same class is dropped, and its views' scores
    count for the larger one (per view the best score, so a view still votes once).
    """
    order = sorted(range(len(clusters)), key=lambda k: -clusters[k][1].area)
    gone: set[int] = set()
    for a in order:
        if a in gone:
            continue
        _, box, _, votes = clusters[a]
        for b in order:
            if b == a or b in gone or clusters[b][1].area > box.area:
                continue
            if inside_fraction(clusters[b][1].as_list(), box.as_list()) >= ABSORB_INSIDE:
                gone.add(b)
                for v, sc in clusters[b][3].items():
                    votes[v] = max(votes.get(v, 0.0), sc)
    return [c for k, c in enumerate(clusters) if k not in gone]
