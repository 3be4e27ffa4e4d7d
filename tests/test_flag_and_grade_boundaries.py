"""The boundaries of what a clinician reads: flags at their exact thresholds (schistocytes over 1 %,
critical sickle cells at the confidence bound, atypical white cells at 3 cells and 10 %), ICSH
grades of every graded morphology and the grades at the ends of their intervals, ratios and the
differential's cell count without nucleated red cells, red-cell size statistics, size-based
classes withheld at an estimated scale, the lymphocyte size bound, and the nucleated re-check's
reference and size rules. Each test was written against a mutation of the code it guards that
the suite let pass (a flipped comparison, a moved bound, a wrong denominator or cell list)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_nucleated import _disc, _disc_field
from test_open_set_flags import _cell

from smearscope.service.analysis.aggregate import (
    AggregateThresholds,
    aggregate,
    is_classified_wbc,
    size_stats,
    wilson_interval,
)
from smearscope.service.analysis.classify import UNIDENTIFIED, HeadResult
from smearscope.service.analysis.morphology import (
    SIZE_BASED,
    icsh_grade,
    shape_label,
    shape_probs,
    size_distribution,
)
from smearscope.service.analysis.nucleated import accepts, dense_interiors, interior_density
from smearscope.service.analysis.records import (
    CellKind,
)
from smearscope.service.analysis.size_gate import gate_lymphocyte_size


def _codes(cells, th: AggregateThresholds | None = None):
    return {f.code for f in aggregate(cells, th or AggregateThresholds()).flags}


# -- morphology() grades and their CI ends
def _target_row(k, n=100):
    cells = [_cell(CellKind.RBC, "normal")] * (n - k) + [_cell(CellKind.RBC, "target")] * k
    return next(s for s in aggregate(cells).rbc_morphology if s.label == "target")


def test_grade_and_its_interval_ends_each_from_their_own_share():
    six = _target_row(6)   # 6 % (95 % CI 2.8-12.5 %): 1+, low end none, high end 1+
    assert (six.grade, six.grade_ci_low, six.grade_ci_high) == ("1+", "none", "1+")
    eighteen = _target_row(18)  # 18 % (CI 11.7-26.7 %): 1+, low 1+, high 2+
    assert (eighteen.grade, eighteen.grade_ci_low, eighteen.grade_ci_high) == ("1+", "1+", "2+")


def test_a_grade_comes_from_the_exact_share_not_the_rounded_percent():
    """One schistocyte in 25 000 red cells is 0.004 %: printed 0.0 %, but ICSH's 1+ (any under 1 %)."""
    cells = [_cell(CellKind.RBC, "normal")] * 24_999 + [_cell(CellKind.RBC, "schistocyte")]
    row = next(s for s in aggregate(cells).rbc_morphology if s.label == "schistocyte")
    assert row.percent == 0.0 and row.grade == "1+"


def test_the_interval_ends_are_graded_on_their_exact_shares_too():
    """Five schistocytes in 300 000 red cells: the interval's low end is 0.0007 %, printed 0.0 %
    but above ICSH's 1+ bound (0.0001 %), so the low end grades 1+ as the share does; graded from
    the rounded percent it read "none"."""
    cells = [_cell(CellKind.RBC, "normal")] * 299_995 + [_cell(CellKind.RBC, "schistocyte")] * 5
    row = next(s for s in aggregate(cells).rbc_morphology if s.label == "schistocyte")
    assert row.ci95_low == 0.0 and (row.grade, row.grade_ci_low, row.grade_ci_high) == ("1+", "1+", "1+")


