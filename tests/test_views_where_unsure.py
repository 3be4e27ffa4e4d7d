"""The detector's extra views only where the first view is unsure (AnalyzerOptions.detector_views_where).

The first view runs everywhere; the other views run on the tiles that show an unsure cell (a
calibrated score inside the band, or a box ending on a tile border) whole; a fused cell's score
is divided by the views that saw it whole. Checked on the parts (window mapping, the tile choice,
coverage, fusion) and on rendered fields through the committed detector: the counted cells
match running every view everywhere, with fewer tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.records import Box, CellDetection, CellKind
from smearscope.service.analysis.tiling import iter_tiles, tile_at
from smearscope.service.analysis.tta import (
    PLACE_MARGIN_PX,
    VIEWS,
    Coverage,
    boxes_in_view,
    fuse_views,
    place_tiles,
    tiles_for_boxes,
    view_frame,
    view_window,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("view", VIEWS)
def test_a_views_tile_window_is_the_part_of_the_frame_it_shows(view):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (300, 420, 3), np.uint8)
    for t in iter_tiles(frame, 128, 0.15, skip_background=False,
                        flip_x=view in ("hflip", "rot180"), flip_y=view in ("vflip", "rot180")):
        x0, y0, x1, y1 = view_window(t, view, 128, 420, 300)
        # the tile's pixels are that window of the frame, seen in the view
        np.testing.assert_array_equal(t.pixels[: y1 - y0, : x1 - x0], view_frame(frame[y0:y1, x0:x1], view))


def test_each_box_gets_the_window_that_holds_it_with_the_widest_margin_or_every_window_it_straddles():
    windows = [(0, 0, 100, 100), (80, 0, 180, 100), (160, 0, 260, 100)]
    boxes = np.array([[88, 10, 95, 20],     # inside the first two: the second has the wider margin
                      [170, 50, 178, 60],   # inside the second and third: the third's margin is wider
                      [40, 40, 60, 60]], float)  # only the first
    assert tiles_for_boxes(windows, boxes) == [0, 1, 2]
    assert tiles_for_boxes(windows, boxes[:1]) == [1]
    # a box no window holds whole: every window it overlaps
    assert tiles_for_boxes(windows, np.array([[70, 10, 175, 20]], float)) == [0, 1, 2]
    assert tiles_for_boxes(windows, np.zeros((0, 4))) == []


@pytest.mark.parametrize("view", VIEWS)
def test_a_tile_placed_anywhere_is_cut_as_the_grid_cuts_its_tiles(view):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (300, 420, 3), np.uint8)
    fx, fy = view in ("hflip", "rot180"), view in ("vflip", "rot180")
    for t in iter_tiles(frame, 128, 0.15, skip_background=False, flip_x=fx, flip_y=fy):
        np.testing.assert_array_equal(tile_at(frame, t.index, t.x, t.y, 128, fx, fy).pixels, t.pixels)
    # off the grid: the window of the view it names
    t = tile_at(frame, 0, 37, 101, 128, fx, fy)
    x0, y0, x1, y1 = view_window(t, view, 128, 420, 300)
    np.testing.assert_array_equal(t.pixels, view_frame(frame[y0:y1, x0:x1], view))
    # a frame smaller than a tile: padded as the grid pads
    small = frame[:90, :100]
    np.testing.assert_array_equal(tile_at(small, 0, 0, 0, 128, fx, fy).pixels,
                                  next(iter_tiles(small, 128, 0.15, skip_background=False, flip_x=fx, flip_y=fy)).pixels)


@pytest.mark.parametrize("seed", range(8))
def test_placed_tiles_show_every_box_whole_with_few_tiles(seed):
    rng = np.random.default_rng(seed)
    w, h, tile, m = 960, 540, 256, PLACE_MARGIN_PX
    xy = rng.uniform(0, [w - 40, h - 40], (15, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 40, (15, 2))], 1)
    placed = place_tiles(boxes, w, h, tile)
    assert 0 < len(placed) <= len(boxes)
    for x, y in placed:
        assert 0 <= x <= w - tile and 0 <= y <= h - tile
    for b in boxes:  # each box shown whole, `m` from every tile side inside the frame
        assert any((b[0] - m >= x or x == 0) and (b[1] - m >= y or y == 0)
                   and (b[2] + m <= x + tile or x + tile >= w) and (b[3] + m <= y + tile or y + tile >= h)
                   for x, y in placed), b
    # a cluster that one tile can show takes one tile
    cluster = np.array([[300, 200, 330, 230], [400, 300, 435, 332], [480, 210, 512, 240]], float)
    assert len(place_tiles(cluster, w, h, tile)) == 1
    # a box larger than a tile gets none; no boxes, no tiles
    assert place_tiles(np.array([[10, 10, 300, 60]], float), w, h, tile) == []
    assert place_tiles(np.zeros((0, 4)), w, h, tile) == []


@pytest.mark.parametrize("view", VIEWS)
def test_boxes_in_view_are_the_boxes_of_the_mirrored_frame(view):
    frame = np.zeros((100, 200), np.uint8)
    frame[10:30, 50:90] = 1
    box = np.array([[50, 10, 90, 30]], float)
    ys, xs = np.nonzero(view_frame(frame, view))
    np.testing.assert_array_equal(boxes_in_view(box, view, 200, 100)[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_coverage_sees_a_box_only_when_a_run_window_holds_all_of_it():
    cov = Coverage(200, 100, n_views=2, cell=4)
    cov.add(0, (0, 0, 200, 100))
    cov.add(1, (0, 0, 100, 100))
    inside, straddling, outside = Box(10, 10, 40, 40), Box(90, 10, 120, 40), Box(150, 10, 190, 40)
    assert cov.sees(1, inside) and not cov.sees(1, straddling) and not cov.sees(1, outside)
    assert [cov.views_seeing(b) for b in (inside, straddling, outside)] == [2, 1, 1]
    # the frame's last partial raster cell belongs to a window that reaches the frame's edge
    odd = Coverage(203, 101, n_views=1, cell=4)
    odd.add(0, (100, 50, 203, 101))
    assert odd.sees(0, Box(150, 60, 202.5, 100.5))


def _slow_sees(cov: Coverage, view_index: int, box: Box) -> bool:
    """The definition: every raster cell the box touches (int() of its start, ceil of its end,
    at least one cell, as slicing clips them) lies in a window the view ran."""
    c = cov.cell
    x0, y0 = max(int(box.x0) // c, 0), max(int(box.y0) // c, 0)
    x1 = min(-(-int(np.ceil(box.x1)) // c), cov.seen.shape[2])
    y1 = min(-(-int(np.ceil(box.y1)) // c), cov.seen.shape[1])
    return bool(cov.seen[view_index, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].all())


def test_coverage_answers_many_boxes_at_once_as_the_raster_cell_by_cell():
    """Boxes are looked up through an integral image per view; each answer is the raster's own,
    for boxes on and off raster lines, straddling windows, on and beyond the frame's edges, of
    zero width or height (one raster cell) and given the wrong way round."""
    rng = np.random.default_rng(7)
    w, h = 403, 299
    cov = Coverage(w, h, n_views=3, cell=4)
    cov.add(0, (0, 0, w, h))
    for view in (1, 2):
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            cov.add(view, (x0, y0, min(w, x0 + int(rng.integers(10, 160))), min(h, y0 + int(rng.integers(10, 160)))))
    x0 = rng.uniform(-12, w + 4, 3000)
    y0 = rng.uniform(-12, h + 4, 3000)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0, 60, 3000), y0 + rng.uniform(0, 60, 3000)], 1)
    boxes[::5] = np.round(boxes[::5] / 4) * 4  # on raster lines
    boxes[1::7, 2] = boxes[1::7, 0]  # zero width (on and off raster lines)
    boxes[2::7, 3] = boxes[2::7, 1]  # zero height
    boxes[3::11, 2:] = [w, h]  # ending on the frame's edges
    boxes[4::13] = boxes[4::13][:, [2, 3, 0, 1]]  # given the wrong way round
    want = np.array([[_slow_sees(cov, v, Box(*b)) for b in boxes.tolist()] for v in range(3)])
    assert want[1].any() and not want[1].all() and want[2].any() and not want[2].all()
    for v in range(3):
        np.testing.assert_array_equal(cov.seen_whole(v, boxes), want[v])
    np.testing.assert_array_equal(cov.views_seeing_whole(boxes), want.sum(axis=0))
    cov.add(2, (0, 0, w, h))  # a window added later is seen
    assert cov.seen_whole(2, boxes).all()


def _det(box, score):
    return CellDetection(CellKind.RBC, Box(*box), score)


def test_fused_scores_are_divided_by_the_views_that_saw_the_cell():
    seen_everywhere, seen_by_first_only = (10, 10, 30, 30), (100, 10, 120, 30)
    per_view = [[_det(seen_everywhere, 0.9), _det(seen_by_first_only, 0.8)],
                [_det(seen_everywhere, 0.6)],
                []]

    def seen_by(boxes: np.ndarray) -> np.ndarray:
        return np.where(boxes[:, 0] < 50, 3, 1)

    fused = {round(d.box.x0): d.score for d in fuse_views(per_view, seen_by=seen_by)}
    assert fused[10] == pytest.approx((0.9 + 0.6) / 3)  # the third view saw it and found nothing
    assert fused[100] == pytest.approx(0.8)             # no other view looked there
    every = {round(d.box.x0): d.score for d in fuse_views(per_view)}
    assert every[100] == pytest.approx(0.8 / 3)


def _partner(c, b):
    """`b`'s counted cell of the same kind overlapping cell `c` most."""
    from smearscope.service.analysis.boxes import pair_iou

    same = [d for d in b.cells if d.detection.kind is c.detection.kind]
    iou = pair_iou(np.array([c.detection.box.as_list()] * len(same)), np.array([d.detection.box.as_list() for d in same]))
    return same[int(iou.argmax())]


