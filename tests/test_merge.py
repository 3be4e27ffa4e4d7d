"""Rules of the cross-tile merge (service.analysis.merge), one situation per test."""

from __future__ import annotations

import time

import numpy as np
import pytest

from smearscope.service.analysis.boxes import DENSE_PAIRS_UP_TO, _grid_pairs, overlapping_pairs
from smearscope.service.analysis.merge import box_iou_ios, mask_window, merge_detections
from smearscope.service.analysis.records import Box, CellDetection, CellKind

RBC, WBC, PLT = CellKind.RBC, CellKind.WBC, CellKind.PLATELET


def disc_mask(box: Box, cx: float, cy: float, r: float) -> np.ndarray:
    """Mask over `box` (rounded outward) of the disc (cx, cy, r) in frame coordinates."""
    r0, c0, r1, c1 = mask_window(box)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r


def det(
    kind: CellKind,
    box: tuple[float, float, float, float],
    score: float = 0.9,
    tile: int = 0,
    cut: bool = False,
    mask: np.ndarray | None = None,
) -> CellDetection:
    return CellDetection(kind, Box(*box), score, mask, tile_index=tile, cut_by_tile_edge=cut)


def test_identical_views_from_two_tiles_become_one_with_the_better_score() -> None:
    a = det(RBC, (100, 100, 137, 137), 0.8, tile=0)
    b = det(RBC, (101, 100, 138, 137), 0.95, tile=1)
    assert merge_detections([a, b]) == [b]


def test_whole_view_beats_a_higher_scored_cut_view() -> None:
    whole = det(RBC, (100, 100, 137, 137), 0.6, tile=0)
    part = det(RBC, (100, 100, 115, 137), 0.99, tile=1, cut=True)  # lies inside the whole view
    _, ios = box_iou_ios(np.array(whole.box.as_list()), np.array([part.box.as_list()]))
    assert ios[0] == 1.0
    assert merge_detections([part, whole]) == [whole]


def test_two_cut_halves_are_united_with_their_masks() -> None:
    cx, cy, r = 140.0, 60.0, 35.0  # a 70 px white cell, larger than a 26 px overlap strip
    left_box, right_box = Box(105, 25, 153, 95), Box(127, 25, 175, 95)  # tiles overlap 127..153
    left = det(WBC, left_box.as_list(), 0.7, tile=0, cut=True, mask=disc_mask(left_box, cx, cy, r))
    right = det(
        WBC, right_box.as_list(), 0.8, tile=1, cut=True, mask=disc_mask(right_box, cx, cy, r)
    )
    (merged,) = merge_detections([left, right])
    assert merged.box == Box(105, 25, 175, 95)
    assert merged.score == 0.8 and not merged.cut_by_tile_edge
    np.testing.assert_array_equal(merged.mask, disc_mask(merged.box, cx, cy, r))


def test_four_corner_pieces_of_one_cell_are_united() -> None:
    # A cell sitting on the corner where four tiles meet (overlap strips x 127..153, y 27..53).
    cx, cy, r = 140.0, 40.0, 36.0
    pieces = []
    for tile, (x0, x1) in enumerate([(104, 153), (127, 176)]):
        for row, (y0, y1) in enumerate([(4, 53), (27, 76)]):
            box = Box(x0, y0, x1, y1)
            pieces.append(
                det(
                    WBC,
                    box.as_list(),
                    0.5 + 0.1 * tile,
                    tile=2 * row + tile,
                    cut=True,
                    mask=disc_mask(box, cx, cy, r),
                )
            )
    (merged,) = merge_detections(pieces)
    assert merged.box == Box(104, 4, 176, 76)
    assert merged.score == pytest.approx(0.6) and not merged.cut_by_tile_edge
    np.testing.assert_array_equal(merged.mask, disc_mask(merged.box, cx, cy, r))


def test_kinds_never_merge() -> None:
    rbc = det(RBC, (100, 100, 137, 137), tile=0)
    platelet = det(PLT, (110, 110, 122, 122), tile=1)  # lies on the red cell
    assert sorted(d.kind.value for d in merge_detections([rbc, platelet])) == ["platelet", "rbc"]