def test_sickle_cells_reported_present_on_the_calls_as_sure_as_the_critical_flag_needs():
    """One unsure sickle call is counted (audit) and listed for review, but the report does not
    read "sickle cells present" on evidence the flag calls too weak; a sure call reads present."""
    normal = [_cell(CellKind.RBC, "normal")] * 300
    one_unsure = next(s for s in aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.5)]).rbc_morphology
                      if s.label == "sickle")
    assert (one_unsure.count, one_unsure.graded_count, one_unsure.grade) == (1, 0, "none")
    cells = normal + [_cell(CellKind.RBC, "sickle", 0.95)] * 4 + [_cell(CellKind.RBC, "sickle", 0.3)] * 4
    row = next(s for s in aggregate(cells).rbc_morphology if s.label == "sickle")
    assert (row.count, row.graded_count, row.grade) == (8, 4, "present")
    sure = next(s for s in aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.8)]).rbc_morphology
                if s.label == "sickle")
    assert (sure.count, sure.graded_count, sure.grade) == (1, None, "present")  # at the bound: every call counts
    assert all(wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0 for n in range(1, 2000))
    lowered = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.5)], AggregateThresholds(sickle_min_confidence=0.5))
    assert next(s for s in lowered.rbc_morphology if s.label == "sickle").grade == "present"


def _sickle(sure: int, unsure: int = 0, n_rbc: int = 114):
    """A specimen of `n_rbc` red cells with `sure` sickle calls at 0.95 and `unsure` at 0.5: its
    sickle row and its sickle flags' (code, severity)."""
    cells = ([_cell(CellKind.RBC, "normal")] * (n_rbc - sure - unsure) + [_cell(CellKind.RBC, "sickle", 0.95)] * sure
             + [_cell(CellKind.RBC, "sickle", 0.5)] * unsure)
    a = aggregate(cells)
    row = next(s for s in a.rbc_morphology if s.label == "sickle")
    return row, {(f.code, f.severity) for f in a.flags if f.code.startswith("sickle")}


def test_sickle_cells_read_present_or_none_never_a_grade_and_agree_with_their_flag():
    """ICSH 2015 reports sickle cells present, not 1+ to 3+: 4 sure calls of 114 red cells (3.5 %,
    which the schistocyte scale reads 3+) are "present" beside the review flag, 5 "present" beside
    the critical one; unsure calls alone are "none" beside the review flag. The share and count
    stay for audit, and no interval's grades are given (present or none has no 1+ to 3+)."""
    four, flags = _sickle(4)
    assert (four.grade, four.count, four.percent) == ("present", 4, round(100 * 4 / 114, 2))
    assert (four.grade_ci_low, four.grade_ci_high, four.graded_count) == (None, None, None)
    assert flags == {("sickle_cells_review", "warning")}
    five, flags = _sickle(5)
    assert (five.grade, five.grade_ci_low, five.grade_ci_high) == ("present", None, None)
    assert flags == {("sickle_cells_present", "critical")}
    unsure, flags = _sickle(0, unsure=3)
    assert (unsure.grade, unsure.graded_count, unsure.count) == ("none", 0, 3)
    assert (unsure.grade_ci_low, unsure.grade_ci_high) == (None, None)
    assert flags == {("sickle_cells_review", "warning")}
    many, flags = _sickle(30, n_rbc=100)  # 30 %: "3+" on any scale, still "present"
    assert many.grade == "present" and flags == {("sickle_cells_present", "critical")}
    assert [icsh_grade("sickle", p) for p in (0.0, 0.5, 1.0, 2.5, 60.0)] == ["none"] + ["present"] * 4
    # schistocytes keep their ICSH scale and its interval's grades
    schisto = next(s for s in aggregate([_cell(CellKind.RBC, "normal")] * 110 + [_cell(CellKind.RBC, "schistocyte")] * 4)
                   .rbc_morphology if s.label == "schistocyte")
    assert (schisto.grade, schisto.grade_ci_low, schisto.grade_ci_high) == ("3+", "2+", "3+")


# -- ratios
def test_ratios_use_their_own_denominators_and_leave_nrbc_out():
    cells = ([_cell(CellKind.RBC, "normal")] * 10 + [_cell(CellKind.WBC, "neutrophil")] * 4
             + [_cell(CellKind.NRBC, "erythroblast")] * 2 + [_cell(CellKind.PLATELET, None, None)] * 3)
    r = aggregate(cells).ratios
    assert r["platelet_rbc"] == 0.3 and r["wbc_rbc"] == 0.4


