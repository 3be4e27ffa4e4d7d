"""Does a calibrated field's blood fit its calibration?

A station's scale comes from its calibration (`smearscope calibrate-scale`, a stage micrometer)
and holds for one objective and one camera setting. Turn the nosepiece from 100x to 40x, bin the
camera 2x2 or copy a config from another station, and every field is analysed at a scale 2 to 2.5
times off: the detector, which only knows cells at the canonical scale, then finds few of them
(a BCCD field calibrated at 0.2 instead of 0.072 um/px: 10 whole red cells instead of 20,
"sickle" review flags among them), and the few it finds measure a plausible size, because a
detector sees cells far from the canonical size as nearer to it than they are. Nothing in such a
report says the calibration is wrong (`rbc_size_implausible` needs the median of 20 measured
cells outside what blood allows, which those cells do not reach).

The check: on the first fields of a run, the field is also analysed as an uncalibrated station
would (the scale found from its red cells, `scale_search.find_scale`) and the two are compared.
It is suspect when the red cells' own scale is `SUSPECT_RATIO` or more times off the calibrated one
and shows more whole red cells than the calibration does (at least `MIN_RBC_FOR_SCALE`), or
`FAR_RATIO` or more times off it whatever the calibrated pass counts: a field calibrated 4 times
too coarse (0.3 for 0.072 um/px) can show the detector as many "red cells" (pieces of real ones,
measuring a plausible 9.5 um) as its own scale shows whole ones, while no field's own estimate at
its known scale lay further than 2.16 times from it (one Raspberry Pi station field, among 149
validation fields of the three labs whose estimates spread most; 1.51 on two samples of 12 per
lab of six labs), so 3 times off is not an estimate's own error.

Measured on validation fields of six labs (`python -m training.calibration_check`, 12 fields
per lab: BCCD, the three TXL-PBC sources, Chula RBC-12, the Raspberry Pi station), each at its
known scale: the fields' own estimates lay 0.62 to 1.31 times the known scale, and no field of
the 72 was suspect. Of the 61 whose own scale showed 5 or more whole red cells (the others cannot
be judged), 60 were suspect calibrated 2.5 times too coarse and 61 were 2.5 times too fine. (On
another sample, from the validation parts before copies were left out: 0 of 72, 54 of 60 and 60
of 60; Chula and the station missed most, where the own estimate reads high or the calibrated
pass still finds many cells.) A factor of 1.6 (100x against 60x) is not told apart this way: the detector
finds as many red cells there as at the true scale. Nor is 1.5 (0.11 for 0.072 um/px): one
field's own estimate strays that far; a station tells it from the median of its checks over many
runs (service.station.calibration_watch, flag `calibration_drift_suspected`).

The check costs an uncalibrated field's scale search (a few detector passes; on the CPU 0.2 to 8 s
a field), which is why a station runs it on the first fields of each run only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from smearscope.service.analysis.aggregate import CALIBRATION_SUSPECT
from smearscope.service.analysis.illumination import Illumination
from smearscope.service.analysis.report import Flag
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX, ScaleEstimate
from smearscope.service.analysis.scale_search import (
    MAX_SEARCH_CANONICAL_PIXELS,
    MIN_RBC_FOR_SCALE,
    Attempt,
    ScaleOutcome,
    find_scale,
)
from smearscope.service.analysis.wording import counted
from smearscope.service.ingest import IngestError

#: The red cells' own scale this many times off the calibrated one (either way) is suspect.
SUSPECT_RATIO = 1.8
#: ... and this many times off it is suspect however many red cells the calibrated pass counts.
FAR_RATIO = 3.0


def _cells(n: int) -> str:
    return counted(n, "whole red cell")


@dataclass(frozen=True)
class CalibrationCheck:
    """A calibrated field against its own estimate: the calibrated scale and the whole, confident
    red cells found there; the scale the field's red cells give (None: not measured from them) and
    the whole red cells found at it."""

    given_mpp: float
    given_rbc: int
    own_mpp: float | None
    own_rbc: int

    @property
    def ratio(self) -> float | None:
        return None if self.own_mpp is None else self.own_mpp / self.given_mpp

    @property
    def suspect(self) -> bool:
        r = self.ratio
        if r is None or self.own_rbc < MIN_RBC_FOR_SCALE:
            return False
        if r >= FAR_RATIO or r <= 1.0 / FAR_RATIO:
            return True
        return self.own_rbc > self.given_rbc and (r >= SUSPECT_RATIO or r <= 1.0 / SUSPECT_RATIO)

    def flag(self) -> Flag | None:
        """The `calibration_suspect` warning, or None where the calibration fits."""
        if not self.suspect:
            return None
        assert self.own_mpp is not None and self.ratio is not None
        how = f"{self.ratio:.1f} times" if self.ratio > 1 else f"1/{1 / self.ratio:.1f} of"
        return Flag(code=CALIBRATION_SUSPECT, severity="warning",
                    message=f"at the calibrated {self.given_mpp:.4f} um/px this field shows {_cells(self.given_rbc)}; "
                            f"its red cells fit {self.own_mpp:.4f} um/px ({how} the calibration, "
                            f"{_cells(self.own_rbc)} there): was the objective, the camera's resolution or "
                            "the station changed? Counts, sizes and size-based morphology are not to be read until "
                            "the calibration is checked (smearscope calibrate-scale)")


def against_own_scale(pixels: np.ndarray, illumination: Illumination, given: ScaleOutcome, guess: ScaleEstimate,
                      detect_at: Callable[[float, bool], Attempt], tolerance: float) -> CalibrationCheck:
    """The calibrated pass `given` against the field's scale found as an uncalibrated station finds
    it (`find_scale` from the model-free first `guess`, by `detect_at` passes). A pass that would
    resample the frame beyond both a scale search's bound (`MAX_SEARCH_CANONICAL_PIXELS`) and the
    calibrated pass's size finds nothing, a pass's resampled field is let go once its cells are
    counted (the calibrated pass's is held meanwhile: at most about twice a field's own peak), and
    a pass the frame cannot take at its scale leaves the check without a verdict."""
    input_pixels = pixels.shape[0] * pixels.shape[1]
    limit = max(MAX_SEARCH_CANONICAL_PIXELS, input_pixels * (given.estimate.microns_per_pixel / CANONICAL_UM_PER_PX) ** 2)

    def bounded(mpp: float, quick: bool) -> Attempt:
        if input_pixels * (mpp / CANONICAL_UM_PER_PX) ** 2 > limit:
            return Attempt(mpp, [], None, quick)
        a = detect_at(mpp, quick)
        a.payload = None  # the check reads the cells found, not the resampled field: one held at a time
        return a
    try:
        own = find_scale(bounded, guess, input_pixels, tolerance).estimate
    except IngestError:  # e.g. too_large_at_scale: the field itself was analysed at its calibration
        return CalibrationCheck(given.estimate.microns_per_pixel, len(given.attempt.whole_rbc), None, 0)
    measured = own.method == "rbc_size_detection"
    return CalibrationCheck(given.estimate.microns_per_pixel, len(given.attempt.whole_rbc),
                            own.microns_per_pixel if measured else None, own.rbc_count if measured else 0)