def test_far_apart_and_edge_adjacent_boxes_stay_apart() -> None:
    a = det(RBC, (0, 0, 37, 37), tile=0)
    b = det(RBC, (400, 300, 437, 337), tile=1)
    c = det(RBC, (37, 0, 74, 37), tile=1)  # shares only an edge with a
    assert len(merge_detections([a, b, c])) == 3


def test_touching_distinct_cells_from_different_tiles_stay_apart() -> None:
    # Two red cells overlapping by 5 px side by side and diagonally; each seen whole once.
    a = det(RBC, (100, 100, 137, 137), tile=0)
    b = det(RBC, (132, 100, 169, 137), tile=1)
    c = det(RBC, (126, 126, 163, 163), tile=2)
    assert len(merge_detections([a, b, c])) == 3


def test_same_tile_detections_are_never_merged() -> None:
    # The detector's NMS kept both: two overlapping cells (IoU ~0.5), not a duplicate.
    a = det(RBC, (100, 100, 137, 137), tile=3)
    b = det(RBC, (112, 100, 149, 137), tile=3)
    assert len(merge_detections([a, b])) == 2
    # With the tile unknown (-1) they are treated as views from different tiles.
    a2, b2 = (det(RBC, d.box.as_list(), tile=-1) for d in (a, b))
    assert len(merge_detections([a2, b2], iou_threshold=0.4)) == 1


def test_one_tile_keeps_every_detection_in_visiting_order() -> None:
    """A small field is one tile: nothing merges, but the order is the merge's (whole cells by
    descending score, then cut ones), and a cut cell keeps its flag."""
    dets = [det(RBC, (0, 0, 30, 30), 0.5), det(RBC, (5, 0, 35, 30), 0.7, cut=True),
            det(RBC, (100, 100, 130, 130), 0.9), det(RBC, (200, 0, 230, 30), 0.6)]
    out = merge_detections(dets)
    assert [d.score for d in out] == [0.9, 0.6, 0.5, 0.7]
    assert [d.cut_by_tile_edge for d in out] == [False, False, False, True]


def test_each_tile_gives_its_best_view_and_a_neighbours_sliver_survives() -> None:
    # Cell X (whole in tile 0) overlaps cell Y a little. Tile 1 sees X cut, and a sliver of Y
    # that lies inside X's box; tile 2 sees the rest of Y. X must absorb tile 1's view of X, not
    # the sliver, which belongs to Y's two cut halves.
    x_whole = det(RBC, (100, 100, 137, 137), 0.9, tile=0)
    x_cut = det(RBC, (100, 100, 130, 137), 0.8, tile=1, cut=True)
    y_sliver = det(RBC, (130, 110, 137, 130), 0.6, tile=1, cut=True)
    y_rest = det(RBC, (133, 105, 167, 142), 0.9, tile=2, cut=True)
    merged = merge_detections([x_whole, x_cut, y_sliver, y_rest])
    assert sorted(d.box.as_list() for d in merged) == [[100, 100, 137, 137], [130, 105, 167, 142]]


def test_cut_views_of_two_different_cells_are_not_united() -> None:
    # Two cells each cut by tile edges, lying side by side with a little overlap.
    a = det(RBC, (100, 100, 126, 137), tile=0, cut=True)
    b = det(RBC, (122, 100, 150, 137), tile=1, cut=True)
    merged = merge_detections([a, b])
    assert len(merged) == 2 and all(d.cut_by_tile_edge for d in merged)