# -- too_few_wbc_for_differential
def test_differential_needs_100_white_cells_and_nrbc_do_not_count_toward_them():
    assert "too_few_wbc_for_differential" not in _codes([_cell(CellKind.WBC, "neutrophil")] * 100)
    assert "too_few_wbc_for_differential" in _codes([_cell(CellKind.WBC, "neutrophil")] * 99)
    assert "too_few_wbc_for_differential" in _codes(
        [_cell(CellKind.WBC, "neutrophil")] * 95 + [_cell(CellKind.NRBC, "erythroblast")] * 10)
    # unidentified white cells go to review: they are not part of the 100
    flags = aggregate([_cell(CellKind.WBC, "neutrophil")] * 95 + [_cell(CellKind.WBC, UNIDENTIFIED)] * 10).flags
    few = next(f for f in flags if f.code == "too_few_wbc_for_differential")
    assert few.message.startswith("95 WBC classified (10 more unidentified)")


# -- too_few_rbc_for_morphology
def test_morphology_on_a_handful_of_red_cells_says_so():
    assert "too_few_rbc_for_morphology" in _codes([_cell(CellKind.RBC, "schistocyte")])
    assert "too_few_rbc_for_morphology" in _codes([_cell(CellKind.RBC, "normal")] * 199)
    assert "too_few_rbc_for_morphology" not in _codes([_cell(CellKind.RBC, "normal")] * 200)
    assert "too_few_rbc_for_morphology" not in _codes([_cell(CellKind.WBC, "neutrophil")])  # no red cell: nothing graded
    assert "too_few_rbc_for_morphology" not in _codes([_cell(CellKind.RBC, "normal")] * 20,
                                                      AggregateThresholds(min_rbc_for_morphology=20))


# -- many_unidentified_*
def test_many_unidentified_red_cells_and_the_share_is_of_that_kind():
    rbc = [_cell(CellKind.RBC, "normal")] * 8 + [_cell(CellKind.RBC, UNIDENTIFIED)] * 2  # 20 % of RBC
    assert "many_unidentified_rbc" in _codes(rbc)
    exactly_ten = [_cell(CellKind.RBC, "normal")] * 9 + [_cell(CellKind.RBC, UNIDENTIFIED)]
    assert "many_unidentified_rbc" not in _codes(exactly_ten)  # 10 % is not "many"
    wbc = [_cell(CellKind.WBC, "neutrophil")] * 8 + [_cell(CellKind.WBC, UNIDENTIFIED)] * 2  # 20 % of WBC
    assert "many_unidentified_wbc" in _codes(wbc + [_cell(CellKind.RBC, "normal")] * 200)


# -- calibration of a pooled specimen
def test_sizes_are_assessable_only_when_every_red_cell_is_calibrated():
    cells = [_cell(CellKind.RBC, "normal", calibrated=False)] * 10
    a = aggregate(cells)
    assert not a.rbc_size.calibrated and a.rbc_size.mean_diameter_um is None and a.rbc_size.n == 10
    assert "size_not_assessable_without_calibration" in {f.code for f in a.flags}


def test_a_run_mixing_calibrated_and_estimated_fields_sizes_only_the_calibrated_cells():
    """One spherocyte row, a share of the calibrated fields' red cells; no not-assessable rows
    beside it; counts add up to the red cells; diameters of the calibrated cells only."""
    cells = ([_cell(CellKind.RBC, "normal", calibrated=True, d_um=7.0)] * 70
             + [_cell(CellKind.RBC, "spherocyte", calibrated=True, d_um=6.0)] * 10
             + [_cell(CellKind.RBC, "normal", calibrated=False, d_um=30.0)] * 15
             + [_cell(CellKind.RBC, "target", calibrated=False, unassessed="spherocyte", d_um=30.0)] * 5)
    a = aggregate(cells)
    rows = {r.label: r for r in a.rbc_morphology}
    assert len(rows) == len(a.rbc_morphology) and set(rows) == {"normal", "spherocyte", "target"}
    assert sum(r.count for r in a.rbc_morphology) == a.counts.rbc == 100
    assert rows["spherocyte"].percent == 12.5 and rows["spherocyte"].of_cells == 80 and rows["spherocyte"].assessable
    assert rows["normal"].percent == 85.0 and rows["normal"].of_cells is None and rows["target"].percent == 5.0
    assert a.rbc_size.calibrated and a.rbc_size.n == 80 and a.rbc_size.mean_diameter_um < 7.0
    codes = {f.code for f in a.flags}
    assert "sizes_from_calibrated_fields_only" in codes and "size_not_assessable_without_calibration" not in codes


