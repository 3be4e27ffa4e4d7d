"""Platelets the detector saw faintly, confirmed by their colour.

A platelet is about 2 to 3 um across: 10 to 15 canonical pixels, near the detector's resolution.
On the boxed labs most of the platelets it misses are not missed outright: it finds them at
calibrated scores well under the counting threshold (BCCD val, 17 of the 83 platelets not
counted: 10 of them scored 0.01 to 0.35, 6 not found at all). What it does not weigh enough is the
one thing a platelet has that a red cell, its fragments and the glass lack: its granules absorb
red light and pass blue, so it is markedly bluer than the red cells of the same field.

This stage reads that colour on the lamp-corrected canonical frame (the glass is neutral white
there, service.analysis.illumination): for each platelet detection of a plausible size and shape
scored from `PlateletRescue.min_score` to under the counting threshold, not overlapping a counted
cell or an already confirmed platelet (IoU) and not lying mostly inside a counted white cell or
platelet, the 95th percentile of blue minus red inside its box (after a 3 x 3 blur) against the
median of the same figure over up to `REFERENCE_CELLS` of the field's counted red cells. A
detection at least `min_contrast` grey levels bluer than the red cells is counted, with the score
`PlateletRescue.score`: the share of such detections that were labelled platelets on validation
(models/README.md, "Faint platelets confirmed by colour"). Others below the detector's usual
threshold are dropped, so what the rest of the analyzer sees is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.service.analysis.boxes import box_iou, inside_fraction
from smearscope.service.analysis.records import CellDetection, CellKind
from smearscope.service.analysis.roi import RoiFilter

#: A candidate overlapping a counted cell this much (IoU) is part of that cell, not a platelet.
MAX_OVERLAP_IOU = 0.3
#: A candidate with this share of its box inside a counted white cell (or platelet) is part of it:
#: a nucleus' lobe or granules are as blue as a platelet.
MAX_INSIDE = 0.5
#: The red cells' reference is read on at most this many of them (spread over the detection order).
REFERENCE_CELLS = 9


@dataclass(frozen=True)
class PlateletRescue:
    """The rule, chosen on validation (models/README.md)."""

    #: Platelet detections from this calibrated score are looked at (the detector's raw floor,
    #: yolo_decode.RAW_SCORE_FLOOR, maps to about 0.02 for platelets).
    min_score: float = 0.05
    #: Grey levels (0-255, lamp-corrected) by which blue minus red must exceed the red cells'.
    min_contrast: float = 30.0
    #: The score a confirmed platelet is counted with: the rule's validation precision.
    score: float = 0.69


def _p95(values: np.ndarray) -> float:
    """`np.percentile(values, 95)` (linear interpolation) by a partial sort: a few times faster on
    the few hundred pixels of a box."""
    v = values.ravel()
    k = 0.95 * (v.size - 1)
    lo = int(k)
    hi = min(lo + 1, v.size - 1)
    part = np.partition(v, (lo, hi))
    return float(part[lo] + (part[hi] - part[lo]) * (k - lo))


def blue_excess(image_bgr: np.ndarray, box: Sequence[float]) -> float:
    """95th percentile of blue minus red (3 x 3 blurred) inside `box` (canonical pixels); 0 for a
    box outside the frame."""
    h, w = image_bgr.shape[:2]
    if box[2] <= 0 or box[3] <= 0 or box[0] >= w or box[1] >= h:
        return 0.0
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, max(x0 + 1, int(np.ceil(box[2])))), min(h, max(y0 + 1, int(np.ceil(box[3]))))
    # one pixel of context so the blur inside the box sees its neighbours, as over the whole frame;
    # the blur is linear, so blue minus red is taken first and blurred once
    px0, py0, px1, py1 = max(0, x0 - 1), max(0, y0 - 1), min(w, x1 + 1), min(h, y1 + 1)
    win = image_bgr[py0:py1, px0:px1]
    diff = cv2.GaussianBlur(win[..., 0].astype(np.float32) - win[..., 2], (3, 3), 0)
    return _p95(diff[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0])


def _reference(image_bgr: np.ndarray, red_cells: Sequence[CellDetection]) -> float:
    """The field's red cells' blue excess (median over up to `REFERENCE_CELLS`, evenly spaced in
    the detections' order); 0 (the glass, neutral after the lamp correction) without any."""
    if not red_cells:
        return 0.0
    picked = np.unique(np.linspace(0, len(red_cells) - 1, min(len(red_cells), REFERENCE_CELLS)).round().astype(int))
    return float(np.median([blue_excess(image_bgr, red_cells[i].box.as_list()) for i in picked]))


def rescue_platelets(dets: Sequence[CellDetection], image_bgr: np.ndarray | None, roi: RoiFilter, floor: float,
                     rule: PlateletRescue = PlateletRescue()) -> list[CellDetection]:
    """`dets` with each faint platelet that its colour confirms counted (score `rule.score`), and
    every other detection under `floor` (the detector's usual threshold) dropped; order kept.

    `image_bgr` is the lamp-corrected canonical frame the detections' boxes refer to; None where the
    field's lamp could not be measured (no neutral glass to judge a colour against): nothing is then
    confirmed. A station counting platelets from above `rule.score` gets none confirmed."""
    plt_threshold = roi.threshold(CellKind.PLATELET)
    faint: list[int] = []
    if image_bgr is not None and rule.score >= plt_threshold:
        faint = [i for i, d in enumerate(dets) if d.kind is CellKind.PLATELET
                 and rule.min_score <= d.score < plt_threshold and roi.plausible(d)]
    out = list(dets)
    if faint:
        counted = [d for d in dets if roi.keep(d)]
        taken = [d.box.as_list() for d in counted]  # boxes a candidate must not overlap (grows as platelets are confirmed)
        holders = [d.box.as_list() for d in counted if d.kind is not CellKind.RBC]  # white cells (and platelets)
        ref = None
        for i in sorted(faint, key=lambda i: -dets[i].score):  # the detector's surest first
            b = dets[i].box.as_list()
            if taken and box_iou(np.array(b), np.array(taken)).max() >= MAX_OVERLAP_IOU:
                continue
            if any(inside_fraction(b, h) >= MAX_INSIDE for h in holders):
                continue
            if ref is None:
                ref = _reference(image_bgr, [d for d in counted if d.kind is CellKind.RBC])
            if blue_excess(image_bgr, b) - ref >= rule.min_contrast:
                out[i] = dataclasses.replace(dets[i], score=rule.score)
                taken.append(b)
    return [d for d in out if d.score >= floor]
