"""Stage 5 with a real model: YOLO instance segmentation through an engine, decoded in numpy.

The ONNX graph is the raw ultralytics head: output0 is (B, 4 + classes + 32, anchors) holding
box centre/size in input pixels, per-class scores (already sigmoid) and mask coefficients;
output1 is (B, 32, H/4, W/4) mask prototypes. NMS and mask assembly happen here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence

import cv2
import numpy as np

from smearscope.engines.base import Engine
from smearscope.engines.batching import run_batched
from smearscope.engines.preprocess import to_model_input
from smearscope.service.analysis.records import SEG_CLASSES, Box, CellDetection, Tile
from smearscope.service.analysis.segment import touches_interior_tile_edge
from smearscope.service.analysis.tta import check_views

logger = logging.getLogger(__name__)


#: Raw detector scores below this are never considered, whatever the calibration and threshold.
#: A fixed floor (not the threshold) makes what the merge and the view fusion see independent of
#: `conf_threshold`: a lower threshold only adds detections under the old one and changes none
#: above it (the calibration was fitted on detections from this floor, training.calibrate_seg).
RAW_SCORE_FLOOR = 0.05


def platt(score: float, a: float, b: float) -> float:
    """Platt scaling of a probability-like score: sigmoid(a * logit(score) + b)."""
    s = min(max(score, 1e-6), 1 - 1e-6)
    z = a * float(np.log(s / (1 - s))) + b
    return float(1.0 / (1.0 + np.exp(-z)))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (boxes as x0, y0, x1, y1; scores above
    zero), best score first.

    Greedy NMS: walking the scores from the highest (ties in index order), a box is kept unless
    its IoU with a box kept before it exceeds the threshold. OpenCV's `dnn.NMSBoxes` does exactly
    this in C++ (stable sort by score, IoU in double precision); a tile holds a few hundred
    candidates above the raw floor, and the pairwise matrix in numpy cost 0.5 ms of the tile's
    decoding where this costs 0.08 (tests/test_yolo_decode.py holds it to a plain greedy loop)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    b = np.asarray(boxes, np.float64)
    xywh = np.concatenate([b[:, :2], b[:, 2:4] - b[:, :2]], axis=1)
    keep = cv2.dnn.NMSBoxes(xywh, np.asarray(scores, np.float32), 0.0, float(iou_threshold))
    return np.asarray(keep, np.int64).ravel()


def decode_tile(pred: np.ndarray, protos: np.ndarray | None, input_size: int, n_classes: int,
                conf_threshold: float, iou_threshold: float, max_det: int = 1000):
    """One tile's raw outputs -> list of (class_index, box[4], score, mask|None) in tile pixels."""
    scores_all = pred[4 : 4 + n_classes].T  # anchors x classes
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    sel = score >= conf_threshold
    if not sel.any():
        return []
    xywh = pred[:4].T[sel]
    boxes = np.stack([xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2,
                      xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2], 1)
    boxes = boxes.clip(0, input_size)
    cls, score = cls[sel], score[sel]
    coeffs = pred[4 + n_classes :].T[sel] if protos is not None else None
    # class-aware NMS: offset boxes by class so different classes never suppress each other
    keep = nms(boxes + cls[:, None] * (input_size + 1.0), score, iou_threshold)[:max_det]
    out = []
    for k in keep:
        mask = None
        b = boxes[k]
        if protos is not None:
            x0, y0 = int(b[0]), int(b[1])
            x1, y1 = int(np.ceil(b[2])), int(np.ceil(b[3]))
            mask = box_mask(coeffs[k], protos, input_size, (y0, x0, y1, x1))
        out.append((int(cls[k]), b, float(score[k]), mask))
    return out


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def box_mask(coeff: np.ndarray, protos: np.ndarray, input_size: int,
             window: tuple[int, int, int, int]) -> np.ndarray:
    """`resize(sigmoid(coeff . protos), input_size)[window] > 0.5`, computed on the prototype
    cells under the window only.

    Bilinear upsampling by an integer stride reads, for output pixel y, the low-resolution rows
    around (y + 0.5) / stride - 0.5. A sub-grid with one spare cell on each side (none beyond the
    map's own border, where both clamp alike) therefore gives the window the very values of the
    whole map's resize (same weights, same source values), at the cost of the box instead of the
    tile. The dot product is an einsum, not BLAS: a BLAS call per box would wake BLAS's thread pool,
    which then competes with the inference engine's threads for the cores."""
    y0, x0, y1, x1 = window
    _, ph, pw = protos.shape
    stride = input_size // ph
    if stride * ph != input_size or stride * pw != input_size:  # not an integer stride: whole map
        lowres = _sigmoid(np.einsum("c,chw->hw", coeff, protos))
        up = cv2.resize(lowres, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
        return up[y0:y1, x0:x1] > 0.5
    r0, c0 = max(0, y0 // stride - 1), max(0, x0 // stride - 1)
    r1, c1 = min(ph, -(-y1 // stride) + 1), min(pw, -(-x1 // stride) + 1)
    if r1 <= r0 or c1 <= c0:
        return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool)
    lowres = _sigmoid(np.einsum("c,chw->hw", coeff, protos[:, r0:r1, c0:c1]))
    sub = cv2.resize(lowres, (stride * (c1 - c0), stride * (r1 - r0)), interpolation=cv2.INTER_LINEAR)
    oy, ox = stride * r0, stride * c0
    return sub[y0 - oy : y1 - oy, x0 - ox : x1 - ox] > 0.5


class YoloSegmenter:
    """Runs the segmentation engine over tiles and returns frame-coordinate detections."""

    def __init__(self, engine: Engine, conf_threshold: float = 0.25, iou_threshold: float = 0.6,
                 views: Sequence[str] | None = None) -> None:
        self.engine = engine
        m = engine.manifest
        #: Test-time views the pipeline runs (service.analysis.tta); the calibration was fitted for m.tta.
        self.views = check_views(m.tta if views is None else views)
        if self.views != tuple(m.tta) and m.score_calibration:
            logger.warning("detector runs views %s but its scores were calibrated for %s: scores will shift",
                           "+".join(self.views), "+".join(m.tta))
        self.input_size = m.input_size
        self.classes = [SEG_CLASSES[[k.value for k in SEG_CLASSES].index(c)] for c in m.classes]
        self.conf_threshold = conf_threshold  # on the CALIBRATED score, applied last (`finish`)
        self.iou_threshold = iou_threshold
        self.calibration = {k: tuple(v) for k, v in m.score_calibration.items()}

    def calibrated(self, kind_name: str, raw: float) -> float:
        """The detector score as a probability of a real cell (Platt scaling from the manifest)."""
        ab = self.calibration.get(kind_name)
        return raw if ab is None else platt(raw, *ab)

    def finish(self, dets: Sequence[CellDetection]) -> list[CellDetection]:
        """Raw-scored detections -> calibrated scores, those below `conf_threshold` dropped."""
        out = []
        for d in dets:
            score = self.calibrated(d.kind.value, d.score)
            if score >= self.conf_threshold:
                out.append(dataclasses.replace(d, score=score))
        return out

    def detect(self, tiles: Iterable[Tile], frame_width: int, frame_height: int,
               calibrate: bool = True) -> list[CellDetection]:
        """Detections in frame coordinates; `calibrate=False` keeps raw scores (all above the raw
        floor) for the merge and test-time fusion, after which the caller applies `finish`.

        Tiles are taken (and may be made) one engine batch at a time, so memory holds one batch
        of tiles and the detections, whatever the frame's size."""
        dets: list[CellDetection] = []
        names = self.engine.output_names
        for chunk in _batches(tiles, self.engine.manifest.batch.max):
            batch = to_model_input(np.stack([t.pixels for t in chunk]), self.engine.manifest.preprocessing)
            outs = run_batched(self.engine, batch)
            preds = outs[names[0]]
            protos = outs[names[1]] if len(names) > 1 else None
            for i, tile in enumerate(chunk):
                dets += self._tile_detections(tile, preds[i], None if protos is None else protos[i],
                                              frame_width, frame_height)
        return self.finish(dets) if calibrate else dets

    def _tile_detections(self, tile: Tile, pred: np.ndarray, protos: np.ndarray | None,
                         frame_width: int, frame_height: int) -> list[CellDetection]:
        dets = []
        for ci, b, raw, mask in decode_tile(pred, protos, self.input_size, len(self.classes), RAW_SCORE_FLOOR,
                                            self.iou_threshold):
            box = Box(float(b[0]) + tile.x, float(b[1]) + tile.y, float(b[2]) + tile.x, float(b[3]) + tile.y)
            # clip to the real frame (tiles may extend into padding)
            box = Box(min(box.x0, frame_width), min(box.y0, frame_height), min(box.x1, frame_width), min(box.y1, frame_height))
            if box.width <= 1 or box.height <= 1:
                continue
            if mask is not None:
                h = int(np.ceil(box.y1)) - int(box.y0)
                w = int(np.ceil(box.x1)) - int(box.x0)
                mask = np.ascontiguousarray(mask[:h, :w])
            dets.append(CellDetection(kind=self.classes[ci], box=box, score=raw, mask=mask, tile_index=tile.index,
                                      cut_by_tile_edge=touches_interior_tile_edge(box, tile, frame_width, frame_height)))
        return dets


def _batches(tiles: Iterable[Tile], size: int) -> Iterator[list[Tile]]:
    """Consecutive lists of at most `size` tiles."""
    it = iter(tiles)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
