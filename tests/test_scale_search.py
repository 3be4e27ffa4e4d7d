"""Scale search (service.analysis.scale_search): red cells cut by the frame still measure the
scale when whole ones are too few (a crop a few red cells wide)."""

from __future__ import annotations

import pytest

from smearscope.service.analysis.records import Box, CellDetection, CellKind
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX, ScaleEstimate
from smearscope.service.analysis.scale_search import (
    DETECTED_RBC_DIAMETER_UM,
    Attempt,
    find_scale,
    measurable_red_cells,
    plausible,
)

W, H = 200, 150


def _rbc(x0, y0, x1, y1, score=0.9, kind=CellKind.RBC) -> CellDetection:
    return CellDetection(kind, Box(x0, y0, x1, y1), score)


def test_whole_cells_alone_when_they_are_enough():
    whole = [_rbc(20 + 30 * k, 50, 50 + 30 * k, 80) for k in range(5)]
    cut = _rbc(0, 100, 25, 130)
    assert measurable_red_cells([*whole, cut], W, H, 0.3) == whole


def test_cells_cut_by_one_side_measure_by_their_uncut_side():
    whole = [_rbc(60, 60, 90, 90)]
    left = _rbc(0, 10, 20, 40)  # 20 of 30 visible: the centre shows, its height is the diameter
    right = _rbc(180, 100, W, 130)
    top = _rbc(100, 0, 130, 16)
    sliver = _rbc(0, 100, 10, 130)  # a third visible: its height is a chord, not the diameter
    corner = _rbc(0, 0, 25, 25)  # cut by two sides
    other = [_rbc(120, 60, 150, 90, score=0.1), _rbc(20, 60, 50, 90, kind=CellKind.WBC)]
    got = measurable_red_cells([*whole, left, right, top, sliver, corner, *other], W, H, 0.3)
    assert [(d.box.x0, d.box.y0, d.box.x1, d.box.y1) for d in got] == [
        (60, 60, 90, 90), (-10, 10, 20, 40), (180, 100, 210, 130), (100, -14, 130, 16)]


