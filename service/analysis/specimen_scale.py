"""The scale a specimen's fields agree on, for a station whose scale is not calibrated.

Every field of one slide is seen through the same objective and camera, so its fields share one
scale. An uncalibrated station estimates each field's scale from its own red cells
(service.analysis.scale_search); most fields land near the truth, and a few do not (a pale field
whose red cells pass for larger ones, a field with a handful of whole red cells). `SpecimenScale`
keeps the own estimates of a specimen's latest fields; their median is the specimen's scale once
enough of them agree with it. A field whose own estimate lies more than
`SPECIMEN_SCALE_TOLERANCE` from it (or that had no red cell to go on) is analysed at the
specimen's scale instead, and says so in its report (scale method "specimen", its own estimate
kept beside it, flag `scale_from_specimen`).

The median is over the last `SPECIMEN_SCALE_WINDOW` fields and counts only when at least
`SPECIMEN_SCALE_MIN_FIELDS` of them have an estimate and `SPECIMEN_SCALE_AGREEMENT` of those lie
within the tolerance of it: a slide's first fields, two of them far off, once pulled a
three-field median to 0.41 of the truth, which a good field would then have had to take. When a
specimen's scale really changes (another objective), up to a third of a window of fields still
take the old scale, the next keep their own estimates, and the new scale holds once the window
agrees on it; a calibrated scale (given) always wins and is never pooled. Pure bookkeeping: the
analyzer takes the specimen's scale as an argument, and the station keeps one `SpecimenScale` per
specimen run (service.station.specimen).
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from smearscope.service.analysis.report import ScaleInfo

#: A field's own estimate further than this (relative) from its specimen's scale is replaced by it.
SPECIMEN_SCALE_TOLERANCE = 0.2
#: The specimen's scale is the median of this many latest fields' own estimates ...
SPECIMEN_SCALE_WINDOW = 9
#: ... once at least this many fields have one ...
SPECIMEN_SCALE_MIN_FIELDS = 5
#: ... and this share of them lie within SPECIMEN_SCALE_TOLERANCE of the median.
SPECIMEN_SCALE_AGREEMENT = 0.7
#: Scale methods that are a field's own estimate from its red cells (pooled); "given" is a
#: calibration, "default" no estimate at all, "specimen" the pool's own answer (its field's
#: own estimate is pooled instead).
ESTIMATED_METHODS = ("rbc_size_classical", "rbc_size_detection")


def replaces(own_um_per_px: float, own_method: str, specimen_um_per_px: float | None,
             tolerance: float = SPECIMEN_SCALE_TOLERANCE) -> bool:
    """Whether a field's own estimate gives way to its specimen's scale: the field had no red
    cell to measure (method "default") or its estimate lies further than `tolerance` from the
    specimen's. A given (calibrated) scale never does."""
    if specimen_um_per_px is None or own_method == "given":
        return False
    if own_method == "default":
        return True
    return abs(own_um_per_px / specimen_um_per_px - 1.0) > tolerance


class SpecimenScale:
    """The own scale estimates of one specimen's latest fields; thread-safe."""

    def __init__(self, window: int = SPECIMEN_SCALE_WINDOW, min_fields: int = SPECIMEN_SCALE_MIN_FIELDS,
                 agreement: float = SPECIMEN_SCALE_AGREEMENT, tolerance: float = SPECIMEN_SCALE_TOLERANCE) -> None:
        if window < 1 or not 1 <= min_fields <= window or not 0.0 <= agreement <= 1.0 or tolerance <= 0:
            raise ValueError(f"need window >= 1, 1 <= min_fields <= window, agreement in [0, 1] and tolerance > 0, "
                             f"got {window}, {min_fields}, {agreement}, {tolerance}")
        self._own: deque[float] = deque(maxlen=window)
        self._min, self._agreement, self._tolerance = min_fields, agreement, tolerance
        self._lock = threading.Lock()

    def add(self, method: str, microns_per_pixel: float, field_estimate: float | None = None) -> None:
        """One analysed field's scale (its report's `scale`): its own estimate is pooled; a given
        or default scale is not (a field at the specimen's scale pools `field_estimate`, the
        estimate it had of its own)."""
        own = field_estimate if method == "specimen" else microns_per_pixel if method in ESTIMATED_METHODS else None
        if own is None or not np.isfinite(own) or own <= 0:
            return
        with self._lock:
            self._own.append(float(own))

    def add_report(self, scale: ScaleInfo | None) -> None:
        """`add` of one field report's `scale` block (none: nothing to pool)."""
        if scale is not None:
            self.add(scale.method, scale.microns_per_pixel, scale.field_estimate_microns_per_pixel)

    def scale(self) -> float | None:
        """The specimen's scale (um/px of the input), or None: fewer than `min_fields` estimates,
        or fewer than `agreement` of them within `tolerance` of their median."""
        with self._lock:
            own = np.array(self._own)
        if len(own) < self._min:
            return None
        median = float(np.median(own))
        if np.mean(np.abs(own / median - 1.0) <= self._tolerance) < self._agreement:
            return None
        return median

    def __len__(self) -> int:
        with self._lock:
            return len(self._own)
