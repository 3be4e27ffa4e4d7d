"""Stage 8a, after the recount twins: a platelet on a cell's whole outline, or a white cell in pieces, is counted once.

The detector merges tiles and fuses views per kind, so one object can come out as two counted
cells: a platelet on a white or red cell's whole outline, or, at a scale far off, a white cell in
overlapping pieces. A hematologist counts an object once:

- a platelet whose box overlaps a counted red or white cell's by IoU `CROSS_KIND_MIN_IOU` or more
  gives way (a platelet's box, 2 to 4 um, overlaps a red cell's by IoU 0.3 at most; one that
  overlaps a cell's box this much has that cell's size), unless the cell's detector score is under
  `PLATELET_KEPT_OVER` times the platelet's: a detection the detector barely believes does not
  take a platelet's place. Counted from the default 0.35 that never happens (0.35 over at most 1
  is above 0.25); where every detection counts (a model-level mAP, thresholds set low) it kept
  true platelets from giving way to red or white detections of a few hundredths (BCCD test
  model-level mAP50 0.806 with the platelet always giving way, 0.831 with this bound, as before the
  stage; the counted cells' figures are the same either way);
- of two counted white cells whose boxes overlap by IoU `WHITE_PIECE_MIN_IOU` or more the higher
  detector score stays.

A red and a white cell on one outline are left as they are: neither the detector's scores nor the
kinds say which one the object is (on validation the red twin scored higher on the station's false
white cells and lower on TXL-PBC 575's edge-cut red cells; keeping the higher score lost labelled
Chula red cells on validation and a labelled white cell on the station's test fields;
models/README.md, Known limits).

Measured on the validation fields of BCCD, the three TXL-PBC sources and the Raspberry Pi station
through the analyzer (`python -m training.cross_kind_twins --split val --scale given|estimated`):
distinct platelets and cells overlap by IoU 0.28 at most (annotated, a platelet on a red cell), 0.15
counted; the platelet twins by 0.77 and 0.98. Distinct counted white cells overlap by 0.17 at most,
annotated ones by 0.05; the pieces of one white cell by 0.44 and 0.55. No annotated cell is lost
on any lab at either scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smearscope.service.analysis.boxes import overlapping_pairs, pair_iou
from smearscope.service.analysis.records import CellKind, ClassifiedCell

#: Two counted cells of different kinds overlapping this much are one object.
CROSS_KIND_MIN_IOU = 0.5
#: A platelet stays against a cell twin scored under this share of its own score.
PLATELET_KEPT_OVER = 0.25
#: Two counted white cells overlapping this much are one white cell.
WHITE_PIECE_MIN_IOU = 0.3
#: The kinds a counted cell is compared as (a nucleated red cell was found as a white cell).
_AS = {CellKind.RBC: CellKind.RBC, CellKind.WBC: CellKind.WBC, CellKind.NRBC: CellKind.WBC,
       CellKind.PLATELET: CellKind.PLATELET}


def _loser(a: ClassifiedCell, b: ClassifiedCell) -> int:
    """0 when `a` gives way to `b`, 1 otherwise: a platelet gives way to a cell (unless the cell's score
    is under PLATELET_KEPT_OVER of its own), else the lower score."""
    ka = _AS[a.detection.kind]
    if ka is not _AS[b.detection.kind]:
        platelet, cell = (a, b) if ka is CellKind.PLATELET else (b, a)
        loser = platelet if cell.detection.score >= PLATELET_KEPT_OVER * platelet.detection.score else cell
        return 0 if loser is a else 1
    return 0 if a.detection.score < b.detection.score else 1


def drop_kind_twins(cells: Sequence[ClassifiedCell], cross_min_iou: float | None = CROSS_KIND_MIN_IOU,
                    white_min_iou: float | None = WHITE_PIECE_MIN_IOU) -> list[ClassifiedCell]:
    """The cells less one of each pair counted on one object (closest pairs first); a bound None
    leaves those pairs as they are."""
    idx = [i for i, c in enumerate(cells) if c.detection.kind in _AS]
    if len(idx) < 2 or (cross_min_iou is None and white_min_iou is None):
        return list(cells)
    boxes = np.array([cells[i].detection.box.as_list() for i in idx], float)
    # only boxes that overlap are compared (memory linear in the cells: a dense 17 MP field holds
    # thousands, whose full IoU matrix would take gigabytes)
    first, second = overlapping_pairs(boxes)
    first, second = first[first < second], second[first < second]
    ious = pair_iou(boxes[first], boxes[second])
    dropped: set[int] = set()
    for k in np.argsort(-ious, kind="stable"):
        a, b, v = int(first[k]), int(second[k]), float(ious[k])
        if v <= 0:
            break
        ca, cb = cells[idx[a]], cells[idx[b]]
        ka, kb = _AS[ca.detection.kind], _AS[cb.detection.kind]
        if ka is not kb and CellKind.PLATELET not in (ka, kb):
            continue  # a red and a white cell: neither score nor kind says which one it is (module doc)
        bound = cross_min_iou if ka is not kb else white_min_iou if ka is CellKind.WBC else None
        if bound is None or v < bound or idx[a] in dropped or idx[b] in dropped:
            continue
        dropped.add((idx[a], idx[b])[_loser(ca, cb)])
    return [c for i, c in enumerate(cells) if i not in dropped]
