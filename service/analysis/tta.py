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

Views where they pay (`AnalyzerOptions.detector_views_where = "unsure"`): the first view runs
everywhere; the other views run only on tiles that show, whole, the cells the first view was
unsure of (calibrated score inside a band around the counting threshold) or that the merge left
cut by a tile edge: tiles placed around those cells (`place_tiles`, a greedy cover) or the grid's
tiles that hold them (`tiles_for_boxes`), whichever are fewer; or, by default, small windows
around those cells packed into tiles (service.analysis.view_windows), when that needs fewer
detector inputs still. `Coverage` records which part of
the frame each view saw; a cell's fused score is the sum of its members' scores over the number of views that saw it whole. A cell only the first
view saw keeps its own score (where every view runs, the others' would have been averaged in, so
a sure cell's score can read higher than full fusion gives it); a cell every view saw is fused as
when every view runs everywhere, except that an extra view's cross-tile merge only had the tiles
it ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import get_args

import numpy as np

from smearscope.engines.manifest import TestTimeView
from smearscope.service.analysis.boxes import inside_fraction, overlapping_pairs, pair_iou
from smearscope.service.analysis.merge import mask_window
from smearscope.service.analysis.records import Box, CellDetection, CellKind, Tile
from smearscope.service.analysis.tiling import StainedArea, iter_tiles, tile_at

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


def view_frame(pixels: np.ndarray, view: str, contiguous: bool = True) -> np.ndarray:
    """The frame (H, W[, C]) as the detector sees it in `view`: contiguous, for the engines, or
    (`contiguous=False`) a strided view of `pixels`, for a caller that copies it anyway."""
    fx, fy = _flips(view)
    flipped = pixels[:: -1 if fy else 1, :: -1 if fx else 1]
    return np.ascontiguousarray(flipped) if contiguous else flipped


def view_tiles(pixels: np.ndarray, view: str, tile: int, overlap: float,
               skip_background: bool = True, stained: StainedArea | None = None) -> Iterator[Tile]:
    """The tiles of `view_frame(pixels, view)`, lazily and without copying the frame
    (service.analysis.tiling.iter_tiles; `stained`: the frame's StainedArea, shared between
    views); offsets are in the view's coordinates."""
    fx, fy = _flips(view)
    return iter_tiles(pixels, tile, overlap, skip_background, flip_x=fx, flip_y=fy, stained=stained)


def view_tile_at(pixels: np.ndarray, index: int, x: int, y: int, tile: int, view: str) -> Tile:
    """The tile at offset (x, y) of `view_frame(pixels, view)`, anywhere (not only on the grid),
    cut as `view_tiles` cuts its tiles (service.analysis.tiling.tile_at)."""
    fx, fy = _flips(view)
    return tile_at(pixels, index, x, y, tile, flip_x=fx, flip_y=fy)


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


def view_window(tile: Tile, view: str, tile_size: int, frame_width: int, frame_height: int) -> tuple[int, int, int, int]:
    """The part of the frame (x0, y0, x1, y1) that a tile of `view` (offsets in the view's
    coordinates, service.analysis.tiling.iter_tiles) shows."""
    return frame_window((tile.x, tile.y, min(tile.x + tile_size, frame_width), min(tile.y + tile_size, frame_height)),
                        view, frame_width, frame_height)


def frame_window(window: tuple[int, int, int, int], view: str, frame_width: int,
                 frame_height: int) -> tuple[int, int, int, int]:
    """A window (x0, y0, x1, y1) of `view` of a frame, mapped back to the frame's coordinates."""
    fx, fy = _flips(view)
    x0, y0, x1, y1 = window
    if fx:
        x0, x1 = frame_width - x1, frame_width - x0
    if fy:
        y0, y1 = frame_height - y1, frame_height - y0
    return x0, y0, x1, y1


def tiles_for_boxes(windows: Sequence[tuple[int, int, int, int]], boxes: np.ndarray) -> list[int]:
    """Indices of the fewest windows that show each box: per box the window holding it whole with
    the widest margin, or every window it overlaps when none holds it whole (the merge then joins
    its pieces). Sorted, each once."""
    if not len(windows) or not len(boxes):
        return []
    win = np.asarray(windows, float)[None, :, :]
    b = np.asarray(boxes, float)[:, None, :]
    margin = np.minimum.reduce([b[..., 0] - win[..., 0], b[..., 1] - win[..., 1],
                                win[..., 2] - b[..., 2], win[..., 3] - b[..., 3]])  # (boxes, windows)
    overlaps = ((b[..., 0] < win[..., 2]) & (b[..., 2] > win[..., 0])
                & (b[..., 1] < win[..., 3]) & (b[..., 3] > win[..., 1]))
    chosen: set[int] = set()
    for m, o in zip(margin, overlaps):
        chosen.update([int(np.argmax(m))] if m.max() >= 0 else np.flatnonzero(o).tolist())
    return sorted(chosen)


#: A placed tile shows a box whole when the box keeps this far from the tile's sides inside the
#: frame (beyond segment.EDGE_MARGIN_PX, within which a box counts as cut).
PLACE_MARGIN_PX = 8.0


def boxes_in_view(boxes: np.ndarray, view: str, frame_width: int, frame_height: int) -> np.ndarray:
    """Frame boxes (n, 4) in the coordinates of `view` of the frame."""
    b = np.asarray(boxes, float).reshape(-1, 4).copy()
    fx, fy = _flips(view)
    if fx:
        b[:, [0, 2]] = frame_width - b[:, [2, 0]]
    if fy:
        b[:, [1, 3]] = frame_height - b[:, [3, 1]]
    return b


def place_tiles(boxes: np.ndarray, frame_width: int, frame_height: int, tile: int,
                margin: float = PLACE_MARGIN_PX) -> list[tuple[int, int]]:
    """Offsets (x, y) of few tiles, placed anywhere in the frame (not on the tiling grid), that
    show every box whole (`margin` from each tile side that is not the frame's edge).

    Greedy cover: the first box (reading order) not yet shown gets the tile, among those that show
    it with a side flush with a nearby box's side (or centred on it), that shows the most boxes
    not yet shown. Linear in the boxes for a given density (only boxes within a tile's reach of
    each other are compared).
    A box too large for any tile gets none."""
    b = np.asarray(boxes, float).reshape(-1, 4)
    max_x, max_y = max(0, frame_width - tile), max(0, frame_height - tile)

    def shows(xs: np.ndarray, ys: np.ndarray, bb: np.ndarray) -> np.ndarray:
        """(len(xs), len(ys), len(bb)): tile (x, y) shows box bb[k] whole."""
        x, y = xs[:, None, None], ys[None, :, None]
        x0, y0, x1, y1 = (bb[None, None, :, c] for c in range(4))
        return (((x0 - margin >= x) | (x == 0)) & ((y0 - margin >= y) | (y == 0))
                & ((x1 + margin <= x + tile) | (x + tile >= frame_width))
                & ((y1 + margin <= y + tile) | (y + tile >= frame_height)))

    def positions(values: list[float], hi: int) -> np.ndarray:
        """The distinct whole-pixel offsets, in [0, hi], ascending (a set of a few dozen values:
        NumPy's unique costs more than the values' work)."""
        return np.array(sorted({min(max(math.floor(v), 0), hi) for v in values}), int)

    left = np.ones(len(b), bool)
    out: list[tuple[int, int]] = []
    for i in np.lexsort((b[:, 0], b[:, 1])):
        if not left[i]:
            continue
        left[i] = False
        x0, y0, x1, y1 = b[i]
        if x1 - x0 + 2 * margin > tile and (x0 > 0 or x1 < frame_width):
            continue  # wider than a tile shows whole
        if y1 - y0 + 2 * margin > tile and (y0 > 0 or y1 < frame_height):
            continue
        # boxes still to show that could share a tile with this one; tile sides flush (with the
        # margin) with one of their sides, or centred on this box
        near = np.flatnonzero(left & (b[:, 2] <= x0 + tile) & (b[:, 0] >= x1 - tile)
                              & (b[:, 3] <= y0 + tile) & (b[:, 1] >= y1 - tile))
        nb = b[near]
        xs = positions([x0 - margin, x1 + margin - tile, (x0 + x1 - tile) / 2, *(nb[:, 0] - margin).tolist(),
                        *(nb[:, 2] + margin - tile).tolist()], max_x)
        ys = positions([y0 - margin, y1 + margin - tile, (y0 + y1 - tile) / 2, *(nb[:, 1] - margin).tolist(),
                        *(nb[:, 3] + margin - tile).tolist()], max_y)
        own = shows(xs, ys, b[i : i + 1])[..., 0]
        if not own.any():
            continue
        count = np.where(own, shows(xs, ys, nb).sum(axis=2), -1)
        ix, iy = np.unravel_index(int(np.argmax(count)), count.shape)  # first best: smallest x, then y
        x, y = int(xs[ix]), int(ys[iy])
        left[near[shows(xs[ix : ix + 1], ys[iy : iy + 1], nb)[0, 0]]] = False
        out.append((x, y))
    return out


class Coverage:
    """Which part of the frame each extra view saw, on a raster of `cell` pixels.

    A box counts as seen by a view when every raster cell it touches lies in a window the view
    ran: a cell cut by the border of the region a view ran is not seen whole by that view. Boxes
    are looked up many at once, each in constant time, by counting the raster cells a view did
    not see under the box (an integral image per view, made once the windows are all added)."""

    def __init__(self, frame_width: int, frame_height: int, n_views: int, cell: int = 4) -> None:
        self.cell = cell
        self.w, self.h = frame_width, frame_height
        self.seen = np.zeros((n_views, -(-frame_height // cell), -(-frame_width // cell)), bool)
        self._unseen: np.ndarray | None = None

    def add(self, view_index: int, window: tuple[int, int, int, int]) -> None:
        x0, y0, x1, y1 = window
        c = self.cell
        # only raster cells wholly inside the window (the frame's last partial cell counts as whole)
        cx0, cy0 = -(-x0 // c), -(-y0 // c)
        cx1 = self.seen.shape[2] if x1 >= self.w else x1 // c
        cy1 = self.seen.shape[1] if y1 >= self.h else y1 // c
        self.seen[view_index, cy0:cy1, cx0:cx1] = True
        self._unseen = None

    def _unseen_counts(self, boxes: np.ndarray) -> np.ndarray:
        """(views, boxes): raster cells under each box (x0, y0, x1, y1 rows) that each view did not see."""
        if self._unseen is None:
            n, rows, cols = self.seen.shape
            self._unseen = np.zeros((n, rows + 1, cols + 1), np.int32)
            self._unseen[:, 1:, 1:] = (~self.seen).cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        c = self.cell
        rows, cols = self.seen.shape[1:]
        # the cells a box touches: int() of its start and ceil of its end, at least one cell;
        # clipped to the raster as slicing would clip them
        x0 = np.maximum(b[:, 0].astype(np.int64) // c, 0)
        y0 = np.maximum(b[:, 1].astype(np.int64) // c, 0)
        x1 = np.maximum(np.minimum(-(-np.ceil(b[:, 2]).astype(np.int64) // c), cols), x0 + 1)
        y1 = np.maximum(np.minimum(-(-np.ceil(b[:, 3]).astype(np.int64) // c), rows), y0 + 1)
        x0, x1 = np.minimum(x0, cols), np.minimum(x1, cols)
        y0, y1 = np.minimum(y0, rows), np.minimum(y1, rows)
        s = self._unseen
        return s[:, y1, x1] - s[:, y0, x1] - s[:, y1, x0] + s[:, y0, x0]

    def sees(self, view_index: int, box: Box) -> bool:
        return bool(self.seen_whole(view_index, np.array([box.as_list()]))[0])

    def views_seeing(self, box: Box) -> int:
        return int(self.views_seeing_whole(np.array([box.as_list()]))[0])

    def seen_whole(self, view_index: int, boxes: np.ndarray) -> np.ndarray:
        """Per box (rows x0, y0, x1, y1): view `view_index` saw it whole."""
        return self._unseen_counts(boxes)[view_index] == 0

    def views_seeing_whole(self, boxes: np.ndarray) -> np.ndarray:
        """Per box: how many views saw it whole."""
        return (self._unseen_counts(boxes) == 0).sum(axis=0)


def _vote(members: list[CellDetection], box: Box) -> np.ndarray | None:
    """Majority vote of the members' masks over the window of the fused `box`."""
    if any(m.mask is None for m in members):
        return None
    wins = [mask_window(m.box) for m in members]
    fr0, fc0, fr1, fc1 = mask_window(box)
    if len(members) == 1 and wins[0] == (fr0, fc0, fr1, fc1) and members[0].mask.shape == (fr1 - fr0, fc1 - fc0):
        return members[0].mask  # one voter on its own window: its mask (records are never written to)
    r0, c0 = min(w[0] for w in wins), min(w[1] for w in wins)
    r1, c1 = max(w[2] for w in wins), max(w[3] for w in wins)
    votes = np.zeros((r1 - r0, c1 - c0), np.uint8)
    for m, (mr0, mc0, mr1, mc1) in zip(members, wins):
        mk = m.mask[: mr1 - mr0, : mc1 - mc0]  # never wider than its window
        votes[mr0 - r0 : mr0 - r0 + mk.shape[0], mc0 - c0 : mc0 - c0 + mk.shape[1]] += mk.astype(bool, copy=False)
    return np.ascontiguousarray(votes[fr0 - r0 : fr1 - r0, fc0 - c0 : fc1 - c0] >= len(members) / 2.0)


def fuse_views(per_view: Sequence[Sequence[CellDetection]], iou_threshold: float = FUSE_IOU,
               absorb_kinds: frozenset[CellKind] = ABSORB_KINDS,
               seen_by: Callable[[np.ndarray], np.ndarray] | None = None) -> list[CellDetection]:
    """Fuse the cells each view found (all in frame coordinates) into one list.

    `seen_by(boxes)`: how many views saw each box (rows x0, y0, x1, y1) whole (default: every
    view); a cluster's score is its members' scores summed over that number (never over fewer
    views than voted)."""
    n_views = len(per_view)
    if n_views == 1:
        return list(per_view[0])
    items = [(v, d) for v, dets in enumerate(per_view) for d in dets]
    out: list[CellDetection] = []
    for kind in sorted({d.kind for _, d in items}, key=lambda k: k.value):
        sel = sorted((it for it in items if it[1].kind == kind), key=lambda it: -it[1].score)
        boxes = np.array([d.box.as_list() for _, d in sel], float).reshape(-1, 4)
        partners = _partners(boxes, iou_threshold)
        own_box, keeps_box, keeps_mask = _alone(boxes, [d for _, d in sel])
        taken = [False] * len(sel)  # a list: read one item at a time
        clusters: list[tuple[CellDetection, Box, np.ndarray | None, dict[int, float]]] = []
        for i in range(len(sel)):
            if taken[i]:
                continue
            taken[i] = True
            members, seen = [sel[i][1]], {sel[i][0]: sel[i][1].score}
            for j in partners[i].tolist():
                if not taken[j] and sel[j][0] not in seen:
                    taken[j] = True
                    seen[sel[j][0]] = sel[j][1].score
                    members.append(sel[j][1])
            # the score-weighted mean box (summed in member order, as numpy's sum over a few rows
            # does; sum() starts from 0, so a lone member's sums are 0 + its values)
            if len(members) == 1 and keeps_box[i]:  # its own box back, bit for bit: its own record's
                box = members[0].box
                clusters.append((members[0], box, members[0].mask if keeps_mask[i] else _vote(members, box), seen))
                continue
            if len(members) == 1:
                box = Box(*own_box[i].tolist())
            else:
                total = max(sum(m.score for m in members), 1e-12)
                box = Box(*(sum(m.score * v for m in members for v in (getattr(m.box, a),)) / total
                            for a in ("x0", "y0", "x1", "y1")))
            clusters.append((members[0], box, _vote(members, box), seen))
        if kind in absorb_kinds:
            clusters = _absorb_pieces(clusters)
        seen = ([n_views] * len(clusters) if seen_by is None
                else seen_by(np.array([c[1].as_list() for c in clusters], float).reshape(-1, 4)).tolist())
        out += [_fused(lead, box, mask, float(sum(votes.values()) / max(n_seen, len(votes))))
                for (lead, box, mask, votes), n_seen in zip(clusters, seen)]
    return out


def _alone(boxes: np.ndarray, dets: list[CellDetection]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """For each cell as a cluster of its own, all at once: the fused box (s * v / s, summed from 0
    as fuse_views sums a cluster's members: NumPy's float64 arithmetic rounds as Python's does),
    whether that is its own box bit for bit (0.0 and -0.0 differ), and whether its mask covers its
    own box's window (what _vote hands back unchanged)."""
    scores = np.array([d.score for d in dets], float)
    own = (0 + scores[:, None] * boxes) / np.maximum(0 + scores, 1e-12)[:, None]
    keeps = (own.view(np.int64) == boxes.view(np.int64)).all(axis=1)
    rows = (np.ceil(boxes[:, 3]) - np.floor(boxes[:, 1])).astype(np.int64).tolist()
    cols = (np.ceil(boxes[:, 2]) - np.floor(boxes[:, 0])).astype(np.int64).tolist()
    fits = [d.mask is None or d.mask.shape == (r, c) for d, r, c in zip(dets, rows, cols)]
    return own, keeps.tolist(), fits


def _fused(lead: CellDetection, box: Box, mask: np.ndarray | None, score: float) -> CellDetection:
    """The cluster's cell: its lead itself when the fusion gave it back its own box and mask and
    the same score bit for bit (most cells only the first view saw), else a copy with those."""
    if box is lead.box and mask is lead.mask and score == lead.score \
            and (score != 0.0 or math.copysign(1.0, score) == math.copysign(1.0, lead.score)):
        return lead
    return replace(lead, box=box, mask=mask, score=score)


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
