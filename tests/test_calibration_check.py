"""A calibrated field checked against its own red cells (service.analysis.calibration_check):
a calibration 2.5 times off (a changed objective) is flagged, a right one is not, and what
reads sizes treats a suspect calibration as not assessable."""

from __future__ import annotations

import dataclasses

import cv2
import pytest
from realdata import BCCD, BCCD_MICRONS_PER_PIXEL, ROOT, bccd_test_ids, needs_bccd

from smearscope.device.frame import Frame
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.calibration_check import (
    CALIBRATION_SUSPECT,
    FAR_RATIO,
    SUSPECT_RATIO,
    CalibrationCheck,
)
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.scale_search import MIN_RBC_FOR_SCALE
from smearscope.service.fhir import report_view


@pytest.mark.parametrize(("own", "own_rbc", "given_rbc", "suspect"), [
    (0.1 * SUSPECT_RATIO, 20, 3, True),           # the cells fit a scale 1.8 times the calibration
    (0.1 / SUSPECT_RATIO, 20, 3, True),           # ... or 1/1.8 of it
    (0.1 * SUSPECT_RATIO * 0.99, 20, 3, False),   # nearer: an estimate's own error (0.62-1.51 on six labs)
    (0.1 / SUSPECT_RATIO / 0.99, 20, 3, False),
    (0.25, MIN_RBC_FOR_SCALE - 1, 0, False),      # too few red cells at its own scale to say
    (0.25, MIN_RBC_FOR_SCALE, 0, True),
    (0.25, 12, 12, False),                        # the calibration shows as many: it is not the worse one
    (0.25, 13, 12, True),
    (None, 0, 0, False),                          # no scale measured from the cells
    (0.1 * FAR_RATIO, 9, 11, True),               # 3 times off: whatever the calibrated pass counts
    (0.1 / FAR_RATIO, 6, 7, True),
    (0.1 * FAR_RATIO * 0.99, 9, 11, False),       # nearer, the calibrated pass counting more: it stands
    (0.1 / FAR_RATIO / 0.99, 6, 7, False),
    (0.1 * FAR_RATIO, MIN_RBC_FOR_SCALE - 1, 0, False),  # still too few to say
])
def test_suspect_only_far_off_and_on_more_red_cells(own, own_rbc, given_rbc, suspect):
    check = CalibrationCheck(0.1, given_rbc, own, own_rbc)
    assert check.suspect is suspect
    flag = check.flag()
    assert (flag is not None) is suspect
    if flag is not None:
        assert flag.code == CALIBRATION_SUSPECT and flag.severity == "warning"
        assert f"{own:.4f} um/px" in flag.message and "calibrated 0.1000 um/px" in flag.message


def test_the_flag_counts_one_whole_red_cell_in_the_singular():
    """A field whose calibrated pass found one whole red cell (0.1 um/px analysed as 0.25) said
    'shows 1 whole red cells'."""
    one = CalibrationCheck(0.25, 1, 0.1078, 19).flag()
    assert one is not None and "this field shows 1 whole red cell; its red cells fit 0.1078 um/px" in one.message
    assert "(1/2.3 of the calibration, 19 whole red cells there)" in one.message, one.message
    none = CalibrationCheck(0.25, 0, 0.1, 12).flag()
    assert none is not None and "shows 0 whole red cells;" in none.message and "12 whole red cells there" in none.message


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer.from_models_dir(ROOT / "models", warmup=False)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_calibration_off_by_a_changed_objective_is_flagged(analyzer, seed):
    """A rendered field at 0.1 um/px told 0.25 (a 100x calibration used at 40x) or 0.04: its red
    cells fit about 0.1, the report says so (flag, the field's own estimate) and its sizes are not
    read; told its true scale, no flag; not asked to check, no check at all."""
    field = render_field(seed, width=640, height=480, microns_per_pixel=0.1).frame

    def at(mpp: float, check: bool = True):
        return analyzer.analyze(dataclasses.replace(field, microns_per_pixel=mpp), check_calibration=check).report

    right = at(0.1)
    assert CALIBRATION_SUSPECT not in {f.code for f in right.flags}
    assert right.scale.field_estimate_microns_per_pixel == pytest.approx(0.1, rel=0.15)
    assert not report_view.calibration_in_doubt(right) and not report_view.size_not_assessable(right)
    for wrong in (0.25, 0.04):
        rep = at(wrong)
        (flag,) = [f for f in rep.flags if f.code == CALIBRATION_SUSPECT]
        assert rep.scale.method == "given" and rep.scale.microns_per_pixel == wrong  # the calibration stands
        assert rep.scale.field_estimate_microns_per_pixel == pytest.approx(0.1, rel=0.15)
        assert f"calibrated {wrong:.4f} um/px" in flag.message
        assert report_view.calibration_in_doubt(rep) and report_view.size_not_assessable(rep)
        assert rep.timing_ms["calibration_check_ms"] > 0
    unchecked = at(0.25, check=False)
    assert CALIBRATION_SUSPECT not in {f.code for f in unchecked.flags}
    assert unchecked.scale.field_estimate_microns_per_pixel is None and "calibration_check_ms" not in unchecked.timing_ms