def test_a_mixed_runs_size_based_grade_is_of_the_calibrated_cells():
    """20 spherocytes among 80 calibrated red cells (25 %: 2+) in a run of 100 (20 %: it would read 1+)."""
    cells = ([_cell(CellKind.RBC, "normal", calibrated=True, d_um=7.0)] * 60
             + [_cell(CellKind.RBC, "spherocyte", calibrated=True, d_um=6.0)] * 20
             + [_cell(CellKind.RBC, "normal", calibrated=False, d_um=30.0)] * 20)
    row = next(r for r in aggregate(cells).rbc_morphology if r.label == "spherocyte")
    assert (row.percent, row.of_cells, row.grade) == (25.0, 80, "2+")


# -- atypical_wbc_present boundaries with the default thresholds
def test_atypical_flag_at_exactly_three_cells_and_exactly_ten_percent():
    cells = [_cell(CellKind.WBC, UNIDENTIFIED, atypical=True)] * 3 + [_cell(CellKind.WBC, "neutrophil")] * 27
    assert "atypical_wbc_present" in _codes(cells)  # 3 cells, 3/30 = 10 %: both "at least"
    # the message tells the cells unlike any trained type from those merely unsure
    cells = cells[:2] + [_cell(CellKind.WBC, UNIDENTIFIED)] + cells[3:]
    flag = next(f for f in aggregate(cells).flags if f.code == "atypical_wbc_present")
    assert "3 of 30 white cells (10%) could not be typed (2 unlike any trained type)" in flag.message


# -- sickle flags
def test_sickle_critical_at_exactly_the_confidence_and_lists_every_sickle_cell():
    normal = [_cell(CellKind.RBC, "normal")] * 200
    at_bound = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.8)] * 5)
    assert any(f.code == "sickle_cells_present" for f in at_bound.flags)  # ">= 0.8"
    mixed = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.95)] * 5 + [_cell(CellKind.RBC, "sickle", 0.5)] * 3)
    crit = next(f for f in mixed.flags if f.code == "sickle_cells_present")
    assert crit.cells == list(range(200, 208))  # the unsure ones listed for review too
    no_score = aggregate(normal + [_cell(CellKind.RBC, "sickle", None)] * 5)
    assert {f.code for f in no_score.flags} >= {"sickle_cells_review"}
    assert "sickle_cells_present" not in {f.code for f in no_score.flags}
    four_sure = aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.95)] * 4 + [_cell(CellKind.RBC, "sickle", 0.5)])
    review = next(f for f in four_sure.flags if f.code == "sickle_cells_review")
    assert review.message.startswith("5 possible sickle cells, 4 at confidence 0.8 or more")  # says which fall short


# -- schistocytes_present
def test_schistocyte_flag_over_one_percent_of_red_cells_with_at_least_three_cells():
    def schisto(k, n_rbc, n_wbc=0):
        return ([_cell(CellKind.RBC, "normal")] * (n_rbc - k) + [_cell(CellKind.RBC, "schistocyte")] * k
                + [_cell(CellKind.WBC, "neutrophil")] * n_wbc)
    flag = next(f for f in aggregate(schisto(4, 300, n_wbc=200)).flags if f.code == "schistocytes_present")
    assert flag.severity == "warning" and flag.cells == list(range(296, 300))  # 1.33 %, WBC do not dilute it
    assert "schistocytes_present" not in _codes(schisto(3, 300))  # exactly 1 %: not "more than 1 %"
    assert "schistocytes_present" not in _codes(schisto(2, 100))  # 2 % but only 2 cells



