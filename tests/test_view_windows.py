"""The detector's extra views on windows around the unsure cells, packed into tiles
(service.analysis.view_windows): the windows, the packing, the packed pixels and the way back.

The analyzer-level check (the counted cells match every view everywhere, with fewer detector
inputs than whole tiles) is in tests/test_views_where_unsure.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.records import Box, CellDetection, CellKind
from smearscope.service.analysis.segment import EDGE_MARGIN_PX
from smearscope.service.analysis.tiling import PAD_VALUE
from smearscope.service.analysis.tta import boxes_in_view, frame_window, view_frame
from smearscope.service.analysis.view_windows import (
    WINDOW_GAP_PX,
    pack,
    packed_tiles,
    plan_windows,
    unpack,
    unsure_windows,
)


def _holds(win, box, margin, w, h) -> bool:
    """`win` shows `box` with `margin` on every side that is not the frame's edge."""
    x0, y0, x1, y1 = win
    return ((box[0] - margin >= x0 or x0 == 0) and (box[1] - margin >= y0 or y0 == 0)
            and (box[2] + margin <= x1 or x1 == w) and (box[3] + margin <= y1 or y1 == h))


def test_windows_show_every_box_with_its_margin_and_join_only_when_that_costs_no_pixels():
    w, h = 600, 400
    boxes = np.array([[100, 100, 140, 140],   # these two nearly touch: one window
                      [150, 105, 190, 145],
                      [400, 250, 430, 280],   # far from the others: its own window
                      [5, 380, 30, 400],      # at the frame's corner: clipped there
                      [200, 10, 480, 60]],    # wider than a tile with its margin
                     float)
    wins, too_big = unsure_windows(boxes, w, h, side=256, margin=24)
    assert too_big == [4]
    assert len(wins) == 3
    for box in boxes[:4]:
        assert any(_holds(win, box, 24, w, h) for win in wins), box
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 <= 256 and y1 - y0 <= 256
    joined = next(win for win in wins if _holds(win, boxes[0], 24, w, h))
    assert _holds(joined, boxes[1], 24, w, h)
    assert (0, 356, 54, 400) in wins  # clipped by the frame, not shifted
    assert unsure_windows(np.zeros((0, 4)), w, h, 256) == ([], [])


def test_packed_windows_keep_the_gap_stay_inside_their_tile_and_frame_edges_go_to_tile_edges():
    rng = np.random.default_rng(3)
    side = 256
    sizes = [(int(a), int(b)) for a, b in rng.integers(30, 140, (40, 2))]
    flush = [tuple(bool(v) for v in rng.random(4) < 0.15) for _ in sizes]
    flush = [(l, t, r and not l, b and not t) for l, t, r, b in flush]
    spots = pack(sizes, side, WINDOW_GAP_PX, flush)
    assert 1 < len({t for t, _, _ in spots}) < len(sizes)  # several per tile
    for i, ((t, x, y), (w, h), (left, top, right, bottom)) in enumerate(zip(spots, sizes, flush)):
        assert 0 <= x and x + w <= side and 0 <= y and y + h <= side
        assert (not left or x == 0) and (not top or y == 0)
        assert (not right or x + w == side) and (not bottom or y + h == side)
        for j in range(i + 1, len(sizes)):
            t2, x2, y2 = spots[j]
            w2, h2 = sizes[j]
            if t2 == t:  # apart by at least the gap along one axis
                assert (x2 >= x + w + WINDOW_GAP_PX or x >= x2 + w2 + WINDOW_GAP_PX
                        or y2 >= y + h + WINDOW_GAP_PX or y >= y2 + h2 + WINDOW_GAP_PX), (i, j)


@pytest.fixture(scope="module")
def field():
    return render_field(11, width=700, height=520, rbc_density=0.2, n_wbc=2, n_platelets=4, microns_per_pixel=0.2)


VIEWS = ("hflip", "vflip", "rot180")


def _plan(field):
    frame = field.frame.pixels
    h, w = frame.shape[:2]
    truth = np.array([c.bbox for c in field.cells[::4]], float)
    per_view = [boxes_in_view(truth, v, w, h) for v in VIEWS]
    return frame, w, h, per_view, plan_windows(per_view, w, h, 256)