#: A counted cell within this of its kind's counting threshold may be counted in one mode only.
BORDERLINE = 0.05


def _matched(a, b) -> bool:
    """Every counted cell of either result clearly above its kind's counting threshold is one of
    the other's counted cells (same kind, IoU >= 0.8), and the counts differ by no more than the
    cells within BORDERLINE of the threshold: fused scores differ a little between the modes (a
    cell only the first view saw keeps its own score), so a cell right at the threshold may fall
    on either side of it."""
    from smearscope.service.analysis.boxes import pair_iou
    from smearscope.service.analysis.roi import RoiFilter

    roi = RoiFilter()
    borderline = 0
    for x, y in ((a, b), (b, a)):
        for c in x.cells:
            if c.detection.score < roi.threshold(c.detection.kind) + BORDERLINE:
                borderline += 1
                continue
            same = [d for d in y.cells if d.detection.kind is c.detection.kind]
            if not same:
                return False
            iou = pair_iou(np.array([c.detection.box.as_list()] * len(same)), np.array([d.detection.box.as_list() for d in same]))
            if iou.max() < 0.8:
                return False
    return abs(len(a.cells) - len(b.cells)) <= borderline


FIELDS = {  # (seed, width, height, rendered density, most tiles the unsure mode may run, as a share,
    #          whether packed windows must need fewer detector inputs than whole tiles)
    "sparse": (7, 1400, 1000, 0.04, 0.6, True),
    # dense: nearly every tile holds a cell cut by its edge; an extra view's own cut pieces (at the
    # border of the region it ran) must not be counted; with unsure cells in nearly every tile the
    # windows are packed no tighter than whole tiles, and never into more inputs than they
    "dense": (1, 1280, 960, 0.38, 0.75, False),
}


