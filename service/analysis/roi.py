"""Stage 7: filter detections and route them to the classifier heads.

Thresholds are physical (um^2 at the canonical scale), so they mean the same whatever the camera.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smearscope.service.analysis.crops import CropSpec, crop_cell
from smearscope.service.analysis.records import CellCrop, CellDetection, CellKind
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX

#: The platelets' counting threshold, chosen on validation (models/README.md, "Platelets counted
#: from 0.35"): the detector scores platelets, small and faint, lower than the cells.
PLATELET_MIN_CONFIDENCE = 0.35
#: The red cells' counting threshold, chosen on validation as the platelets' (models/README.md).
RED_CELL_MIN_CONFIDENCE: float | None = 0.35
#: The white cells' (and any kind without its own) counting threshold, chosen on validation by the
#: worst lab's white cells found (models/README.md, "White cells counted from 0.35").
CELL_MIN_CONFIDENCE = 0.35


@dataclass(frozen=True)
class RoiFilter:
    min_confidence: float = CELL_MIN_CONFIDENCE
    min_area_um2: float = 2.0  # 50 px at 0.2 um/px
    max_aspect: float = 5.0
    #: Platelets are counted from this (calibrated) score; None: `min_confidence` as for the cells.
    platelet_min_confidence: float | None = PLATELET_MIN_CONFIDENCE
    #: Red cells are counted from this score; None: `min_confidence`.
    red_cell_min_confidence: float | None = RED_CELL_MIN_CONFIDENCE

    @classmethod
    def every_kind_from(cls, score: float, **kw) -> RoiFilter:
        """A filter counting every kind from `score` (evaluations that rank every detection)."""
        return cls(min_confidence=score, platelet_min_confidence=None, red_cell_min_confidence=None, **kw)

    def threshold(self, kind: CellKind) -> float:
        """The score from which a detection of `kind` is counted."""
        own = (self.platelet_min_confidence if kind is CellKind.PLATELET
               else self.red_cell_min_confidence if kind is CellKind.RBC else None)
        return self.min_confidence if own is None else own

    @property
    def lowest_threshold(self) -> float:
        return min(self.threshold(k) for k in CellKind)

    def keep(self, det: CellDetection) -> bool:
        return det.score >= self.threshold(det.kind) and self.plausible(det)

    def plausible(self, det: CellDetection) -> bool:
        """Size and shape of a cell, whatever the confidence."""
        area_um2 = det.mask_area_px * CANONICAL_UM_PER_PX**2
        if area_um2 < self.min_area_um2:
            return False
        short = max(1e-6, min(det.box.width, det.box.height))
        return max(det.box.width, det.box.height) / short <= self.max_aspect

    def apply(self, dets: Sequence[CellDetection]) -> list[CellDetection]:
        return [d for d in dets if self.keep(d)]

    def below_confidence(self, dets: Sequence[CellDetection]) -> list[CellDetection]:
        """Plausible cells set aside for confidence alone: the candidates a reviewer (or a
        ranking metric such as mAP) looks at below the counting threshold."""
        return [d for d in dets if d.score < self.threshold(d.kind) and self.plausible(d)]


@dataclass(frozen=True)
class Routed:
    rbc: list[CellCrop]
    wbc: list[CellCrop]
    platelets: list[CellDetection]


def route(rbc_image: np.ndarray, wbc_image: np.ndarray, dets: Sequence[CellDetection], rbc_spec: CropSpec,
          wbc_spec: CropSpec) -> Routed:
    """RBC crops -> RBC head, WBC crops -> WBC head, platelets counted without a head.

    Each head's crops come from the canonical frame variant it was trained on (raw or normalized).
    """
    rbc, wbc, plt = [], [], []
    for d in dets:
        if d.kind is CellKind.RBC:
            rbc.append(CellCrop(d, crop_cell(rbc_image, d.box.center, rbc_spec)))
        elif d.kind is CellKind.WBC:
            wbc.append(CellCrop(d, crop_cell(wbc_image, d.box.center, wbc_spec)))
        else:
            plt.append(d)
    return Routed(rbc, wbc, plt)
