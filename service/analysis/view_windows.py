"""Stage 5b: the detector's extra views on small windows around the unsure cells, packed into tiles.

With views where they pay (service.analysis.tta), the views after the first run only where the
first view was unsure. A whole tile (256 px) around each unsure cell shows mostly cells the
first view was sure of; a window of the unsure cell and `WINDOW_MARGIN_PX` of context around it
is a few percent of a tile. Here the windows of every extra view are cut from the (mirrored)
frame and packed side by side, `WINDOW_GAP_PX` of padding grey apart, into tiles of the
detector's input size: the engine's input keeps its one static shape (TensorRT engines are
built for it) and a field's extra views cost a tile or two instead of one tile per unsure cell.

Pure functions on coordinates and pixels; the pipeline runs the packed tiles through the
segmenter as ordinary tiles of a frame the size of one tile and hands the detections to
`unpack`, which keeps those lying whole inside a window and maps them to the view's coordinates
(those cut by a window side inside the frame are dropped: another window or the first view shows
them). Windows larger than a tile are left to the caller (`plan_windows(...).left_over`), which
places whole tiles around those cells as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from smearscope.service.analysis.records import Box, CellDetection, Tile
from smearscope.service.analysis.segment import EDGE_MARGIN_PX
from smearscope.service.analysis.tiling import PAD_VALUE, copy_pixels

#: Context kept around an unsure cell in its window (9.6 um at the canonical 0.2 um/px: with 4.8 um,
#: Chula val lost 0.026 of its labelled red cells against whole tiles; with 9.6 um, 0.003).
WINDOW_MARGIN_PX = 48
#: Padding grey between two windows packed into one tile.
WINDOW_GAP_PX = 16
#: A window's view judges only the cells lying this far inside its sides within the frame: a cell
#: that a window shows whole but with little context around it is often missed there (a dense
#: field's confident red cell 18 px inside a window side went unseen by both extra views, and the
#: fusion then divided its score by three), so such a cell keeps the first view's verdict.
WINDOW_SEES_INSET_PX = WINDOW_MARGIN_PX // 2


@dataclass(frozen=True)
class Placement:
    """Window (x0, y0, x1, y1) of view `view_index` (the view's coordinates) at (cx, cy) of
    packed tile `tile`."""

    view_index: int
    window: tuple[int, int, int, int]
    tile: int
    cx: int
    cy: int

    @property
    def size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.window
        return x1 - x0, y1 - y0


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows went: `placements` in `n_tiles` packed tiles; `left_over[k]` the indices
    of view k's boxes whose window is larger than a tile."""

    placements: tuple[Placement, ...]
    n_tiles: int
    left_over: tuple[tuple[int, ...], ...]


def unsure_windows(boxes: np.ndarray, frame_width: int, frame_height: int, side: int,
                   margin: int = WINDOW_MARGIN_PX) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """Windows (integer x0, y0, x1, y1, inside the frame) that show each box with `margin` around
    it, joined where one window over two costs no more pixels than both; and the indices of the
    boxes whose window would be wider or taller than `side`."""
    b = np.asarray(boxes, float).reshape(-1, 4)
    wins: list[list[int]] = []
    too_big: list[int] = []
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
        win = [max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin)),
               min(frame_width, math.ceil(x1 + margin)), min(frame_height, math.ceil(y1 + margin))]
        if win[2] - win[0] > side or win[3] - win[1] > side:
            too_big.append(i)
        elif win[2] > win[0] and win[3] > win[1]:
            wins.append(win)

    arr = np.array(wins, np.int64).reshape(-1, 4)
    alive = (_join_by_table if len(arr) <= JOIN_TABLE_UP_TO else _join_one_at_a_time)(arr, side)
    wins = arr[alive].tolist()
    return [tuple(w) for w in wins], too_big  # type: ignore[misc]


#: Up to this many windows the join keeps a table of every pair of them (a few MB at most);
#: beyond it, it judges one window against all the others at a time, so memory stays linear in
#: the windows (a 64 MP field unsure of 3000 cells: 550 MB for the table).
JOIN_TABLE_UP_TO = 256