@pytest.fixture(scope="module")
def analyzers():
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    everywhere = Analyzer.from_models_dir(MODELS, warmup=False, intra_op_threads=1,
                                          options=AnalyzerOptions(detector_views_where="everywhere"))
    unsure = Analyzer.from_models_dir(MODELS, warmup=False, intra_op_threads=1,
                                      options=AnalyzerOptions(detector_views_where="unsure"))
    whole = Analyzer.from_models_dir(MODELS, warmup=False, intra_op_threads=1,
                                     options=AnalyzerOptions(detector_views_where="unsure", detector_view_windows=False))
    tiles: dict[str, list[int]] = {"everywhere": [], "unsure": [], "whole tiles": []}
    for name, analyzer in (("everywhere", everywhere), ("unsure", unsure), ("whole tiles", whole)):
        original = analyzer.segmenter.detect

        def counting(ts, *args, _original=original, _seen=tiles[name], **kw):
            ts = list(ts)
            _seen.append(len(ts))
            return _original(iter(ts), *args, **kw)

        analyzer.segmenter.detect = counting
    yield everywhere, unsure, whole, tiles
    everywhere.close()
    unsure.close()
    whole.close()


@pytest.mark.skipif(not (MODELS / "seg.onnx").exists(), reason="committed models missing (models/)")
@pytest.mark.parametrize("kind", FIELDS)
def test_views_where_unsure_count_the_same_cells_as_every_view_everywhere_with_fewer_tiles(analyzers, kind):
    everywhere, unsure, whole, tiles = analyzers
    assert len(everywhere.segmenter.views) == 3
    seed, width, height, density, most, windows_save = FIELDS[kind]
    field = render_field(seed, width=width, height=height, rbc_density=density, n_wbc=1, n_platelets=3,
                         microns_per_pixel=0.1)
    for t in tiles.values():
        t.clear()
    a, b, c = everywhere.analyze(field.frame), unsure.analyze(field.frame), whole.analyze(field.frame)
    assert len(a.cells) >= 10 and _matched(a, b) and _matched(a, c)
    assert sum(tiles["whole tiles"]) <= most * sum(tiles["everywhere"]), tiles
    # the extra views on windows around the unsure cells, packed into tiles (the default): fewer
    # detector inputs than whole tiles around them (service.analysis.view_windows), never more
    assert sum(tiles["unsure"]) <= sum(tiles["whole tiles"]), tiles
    if windows_save:
        assert sum(tiles["unsure"]) < sum(tiles["whole tiles"]), tiles
    else:
        # windows that save no detector input lose to whole tiles (more context): the same inputs
        # run, and the same cells come out, as with the windows turned off
        assert tiles["unsure"] == tiles["whole tiles"], tiles
        assert [(x.detection.kind, x.detection.box, x.detection.score) for x in b.cells] == \
            [(x.detection.kind, x.detection.box, x.detection.score) for x in c.cells]
    # the counted cells' scores mostly agree (a cell only the first view saw keeps its own score,
    # where full fusion would have averaged the other views' in)
    diffs = np.array([abs(c.detection.score - _partner(c, b).detection.score) for c in a.cells])
    assert np.median(diffs) < 0.01 and (diffs <= 0.05).mean() >= 0.85, np.sort(diffs)[-10:]