def test_schistocyte_flag_and_grade_count_the_calls_at_their_confidence():
    """A normal-looking lab's red cells draw a few unsure schistocyte calls (BCCD val: 2.5 % typed,
    0.8 % at 0.6): only calls at or above schistocyte_min_confidence count toward the flag and the
    grade; every call stays in the count and on the flag's list."""
    normal = [_cell(CellKind.RBC, "normal")] * 288
    unsure = aggregate(normal + [_cell(CellKind.RBC, "schistocyte", 0.55)] * 10 + [_cell(CellKind.RBC, "schistocyte", 0.9)] * 2)
    assert "schistocytes_present" not in {f.code for f in unsure.flags}  # 4 % called, 0.67 % sure
    (row,) = [s for s in unsure.rbc_morphology if s.label == "schistocyte"]
    assert row.count == 12 and row.graded_count == 2 and row.grade == "1+"  # under 1 %, not 3+
    at_bound = aggregate(normal + [_cell(CellKind.RBC, "schistocyte", 0.6)] * 4 + [_cell(CellKind.RBC, "schistocyte", 0.3)] * 8)
    flag = next(f for f in at_bound.flags if f.code == "schistocytes_present")  # ">= 0.6": 4 of 300
    assert flag.cells == list(range(288, 300)) and "1.3% of red cells at confidence 0.6 or more (12 called" in flag.message
    stricter = aggregate(normal + [_cell(CellKind.RBC, "schistocyte", 0.6)] * 4 + [_cell(CellKind.RBC, "normal")] * 8,
                         AggregateThresholds(schistocyte_min_confidence=0.7))
    assert "schistocytes_present" not in {f.code for f in stricter.flags}


# -- nucleated_rbc_present lists the NRBC
def test_nrbc_flag_lists_the_nucleated_red_cells():
    cells = [_cell(CellKind.WBC, "neutrophil")] * 4 + [_cell(CellKind.NRBC, "erythroblast")] * 2
    flag = next(f for f in aggregate(cells).flags if f.code == "nucleated_rbc_present")
    assert flag.cells == [4, 5]


# -- ICSH table
@pytest.mark.parametrize("feature", ["microcyte", "macrocyte", "hypochromia"])
def test_icsh_size_and_colour_grades(feature):
    assert [icsh_grade(feature, p) for p in (10.0, 10.5, 11.0, 20.0, 20.5, 21.0, 50.0, 50.1)] == \
        ["none", "1+", "1+", "1+", "2+", "2+", "2+", "3+"]


@pytest.mark.parametrize("feature", ["spherocyte", "target", "stomatocyte", "ovalocyte", "elliptocyte",
                                     "teardrop", "burr", "other_poikilocyte"])
def test_icsh_shape_grades(feature):
    assert [icsh_grade(feature, p) for p in (4.9, 5.0, 20.0, 20.5, 21.0, 50.0, 50.1)] == \
        ["none", "1+", "1+", "2+", "2+", "2+", "3+"]


def test_a_share_between_icsh_ranges_takes_the_grade_above():
    """ICSH's whole-percent ranges are contiguous: 41 target cells of 200 (20.5 %) are past 1+'s
    "5-20 %" and read 2+, as 101 of 200 (50.5 %) read 3+ ("> 50 %"); 21 microcytes of 200
    (10.5 %) are past "none" and read 1+. They read 1+, 3+ and none: 2+ started at 21 %, 3+ just
    above 50 %."""
    def row(label, k, n=200):
        cells = [_cell(CellKind.RBC, "normal")] * (n - k) + [_cell(CellKind.RBC, label)] * k
        return next(s for s in aggregate(cells).rbc_morphology if s.label == label)
    assert (row("target", 41).percent, row("target", 41).grade) == (20.5, "2+")
    assert row("target", 40).grade == "1+" and row("target", 101).grade == "3+" and row("target", 100).grade == "2+"
    assert (row("microcyte", 21).percent, row("microcyte", 21).grade) == (10.5, "1+")
    assert row("microcyte", 20).grade == "none" and row("hypochromia", 41).grade == "2+"