def test_refinement_reads_the_cut_cells_where_whole_ones_are_too_few():
    """A field with 2 whole and 6 measurable red cells of 7.5 um at 0.1 um/px, first guessed at 0.08."""
    true_mpp = 0.1

    def detect_at(mpp: float, quick: bool) -> Attempt:
        side = DETECTED_RBC_DIAMETER_UM / CANONICAL_UM_PER_PX * mpp / true_mpp  # a normal cell's box at 0.2 um/px, resampled from `mpp`
        cells = [_rbc(10 + 60 * k, 10, 10 + 60 * k + side, 10 + side) for k in range(6)]
        return Attempt(mpp, cells[:2], None, quick, measured=cells)

    out = find_scale(detect_at, ScaleEstimate(0.08, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(true_mpp, rel=0.05)

    def whole_only(mpp: float, quick: bool) -> Attempt:
        a = detect_at(mpp, quick)
        return Attempt(a.mpp, a.whole_rbc, None, quick)

    stuck = find_scale(whole_only, ScaleEstimate(0.08, "rbc_size_classical"), 640 * 480)
    assert stuck.estimate.microns_per_pixel == pytest.approx(0.08) and stuck.uncertain


def test_a_searched_scale_that_shows_white_cells_by_the_dozen_is_not_blood():
    """A pale camera searched far above its scale: its red cells are seen large and taken for white
    cells while their pieces pass for many red cells of the right size (they settle at any scale).
    Such a pass is not blood; the search keeps the plausible pass near the true scale."""
    true_mpp = 0.135
    side = DETECTED_RBC_DIAMETER_UM / CANONICAL_UM_PER_PX

    def detect_at(mpp: float, quick: bool) -> Attempt:
        r = mpp / true_mpp
        if abs(mpp / 0.042 - 1) < 0.45:  # the first guess and its neighbours: two "red cells"
            return Attempt(mpp, [_rbc(0, 0, 30, 30)] * 2, None, quick)
        if 0.8 < r < 1.25:  # near the truth: red cells sized as the scale says, one white cell
            s_ = side * r
            return Attempt(mpp, [_rbc(0, 0, s_, s_)] * 20, None, quick, n_wbc=1)
        if mpp > 0.25:  # far above: pieces of the right size, and the red cells seen as white ones
            return Attempt(mpp, [_rbc(0, 0, side, side)] * 90, None, quick, n_wbc=25)
        return Attempt(mpp, [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.042, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(true_mpp, rel=0.1)
    assert plausible(Attempt(0.1, [_rbc(0, 0, 9, 9)] * 100, None, n_wbc=9))  # one per 11 red cells
    assert not plausible(Attempt(0.1, [_rbc(0, 0, 9, 9)] * 100, None, n_wbc=10))
    assert plausible(Attempt(0.1, [_rbc(0, 0, 9, 9)] * 10, None, n_wbc=4))  # a few: a crop around white cells
    assert not plausible(Attempt(0.1, [_rbc(0, 0, 9, 9)] * 10, None, n_wbc=5))


def test_with_no_red_cell_at_the_guesses_the_search_takes_the_most_red_cells_that_are_blood():
    """No whole red cell at the guesses: the search's pass with the most whole red cells is taken,
    unless it is not blood; then the next one that is."""
    true_mpp = 0.135
    side = DETECTED_RBC_DIAMETER_UM / CANONICAL_UM_PER_PX

    def detect_at(mpp: float, quick: bool) -> Attempt:
        r = mpp / true_mpp
        if 0.8 < r < 1.25:
            return Attempt(mpp, [_rbc(0, 0, side * r, side * r)] * 3, None, quick, n_wbc=0)
        if mpp > 0.25:  # more "red cells", and white cells by the dozen: not blood
            return Attempt(mpp, [_rbc(0, 0, side, side)] * 40, None, quick, n_wbc=12)
        return Attempt(mpp, [], None, quick, n_wbc=6 if mpp < 0.05 else 0)  # the guesses: white cells only

    out = find_scale(detect_at, ScaleEstimate(0.035, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.152, rel=0.01)  # the search's step nearest the truth
    assert out.uncertain and "search" in out.reason


def test_refining_a_searched_scale_does_not_walk_out_of_blood():
    """The searched pass shows three red cells that point to a scale twice as large, where the
    red cells are seen as white cells by the dozen: the searched pass stands, flagged."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        if abs(mpp / 0.1519 - 1) < 0.01:  # the search's best: three red cells that look small
            return Attempt(mpp, [_rbc(0, 0, 20, 20)] * 5, None, quick, n_wbc=0)
        if mpp > 0.25:
            return Attempt(mpp, [_rbc(0, 0, 20, 20)] * 5, None, quick, n_wbc=30)
        return Attempt(mpp, [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.035, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.1519, rel=0.01)
    assert out.uncertain and "did not settle" in out.reason


def test_a_handful_of_red_cells_at_the_guess_is_checked_at_larger_scales():
    """A first guess misled by clumps of cells: five huge "red cells" that settle at the guess.
    2.5 times the guess shows far more, and refining from them settles at the true scale
    (flagged: searched); a sparse field whose handful of red cells no larger scale outnumbers
    fourfold keeps its guess."""
    true_mpp = 0.13
    side = DETECTED_RBC_DIAMETER_UM / CANONICAL_UM_PER_PX

    def clumps(mpp: float, quick: bool) -> Attempt:
        r = mpp / true_mpp
        if abs(mpp / 0.042 - 1) < 0.05:  # the guess: five cells sized as that scale says
            return Attempt(mpp, [_rbc(0, 0, side, side)] * 5, None, quick)
        if 0.75 < r < 1.35:
            return Attempt(mpp, [_rbc(0, 0, side * r, side * r)] * 100, None, quick, n_wbc=1)
        return Attempt(mpp, [_rbc(0, 0, side, side)] * 3, None, quick)

    out = find_scale(clumps, ScaleEstimate(0.042, "rbc_size_classical"), 1008 * 630)
    assert out.estimate.microns_per_pixel == pytest.approx(true_mpp, rel=0.06)
    assert out.uncertain and out.reason == "found at 2.5 times the first guess's scale, where 5 whole red cells showed"

    def sparse(mpp: float, quick: bool) -> Attempt:  # eight red cells at the truth, pieces elsewhere
        r = mpp / true_mpp
        n = 8 if 0.75 < r < 1.35 else 12
        return Attempt(mpp, [_rbc(0, 0, side * r, side * r)] * n, None, quick)

    kept = find_scale(sparse, ScaleEstimate(true_mpp, "rbc_size_classical"), 640 * 480)
    assert kept.estimate.microns_per_pixel == pytest.approx(true_mpp, rel=0.01)
    assert not kept.uncertain


SIDE = DETECTED_RBC_DIAMETER_UM / CANONICAL_UM_PER_PX  # a normal red cell's box at the canonical scale


def _near(mpp: float, at: float, rel: float = 0.05) -> bool:
    return abs(mpp / at - 1) < rel


def _cells(n: int, looks: float = 1.0) -> list[CellDetection]:
    """`n` whole red cells whose boxes read `looks` times the canonical size of a normal cell
    (1: sized as the pass's scale says; 0.5: pointing to twice the pass's scale)."""
    return [_rbc(0, 0, SIDE * looks, SIDE * looks)] * n


def test_whole_cells_are_the_ones_no_side_cuts_within_the_edge_band_and_top_bottom_cuts_measure_too():
    """A box within FRAME_EDGE_PX (2 px) of a side is cut by it; cells cut by the top or bottom
    measure by their width where at least half of it shows, placed over their visible part."""
    from smearscope.service.analysis.scale_search import FRAME_EDGE_PX, whole_red_cells

    at_band = _rbc(FRAME_EDGE_PX, 60, 30, 90)
    inside = _rbc(FRAME_EDGE_PX + 0.5, 60, 30.5, 90)
    at_right = _rbc(100, 60, W - FRAME_EDGE_PX, 90)
    assert whole_red_cells([at_band, inside, at_right], W, H, 0.3) == [inside]
    whole = [_rbc(60, 60, 90, 90)]
    bottom = _rbc(100, 130, 130, H)  # 20 of 30 rows visible: the centre shows
    top_sliver = _rbc(20, 0, 50, 10)  # a third visible: its width is a chord
    bottom_sliver = _rbc(150, 140, 180, H)
    got = measurable_red_cells([*whole, bottom, top_sliver, bottom_sliver], W, H, 0.3)
    assert [(d.box.x0, d.box.y0, d.box.x1, d.box.y1) for d in got] == [(60, 60, 90, 90), (100, 130, 130, 160)]


def test_a_first_guess_that_settles_is_one_full_pass():
    """Enough red cells at the first guess, sized as its scale says: no other guess, no search."""
    calls: list[tuple[float, bool]] = []

    def detect_at(mpp: float, quick: bool) -> Attempt:
        calls.append((mpp, quick))
        return Attempt(mpp, _cells(30, mpp / 0.1), None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert calls == [(pytest.approx(0.1), False)]
    assert out.estimate.microns_per_pixel == pytest.approx(0.1) and out.estimate.method == "rbc_size_detection"
    assert not out.uncertain and out.estimate.rbc_count == 30


def test_the_search_reaches_a_20x_objectives_scale():
    """No red cell at the guesses and red cells only at about 0.5 um/px (a 20x objective): the
    search's grid runs up to the plausible range's end, so its last step finds them."""
    from smearscope.service.analysis.scale_search import (
        PLAUSIBLE_UM_PER_PX,
        SEARCH_STEP,
        search_grid,
    )

    grid = search_grid()
    assert grid[0] == PLAUSIBLE_UM_PER_PX[0] and grid[-1] <= PLAUSIBLE_UM_PER_PX[1] < grid[-1] * SEARCH_STEP

    def detect_at(mpp: float, quick: bool) -> Attempt:
        return Attempt(mpp, _cells(30, mpp / 0.5) if _near(mpp, 0.5, 0.2) else [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.035, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.5, rel=0.05)
    assert out.estimate.method == "rbc_size_detection"


def test_a_search_pass_too_large_for_memory_is_not_run():
    """A 12 MP frame: a search pass above 0.2 um/px would resample it beyond
    MAX_SEARCH_CANONICAL_PIXELS (12 MP) and is skipped; the ones below run."""
    from smearscope.service.analysis.scale_search import MAX_SEARCH_CANONICAL_PIXELS

    pixels = 4000 * 3000
    asked: list[float] = []

    def detect_at(mpp: float, quick: bool) -> Attempt:
        asked.append(mpp)
        return Attempt(mpp, [], None, quick)

    find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), pixels)
    assert min(asked) == pytest.approx(0.03)  # the search ran
    assert all(pixels * (m / CANONICAL_UM_PER_PX) ** 2 <= MAX_SEARCH_CANONICAL_PIXELS * (1 + 1e-9) for m in asked)


@pytest.mark.parametrize(("at_guess", "at_search", "taken"), [
    (1, 3, False),   # one red cell at the guess is a sparse field, not none: three are not four times as many
    (1, 5, True),
    (3, 10, False),  # fewer than four times as many
    (3, 12, True),
])
def test_a_few_red_cells_at_the_guess_give_way_only_to_four_times_as_many(at_guess, at_search, taken):
    """A few whole red cells at the guesses (0.1 um/px): the search's pass at 0.228 whose cells
    settle there is taken only where it shows SEARCH_WINS_FACTOR (4) times as many, and at least
    MIN_RBC_FOR_SCALE."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        if _near(mpp, 0.1, 0.5):  # the guesses 0.1, 0.14 and 0.071
            return Attempt(mpp, _cells(at_guess, mpp / 0.1), None, quick)
        if _near(mpp, 0.2278):
            return Attempt(mpp, _cells(at_search), None, quick)
        return Attempt(mpp, [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.2278 if taken else 0.1, rel=0.01)
    assert out.uncertain


def _guess_with_two_cells(mpp: float, quick: bool) -> Attempt | None:
    """Two whole red cells at the guesses around 0.1 um/px (too few to measure)."""
    return Attempt(mpp, _cells(2, mpp / 0.1), None, quick) if _near(mpp, 0.1, 0.5) else None


def test_a_searched_scale_whose_cells_point_out_of_the_plausible_range_is_not_taken():
    """The search's top step shows 30 "red cells" that read half a normal cell's size, so point
    to twice its scale: the refinement is pinned at the range's end (no scale agrees) and the
    guess is kept."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        a = _guess_with_two_cells(mpp, quick)
        return a or Attempt(mpp, _cells(30, 0.5) if mpp > 0.45 else [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.1)
    assert out.uncertain and "only 2 whole red cells" in out.reason


def test_a_kept_guess_with_one_whole_red_cell_says_it_in_the_singular():
    """One whole red cell at the guesses, none anywhere else: the reason said "only 1 whole red cells"."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        return Attempt(mpp, _cells(1, mpp / 0.1) if _near(mpp, 0.1, 0.5) else [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.uncertain and "only 1 whole red cell" in out.reason and "1 whole red cells" not in out.reason, out.reason


def test_a_searched_scale_whose_refinement_settles_where_white_cells_abound_is_not_taken():
    """The search's pass at 0.342 points to 0.45, where the cells settle but 25 white cells show
    per 30 red cells (not blood): neither is taken, the guess is kept."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        a = _guess_with_two_cells(mpp, quick)
        if a:
            return a
        if _near(mpp, 0.342):
            return Attempt(mpp, _cells(30, mpp / 0.45), None, quick)
        if _near(mpp, 0.45):
            return Attempt(mpp, _cells(30, mpp / 0.45), None, quick, n_wbc=25)
        return Attempt(mpp, [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.1)
    assert out.uncertain


@pytest.mark.parametrize(("at_search", "kept"), [(30, 0.2278), (12, 0.1)])
def test_a_drifting_refinement_keeps_the_pass_with_the_most_cells_if_they_are_many(at_search, kept):
    """The searched pass at 0.228 shows `at_search` red cells that always read 1.3 times larger
    than their pass's scale, and each refined pass shows half as many: the refinement does not
    settle. The searched pass is kept where it showed UNSETTLED_MIN_RBC (20) or more (and four
    times the guesses' two), else the guess."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        a = _guess_with_two_cells(mpp, quick)
        if a:
            return a
        if _near(mpp, 0.2278):
            return Attempt(mpp, _cells(at_search, 1 / 1.3), None, quick)
        if mpp > 0.25:
            return Attempt(mpp, _cells(at_search // 2, 1 / 1.3), None, quick)
        return Attempt(mpp, [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(kept, rel=0.01)
    assert out.uncertain and not out.attempt.quick
    if kept != 0.1:
        assert "search" in out.reason and "did not settle" in out.reason


def test_a_guess_refines_even_where_white_cells_abound():
    """A crop around white cells (6 white per 20 red cells): the plausibility test is for searched
    scales only, so a guess's refinement is followed to where its cells settle."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        return Attempt(mpp, _cells(20, mpp / 0.12), None, quick, n_wbc=6)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.12, rel=0.05)
    assert not out.uncertain


def test_a_refined_pass_that_finds_no_red_cell_leaves_the_scale_where_it_was():
    def detect_at(mpp: float, quick: bool) -> Attempt:
        return Attempt(mpp, _cells(20, 0.1 / 0.15) if _near(mpp, 0.1) else [], None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.1, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.1) and out.estimate.rbc_count == 20
    assert out.uncertain and "did not settle" in out.reason


def test_the_refinement_settles_a_detector_that_sees_cells_nearer_the_canonical_size():
    """A detector whose boxes read the square root of a cell's true size ratio to the canonical
    (a first guess 1.3 times the truth): each pass halves the error in log terms, and the third
    pass lies within the tolerance (0.13 -> 0.114 -> 0.1068, which implies 0.1034)."""
    def detect_at(mpp: float, quick: bool) -> Attempt:
        return Attempt(mpp, _cells(30, (mpp / 0.1) ** 0.5), None, quick)

    out = find_scale(detect_at, ScaleEstimate(0.13, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.1068, rel=0.01)
    assert not out.uncertain


def test_the_outcome_is_a_full_pass_never_out_of_range_and_default_without_red_cells():
    from smearscope.service.analysis.scale_search import PLAUSIBLE_UM_PER_PX

    lo, hi = PLAUSIBLE_UM_PER_PX
    calls: list[tuple[float, bool]] = []

    def nothing(mpp: float, quick: bool) -> Attempt:
        calls.append((mpp, quick))
        return Attempt(mpp, [], None, quick)

    # a first guess beyond the plausible range (the classical estimate's 1.0 um/px): no pass and
    # no estimate leaves the range; with no red cell anywhere the searched scale is no measurement
    out = find_scale(nothing, ScaleEstimate(1.0, "rbc_size_classical"), 640 * 480)
    assert all(lo <= m <= hi for m, _ in calls) and lo <= out.estimate.microns_per_pixel <= hi
    assert out.estimate.method == "default" and out.uncertain

    # the search's best is a quick pass: the outcome is that scale's full pass
    calls.clear()

    def three_at_0152(mpp: float, quick: bool) -> Attempt:
        calls.append((mpp, quick))
        return Attempt(mpp, _cells(3) if _near(mpp, 0.1519) else [], None, quick)

    out = find_scale(three_at_0152, ScaleEstimate(0.035, "rbc_size_classical"), 640 * 480)
    assert out.estimate.microns_per_pixel == pytest.approx(0.1519, rel=0.01)
    assert not out.attempt.quick and calls[-1] == (pytest.approx(0.1519, rel=0.01), False)