def test_bad_options_are_refused():
    from smearscope.service.analysis.pipeline import AnalyzerOptions

    with pytest.raises(ValueError, match="detector_views_where"):
        AnalyzerOptions(detector_views_where="Unsure")
    with pytest.raises(ValueError, match="detector_unsure_band"):
        AnalyzerOptions(detector_unsure_band=(0.8, 0.2))


@pytest.mark.parametrize("band", [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.1)])
def test_an_empty_or_out_of_range_unsure_band_is_refused(band):
    """0 <= low < high <= 1: an empty band [x, x) or one past the scores' range is a mistake (mutation audit)."""
    from smearscope.service.analysis.pipeline import AnalyzerOptions

    with pytest.raises(ValueError, match="detector_unsure_band"):
        AnalyzerOptions(detector_unsure_band=band)
    assert AnalyzerOptions(detector_unsure_band=(0.0, 1.0)).detector_unsure_band == (0.0, 1.0)


def test_unsure_is_the_default_of_the_analyzer_and_of_the_station_config():
    """Chosen on the lab table (val, every lab within 0.005 of every view everywhere, the worst lab
    unchanged): a station gets the cheaper mode unless its config asks for 'everywhere'."""
    from smearscope.service.analysis.pipeline import AnalyzerOptions
    from smearscope.service.config.analysis import AnalysisConfig

    assert AnalyzerOptions().detector_views_where == "unsure"
    assert AnalysisConfig().detector_views_where == "unsure"