# -- size statistics
def test_rbc_size_sd_is_the_sample_sd_and_cv_a_percent():
    d = size_distribution([7.0, 8.0, 9.0, float("nan")])
    assert d.n == 3 and d.mean_um == 8.0 and d.sd_um == 1.0 and d.cv_percent == 12.5


# -- size-based classes
def test_every_size_class_is_withheld_at_an_estimated_scale():
    assert SIZE_BASED == {"microcyte", "macrocyte", "spherocyte"}
    # a size call is a normal outline at a size no one can judge: its probability is normal's, so
    # the runner-up abnormal shape is not inflated by it ...
    classes = ["macrocyte", "microcyte", "spherocyte", "target", "normal"]
    assert shape_label(classes, np.array([0.5, 0.2, 0.1, 0.15, 0.05])) == "normal"
    # ... and a shape the head saw more strongly than every size call together stays
    assert shape_label(classes, np.array([0.2, 0.05, 0.05, 0.6, 0.1])) == "target"


# -- size gate bound
def test_a_lymphocyte_just_over_15_um_goes_to_review_by_default():
    out = gate_lymphocyte_size([_cell(CellKind.WBC, "lymphocyte", d_um=15.5)])
    assert (out[0].label, out[0].atypical) == (UNIDENTIFIED, True)


# -- nucleated re-check (stained discs and their fields: tests/test_nucleated.py)
def test_dense_ratio_is_1_8_times_the_median():
    # median red 214 -> density -ln(215/236) = 0.0932; 1.8x = 0.1678 -> red+1 <= 236*exp(-0.1678) = 199.6
    img, crops = _disc_field([214] * 11 + [197, 202])  # 197: 1.88x (re-checked); 202: 1.62x (not)
    assert dense_interiors(img, crops) == [11]


def test_ten_measurable_red_cells_are_a_reference():
    img, crops = _disc_field([215] * 9 + [90])
    assert dense_interiors(img, crops) == [9]


def test_a_field_whose_median_red_cell_reads_as_glass_is_no_reference():
    img, crops = _disc_field([235] * 10 + [90])
    assert dense_interiors(img, crops) == []


def test_a_cell_brighter_than_the_white_point_has_density_zero():
    img, crops = _disc_field([250])
    assert interior_density(img, crops[0]) == 0.0


def test_granulocytes_are_accepted_from_8_8_um():
    assert accepts(HeadResult("eosinophil", 0.99), _disc(10.0), 15.0)
    assert accepts(HeadResult("basophil", 0.99), _disc(10.0), 15.0)
    assert accepts(HeadResult("ig", 0.99), _disc(10.0), 15.0)
    assert accepts(HeadResult("neutrophil", 0.99), _disc(9.2), 15.0)  # the station's shrunken neutrophils
    assert not accepts(HeadResult("neutrophil", 0.99), _disc(8.4), 15.0)  # a red cell's size


def test_a_diameter_that_could_not_be_measured_leaves_the_size_statistics_to_the_others():
    cells = [_cell(CellKind.RBC, "normal", d_um=d) for d in (7.0, 7.5, 8.0)] + [_cell(CellKind.RBC, "normal", d_um=float("nan"))]
    size = aggregate(cells).rbc_size
    assert (size.n, size.median_diameter_um, size.mean_diameter_um) == (3, 7.5, 7.5)