def test_mask_overlap_decides_when_masks_are_present() -> None:
    # Boxes overlap a lot (IoS 0.6 by box) but the masks are thin diagonal bars that do not touch.
    box_a, box_b = Box(0, 0, 40, 40), Box(0, 16, 40, 56)
    yy, xx = np.mgrid[0:40, 0:40]
    bar = np.abs(xx - yy) < 3
    a = det(RBC, box_a.as_list(), tile=0, cut=True, mask=bar)
    b = det(RBC, box_b.as_list(), tile=1, cut=True, mask=np.fliplr(bar))
    _, ios = box_iou_ios(np.array(box_a.as_list()), np.array([box_b.as_list()]))
    assert ios[0] >= 0.5
    assert len(merge_detections([a, b])) == 2
    a_nomask, b_nomask = (det(RBC, d.box.as_list(), tile=d.tile_index, cut=True) for d in (a, b))
    assert len(merge_detections([a_nomask, b_nomask])) == 1


def test_mask_that_does_not_cover_its_box_is_an_error() -> None:
    bad = det(RBC, (10.5, 10, 20, 20), mask=np.ones((10, 9), bool))  # needs 10 x 10
    with pytest.raises(ValueError, match="mask shape"):
        merge_detections([bad])


def test_thresholds_are_honoured() -> None:
    a = det(RBC, (0, 0, 40, 40), tile=0)
    b = det(RBC, (10, 0, 50, 40), tile=1)  # IoU 0.6, IoS 0.75
    assert len(merge_detections([a, b], iou_threshold=0.55, ios_threshold=0.9)) == 1
    assert len(merge_detections([a, b], iou_threshold=0.65, ios_threshold=0.9)) == 2
    assert len(merge_detections([a, b], iou_threshold=0.65, ios_threshold=0.7)) == 1


def test_empty_input() -> None:
    assert merge_detections([]) == []


def test_two_thousand_detections_merge_quickly() -> None:
    rng = np.random.default_rng(0)
    dets = []
    for gy in range(25):
        for gx in range(40):
            x, y = gx * 45 + rng.uniform(0, 5), gy * 45 + rng.uniform(0, 5)
            dets.append(det(RBC, (x, y, x + 37, y + 37), 0.9, tile=0))
            dets.append(det(RBC, (x, y, x + 20, y + 37), 0.95, tile=1, cut=True))
    rng.shuffle(dets)  # type: ignore[arg-type]
    start = time.perf_counter()
    merged = merge_detections(dets)
    elapsed = time.perf_counter() - start
    assert len(merged) == 1000 and not any(d.cut_by_tile_edge for d in merged)
    assert elapsed < 5.0  # ~0.15 s on a laptop core; generous for a loaded CI box


def test_a_growing_cell_finds_a_piece_that_starts_far_to_its_left() -> None:
    """A united cell looks again for pieces among boxes that may start a whole widest box to its
    left (not the narrowest: a small cell elsewhere must not narrow the search)."""
    top_right = det(RBC, (130, 0, 160, 60), 0.9, tile=1, cut=True)
    bottom_right = det(RBC, (100, 30, 160, 100), 0.8, tile=2, cut=True)  # IoS 0.5 with top_right
    # IoS 0.17 with top_right alone, but 0.58 of the united (100, 0, 160, 100)
    left = det(RBC, (0, 0, 135, 100), 0.5, tile=0, cut=True)
    small = det(RBC, (500, 500, 510, 510), 0.9, tile=3)  # the narrowest box of the field
    merged = merge_detections([top_right, bottom_right, left, small])
    assert sorted(d.box.as_list() for d in merged) == [[0, 0, 160, 100], [500, 500, 510, 510]]
    assert not any(d.cut_by_tile_edge for d in merged)


def test_a_united_cell_takes_no_second_view_from_a_tile_it_already_has() -> None:
    a = det(RBC, (100, 0, 140, 60), 0.9, tile=0, cut=True)
    b = det(RBC, (110, 0, 170, 60), 0.8, tile=1, cut=True)  # another tile's view of a's cell
    # tile 0's own detector kept this apart from a: a different cell, even if the union holds it
    c = det(RBC, (140, 10, 170, 50), 0.5, tile=0, cut=True)
    merged = merge_detections([a, b, c])
    assert sorted(d.box.as_list() for d in merged) == [[100, 0, 170, 60], [140, 10, 170, 50]]


