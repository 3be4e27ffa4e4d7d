"""Field flags about the scale and the lamp, as a technician reads them (service.analysis.field_flags)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from smearscope.service.analysis.field_flags import scale_and_lamp_flags
from smearscope.service.analysis.illumination import Illumination
from smearscope.service.analysis.scale import ScaleEstimate


def test_scale_unknown_says_the_assumed_scale_as_the_summary_line_does():
    """A field with no whole red cell (a 64 px crop) was analysed at its first guess, and the
    warning read "assumed 0.19736842105263158 um/px": 17 digits, where the field's summary line
    says 0.1974."""
    est = ScaleEstimate(microns_per_pixel=0.19736842105263158, method="default")
    outcome = SimpleNamespace(uncertain=True, reason=None)
    flags = scale_and_lamp_flags(est, outcome, Illumination(gain=np.ones((2, 2, 3), np.float32)))
    (flag,) = [f for f in flags if f.code == "scale_unknown"]
    assert flag.message == "scale could not be measured; assumed 0.1974 um/px"
