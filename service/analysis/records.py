"""Frozen records passed between pipeline stages (one-way data flow).

All coordinates are in CANONICAL pixels (see `service.analysis.scale.CANONICAL_UM_PER_PX`) unless a
field name says otherwise; the report maps them back to input-image pixels at the end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

import numpy as np


class CellKind(str, Enum):
    RBC = "rbc"
    WBC = "wbc"
    PLATELET = "platelet"
    #: A nucleated red cell (erythroblast): found by the detector as a white cell, typed by the WBC
    #: head, and counted apart from the white cells (per 100 WBC, as ICSH reports it).
    NRBC = "nrbc"
    #: Not a cell (debris, stain precipitate, an object the detector took for one): given only by a
    #: technician's verification (type `ARTEFACT`), counted apart and in no other count.
    ARTEFACT = "artefact"


#: The type a technician gives an object of the review gallery that is not a cell.
ARTEFACT = CellKind.ARTEFACT.value

#: Head classes that are not the kind the head serves. A "platelet" from the WBC head (PBC's
#: platelet class: a giant platelet or a platelet clump the detector took for a WBC) is counted as
#: a platelet, never as a WBC (clumps raising the WBC count is a classic analyzer error), and
#: flagged for review. A "platelet" from the RBC head (a platelet or small clump the detector took
#: for a red cell) would be counted as a platelet, not a red cell (the committed RBC head has no
#: such class: one was tried and not adopted, see models/README.md).
KIND_FROM_HEAD_LABEL = {"platelet": CellKind.PLATELET, "erythroblast": CellKind.NRBC}


#: Class order of the segmentation model's outputs.
SEG_CLASSES: tuple[CellKind, ...] = (CellKind.RBC, CellKind.WBC, CellKind.PLATELET)


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0

    def shifted(self, dx: float, dy: float) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def scaled(self, factor: float) -> Box:
        return Box(self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor)

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class Tile:
    """A window of the canonical frame: `pixels` is tile_size x tile_size, `x`/`y` its offset."""

    index: int
    x: int
    y: int
    pixels: np.ndarray


@dataclass(frozen=True)
class CellDetection:
    """One cell found by the segmentation model, in canonical frame coordinates.

    `mask` is a boolean array covering `box` (rounded outward to whole pixels: rows
    int(y0)..ceil(y1), cols int(x0)..ceil(x1)), or None when the engine gives boxes only.
    `cut_by_tile_edge` marks a detection that touches an interior tile border, i.e. may be a
    partial cell; the merge step prefers whole views of the same cell.
    """

    kind: CellKind
    box: Box
    score: float
    mask: np.ndarray | None = None
    tile_index: int = -1
    cut_by_tile_edge: bool = False

    @functools.cached_property
    def mask_area_px(self) -> float:
        """Pixels inside the outline (an ellipse inscribed in the box without a mask); computed
        once per record (the scale search, the ROI filter and the cell records all ask)."""
        return float(np.count_nonzero(self.mask)) if self.mask is not None else self.box.area * np.pi / 4.0

    @property
    def diameter_px(self) -> float:
        """Equivalent-area diameter of the outline (canonical pixels)."""
        return 2.0 * float(np.sqrt(self.mask_area_px / np.pi))


@dataclass(frozen=True)
class CellCrop:
    """A fixed-physical-extent crop around one detection, ready for a classifier head."""

    detection: CellDetection
    pixels: np.ndarray


@dataclass(frozen=True)
class HeadFeatures:
    """A crop's penultimate features (its views averaged) and the head's own most likely class
    (before the confidence gate, the open-set tests and any station means)."""

    features: tuple[float, ...]
    closed_set_label: str
    #: The features in each view the crop ran in (one row per view; their mean is `features`).
    view_features: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class ClassifiedCell:
    detection: CellDetection
    label: str | None
    label_score: float | None
    diameter_um: float
    area_um2: float
    touches_frame_edge: bool = False
    #: The detector's kind when a head re-assigned the cell (e.g. a "WBC" the WBC head typed as a platelet).
    detected_as: CellKind | None = None
    #: The head's open-set score put the cell outside every trained class (label is UNIDENTIFIED).
    atypical: bool = False
    #: The field's scale was given (a calibrated station), so sizes in micrometres are measured.
    size_calibrated: bool = False
    #: A size-based class (e.g. spherocyte) the head gave but an estimated scale cannot support;
    #: `label` then holds the most likely shape class.
    unassessed_label: str | None = None
    #: False for a red cell of a field whose red cells were too blurred to judge their shape
    #: (service.analysis.rbc_focus): counted, left out of the morphology grades.
    shape_judged: bool = True
    #: Typed by a technician verifying the run (service.station.specimen: `SpecimenRun.verified`),
    #: its label certain: a flag says which of its cells a person confirmed.
    typed: bool = False
    #: The head's open-set scores (its manifest's tests, in order; empty for a head without any):
    #: what `smearscope calibrate-atypical` fits a station's thresholds on. Not in the report.
    open_set_scores: tuple[float, ...] = ()
    #: The head's features and its own closed-set class, kept only when the analyzer is asked to
    #: (`smearscope adapt-wbc` fits a station's class means on them). Not in the report.
    head_features: HeadFeatures | None = None