def test_a_united_cells_mask_overlap_is_over_its_whole_united_mask() -> None:
    """Once pieces are united, a further piece must cover half of the smaller of the UNITED mask
    and its own, not half of the first piece's mask."""
    def full(box):
        return np.ones((box[3] - box[1], box[2] - box[0]), bool)

    a, b, c = (0, 0, 20, 20), (5, 0, 105, 20), (70, 0, 170, 20)
    # a and b: IoS 300 / 400 = 0.75, united into (0, 0, 105, 20) of 2100 px; c meets that in
    # 700 px: 700 / min(2100, 2000) = 0.35 (but 700 / 400 > 1 over a's mask alone)
    dets = [det(RBC, a, 0.9, tile=0, cut=True, mask=full(a)), det(RBC, b, 0.8, tile=1, cut=True, mask=full(b)),
            det(RBC, c, 0.7, tile=2, cut=True, mask=full(c))]
    merged = merge_detections(dets)
    assert sorted(d.box.as_list() for d in merged) == [[0, 0, 105, 20], [70, 0, 170, 20]]


def test_a_united_cells_further_pieces_are_judged_on_the_masks() -> None:
    """A united cell's next piece is judged on the masks where both have one: a piece whose box
    overlaps the united box enough (box IoS 0.6, IoU 0.43) but whose mask does not touch the
    united mask stays apart; without masks the same boxes unite."""
    a, b, c = (0, 0, 40, 40), (20, 0, 60, 40), (0, 16, 60, 56)
    lower = np.zeros((40, 60), bool)
    lower[24:] = True  # c's mask: only its rows 40..56 of the frame, below the united cell
    masks = [np.ones((40, 40), bool), np.ones((40, 40), bool), lower]
    with_masks = [det(RBC, box, score, tile=t, cut=True, mask=m)
                  for t, (box, score, m) in enumerate(zip((a, b, c), (0.9, 0.8, 0.7), masks))]
    merged = merge_detections(with_masks)
    assert sorted(d.box.as_list() for d in merged) == [[0, 0, 60, 40], [0, 16, 60, 56]]
    boxes_only = [det(RBC, d.box.as_list(), d.score, tile=d.tile_index, cut=True) for d in with_masks]
    assert [d.box.as_list() for d in merge_detections(boxes_only)] == [[0, 0, 60, 56]]


def test_an_overlap_exactly_at_the_threshold_merges() -> None:
    # boxes: IoS = 20 * 40 / (40 * 40) = 0.5 exactly (IoU 0.2): the thresholds are inclusive
    a = det(RBC, (0, 0, 40, 40), 0.9, tile=0, cut=True)
    b = det(RBC, (20, 0, 100, 40), 0.8, tile=1, cut=True)
    (merged,) = merge_detections([a, b])
    assert merged.box == Box(0, 0, 100, 40) and not merged.cut_by_tile_edge
    # IoU = 40 * 40 / (60 * 40 + 60 * 40 - 40 * 40) = 0.5 exactly, with an IoS threshold out of reach
    c = det(RBC, (0, 0, 60, 40), 0.9, tile=0)
    d = det(RBC, (20, 0, 80, 40), 0.8, tile=1)
    assert merge_detections([c, d], iou_threshold=0.5, ios_threshold=1.01) == [c]


def test_same_tile_detections_stay_apart_in_a_field_of_several_tiles() -> None:
    # as in test_same_tile_detections_are_never_merged (IoU ~0.51), but with another tile's view
    # of a in the field, so the merge runs: a absorbs that view, never its own tile's b
    a = det(RBC, (100, 100, 137, 137), 0.9, tile=3)
    b = det(RBC, (112, 100, 149, 137), 0.8, tile=3)
    a_again = det(RBC, (100, 100, 137, 137), 0.85, tile=4)
    assert merge_detections([a, b, a_again]) == [a, b]