# -- rows, rounding and the size statistics a report prints (each against a mutation the suite let pass)
def test_rows_are_listed_most_frequent_first_then_by_name_and_percents_keep_two_decimals():
    wbc = ([_cell(CellKind.WBC, "neutrophil")] * 5 + [_cell(CellKind.WBC, "monocyte")] * 3
           + [_cell(CellKind.WBC, "lymphocyte")] * 3 + [_cell(CellKind.WBC, "eosinophil")])
    assert [s.label for s in aggregate(wbc).wbc_differential] == ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    thirds = aggregate([_cell(CellKind.WBC, "neutrophil")] * 2 + [_cell(CellKind.WBC, "eosinophil")]).wbc_differential
    assert [(s.label, s.percent) for s in thirds] == [("neutrophil", 66.67), ("eosinophil", 33.33)]  # 200/3, 100/3
    # a run mixing calibrated and estimated fields: shape rows and size rows in one order too
    mixed = ([_cell(CellKind.RBC, "normal")] * 50 + [_cell(CellKind.RBC, "spherocyte", d_um=6.0)] * 30
             + [_cell(CellKind.RBC, "target", calibrated=False)] * 10 + [_cell(CellKind.RBC, "normal", calibrated=False)] * 10)
    assert [(s.label, s.count) for s in aggregate(mixed).rbc_morphology] == [("normal", 60), ("spherocyte", 30), ("target", 10)]


def test_a_fully_calibrated_run_gives_size_rows_of_every_red_cell_and_no_mixed_run_note():
    cells = [_cell(CellKind.RBC, "normal")] * 80 + [_cell(CellKind.RBC, "spherocyte", d_um=6.0)] * 20
    a = aggregate(cells)
    row = next(s for s in a.rbc_morphology if s.label == "spherocyte")
    assert (row.percent, row.of_cells, row.grade) == (20.0, None, "1+")  # of every red cell: no `of_cells`
    assert "sizes_from_calibrated_fields_only" not in {f.code for f in a.flags}


def test_median_and_histogram_of_red_cell_diameters_with_open_ends():
    """Bins 0.5 um wide from 3 to 12 um plus one below 3 and one from 12 up: a 2 um fragment and
    a 14 um cell are counted, not dropped; the median is the middle diameter, not the mean."""
    diameters = (2.0, 6.0, 7.0, 7.2, 7.5, 12.0, 14.0)
    size = aggregate([_cell(CellKind.RBC, "normal", d_um=d) for d in diameters]).rbc_size
    assert size.median_diameter_um == 7.2 and size.mean_diameter_um == round(sum(diameters) / 7, 3)
    edges, counts = size.histogram.bin_edges_um, size.histogram.counts
    assert edges == [3.0 + 0.5 * i for i in range(19)]  # 3.0 .. 12.0
    assert len(counts) == len(edges) + 1 and sum(counts) == 7
    # counts[0] below 3 um, counts[1 + i] from edges[i], counts[-1] from 12 um up
    expected = [0] * 20
    expected[0] = 1  # 2.0
    expected[1 + 6] = 1  # 6.0 in [6.0, 6.5)
    expected[1 + 8] = 2  # 7.0, 7.2 in [7.0, 7.5)
    expected[1 + 9] = 1  # 7.5 in [7.5, 8.0)
    expected[-1] = 2  # 12.0 and 14.0
    assert counts == expected


def test_one_measured_red_cell_has_no_spread():
    """One cell measures no spread: SD and CV are absent (None, not NaN), never 0.0, which would
    read as no anisocytosis; two cells have one."""
    d = size_distribution([7.0])
    assert (d.n, d.mean_um, d.sd_um, d.cv_percent) == (1, 7.0, None, None)
    s = size_stats([7.0])
    assert s.sd_um is None and s.cv_percent is None and s.mean_diameter_um == 7.0
    two = size_distribution([7.0, 8.0])
    assert two.sd_um == pytest.approx(0.707, abs=1e-3) and two.cv_percent == pytest.approx(9.43, abs=0.01)


def test_red_cells_cut_by_the_frame_edge_are_not_sized_at_either_scale():
    estimated = ([_cell(CellKind.RBC, "normal", calibrated=False)] * 10
                 + [replace(_cell(CellKind.RBC, "normal", calibrated=False), touches_frame_edge=True)] * 2)
    a = aggregate(estimated)
    assert (a.counts.rbc, a.rbc_size.n, a.rbc_size.calibrated) == (12, 10, False)
    # a calibrated field whose red cells all touch its edge: calibrated, with no whole cell to size
    edge_only = aggregate([replace(_cell(CellKind.RBC, "normal"), touches_frame_edge=True)] * 3)
    assert (edge_only.rbc_size.calibrated, edge_only.rbc_size.n, edge_only.rbc_size.mean_diameter_um) == (True, 0, None)
    assert "size_not_assessable_without_calibration" not in {f.code for f in edge_only.flags}


