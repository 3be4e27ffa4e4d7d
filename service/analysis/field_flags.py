"""Field flags about how the scale was found and how the lamp lit the field (pipeline stage 10's
inputs that are not cells): the scale's method and doubt, a greyscale input, uneven lighting."""

from __future__ import annotations

from smearscope.service.analysis.illumination import Illumination
from smearscope.service.analysis.report import Flag
from smearscope.service.analysis.scale import ScaleEstimate
from smearscope.service.analysis.scale_search import ScaleOutcome

#: Lighting this uneven (darkest / brightest glass) is worth telling the technician about.
UNEVEN_ILLUMINATION = 0.5


def scale_and_lamp_flags(est: ScaleEstimate, outcome: ScaleOutcome, illumination: Illumination,
                         own_scale: float | None = None) -> list[Flag]:
    flags = []
    if est.method == "specimen":
        own = "no red cell to measure" if own_scale is None else f"its red cells pointed to {own_scale:.4f} um/px"
        flags.append(Flag(code="scale_from_specimen", severity="info",
                          message=f"this field was analysed at {est.microns_per_pixel:.4f} um/px, the scale its "
                                  f"specimen's fields agree on ({own}); calibrate the station (smearscope "
                                  "calibrate-scale) to measure sizes"))
    elif est.method == "default":
        flags.append(Flag(code="scale_unknown", severity="warning",
                          message=f"scale could not be measured; assumed {est.microns_per_pixel:.4f} um/px"))
    elif outcome.uncertain:
        flags.append(Flag(code="scale_uncertain", severity="warning",
                          message=f"scale estimated at {est.microns_per_pixel:.4f} um/px but uncertain ({outcome.reason}); "
                                  "sizes and counts may be off: calibrate the station (smearscope calibrate-scale)"))
    if illumination.greyscale:
        flags.append(Flag(code="greyscale_input", severity="info",
                          message="the image has no colour; cells were typed from shape and density only"))
    if illumination.applied and illumination.uniformity < UNEVEN_ILLUMINATION:
        flags.append(Flag(code="uneven_illumination", severity="info",
                          message=f"the lamp lights the field unevenly (darkest/brightest glass {illumination.uniformity:.2f}); "
                                  "corrected, but check the condenser and lamp alignment"))
    if not illumination.applied:
        flags.append(Flag(code="no_background_found", severity="info",
                          message="no lit glass found to measure the lamp; the frame was used as it came"))
    return flags
