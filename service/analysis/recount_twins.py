"""Stage 8a: a red-cell detection re-counted as a white cell on top of the detector's own white cell is that cell.

The detector merges its detections per kind, so one object can come out both as a white cell and
as a red cell (two boxes on the same outline). Left as a red cell, the twin was a red cell too
many; the nucleated recheck (stage 7b, service.analysis.nucleated) finds a nucleus in it and
re-counts it as a white cell, and the same white cell is then counted, and typed into the
differential, twice. A hematologist counts an object once: a re-counted red-cell detection whose
box overlaps a white cell the detector found by IoU `TWIN_MIN_IOU` or more is dropped (the
detector's white cell, already typed, stays; the twin is counted neither as a white cell, its
nucleus says it is none, nor as a red cell).

Measured on validation through the analyzer at the given scale (`python -m training.wbc_extras
--split val --scale given`: every counted white cell of BCCD, the three TXL-PBC sources and the
Raspberry Pi station, 279, matched to the annotated white cells as the lab table matches them):
4 of the 16 counted white cells no annotation pairs with were such twins, all on the Raspberry Pi
station (4 of its 8), overlapping their white cell by IoU 0.92 to 0.97; two distinct counted white
cells never overlapped by more than 0.05 (at an estimated scale: 1 twin of 17, IoU 0.99). The
bound, 0.5, is the lab table's own for one object and lies in that gap; no annotated white cell is
lost (each twin's partner overlaps the annotation by IoU 0.75 or more). Lab table on validation
(`python -m training.lab_table --split val --labs bccd,txl_575,txl_416,txl_360,rpi`, with and
without `--count-twins`): the station's counted over labelled white cells 1.16 -> 1.03 at the
given scale, 1.19 -> 1.16 at an estimated one, every other figure unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.records import CellKind, ClassifiedCell

#: A re-counted red-cell detection overlapping the detector's white cell this much is the same object.
TWIN_MIN_IOU = 0.5
_COUNTED_WHITE = (CellKind.WBC, CellKind.NRBC)


def is_recounted(c: ClassifiedCell) -> bool:
    """A red-cell detection the WBC head re-counted as a white (or nucleated red) cell."""
    return c.detected_as is CellKind.RBC and c.detection.kind in _COUNTED_WHITE


#: Re-counted cells compared with the found white cells at once (bounds the IoU block's memory).
_ROWS = 256


def drop_recounted_twins(cells: Sequence[ClassifiedCell], min_iou: float | None = TWIN_MIN_IOU) -> list[ClassifiedCell]:
    """The cells less every re-counted red-cell detection whose box overlaps a white cell the
    detector found by IoU `min_iou` or more; `min_iou` None leaves them as they are."""
    if min_iou is None:
        return list(cells)
    twins = [i for i, c in enumerate(cells) if is_recounted(c)]
    found = [c for c in cells if (c.detected_as or c.detection.kind) is CellKind.WBC]
    if not twins or not found:
        return list(cells)
    twin_boxes = np.array([cells[i].detection.box.as_list() for i in twins], float)
    found_boxes = np.array([c.detection.box.as_list() for c in found], float)
    dropped: set[int] = set()
    for start in range(0, len(twins), _ROWS):  # a bounded block of the IoU matrix at a time
        iou = box_iou(twin_boxes[start:start + _ROWS], found_boxes)
        dropped.update(i for i, row in zip(twins[start:start + _ROWS], iou) if row.max() >= min_iou)
    return [c for i, c in enumerate(cells) if i not in dropped]
