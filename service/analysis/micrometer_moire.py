"""Lines finer than the camera resolves: their moire must not be taken for the division.

Lines about 2 px apart (a 10 um micrometer through a low-power objective), sampled by the camera's
pixels, beat into a coarser pattern that repeats as a ruling would (lines 2.1 px apart make one
every 10.5 px). The profile's strongest frequency then belongs to the fine lines, a period under
the shortest measured, not to the division found; a ruling's own lines always put most of their
power at the division or its multiples no finer than that.
"""

from __future__ import annotations

import numpy as np


def moire_of(span: np.ndarray, period: float, min_period: float) -> float | None:
    """The fine lines' spacing (px) when `span`'s strongest frequency is finer than `min_period` px
    and is not the measured `period`'s own; None for a ruling measured at its division."""
    if len(span) < 4:
        return None
    spectrum = np.abs(np.fft.rfft(span * np.hanning(len(span))))
    freqs = np.fft.rfftfreq(len(span))
    spectrum[freqs < 1.5 / len(span)] = 0.0  # what the detrending leaves of the lamp
    strongest = float(freqs[int(np.argmax(spectrum))])
    if strongest <= 0.0:
        return None
    finest = 1.0 / strongest
    if finest < min_period and abs(finest - period) > 0.03 * period:
        return finest
    return None