def test_no_cells_found_only_when_there_is_no_cell_of_any_kind():
    assert "no_cells_found" not in _codes([_cell(CellKind.WBC, "neutrophil")] * 3)
    assert "no_cells_found" not in _codes([_cell(CellKind.PLATELET, None, None)])
    assert "no_cells_found" in _codes([])


def test_three_schistocytes_over_one_percent_flag_and_the_message_is_of_red_cells():
    cells = ([_cell(CellKind.RBC, "normal")] * 197 + [_cell(CellKind.RBC, "schistocyte")] * 3
             + [_cell(CellKind.WBC, "neutrophil")] * 100)
    flag = next(f for f in aggregate(cells).flags if f.code == "schistocytes_present")  # 3 cells, 1.5 %: both met
    assert flag.cells == [197, 198, 199] and flag.message.startswith("schistocytes 1.5% of red cells")


def test_a_white_cell_no_head_named_is_not_a_classified_one():
    """An analyzer without a WBC head leaves white cells unlabelled: none of them is part of a
    differential (or of a specimen's target)."""
    unlabelled = _cell(CellKind.WBC, None, None)
    assert not is_classified_wbc(unlabelled) and is_classified_wbc(_cell(CellKind.WBC, "neutrophil"))
    few = next(f for f in aggregate([unlabelled] * 100).flags if f.code == "too_few_wbc_for_differential")
    assert few.message.startswith("0 WBC classified (100 more unidentified)")


def test_platelet_clump_flag_lists_only_the_platelets_found_as_white_cells():
    regrouped = replace(_cell(CellKind.PLATELET, None, None), detected_as=CellKind.WBC)
    cells = [_cell(CellKind.RBC, "normal")] * 3 + [_cell(CellKind.PLATELET, None, None), regrouped]
    flag = next(f for f in aggregate(cells).flags if f.code == "platelet_clumps_suspected")
    assert flag.cells == [4] and flag.message.startswith("1 object found as white cells was typed as platelets")


def test_shape_probabilities_give_the_size_classes_to_normal():
    classes = ["macrocyte", "microcyte", "spherocyte", "target", "normal"]
    probs = shape_probs(classes, np.array([0.5, 0.2, 0.1, 0.15, 0.05]))
    assert set(probs) == {"target", "normal"}  # no size class left
    assert probs["target"] == pytest.approx(0.15) and probs["normal"] == pytest.approx(0.05 + 0.5 + 0.2 + 0.1)


def test_flag_texts_say_a_count_of_one_in_the_singular_and_confidence_bounds_in_words():
    """Flag texts a clinician reads said "1 possible sickle cell(s), 1 at confidence >= 0.8", "1 red
    cells counted", "1 of 1 white cells": one is said in the singular, a bound in plain words."""
    normal = [_cell(CellKind.RBC, "normal")] * 199
    review = next(f for f in aggregate(normal + [_cell(CellKind.RBC, "sickle", 0.9)]).flags
                  if f.code == "sickle_cells_review")
    assert review.message == ("1 possible sickle cell, 1 at confidence 0.8 or more, fewer than the 5 a critical flag "
                              "needs: review the listed cells"), review.message
    few = next(f for f in aggregate([_cell(CellKind.RBC, "normal")]).flags if f.code == "too_few_rbc_for_morphology")
    assert few.message.startswith("1 red cell counted; morphology grades need at least 200"), few.message
    unlabelled = _cell(CellKind.WBC, UNIDENTIFIED)
    odd = aggregate(normal + [unlabelled], AggregateThresholds(atypical_wbc_min_count=1))
    atypical = next(f for f in odd.flags if f.code == "atypical_wbc_present")
    assert atypical.message.startswith("1 of 1 white cell (100%) could not be typed"), atypical.message
    for flag in [*odd.flags, review, few]:
        assert ">=" not in flag.message and "(s)" not in flag.message, flag.message