def test_an_uncalibrated_field_is_not_checked(analyzer):
    """Without a given scale there is nothing to check: the field's estimate is its scale."""
    field = dataclasses.replace(render_field(3, width=640, height=480, microns_per_pixel=0.1).frame,
                                microns_per_pixel=None)
    rep = analyzer.analyze(field, check_calibration=True).report
    assert rep.scale.method != "given" and "calibration_check_ms" not in rep.timing_ms
    assert CALIBRATION_SUSPECT not in {f.code for f in rep.flags}


@pytest.mark.realdata
@needs_bccd
def test_a_bccd_field_calibrated_for_another_objective(analyzer):
    """A BCCD test field told 0.2 um/px (its scale is 0.072): 10 red cells counted there, with a
    sickle review flag among them, and nothing said of the scale before this check."""
    image = cv2.imread(str(BCCD / "JPEGImages" / f"{bccd_test_ids()[0]}.jpg"))
    field = Frame(image, "bccd", "bccd")

    def flags(mpp: float) -> set[str]:
        rep = analyzer.analyze(dataclasses.replace(field, microns_per_pixel=mpp), check_calibration=True).report
        return {f.code for f in rep.flags}
    assert CALIBRATION_SUSPECT in flags(0.2)
    assert CALIBRATION_SUSPECT in flags(0.03)
    assert CALIBRATION_SUSPECT not in flags(BCCD_MICRONS_PER_PIXEL)


@pytest.mark.realdata
@needs_bccd
@pytest.mark.parametrize("image_id", ["BloodImage_00014", "BloodImage_00072"])
def test_a_crowded_bccd_field_calibrated_four_times_too_coarse(analyzer, image_id):
    """Two crowded BCCD validation fields told 0.29 um/px (their scale is 0.072): the detector
    counts as many "red cells" there (pieces of real ones, a plausible size) as the fields' own
    scale shows whole ones, so the count cannot tell the calibrations apart; the red cells' own
    scale, about a quarter of the calibration, does."""
    field = Frame(cv2.imread(str(BCCD / "JPEGImages" / f"{image_id}.jpg")), "bccd", "bccd")
    check = analyzer.calibration_check(dataclasses.replace(field, microns_per_pixel=4 * BCCD_MICRONS_PER_PIXEL))
    assert check is not None and check.own_rbc >= MIN_RBC_FOR_SCALE and check.own_rbc <= check.given_rbc
    assert check.ratio is not None and check.ratio <= 1 / FAR_RATIO
    assert check.suspect and check.flag() is not None
    assert not analyzer.calibration_check(dataclasses.replace(field, microns_per_pixel=BCCD_MICRONS_PER_PIXEL)).suspect