@pytest.mark.skipif(not (MODELS / "seg.onnx").exists(), reason="committed models missing (models/)")
def test_packed_windows_on_a_dense_field_keep_the_cells_they_show_with_little_context(analyzers, monkeypatch):
    """Windows chosen even where whole tiles would be as few (here whole tiles are made to look
    dear): every window then shows, near its sides, confident cells it was not placed for; its
    view must not vote them down. Without the inset (view_windows.judged_region) a confident red
    cell 18 px inside a window side, missed by both extra views there, lost two thirds of its
    score and was not counted."""
    import smearscope.service.analysis.detect_views as dv

    everywhere, unsure, _, _ = analyzers
    monkeypatch.setattr(dv, "place_tiles", lambda boxes, *a, **k: [(0, 0)] * 1000)
    monkeypatch.setattr(dv, "tiles_for_boxes", lambda windows, boxes: list(range(len(windows))))
    planned = []
    original = dv.plan_windows
    monkeypatch.setattr(dv, "plan_windows", lambda *a, **k: planned.append(original(*a, **k)) or planned[-1])
    seed, width, height, density, _, _ = FIELDS["dense"]
    field = render_field(seed, width=width, height=height, rbc_density=density, n_wbc=1, n_platelets=3,
                         microns_per_pixel=0.1)
    a, b = everywhere.analyze(field.frame), unsure.analyze(field.frame)
    assert planned and planned[0].n_tiles >= 2  # the windows ran
    assert len(a.cells) >= 50 and _matched(a, b)


@pytest.mark.parametrize("view", VIEWS)
def test_a_tile_of_a_frame_smaller_than_a_tile_shows_the_whole_frame(view):
    frame = np.zeros((90, 100, 3), np.uint8)
    fx, fy = view in ("hflip", "rot180"), view in ("vflip", "rot180")
    (t,) = iter_tiles(frame, 128, 0.15, skip_background=False, flip_x=fx, flip_y=fy)
    assert view_window(t, view, 128, 100, 90) == (0, 0, 100, 90)


def test_a_box_flush_with_a_window_side_is_held_whole_by_that_window():
    windows = [(0, 0, 100, 100), (80, 0, 180, 100)]
    assert tiles_for_boxes(windows, np.array([[20, 10, 100, 20]], float)) == [0]


def test_a_placed_tile_is_the_first_that_shows_the_box_at_whole_pixel_offsets():
    """Offsets are the candidate sides rounded down to whole pixels, tried from the smallest x,
    then y: for a box at x 300.7..330.7 the flush-right offset 338.7 - 256 = 82.7 becomes 82,
    which ends at 338 and does not show it with the margin, so the centred offset 187 is taken
    (rounding to 83 would end at 339 and take that); of the y offsets 0 and 42, 0."""
    box = np.array([[300.7, 50.2, 330.7, 80.9]])
    assert place_tiles(box, 1000, 1000, 256) == [(187, 0)]
    # both offsets of every side show this box: the smallest x and y win
    assert place_tiles(np.array([[100.7, 50.2, 130.3, 80.9]]), 1000, 1000, 256) == [(0, 0)]


def test_a_placed_tile_keeps_the_margin_on_every_side_inside_the_frame():
    """A tile placed for a neighbour that would also take the first box with only 4 px on its
    left side does not count as showing it."""
    w, h, tile, m = 960, 540, 256, PLACE_MARGIN_PX
    boxes = np.array([[300, 200, 330, 230], [304, 240, 334, 270], [514, 205, 544, 235]], float)
    placed = place_tiles(boxes, w, h, tile)
    for b in boxes:
        assert any((b[0] - m >= x or x == 0) and (b[1] - m >= y or y == 0)
                   and (b[2] + m <= x + tile or x + tile >= w) and (b[3] + m <= y + tile or y + tile >= h)
                   for x, y in placed), b


def test_a_box_on_the_frames_right_edge_gets_a_tile_flush_with_that_edge():
    w, h, tile = 960, 540, 256
    (placed,) = place_tiles(np.array([[w - 30, 100, w, 130]], float), w, h, tile)
    assert placed[0] == w - tile


def test_coverage_does_not_see_a_box_that_starts_just_outside_a_window():
    cov = Coverage(200, 100, n_views=2, cell=4)
    cov.add(1, (10, 0, 100, 100))  # starts inside raster cell 2 (x 8..12)
    assert not cov.sees(1, Box(9, 10, 30, 30))  # its first column lies outside the window
    assert cov.sees(1, Box(12, 10, 30, 30))