def _join_one_at_a_time(arr: np.ndarray, side: int) -> np.ndarray:
    """Join windows `arr` (rows x0, y0, x1, y1, grown in place) greedily: window by window
    (passes until none joins), each with the neighbour whose union adds the fewest pixels (none
    added over the two; the first such in index order). Which windows are left (a mask)."""
    alive = np.ones(len(arr), bool)
    joined = True
    while joined:
        joined = False
        for i in range(len(arr)):
            if not alive[i]:
                continue
            u, extra, ok = _joins(arr[i : i + 1], arr, alive, side)
            ok[0, i] = False
            if ok.any():
                j = int(np.flatnonzero(ok[0])[np.argmin(extra[0][ok[0]])])
                arr[i] = u[0, j]
                alive[j] = False
                joined = True
    return alive


def _join_by_table(arr: np.ndarray, side: int) -> np.ndarray:
    """`_join_one_at_a_time`, judging every pair once up front and, after a join, only the grown
    window's pairs again, so the walk goes straight to the next window that has a partner
    (integers: each judgement is the one a window at a time would make). Quadratic memory: for
    few windows (JOIN_TABLE_UP_TO), where it takes half the CPU."""
    alive = np.ones(len(arr), bool)
    u, extra, ok = _joins(arr, arr, alive, side)
    np.fill_diagonal(ok, False)
    joined = True
    while joined:
        joined = False
        i = 0
        while i < len(arr):
            later = np.flatnonzero(ok[i:].any(axis=1))
            if not later.size:
                break
            i += int(later[0])
            j = int(np.flatnonzero(ok[i])[np.argmin(extra[i][ok[i]])])
            arr[i] = u[i, j]
            alive[j] = False
            ok[j, :] = ok[:, j] = False
            ui, ei, oi = _joins(arr[i : i + 1], arr, alive, side)
            u[i, :] = u[:, i] = ui[0]
            extra[i, :] = extra[:, i] = ei[0]
            oi[0, i] = False
            ok[i, :] = ok[:, i] = oi[0]
            joined = True
            i += 1
    return alive


