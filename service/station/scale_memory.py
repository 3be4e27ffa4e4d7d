"""Where the next field's scale search starts: what the station's previous fields measured.

A station without a calibrated scale measures each field's scale from its red cells
(`service.analysis.scale_search`). The search starts from a model-free guess (the size of stained
blobs), which on some cameras is far off: a Raspberry Pi station's reads about a third of its
scale, so every field runs a search over the plausible range, some passes on the frame upsampled
several times (seconds per field). The microscope does not change between two fields of a run,
so the scale the last fields settled at is a far better start.

Only the start: each field still measures its own red cells, and a field whose first pass at the
hint shows too few of them (an objective changed, an empty field) searches as it would without
one. Only certain estimates are remembered (measured on the field's red cells, not flagged
`scale_uncertain`); the hint is their median over the last `window` fields, so one odd field does
not move it. Thread-safe: fields analysed at once record and read it concurrently.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

from smearscope.service.analysis.report import ScaleInfo

#: Settled estimates the hint is the median of.
DEFAULT_WINDOW = 5


class ScaleMemory:
    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 field, got {window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def record(self, scale: ScaleInfo) -> None:
        """Remember a field's scale if it was measured on its own red cells and is certain."""
        if scale.method == "rbc_size_detection" and not scale.uncertain:
            with self._lock:
                self._recent.append(scale.microns_per_pixel)

    def hint(self) -> float | None:
        """The median of the remembered scales (um/px), or None before the first certain one."""
        with self._lock:
            return statistics.median(self._recent) if self._recent else None