def test_the_check_stays_within_the_fields_own_memory_and_never_fails_the_field():
    """A pass that would resample the frame beyond both the search's bound and the calibrated
    pass's size is not run (it finds nothing); a pass the frame cannot take (too_large_at_scale)
    leaves the check without a verdict instead of failing a field analysed at its calibration."""
    import numpy as np

    from smearscope.service.analysis.calibration_check import against_own_scale
    from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX, ScaleEstimate
    from smearscope.service.analysis.scale_search import (
        MAX_SEARCH_CANONICAL_PIXELS,
        Attempt,
        ScaleOutcome,
    )
    from smearscope.service.ingest import IngestError, RejectReason

    pixels = np.zeros((3000, 4000, 3), np.uint8)  # 12 MP: at 0.2 um/px, 12 MP canonical
    given = ScaleOutcome(ScaleEstimate(0.2, "given"), Attempt(0.2, [], None), uncertain=False)
    limit = max(MAX_SEARCH_CANONICAL_PIXELS, pixels.shape[0] * pixels.shape[1])
    asked: list[float] = []

    def detect_at(mpp: float, quick: bool) -> Attempt:
        asked.append(mpp)
        assert pixels.shape[0] * pixels.shape[1] * (mpp / CANONICAL_UM_PER_PX) ** 2 <= limit
        return Attempt(mpp, [], None, quick)
    check = against_own_scale(pixels, _no_lamp(), given, ScaleEstimate(0.4, "rbc_size_classical"), detect_at, 0.05)
    assert check.own_mpp is None and not check.suspect and all(m <= 0.2 + 1e-9 for m in asked)

    def refusing(mpp: float, quick: bool) -> Attempt:
        raise IngestError(RejectReason.TOO_LARGE_AT_SCALE, "too large")
    check = against_own_scale(pixels, _no_lamp(), given, ScaleEstimate(0.1, "rbc_size_classical"), refusing, 0.05)
    assert check.own_mpp is None and check.flag() is None


def _no_lamp():
    from smearscope.service.analysis.illumination import Illumination

    return Illumination(None, reason="no_lit_background")


def test_the_flag_says_which_way_the_calibration_is_off():
    coarse = CalibrationCheck(0.1, 3, 0.25, 20)  # the red cells fit 2.5 times the calibrated scale
    assert coarse.ratio == pytest.approx(2.5)
    assert "(2.5 times the calibration" in coarse.flag().message
    fine = CalibrationCheck(0.25, 3, 0.1, 20)  # ... or 1/2.5 of it
    assert fine.ratio == pytest.approx(0.4)
    assert "(1/2.5 of the calibration" in fine.flag().message


def test_the_check_may_run_passes_as_large_as_the_calibrated_one_and_holds_one_field_at_a_time():
    """A 12 MP frame calibrated at 0.22 um/px is 14.5 MP canonical, over the search's 12 MP bound:
    the check's own passes may be that large too (its first guess, 0.22), not larger (0.31). Each
    pass's resampled field is let go once its cells are counted."""
    import weakref

    import numpy as np

    from smearscope.service.analysis.calibration_check import against_own_scale
    from smearscope.service.analysis.scale import ScaleEstimate
    from smearscope.service.analysis.scale_search import Attempt, ScaleOutcome

    pixels = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (3000, 4000, 3))
    given = ScaleOutcome(ScaleEstimate(0.22, "given"), Attempt(0.22, [], None), uncertain=False)
    asked: list[float] = []
    held: list[weakref.ref] = []

    class Field:
        pass

    def detect_at(mpp: float, quick: bool) -> Attempt:
        assert all(r() is None for r in held), "an earlier pass's field is still held"
        asked.append(mpp)
        field = Field()
        held.append(weakref.ref(field))
        return Attempt(mpp, [], field, quick)

    check = against_own_scale(pixels, _no_lamp(), given, ScaleEstimate(0.22, "rbc_size_classical"), detect_at, 0.05)
    assert asked[0] == pytest.approx(0.22) and max(asked) <= 0.22 + 1e-9 and len(asked) > 3
    assert check.own_mpp is None and not check.suspect