def _joins(rows: np.ndarray, arr: np.ndarray, alive: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For windows `rows` (all alive) against every window of `arr`: their union, the pixels it
    adds over the two, and whether they may be joined (the other alive, the union within `side`,
    no pixel added)."""
    u = np.concatenate([np.minimum(arr[None, :, :2], rows[:, None, :2]),
                        np.maximum(arr[None, :, 2:], rows[:, None, 2:])], axis=2)
    uw, uh = u[..., 2] - u[..., 0], u[..., 3] - u[..., 1]
    areas = (arr[:, 2] - arr[:, 0]) * (arr[:, 3] - arr[:, 1])
    extra = uw * uh - areas[None, :] - ((rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1]))[:, None]
    return u, extra, alive[None, :] & (uw <= side) & (uh <= side) & (extra <= 0)


#: The packer's occupancy raster (pixels per cell).
_CELL = 8


def pack(sizes: Sequence[tuple[int, int]], side: int, gap: int = WINDOW_GAP_PX,
         flush: Sequence[tuple[bool, bool, bool, bool]] | None = None) -> list[tuple[int, int, int]]:
    """(tile, x, y) for each (width, height) <= side, `gap` apart, largest first, first fit.

    `flush[i]` = (left, top, right, bottom): window i ends at that edge of the frame, so it goes
    against the same edge of its tile: the detector then sees the frame's edge as the edge of its
    input, as it does in the frame's own tiles (not as padding grey)."""
    flush = list(flush) if flush is not None else [(False, False, False, False)] * len(sizes)
    n = -(-side // _CELL)
    order = sorted(range(len(sizes)), key=lambda i: (-sum(flush[i]), -sizes[i][0] * sizes[i][1], i))
    used: list[np.ndarray] = []  # per tile: raster cells taken (windows grown by the gap)
    sums: list[np.ndarray] = []  # per tile: the raster's integral image
    failed: list[list[tuple[int, int]]] = []  # per tile: sizes that found no room (tiles only fill up)
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(sizes)
    for i in order:
        w, h = sizes[i]
        left, top, right, bottom = flush[i]
        xs = [0] if left else [side - w] if right else range(0, side - w + 1, _CELL)
        ys = [0] if top else [side - h] if bottom else range(0, side - h + 1, _CELL)
        # the raster cells under the candidate positions, as slices of the integral image: the
        # positions are one value or steps of one cell, so their first and last cells run in steps of one
        x0 = slice(xs[0] // _CELL, xs[0] // _CELL + len(xs))
        x1 = slice(-(-(xs[0] + w) // _CELL), -(-(xs[0] + w) // _CELL) + len(xs))
        y0 = slice(ys[0] // _CELL, ys[0] // _CELL + len(ys))
        y1 = slice(-(-(ys[0] + h) // _CELL), -(-(ys[0] + h) // _CELL) + len(ys))
        need = (w // _CELL) * (h // _CELL)
        free_to_move = not (left or top or right or bottom)
        for t in range(len(used) + 1):
            if t == len(used):
                used.append(np.zeros((n, n), bool))
                sums.append(np.zeros((n + 1, n + 1), np.int32))
                failed.append([])
            s_ = sums[t]
            if n * n - s_[n, n] < need or (free_to_move and any(w >= fw and h >= fh for fw, fh in failed[t])):
                continue  # no room left for it in this tile
            # cells taken under each candidate position
            free = (s_[y1, x1] - s_[y0, x1] - s_[y1, x0] + s_[y0, x0]) == 0
            first = int(free.argmax())
            if free.flat[first]:  # the first free position in reading order
                r, c = divmod(first, len(xs))
                x, y = int(xs[c]), int(ys[r])
                used[t][max(0, y - gap) // _CELL : -(-(y + h + gap) // _CELL),
                        max(0, x - gap) // _CELL : -(-(x + w + gap) // _CELL)] = True
                s_[1:, 1:] = used[t].cumsum(0).cumsum(1)
                out[i] = (t, x, y)
                break
            if free_to_move:
                failed[t].append((w, h))
    return out


def plan_windows(boxes_per_view: Sequence[np.ndarray], frame_width: int, frame_height: int, side: int,
                 margin: int = WINDOW_MARGIN_PX, gap: int = WINDOW_GAP_PX) -> WindowPlan:
    """Windows around each view's boxes (given in that view's coordinates), packed together."""
    wins: list[tuple[int, tuple[int, int, int, int]]] = []
    left_over = []
    for k, boxes in enumerate(boxes_per_view):
        found, too_big = unsure_windows(boxes, frame_width, frame_height, side, margin)
        wins += [(k, w) for w in found]
        left_over.append(tuple(too_big))
    spots = pack([(w[2] - w[0], w[3] - w[1]) for _, w in wins], side, gap,
                 [(w[0] == 0, w[1] == 0, w[2] == frame_width, w[3] == frame_height) for _, w in wins])
    placements = tuple(Placement(k, w, t, x, y) for (k, w), (t, x, y) in zip(wins, spots))
    return WindowPlan(placements, 1 + max((p.tile for p in placements), default=-1), tuple(left_over))


def judged_region(window: tuple[int, int, int, int], frame_width: int, frame_height: int,
                  inset: int = WINDOW_SEES_INSET_PX) -> tuple[int, int, int, int]:
    """The part of `window` whose cells its view judges: `inset` in from each side that lies
    inside the frame (a side on the frame's edge stays, as a tile's does)."""
    x0, y0, x1, y1 = window
    return (x0 + inset if x0 > 0 else x0, y0 + inset if y0 > 0 else y0,
            x1 - inset if x1 < frame_width else x1, y1 - inset if y1 < frame_height else y1)


def packed_tiles(view_pixels: Sequence[np.ndarray], plan: WindowPlan, side: int,
                 first_index: int = 0) -> list[Tile]:
    """The plan's tiles (side x side, padding grey around the windows); `view_pixels[k]`: view k
    of the frame (service.analysis.tta.view_frame, or any array that reads the same)."""
    canvases = [np.full((side, side, 3), PAD_VALUE, np.uint8) for _ in range(plan.n_tiles)]
    for p in plan.placements:
        x0, y0, x1, y1 = p.window
        copy_pixels(canvases[p.tile][p.cy : p.cy + y1 - y0, p.cx : p.cx + x1 - x0], view_pixels[p.view_index][y0:y1, x0:x1])
    return [Tile(index=first_index + t, x=0, y=0, pixels=c) for t, c in enumerate(canvases)]


def unpack(detections: Sequence[CellDetection], plan: WindowPlan, first_index: int, frame_width: int,
           frame_height: int, index_of: Sequence[int]) -> list[list[CellDetection]]:
    """Detections on the packed tiles (tile coordinates, `tile_index` = first_index + tile) ->
    per view, those lying whole inside a window, in the view's coordinates, with tile index
    `index_of[placement number]`. A detection belongs to the window holding its box centre; one
    within EDGE_MARGIN_PX of a window side inside the frame is cut there and dropped; a side on
    the frame's edge clips it (as a tile's padding does)."""
    n_views = 1 + max((p.view_index for p in plan.placements), default=-1)
    out: list[list[CellDetection]] = [[] for _ in range(n_views)]
    by_tile = _placements_by_tile(plan)
    for d in detections:
        n = _holding(plan, by_tile.get(d.tile_index - first_index, ()), d.box.as_list(), frame_width, frame_height)
        if n >= 0:
            p = plan.placements[n]
            out[p.view_index].append(_moved(d, p, index_of[n]))
    return out


def kept_by_unpack(plan: WindowPlan, first_index: int, frame_width: int,
                   frame_height: int) -> Callable[[Tile, np.ndarray], np.ndarray]:
    """Which boxes (rows x0, y0, x1, y1 in a packed tile's coordinates) `unpack` will keep, per
    packed tile: the segmenter decodes masks for those only (the others are dropped unread)."""
    by_tile = _placements_by_tile(plan)

    def kept(tile: Tile, boxes: np.ndarray) -> np.ndarray:
        placements = by_tile.get(tile.index - first_index, ())
        return np.array([_holding(plan, placements, b, frame_width, frame_height) >= 0
                         for b in np.asarray(boxes, np.float64).reshape(-1, 4).tolist()], bool)

    return kept


def _placements_by_tile(plan: WindowPlan) -> dict[int, list[int]]:
    by_tile: dict[int, list[int]] = {}
    for n, p in enumerate(plan.placements):
        by_tile.setdefault(p.tile, []).append(n)
    return by_tile


def _holding(plan: WindowPlan, placements: Sequence[int], box: Sequence[float], frame_width: int,
             frame_height: int) -> int:
    """The placement (of those on the box's tile) whose window holds the box whole, or -1: the
    window holding its centre, unless the box is within EDGE_MARGIN_PX of one of that window's
    sides inside the frame (cut there)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    m = EDGE_MARGIN_PX
    for n in placements:
        p = plan.placements[n]
        w, h = p.size
        if not (p.cx <= cx < p.cx + w and p.cy <= cy < p.cy + h):
            continue
        wx0, wy0, wx1, wy1 = p.window
        # window sides inside the frame: a box within m of them is cut
        if ((wx0 > 0 and x0 <= p.cx + m) or (wy0 > 0 and y0 <= p.cy + m)
                or (wx1 < frame_width and x1 >= p.cx + w - m) or (wy1 < frame_height and y1 >= p.cy + h - m)):
            return -1
        return n
    return -1


def _moved(d: CellDetection, p: Placement, tile_index: int) -> CellDetection:
    """`d` clipped to placement `p` (only sides on the frame's edge can still cut it) and moved to
    the view's coordinates; the mask keeps covering the box rounded outward."""
    w, h = p.size
    b = d.box
    x0, y0 = max(b.x0, p.cx), max(b.y0, p.cy)
    x1, y1 = min(b.x1, p.cx + w), min(b.y1, p.cy + h)
    mask = d.mask
    if mask is not None:
        # floor, as the mask is laid out (merge.mask_window): int() would truncate a negative start
        r0, c0 = math.floor(y0) - math.floor(b.y0), math.floor(x0) - math.floor(b.x0)
        mask = np.ascontiguousarray(mask[r0 : r0 + math.ceil(y1) - math.floor(y0),
                                         c0 : c0 + math.ceil(x1) - math.floor(x0)])
    dx, dy = p.window[0] - p.cx, p.window[1] - p.cy
    return replace(d, box=Box(x0 + dx, y0 + dy, x1 + dx, y1 + dy), mask=mask, tile_index=tile_index,
                   cut_by_tile_edge=False)
