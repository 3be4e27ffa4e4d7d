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
