"""pycocotools as the reference for the project's box matching and AP (training.metrics).

COCO ranks detections and matches them as training.metrics does; its AP samples the precision
envelope at 101 recall points, where the project integrates it over every recall step (all-point,
as VOC 2010+). With a dense grid of recall points (`RECALL_POINTS`) COCO's mean converges to the
all-point integral: the envelope is monotone, so the grid's error is below 1 / (RECALL_POINTS - 1).
COCO also keeps at most `maxDets` detections per image and class; the reference lifts the cap.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

RECALL_POINTS = 10001
#: Difference allowed between the project's AP and the dense-grid COCO AP.
AP_TOLERANCE = 2.0 / (RECALL_POINTS - 1)


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_eval(per_image: list[dict], classes: tuple[str, ...], iou_threshold: float = 0.5):
    """COCOeval over items as detection_map50 reads them ({"pred": [(cls, box, score)],
    "truth": [(cls, box)]}), images and detections in the given order; evaluated and accumulated."""
    images = [{"id": i + 1, "width": 10_000, "height": 10_000} for i in range(len(per_image))]
    categories = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
    annotations, detections = [], []
    for i, item in enumerate(per_image):
        for kind, box in item["truth"]:
            xywh = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": classes.index(kind) + 1,
                                "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
        for kind, box, score in item["pred"]:
            detections.append({"image_id": i + 1, "category_id": classes.index(kind) + 1, "bbox": _xywh(box),
                               "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else COCO()
        if not detections:
            dt.dataset = {"images": images, "annotations": [], "categories": categories}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs = np.array([iou_threshold])
        ev.params.recThrs = np.linspace(0.0, 1.0, RECALL_POINTS)
        ev.params.maxDets = [1_000_000]
        ev.params.areaRng = [[0.0, 1e12]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    return ev


def coco_ap(ev: COCOeval, classes: tuple[str, ...]) -> dict[str, float]:
    """Per class AP (NaN for a class without truth, as the project reports it) and mAP50."""
    out = {}
    for k, c in enumerate(classes):
        prec = ev.eval["precision"][0, :, k, 0, 0]
        out[c] = float("nan") if (prec < 0).all() else float(prec.mean())
    vals = [v for v in out.values() if not np.isnan(v)]
    out["mAP50"] = float(np.mean(vals)) if vals else 0.0
    return out


def coco_hits(ev: COCOeval, n_images: int, classes: tuple[str, ...]) -> dict[tuple[int, str], list[bool]]:
    """Per (image index, class): whether each detection, in COCO's ranking, matched a truth."""
    out = {}
    for e in ev.evalImgs:
        if e is None:
            continue
        key = (e["image_id"] - 1, classes[e["category_id"] - 1])
        out[key] = [bool(m > 0) for m in e["dtMatches"][0]]
    return {(i, c): out.get((i, c), []) for i in range(n_images) for c in classes}
