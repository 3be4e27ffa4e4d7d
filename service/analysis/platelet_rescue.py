"""Platelets the detector saw faintly, confirmed by their colour.

A platelet is about 2 to 3 um across: 10 to 15 canonical pixels, near the detector's resolution.
On the boxed labs most of the platelets it misses are not missed outright: it finds them at
calibrated scores well under the counting threshold (BCCD val, 17 of the 83 platelets not
counted: 10 of them scored 0.01 to 0.35, 6 not found at all). What it does not weigh enough is the
one thing a platelet has that a red cell, its fragments and the glass lack: its granules absorb
red light and pass blue, so it is markedly bluer than the red cells of the same field.

This stage reads that colour on the lamp-corrected canonical frame (the glass is neutral white
there, service.analysis.illumination): for each platelet detection scored from `MIN_SCORE` to
under the counting threshold that overlaps no counted cell, the 95th percentile of blue minus
red inside its box (after a 3 x 3 blur) against the median of the same figure over the field's
counted red cells. A detection at least `MIN_CONTRAST` grey levels bluer than the red cells is
counted, with the score `RESCUED_SCORE`: the share of such detections that were labelled
platelets on validation (models/README.md, "Faint platelets confirmed by colour"). Others below
the detector's usual threshold are dropped, so what the rest of the analyzer sees is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.records import CellDetection, CellKind
from smearscope.service.analysis.roi import RoiFilter

#: Platelet detections from this calibrated score are looked at (the detector's raw floor,
#: yolo_decode.RAW_SCORE_FLOOR, maps to about 0.01).
MIN_SCORE = 0.05
#: Grey levels (0-255, lamp-corrected) by which a platelet's blue-minus-red must exceed the red cells'.
MIN_CONTRAST = 30.0
#: The score a confirmed platelet is counted with: validation precision of the rule (see above).
RESCUED_SCORE = 0.68
#: A candidate overlapping a counted cell this much (IoU) is part of that cell, not a platelet.
MAX_OVERLAP_IOU = 0.3
#: The red cells' reference is read on at most this many of them (spread over the field).
REFERENCE_CELLS = 9


def _p95(values: np.ndarray) -> float:
    """`np.percentile(values, 95)` (linear interpolation) by a partial sort: a few times faster on
    the few hundred pixels of a box."""
    v = values.ravel()
    k = 0.95 * (v.size - 1)
    lo = int(k)
    hi = min(lo + 1, v.size - 1)
    part = np.partition(v, (lo, hi))
    return float(part[lo] + (part[hi] - part[lo]) * (k - lo))


def blue_excess(image_bgr: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """95th percentile of blue minus red (3 x 3 blurred) inside `box` (canonical pixels)."""
    h, w = image_bgr.shape[:2]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, max(x0 + 1, int(np.ceil(box[2])))), min(h, max(y0 + 1, int(np.ceil(box[3]))))
    if x0 >= w or y0 >= h:
        return 0.0
    # one pixel of context so the blur inside the box sees its neighbours, as over the whole frame;
    # the blur is linear, so blue minus red is taken first and blurred once
    px0, py0, px1, py1 = max(0, x0 - 1), max(0, y0 - 1), min(w, x1 + 1), min(h, y1 + 1)
    win = image_bgr[py0:py1, px0:px1]
    diff = cv2.GaussianBlur(win[..., 0].astype(np.float32) - win[..., 2], (3, 3), 0)
    return _p95(diff[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0])


def _reference(image_bgr: np.ndarray, red_cells: Sequence[CellDetection]) -> float:
    """The field's red cells' blue excess (median over up to `REFERENCE_CELLS`); 0 (the glass,
    neutral after the lamp correction) without any."""
    if not red_cells:
        return 0.0
    step = max(1, len(red_cells) // REFERENCE_CELLS)
    picked = red_cells[::step][:REFERENCE_CELLS]
    return float(np.median([blue_excess(image_bgr, (d.box.x0, d.box.y0, d.box.x1, d.box.y1)) for d in picked]))


def rescue_platelets(dets: Sequence[CellDetection], image_bgr: np.ndarray, roi: RoiFilter,
                     floor: float) -> list[CellDetection]:
    """`dets` with each faint platelet that its colour confirms counted (score `RESCUED_SCORE`),
    and every other detection under `floor` (the detector's usual threshold) dropped.

    `image_bgr` is the lamp-corrected canonical frame the detections' boxes refer to."""
    plt_threshold = roi.threshold(CellKind.PLATELET)
    # a station counting platelets from above the rule's precision gets no rescued ones
    faint = [i for i, d in enumerate(dets)
             if d.kind is CellKind.PLATELET and MIN_SCORE <= d.score < plt_threshold and roi.plausible(d)
             ] if RESCUED_SCORE >= plt_threshold else []
    out = list(dets)
    if faint:
        counted = [d for d in dets if roi.keep(d)]
        boxes = np.array([[d.box.x0, d.box.y0, d.box.x1, d.box.y1] for d in counted]).reshape(-1, 4)
        cand = np.array([[dets[i].box.x0, dets[i].box.y0, dets[i].box.x1, dets[i].box.y1] for i in faint])
        free = (box_iou(cand, boxes).max(axis=1) < MAX_OVERLAP_IOU) if len(boxes) else np.ones(len(faint), bool)
        ref = None
        for i, ok in zip(faint, free):
            if not ok:
                continue
            if ref is None:
                ref = _reference(image_bgr, [d for d in counted if d.kind is CellKind.RBC])
            b = dets[i].box
            if blue_excess(image_bgr, (b.x0, b.y0, b.x1, b.y1)) - ref >= MIN_CONTRAST:
                out[i] = dataclasses.replace(dets[i], score=RESCUED_SCORE)
    return [d for d in out if d.score >= floor]