def test_a_fused_score_is_never_divided_by_fewer_views_than_voted():
    per_view = [[_det((10, 10, 30, 30), 0.9)], [_det((10, 10, 30, 30), 0.6)], []]
    (fused,) = fuse_views(per_view, seen_by=lambda boxes: np.ones(len(boxes), int))  # coverage says one view; two found it
    assert fused.score == pytest.approx((0.9 + 0.6) / 2)


def test_a_cell_is_unsure_from_the_bands_low_end_up_to_but_not_at_its_high_end():
    """The unsure band is [low, high): the other views run for a cell scored exactly `low`, not for
    one scored exactly `high`. Through the oracle (tests/oracle.py), which scores a whole cell 1.0,
    on a field of one tile (no cell cut by a tile edge, so only the score makes a cell unsure)."""
    from oracle import OracleSegmenter

    from smearscope.service.analysis.detect_views import ViewSettings, detect_views

    field = render_field(3, width=220, height=200, rbc_density=0.1, n_wbc=0, n_platelets=0, microns_per_pixel=0.2)

    class Counting(OracleSegmenter):
        def __init__(self, f):
            super().__init__(f)
            self.calls: list[int] = []

        def detect(self, tiles, *args, **kw):
            tiles = list(tiles)
            self.calls.append(len(tiles))
            return super().detect(tiles, *args, **kw)

    for band, calls in (((1.0, 1.5), [1, 1]), ((0.5, 1.0), [1])):
        seg = Counting(field)
        s = ViewSettings(256, 0.1, "unsure", band, ("rbc", "wbc", "platelet"), windows=False, window_margin=48)
        cells = detect_views(seg, field.frame.pixels, ("identity", "identity"), s)
        assert seg.calls == calls, band
        assert len(cells) == len(field.cells) and all(d.score == pytest.approx(1.0) for d in cells)


def _fused_plainly(per_view, views_seeing):
    """fuse_views written out: per kind, best score first, each cell with its partners (one per
    view), the score-weighted mean box by plain sums for every cluster, the score over the views
    that saw the fused box whole (asked one box at a time)."""
    from dataclasses import replace

    from smearscope.service.analysis.tta import (
        ABSORB_KINDS,
        FUSE_IOU,
        _absorb_pieces,
        _partners,
        _vote,
    )

    items = [(v, d) for v, dets in enumerate(per_view) for d in dets]
    out = []
    for kind in sorted({d.kind for _, d in items}, key=lambda k: k.value):
        sel = sorted((it for it in items if it[1].kind == kind), key=lambda it: -it[1].score)
        partners = _partners(np.array([d.box.as_list() for _, d in sel], float), FUSE_IOU)
        taken = np.zeros(len(sel), bool)
        clusters = []
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
            total = max(sum(m.score for m in members), 1e-12)
            box = Box(*(sum(m.score * getattr(m.box, a) for m in members) / total for a in ("x0", "y0", "x1", "y1")))
            clusters.append((members[0], box, _vote(members, box), seen))
        if kind in ABSORB_KINDS:
            clusters = _absorb_pieces(clusters)
        out += [replace(lead, box=box, mask=mask, score=float(sum(votes.values()) / max(views_seeing(box), len(votes))))
                for lead, box, mask, votes in clusters]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_fused_cells_are_those_of_the_fusion_written_out_plainly(seed):
    """fuse_views (lone cells' boxes without generator sums, partners walked as lists, the views
    that saw each fused box asked for all boxes at once) gives, bit for bit, the cells of the
    fusion written out plainly, on random fields of three views: cells found by one, two or all
    views with jittered fractional boxes, duplicates, white cells in pieces, windows seen by some
    views only."""
    rng = np.random.default_rng(seed)
    w, h = 600, 400
    kinds = (CellKind.RBC, CellKind.WBC, CellKind.PLATELET)
    centres = rng.uniform([20, 20], [w - 20, h - 20], (150, 2))
    sizes = rng.uniform(4, 40, (150, 2))
    per_view = [[], [], []]
    for c, s, kind in zip(centres, sizes, rng.choice(3, 150)):
        for v in range(3):
            if rng.random() < 0.6:
                x0, y0 = c - s / 2 + rng.normal(0, 1.5, 2)
                box = (x0, y0, x0 + s[0] + rng.normal(0, 1), y0 + s[1] + rng.normal(0, 1))
                per_view[v].append(CellDetection(kinds[kind], Box(*box), float(rng.uniform(0.05, 1.0)), tile_index=v))
                if rng.random() < 0.1:  # the same cell twice in a view
                    per_view[v].append(CellDetection(kinds[kind], Box(*box), float(rng.uniform(0.05, 1.0)), tile_index=v))
    for v in range(3):  # a white cell in two halves in one view
        x0, y0 = rng.uniform(50, 500), rng.uniform(50, 300)
        per_view[v] += [CellDetection(CellKind.WBC, Box(x0, y0, x0 + 60, y0 + 60), 0.9, tile_index=v)]
        per_view[(v + 1) % 3] += [CellDetection(CellKind.WBC, Box(x0 + 1, y0, x0 + 30, y0 + 60), 0.5, tile_index=v),
                                  CellDetection(CellKind.WBC, Box(x0 + 31, y0, x0 + 60, y0 + 60), 0.4, tile_index=v)]
    cov = Coverage(w, h, n_views=3)
    cov.add(0, (0, 0, w, h))
    for v in (1, 2):
        for _ in range(15):  # many window sides across cells
            x0, y0 = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
            cov.add(v, (x0, y0, x0 + int(rng.integers(30, 150)), y0 + int(rng.integers(30, 120))))

    def cells(dets):
        return [(d.kind, d.box.as_list(), d.score, d.tile_index) for d in dets]

    got = fuse_views(per_view, seen_by=cov.views_seeing_whole)
    want = _fused_plainly(per_view, cov.views_seeing)
    assert cells(got) == cells(want)
    assert len(got) < sum(map(len, per_view))  # cells were fused
    assert len({s for _, _, s, _ in cells(got)}) > 10