@pytest.mark.parametrize("n, extent", [(120, 200), (256, 300), (257, 300), (700, 600)])
def test_overlapping_pairs_are_the_pairs_sharing_a_positive_area(n: int, extent: int) -> None:
    """boxes.overlapping_pairs finds exactly the pairs a comparison of every pair finds, boxes
    sharing only an edge or a corner excluded, on boxes of mixed sizes on an integer grid (so many
    touch) that reach across several grid cells: up to DENSE_PAIRS_UP_TO boxes by its own table
    of every pair, beyond it through the grid."""
    rng = np.random.default_rng(2)
    xy = rng.integers(0, extent, (n, 2))
    wh = np.where(rng.random((n, 1)) < 0.1, rng.integers(60, 150, (n, 2)), rng.integers(5, 30, (n, 2)))
    boxes = np.concatenate([xy, xy + wh], 1).astype(float)
    boxes[1] = [boxes[0, 2], boxes[0, 1], boxes[0, 2] + 10, boxes[0, 3]]  # edge-adjacent to box 0
    boxes[2] = [boxes[0, 2], boxes[0, 3], boxes[0, 2] + 10, boxes[0, 3] + 10]  # corner-adjacent
    i, j = overlapping_pairs(boxes)
    a, b = boxes[:, None, :], boxes[None, :, :]
    inter = ((np.minimum(a[..., 2], b[..., 2]) > np.maximum(a[..., 0], b[..., 0]))
             & (np.minimum(a[..., 3], b[..., 3]) > np.maximum(a[..., 1], b[..., 1])))
    want_i, want_j = np.nonzero(inter)  # row-major: sorted by i, then j
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(j, want_j)
    assert (0, 1) not in set(zip(i.tolist(), j.tolist())) and (0, 2) not in set(zip(i.tolist(), j.tolist()))


def _pairs_by_definition(boxes: np.ndarray) -> list[tuple[int, int]]:
    """Every ordered pair whose intersection has positive area, one comparison at a time."""
    b = boxes.tolist()
    return [(i, j) for i in range(len(b)) for j in range(len(b))
            if min(b[i][2], b[j][2]) > max(b[i][0], b[j][0]) and min(b[i][3], b[j][3]) > max(b[i][1], b[j][1])]


@pytest.mark.parametrize("n", [1, 2, 3, 40, DENSE_PAIRS_UP_TO - 1, DENSE_PAIRS_UP_TO, DENSE_PAIRS_UP_TO + 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_ways_of_finding_overlaps_give_the_pairs_of_the_definition_on_awkward_boxes(n: int, seed: int) -> None:
    """Either side of DENSE_PAIRS_UP_TO, and the grid itself below it: the pairs one comparison at
    a time gives, on boxes with fractional and negative coordinates, duplicates, zero width or
    height (which overlap nothing, not even themselves), boxes given corner first the wrong way
    round, and a few far larger than the rest (the grid's cell is twice the median side)."""
    rng = np.random.default_rng(seed * 1000 + n)
    xy = rng.uniform(-40, 300, (n, 2))
    wh = rng.uniform(0.5, 40, (n, 2))
    wh[rng.random(n) < 0.1, 0] = 0  # zero width
    wh[rng.random(n) < 0.1, 1] = 0  # zero height
    wh[rng.random(n) < 0.05] *= 12  # large
    boxes = np.concatenate([xy, xy + wh], 1)
    whole = rng.random(n) < 0.5  # on integers: many only touch
    boxes[whole] = np.round(boxes[whole])
    if n > 1:  # duplicates of other boxes, and a box given (x1, y1, x0, y0)
        dup = rng.random(n) < 0.2
        boxes[dup] = boxes[rng.integers(0, n, int(dup.sum()))]
        boxes[n - 1] = boxes[0, [2, 3, 0, 1]]
    want = _pairs_by_definition(boxes)
    assert n < 40 or sum(i != j for i, j in want) > n // 2  # many boxes overlap others
    for i, j in (overlapping_pairs(boxes), _grid_pairs(boxes)):
        assert list(zip(i.tolist(), j.tolist())) == want