class _Mirror:
    def __init__(self, frame, view):
        self.pixels = view_frame(frame, view)

    def __getitem__(self, key):
        return self.pixels[key]


def test_packed_tiles_hold_each_views_window_and_padding_grey_between(field):
    frame, w, h, _, plan = _plan(field)
    assert len(plan.placements) > 3 and plan.n_tiles >= 1
    tiles = packed_tiles([_Mirror(frame, v) for v in VIEWS], plan, 256, first_index=50)
    assert [t.index for t in tiles] == list(range(50, 50 + plan.n_tiles))
    covered = [np.zeros((256, 256), bool) for _ in tiles]
    for p in plan.placements:
        x0, y0, x1, y1 = p.window
        got = tiles[p.tile].pixels[p.cy : p.cy + y1 - y0, p.cx : p.cx + x1 - x0]
        np.testing.assert_array_equal(got, view_frame(frame, VIEWS[p.view_index])[y0:y1, x0:x1])
        covered[p.tile][p.cy : p.cy + y1 - y0, p.cx : p.cx + x1 - x0] = True
        # the window mapped back to the frame is the same pixels, unmirrored
        fx0, fy0, fx1, fy1 = frame_window(p.window, VIEWS[p.view_index], w, h)
        np.testing.assert_array_equal(view_frame(frame[fy0:fy1, fx0:fx1], VIEWS[p.view_index]), got)
    for t, c in zip(tiles, covered):
        assert (t.pixels[~c] == PAD_VALUE).all()


