"""A station's own open-set thresholds for the WBC head, fitted on its normal specimens.

The WBC head's open-set thresholds (manifest `open_set`) are set for the worst-matched training
lab: the largest of the labs' validation quantiles. A station whose camera and stain the head
knows well therefore inherits a threshold its own normal cells never come near, and a cell type
the head never saw (a blast) passes under it more often than it needs to. Here a station sets
its own: from the white cells of specimens it knows to be normal, the lowest common quantile q
(on a grid from `Q_GRID_FROM` up) of each test's scores such that at most `budget` of those
cells go to review (a top probability under the head's minimum confidence, or a score beyond a
threshold). A threshold is never set above the model's: a station may tighten, never loosen (a
station whose normal cells already need more review than its budget keeps the model's, as does
one where only the model's own thresholds keep within it).

Measured with heads trained without one white-cell type (`python -m training.openset_compare
--station-budget`, models/README.md): how much more of the unseen type each lab catches with
its own thresholds, and what it pays in review of its normal cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The quantiles tried, lowest first: a station's thresholds are the lowest of these within budget.
Q_GRID_FROM = 0.80
Q_GRID_STEP = 0.0025
#: Fewer normal white cells than this give a quantile too unstable to set a threshold from.
MIN_CELLS = 200


@dataclass(frozen=True)
class OpenSetFit:
    """The station's thresholds (method -> threshold), or None with the reason it keeps the model's."""

    thresholds: dict[str, float] | None
    n_cells: int
    #: Share of the calibration cells sent to review: with the fitted thresholds, with the model's.
    review_share: float
    review_share_model: float
    quantile: float | None = None
    reason: str | None = None  # too_few_white_cells | over_budget | nothing_tighter


def _review(scores: np.ndarray, unsure: np.ndarray, thresholds: np.ndarray) -> float:
    return float((unsure | (scores > thresholds).any(axis=1)).mean()) if len(unsure) else 0.0


def fit_station_thresholds(scores: np.ndarray, unsure: np.ndarray, methods: Sequence[str],
                           model_thresholds: Sequence[float], budget: float,
                           min_cells: int = MIN_CELLS) -> OpenSetFit:
    """Thresholds for the tests `methods` from the station's normal white cells.

    `scores`: (cells, tests) open-set scores in the manifest's order; `unsure`: (cells,) the head's
    top probability is under its minimum confidence (those go to review whatever the thresholds).
    """
    scores = np.asarray(scores, np.float64).reshape(len(unsure), len(methods))
    unsure = np.asarray(unsure, bool)
    model = np.asarray(model_thresholds, np.float64)
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    n = len(unsure)
    at_model = _review(scores, unsure, model)
    if n < min_cells:
        return OpenSetFit(None, n, at_model, at_model, reason="too_few_white_cells")
    for q in np.arange(Q_GRID_FROM, 1.0, Q_GRID_STEP):
        t = np.minimum(np.quantile(scores, q, axis=0), model)
        share = _review(scores, unsure, t)
        if share <= budget:
            if np.array_equal(t, model):
                break  # the model's own thresholds are the first within budget: nothing tighter is
            # rounded down, so a threshold capped at the model's never reads above it
            return OpenSetFit({m: float(np.floor(v * 1e4) / 1e4) for m, v in zip(methods, t)}, n, share, at_model,
                              quantile=round(float(q), 4))
    # no tighter thresholds: over budget only where the model's own are
    return OpenSetFit(None, n, at_model, at_model, reason="over_budget" if at_model > budget else "nothing_tighter")