def _cell_bits(d):
    """A fused cell as bytes: its box and score bit for bit (0.0 and -0.0 apart) and its mask."""
    import struct

    mask = None if d.mask is None else (d.mask.shape, d.mask.dtype.str, d.mask.tobytes())
    return (d.kind, struct.pack("4d", *d.box.as_list()), struct.pack("d", d.score), d.tile_index, d.cut_by_tile_edge, mask)


@pytest.mark.skipif(not (MODELS / "seg.onnx").exists(), reason="committed models missing (models/)")
def test_fused_cells_and_masks_of_a_rendered_field_are_those_of_the_fusion_written_out_plainly(analyzers, monkeypatch):
    """On the committed detector's cells of a rendered field (the default views, extra views where
    the first is unsure), fuse_views gives bit for bit the boxes, scores and masks of the fusion
    written out plainly (every cluster's box by plain sums, every mask voted): a cell only the
    first view saw keeps its own record only where that is what the fusion gives it."""
    import smearscope.service.analysis.detect_views as dv

    _, unsure, _, _ = analyzers
    calls = []
    original = dv.fuse_views
    monkeypatch.setattr(dv, "fuse_views", lambda per_view, **k: calls.append((per_view, k)) or original(per_view, **k))
    seed, width, height, density, _, _ = FIELDS["dense"]
    field = render_field(seed, width=width, height=height, rbc_density=density, n_wbc=1, n_platelets=3,
                         microns_per_pixel=0.1)
    unsure.analyze(field.frame)
    ((per_view, kw),) = calls
    coverage = kw["seen_by"].__self__
    got = original(per_view, **kw)
    want = _fused_plainly(per_view, coverage.views_seeing)
    assert [_cell_bits(d) for d in got] == [_cell_bits(d) for d in want]
    assert all(d.mask is not None for d in got) and len(per_view[1]) >= 5
    lone = {id(d) for d in per_view[0]} & {id(d) for d in got}
    assert 0 < len(lone) < len(got)  # the first view's own records kept, and cells fused
    # a cell whose score the views that saw it divided keeps no record of its own
    assert any(d.score != p.score for d in got for p in per_view[0] if d.box == p.box and d.kind is p.kind)