def test_unpack_returns_whole_cells_in_the_views_coordinates_and_drops_cut_ones(field):
    _frame, w, h, per_view, plan = _plan(field)
    first = 100
    dets, expected = [], [[] for _ in VIEWS]
    rng = np.random.default_rng(5)
    for n, p in enumerate(plan.placements):
        x0, y0, x1, y1 = p.window
        dx, dy = p.cx - x0, p.cy - y0
        for box in per_view[p.view_index]:
            if not (box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1):
                continue
            bx0, by0, bx1, by1 = (float(v) + s * rng.uniform(0.1, 0.9) for v, s in zip(box, (1, 1, -1, -1)))
            mask = rng.random((int(np.ceil(by1)) - int(by0), int(np.ceil(bx1)) - int(bx0))) > 0.5
            d = CellDetection(CellKind.RBC, Box(bx0 + dx, by0 + dy, bx1 + dx, by1 + dy), 0.7, mask, tile_index=first + p.tile)
            dets.append(d)
            expected[p.view_index].append((n, Box(bx0, by0, bx1, by1), mask))
        # a cell running into the window's side inside the frame: cut there, dropped
        if x1 < w:
            cut = Box(p.cx + (x1 - x0) - 20, p.cy + 30, p.cx + (x1 - x0) - 1, p.cy + 50)
            dets.append(CellDetection(CellKind.RBC, cut, 0.9, np.ones((20, 19), bool), tile_index=first + p.tile))
    # a detection in the padding between windows belongs to no window
    inside = np.zeros((256, 256), bool)
    for p in plan.placements:
        if p.tile == 0:
            inside[p.cy : p.cy + p.size[1], p.cx : p.cx + p.size[0]] = True
    gy, gx = np.argwhere(~inside)[len(np.argwhere(~inside)) // 2]
    dets.append(CellDetection(CellKind.WBC, Box(gx - 2.0, gy - 2.0, gx + 2.0, gy + 2.0), 0.9, None, tile_index=first))
    index_of = [1000 + n for n in range(len(plan.placements))]
    out = unpack(dets, plan, first, w, h, index_of)
    assert [len(o) for o in out] == [len(e) for e in expected] and sum(map(len, out)) >= 5
    for got, want in zip(out, expected):
        for d, (n, box, mask) in zip(got, want):
            assert d.tile_index == index_of[n] and not d.cut_by_tile_edge
            assert d.box.as_list() == pytest.approx(box.as_list(), abs=1e-9)
            np.testing.assert_array_equal(d.mask, mask)


def test_a_window_on_the_frames_edge_clips_a_cell_running_into_the_padding():
    w, h = 300, 200
    plan = plan_windows([np.array([[0.0, 60, 30, 90]])], w, h, 256)  # on the frame's left edge
    (p,) = plan.placements
    assert p.window[0] == 0 and p.cx == 0
    # the detector put the cell a little beyond the tile's left edge: it is clipped, not dropped
    d = CellDetection(CellKind.RBC, Box(p.cx + 0.0, p.cy + 36.4, p.cx + 30.6, p.cy + 66.2), 0.8,
                      np.ones((31, 31), bool), tile_index=7)
    (got,), = unpack([d], plan, 7, w, h, [3])
    assert got.box.x0 == 0 and got.box.y0 == pytest.approx(p.window[1] + 36.4)
    assert got.mask.shape == (int(np.ceil(got.box.y1)) - int(got.box.y0), int(np.ceil(got.box.x1)) - int(got.box.x0))
    # the same cell touching the window's right side (inside the frame) is cut
    x1 = p.cx + p.window[2] - p.window[0]
    cut = CellDetection(CellKind.RBC, Box(x1 - 25, p.cy + 36, x1 - EDGE_MARGIN_PX / 2, p.cy + 60), 0.8, None, tile_index=7)
    assert unpack([cut], plan, 7, w, h, [3]) == [[]]


def test_a_window_judges_only_the_cells_well_inside_its_sides_within_the_frame():
    from smearscope.service.analysis.view_windows import WINDOW_SEES_INSET_PX, judged_region

    m = WINDOW_SEES_INSET_PX
    assert m > 0
    # inside the frame on every side: inset on every side
    assert judged_region((100, 80, 300, 240), 640, 480) == (100 + m, 80 + m, 300 - m, 240 - m)
    # on the frame's left and bottom edges: those sides stay (the frame's edge is the edge there)
    assert judged_region((0, 300, 200, 480), 640, 480) == (0, 300 + m, 200 - m, 480)
    assert judged_region((0, 0, 640, 480), 640, 480) == (0, 0, 640, 480)


def test_a_window_rounds_outward_and_may_be_exactly_a_tile_wide():
    w, h = 600, 400
    # fractional box: the window rounds outward, keeping the whole margin
    assert unsure_windows(np.array([[100.5, 100.5, 140.5, 140.5]]), w, h, side=256, margin=24) == (
        [(76, 76, 165, 165)], [])
    # a window of exactly the tile's side (76..332) fits a tile; one pixel more does not
    wins, too_big = unsure_windows(np.array([[100, 100, 308, 140], [100, 200, 309, 240]], float), w, h, 256, 24)
    assert wins == [(76, 76, 332, 164)] and too_big == [1]


def test_two_windows_that_abut_are_joined_as_their_union_costs_no_pixel():
    boxes = np.array([[124, 124, 150, 176], [198, 124, 226, 176]], float)  # windows 100..174 and 174..250
    wins, _ = unsure_windows(boxes, 600, 400, side=256, margin=24)
    assert wins == [(100, 100, 250, 200)]


def test_windows_on_the_frames_right_and_bottom_edges_go_to_those_edges_of_their_tile():
    from smearscope.service.analysis.view_windows import WINDOW_MARGIN_PX as m

    w, h = 600, 400
    plan = plan_windows([np.array([[570.0, 370, 600, 400]])], w, h, 256)  # the frame's bottom-right corner
    (p,) = plan.placements
    assert p.window == (570 - m, 370 - m, 600, 400)  # the margin of context, clipped by the frame
    assert p.cx + p.size[0] == 256 and p.cy + p.size[1] == 256


def test_a_window_drops_a_cell_within_the_edge_margin_of_its_left_or_top_side_inside_the_frame():
    w, h = 600, 400
    plan = plan_windows([np.array([[200.0, 150, 230, 180]])], w, h, 256)  # well inside the frame
    (p,) = plan.placements
    inside = Box(p.cx + 30, p.cy + 30, p.cx + 60, p.cy + 60)
    near_left = Box(p.cx + EDGE_MARGIN_PX / 2, p.cy + 30, p.cx + 40, p.cy + 60)
    near_top = Box(p.cx + 30, p.cy + EDGE_MARGIN_PX / 2, p.cx + 60, p.cy + 40)
    dets = [CellDetection(CellKind.RBC, b, 0.8, None, tile_index=7) for b in (inside, near_left, near_top)]
    (got,) = unpack(dets, plan, 7, w, h, [3])
    assert [d.box.as_list() for d in got] == [[p.window[0] + 30, p.window[1] + 30, p.window[0] + 60, p.window[1] + 60]]


def test_a_cell_running_beyond_the_tile_at_a_frame_edge_is_clipped_with_its_mask_and_is_whole():
    w, h = 300, 200
    plan = plan_windows([np.array([[0.0, 60, 30, 90]])], w, h, 256)  # on the frame's left edge
    (p,) = plan.placements
    assert p.cx == 0
    # a box starting 2 px left of the tile's edge; mask columns numbered to follow them
    mask = np.tile(np.arange(32), (20, 1)) % 3 == 0
    d = CellDetection(CellKind.RBC, Box(-2.0, p.cy + 40, 30.0, p.cy + 60), 0.8, mask, tile_index=7,
                      cut_by_tile_edge=True)
    ((got,),) = unpack([d], plan, 7, w, h, [3])
    assert got.box.as_list() == [0.0, p.window[1] + 40, 30.0, p.window[1] + 60]
    np.testing.assert_array_equal(got.mask, mask[:, 2:])  # the frame's columns 0..29
    assert not got.cut_by_tile_edge  # whole inside its window: not a piece


def test_a_window_does_not_judge_a_cell_18_px_inside_its_side():
    """The case that set the inset (view_windows.WINDOW_SEES_INSET_PX): a confident red cell 18 px
    inside a window side, missed by both extra views there, must keep the first view's verdict."""
    from smearscope.service.analysis.view_windows import judged_region

    x0, y0, x1, y1 = judged_region((100, 80, 300, 240), 640, 480)
    assert x0 > 100 + 18 and y0 > 80 + 18 and x1 < 300 - 18 and y1 < 240 - 18


def test_a_mask_starting_at_a_fractional_negative_coordinate_is_cut_where_it_was_laid_out() -> None:
    """A mask covers its box rounded outward (merge.mask_window: floor of the start), so a box
    starting at x = -0.6 has a mask whose first column is frame column -1: clipped to the frame,
    the kept columns are frame columns 0 onward (int() would have kept -1 onward, one off)."""
    from smearscope.service.analysis.merge import mask_window

    w, h = 300, 200
    plan = plan_windows([np.array([[0.0, 60, 30, 90]])], w, h, 256)
    (p,) = plan.placements
    box = Box(-0.6, p.cy + 40, 30.6, p.cy + 60)
    r0, c0, r1, c1 = mask_window(box)
    assert c0 == -1
    mask = np.tile(np.arange(c0, c1) % 3 == 0, (r1 - r0, 1))  # each column marks its frame column
    ((got,),) = unpack([CellDetection(CellKind.RBC, box, 0.8, mask, tile_index=7)], plan, 7, w, h, [3])
    g0, gc0, g1, gc1 = mask_window(got.box)
    assert got.mask is not None and got.mask.shape == (g1 - g0, gc1 - gc0)
    np.testing.assert_array_equal(got.mask, np.tile(np.arange(gc0, gc1) % 3 == 0, (g1 - g0, 1)))


def test_the_detector_makes_on_packed_windows_only_the_cells_unpack_keeps(monkeypatch):
    """On a real field (the bench's 1920x1080, default views), the cells the detector finds on the
    packed tiles are all ones `unpack` keeps: the others (context cells cut by a window side)
    are never made, so their masks are never decoded. What unpack keeps is what it kept when
    every detection was made (tests/test_report_golden.py: reports unchanged)."""
    from smearscope.service.analysis import detect_views
    from smearscope.service.analysis.pipeline import Analyzer

    seen = []
    real_unpack = detect_views.unpack

    def spy(dets, plan, *args):
        kept = real_unpack(dets, plan, *args)
        seen.append((len(dets), sum(map(len, kept))))
        return kept

    monkeypatch.setattr(detect_views, "unpack", spy)
    analyzer = Analyzer.from_models_dir(warmup=False)
    try:
        analyzer.analyze(render_field(100, width=1920, height=1080, microns_per_pixel=0.1).frame)
    finally:
        analyzer.close()
    assert seen and seen[0][0] > 50  # the field's extra views ran on packed windows
    made, kept = seen[0]
    assert made == kept


def _joined_one_at_a_time(boxes, w, h, side, margin):
    """The join written out plainly: window by window, every other window judged afresh."""
    wins = []
    for x0, y0, x1, y1 in np.asarray(boxes, float).reshape(-1, 4).tolist():
        win = [max(0, int(np.floor(x0 - margin))), max(0, int(np.floor(y0 - margin))),
               min(w, int(np.ceil(x1 + margin))), min(h, int(np.ceil(y1 + margin)))]
        if win[2] - win[0] <= side and win[3] - win[1] <= side and win[2] > win[0] and win[3] > win[1]:
            wins.append(win)
    alive = [True] * len(wins)
    joined = True
    while joined:
        joined = False
        for i in range(len(wins)):
            if not alive[i]:
                continue
            best = None
            for j in range(len(wins)):
                if j == i or not alive[j]:
                    continue
                u = [min(wins[i][0], wins[j][0]), min(wins[i][1], wins[j][1]),
                     max(wins[i][2], wins[j][2]), max(wins[i][3], wins[j][3])]
                uw, uh = u[2] - u[0], u[3] - u[1]
                extra = uw * uh - (wins[j][2] - wins[j][0]) * (wins[j][3] - wins[j][1]) \
                    - (wins[i][2] - wins[i][0]) * (wins[i][3] - wins[i][1])
                if uw <= side and uh <= side and extra <= 0 and (best is None or extra < best[0]):
                    best = (extra, j, u)
            if best is not None:
                wins[i], alive[best[1]] = best[2], False
                joined = True
    return [tuple(wn) for wn, a in zip(wins, alive) if a]


@pytest.mark.parametrize("n", [2, 12, 60, 250, 600])
def test_windows_are_joined_as_judging_one_window_at_a_time_joins_them(n):
    """The join judges every pair up front and after a join only the grown window's pairs; the
    windows it gives are those of the plain greedy walk, on clustered boxes that join in chains."""
    rng = np.random.default_rng(n)
    centres = rng.uniform(0, 1900, (max(1, n // 4), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 25, (n, 2))
    size = rng.uniform(6, 60, (n, 2))
    boxes = np.concatenate([c, c + size], 1).clip(0, None)
    for side in (256, 160):
        want = _joined_one_at_a_time(boxes, 1920, 1080, side, 48)
        got, _ = unsure_windows(boxes, 1920, 1080, side, 48)
        assert got == want
        assert n < 12 or len(got) < n - 2  # windows were joined


def test_a_64_mp_fields_thousands_of_unsure_cells_plan_their_windows_in_memory_linear_in_them():
    """The largest frame accepted (64 MP) with a first view unsure of 3000 cells: the join of
    their windows (about 1900 after the frame's edges) holds memory in proportion to the windows,
    not a table of every pair of them (32 bytes and more per pair: 600 MB here)."""
    import tracemalloc

    rng = np.random.default_rng(5)
    w, h = 9238, 6928
    xy = rng.uniform(0, 1, (3000, 2)) * [w - 80, h - 80]
    boxes = np.concatenate([xy, xy + rng.uniform(60, 80, (3000, 2))], 1)
    tracemalloc.start()
    try:
        wins, too_big = unsure_windows(boxes, w, h, 256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert too_big == [] and 1000 < len(wins) < 3000  # windows were joined
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB"


def _edge_frames():
    """Frames at the edges of what the default views meet: no cell, a frame smaller than a tile
    (down to one pixel), a greyscale field, sizes no raster divides, one white cell alone."""
    field = render_field(7, width=1024, height=768, microns_per_pixel=0.1).frame.pixels
    grey = cv2.cvtColor(cv2.cvtColor(field, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return {
        "no cell": np.full((480, 640, 3), field[:20, :20].reshape(-1, 3).mean(0).astype(np.uint8)),
        "one pixel": field[300:301, 400:401],
        "31x29": field[200:229, 300:331],
        "257x255": field[200:455, 300:557],
        "greyscale": grey[:480, :640],
        "1001x757": field[:757, :1001],
        "one white cell": render_field(5, width=640, height=480, microns_per_pixel=0.1, rbc_density=0.0, n_wbc=1,
                                       n_platelets=0).frame.pixels,
        "dense 640x480": render_field(2, width=640, height=480, microns_per_pixel=0.1).frame.pixels,
    }


@pytest.mark.parametrize("options", ["default", "every cell unsure, windows without margin"])
def test_cells_left_unmade_on_packed_tiles_change_no_report_on_edge_frames(options, monkeypatch):
    """kept_by_unpack spares the masks of the packed tiles' cells that unpack drops: each report is
    the one made when every cell of those tiles is made and unpack alone drops them, on edge
    frames through the default configuration, and with every cell unsure and windows without a
    margin of context, where whole packed tiles hold no cell unpack keeps (the dense field)."""
    from smearscope.device.frame import Frame
    from smearscope.service.analysis import detect_views
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    opts = AnalyzerOptions() if options == "default" else AnalyzerOptions(detector_unsure_band=(0.0, 1.0),
                                                                          detector_window_margin=0)
    refused_all, real_kept = [], detect_views.kept_by_unpack

    def counting(*args):
        kept = real_kept(*args)

        def wanted(tile, boxes):
            got = kept(tile, boxes)
            refused_all.append(not got.any())
            return got
        return wanted

    def every_cell(*args):
        return lambda tile, boxes: np.ones(len(boxes), bool)

    analyzer = Analyzer.from_models_dir(options=opts, warmup=False)
    try:
        for name, pixels in _edge_frames().items():
            reports = []
            for rule in (counting, every_cell):
                monkeypatch.setattr(detect_views, "kept_by_unpack", rule)
                frame = Frame(np.ascontiguousarray(pixels), name, "edge", microns_per_pixel=0.1)
                rep = analyzer.analyze(frame).report
                reports.append((rep.counts.model_dump(), [(c.kind, c.label, c.bbox, c.score, c.label_score)
                                                          for c in rep.cells]))
                h, w = pixels.shape[:2]
                assert all(0 <= c.bbox[0] < c.bbox[2] <= w and 0 <= c.bbox[1] < c.bbox[3] <= h for c in rep.cells)
            assert reports[0] == reports[1], name
    finally:
        analyzer.close()
    assert refused_all  # packed tiles ran
    assert options == "default" or any(refused_all)  # and some held no cell unpack keeps


def _packed_plainly(sizes, side, gap, flush):
    """pack written out: largest first (frame-edge windows before), each at the first position in
    reading order, in the first tile, whose raster cells (8 px) are all free, each position's
    cells looked at one slice at a time; a placed window takes its cells grown by the gap."""
    cell, n = 8, -(-side // 8)
    order = sorted(range(len(sizes)), key=lambda i: (-sum(flush[i]), -sizes[i][0] * sizes[i][1], i))
    used, out = [], [None] * len(sizes)
    for i in order:
        w, h = sizes[i]
        left, top, right, bottom = flush[i]
        xs = [0] if left else [side - w] if right else range(0, side - w + 1, cell)
        ys = [0] if top else [side - h] if bottom else range(0, side - h + 1, cell)
        t = 0
        while out[i] is None:
            if t == len(used):
                used.append(np.zeros((n, n), bool))
            spot = next(((x, y) for y in ys for x in xs
                         if not used[t][y // cell : -(-(y + h) // cell), x // cell : -(-(x + w) // cell)].any()), None)
            if spot is not None:
                x, y = spot
                used[t][max(0, y - gap) // cell : -(-(y + h + gap) // cell), max(0, x - gap) // cell : -(-(x + w + gap) // cell)] = True
                out[i] = (t, x, y)
            t += 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_windows_are_packed_where_a_plain_first_fit_puts_them(seed):
    """pack (the taken cells of all positions at once, through an integral image) puts every
    window where a first fit looking at each position's raster cells one at a time puts it, on
    windows of any size up to a tile, some on a frame edge, at sizes that are and are not whole
    raster cells."""
    rng = np.random.default_rng(seed)
    side = 256
    sizes = [(int(rng.integers(10, 150)), int(rng.integers(10, 150))) for _ in range(70)] + [(side, int(rng.integers(1, side)))]
    flush = [tuple(bool(f) for f in rng.random(4) < 0.08) for _ in sizes]
    flush = [(a, b, c and not a, d and not b) for a, b, c, d in flush]
    for gap in (0, 16, 21):
        got = pack(sizes, side, gap, flush)
        assert got == _packed_plainly(sizes, side, gap, flush)
        assert len({t for t, _, _ in got}) >= 4
