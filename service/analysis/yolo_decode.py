"""Stage 5 with a real model: YOLO instance segmentation through an engine, decoded in numpy.

The ONNX graph is the raw ultralytics head: output0 is (B, 4 + classes + 32, anchors) holding
box centre/size in input pixels, per-class scores (already sigmoid) and mask coefficients;
output1 is (B, 32, H/4, W/4) mask prototypes. NMS and mask assembly happen here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from smearscope.engines.base import Engine
from smearscope.engines.batching import run_batched
from smearscope.engines.manifest import ManifestError, ModelManifest
from smearscope.engines.preprocess import to_model_input
from smearscope.service.analysis.records import SEG_CLASSES, Box, CellDetection, CellKind, Tile
from smearscope.service.analysis.segment import cut_by_interior_tile_edges
from smearscope.service.analysis.tiling import PAD_VALUE, stack_tiles
from smearscope.service.analysis.tta import check_views

logger = logging.getLogger(__name__)


#: Raw detector scores below this are never considered, whatever the calibration and threshold.
#: A fixed floor (not the threshold) makes what the merge and the view fusion see independent of
#: `conf_threshold`: a lower threshold only adds detections under the old one and changes none
#: above it (the calibration was fitted on detections from this floor, training.calibrate_seg).
RAW_SCORE_FLOOR = 0.05


def platt(score: float, a: float, b: float) -> float:
    """Platt scaling of a probability-like score: sigmoid(a * logit(score) + b)."""
    return float(platt_array(np.array([score]), a, b)[0])


def platt_array(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    """`platt` of each score (the same arithmetic, in float64)."""
    s = np.clip(np.asarray(scores, np.float64), 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(a * np.log(s / (1 - s)) + b)))


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
    return decode_batch(pred[None], None if protos is None else protos[None], input_size, n_classes,
                        conf_threshold, iou_threshold, max_det)[0]


def decode_batch(preds: np.ndarray, protos: np.ndarray | None, input_size: int, n_classes: int,
                 conf_threshold: float, iou_threshold: float, max_det: int = 1000,
                 wanted: Callable[[int, np.ndarray], np.ndarray] | None = None) -> list[list[tuple]]:
    """Per tile of a batch (preds: B x (4 + classes + 32) x anchors; protos: B x 32 x H/4 x W/4),
    the list of (class_index, box[4], score, mask|None) in tile pixels.

    Each tile's candidates are those at or above `conf_threshold` under their best class,
    suppressed by class-aware greedy NMS within the tile (kept best score first, ties in anchor
    order), at most `max_det` per tile; its masks come from its own prototypes (`box_masks`).
    The best class, the threshold and the boxes are computed for the whole batch at once; the
    NMS runs per tile (one call over every tile's candidates would compare each with every kept
    box of the batch: slower). `wanted(t, boxes)`: which of tile t's kept boxes (tile pixels, in
    order) the caller will use; only those are returned and only their masks decoded."""
    n_tiles = len(preds)
    out: list[list[tuple]] = [[] for _ in range(n_tiles)]
    scores_all = preds[:, 4 : 4 + n_classes]  # tiles x classes x anchors
    cls_all = scores_all.argmax(1)  # tiles x anchors
    score_all = scores_all.max(1)  # the best class's score
    tile_of, anchor = np.nonzero(score_all >= conf_threshold)  # tile by tile, anchors ascending
    if tile_of.size == 0:
        return out
    xywh = preds[tile_of, :4, anchor]  # candidates x 4
    boxes = np.stack([xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2,
                      xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2], 1)
    boxes = boxes.clip(0, input_size)
    cls, score = cls_all[tile_of, anchor], score_all[tile_of, anchor]
    # class-aware NMS: offset boxes by class so different classes never suppress each other
    offset = boxes + cls[:, None] * (input_size + 1.0)
    bounds = np.searchsorted(tile_of, np.arange(n_tiles + 1))
    for t in range(n_tiles):
        lo, hi = int(bounds[t]), int(bounds[t + 1])
        if lo == hi:
            continue
        k_t = lo + nms(offset[lo:hi], score[lo:hi], iou_threshold)[:max_det]
        if wanted is not None:
            k_t = k_t[wanted(t, boxes[k_t])]
            if not len(k_t):
                continue
        kept = boxes[k_t]  # (rows y0, x0 rounded down, y1, x1 rounded up: boxes are clipped to >= 0)
        windows = np.concatenate([np.floor(kept[:, [1, 0]]), np.ceil(kept[:, [3, 2]])], axis=1).astype(np.int64)
        if protos is not None:
            coeffs = np.ascontiguousarray(preds[t][4 + n_classes :, anchor[k_t]].T)  # kept x 32
            masks = box_masks(coeffs, protos[t], input_size, windows)
        else:
            masks = [None] * len(k_t)
        out[t] = [(int(cls[k]), boxes[k], float(score[k]), mask) for k, mask in zip(k_t.tolist(), masks)]
    return out


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


#: Boxes whose prototype windows are computed and upsampled together (cv2.resize takes at most
#: 512 channels; a group shares the largest window of its members, so it holds similar sizes).
_GROUP = 64


def box_masks(coeffs: np.ndarray, protos: np.ndarray, input_size: int,
              windows: Sequence[tuple[int, int, int, int]] | np.ndarray) -> list[np.ndarray]:
    """Each box's `resize(sigmoid(coeff . protos), input_size)[window] > 0.5`, computed on the
    prototype cells under its window only, for a tile's boxes at once.

    Bilinear upsampling by an integer stride reads, for output pixel y, the low-resolution rows
    around (y + 0.5) / stride - 0.5. A sub-grid with one spare cell on each side gives the window
    the very values of the whole map's resize (same weights, same source values), at the cost of
    the box instead of the tile; beyond the map's own border the sub-grid repeats the edge cell,
    which is how the resize clamps there. Boxes of similar size share one sub-grid size: their
    cells are gathered into one (rows, cols, boxes) array, the dot products are one einsum (not
    BLAS: a BLAS call would wake BLAS's thread pool, which then competes with the inference
    engine's threads for the cores), and one `cv2.resize` upsamples every box as a channel."""
    _, ph, pw = protos.shape
    stride = input_size // ph
    win = np.asarray(windows, np.int64).reshape(-1, 4)
    coeffs = np.asarray(coeffs, protos.dtype).reshape(len(win), len(protos))  # (no box: no mask)
    if stride * ph != input_size or stride * pw != input_size:  # not an integer stride: whole map
        out = []
        for coeff, (y0, x0, y1, x1) in zip(coeffs, win):
            lowres = _sigmoid(np.einsum("c,chw->hw", coeff, protos))
            up = cv2.resize(lowres, (input_size, input_size), interpolation=cv2.INTER_LINEAR)
            out.append(up[y0:y1, x0:x1] > 0.5)
        return out
    y0, x0, y1, x1 = win.T
    r0, c0 = np.maximum(0, y0 // stride - 1), np.maximum(0, x0 // stride - 1)
    r1, c1 = np.minimum(ph, -(-y1 // stride) + 1), np.minimum(pw, -(-x1 // stride) + 1)
    rows, cols = np.maximum(r1 - r0, 1), np.maximum(c1 - c0, 1)
    out: list[np.ndarray | None] = [None] * len(win)
    # (32, ph * pw): a gather takes each prototype's cells under the windows only (a transpose to
    # cells x prototypes first copied the whole map: 0.14 ms a tile)
    flat = np.ascontiguousarray(protos).reshape(len(protos), ph * pw)
    ys0, xs0, ys1, xs1, rs0, cs0, rs1, cs1 = (a.tolist() for a in (y0, x0, y1, x1, r0, c0, r1, c1))
    order = np.argsort(np.maximum(rows, cols), kind="stable")
    for start in range(0, len(order), _GROUP):
        g = order[start : start + _GROUP]
        gh, gw = int(rows[g].max()), int(cols[g].max())
        ri = np.minimum(r0[g, None] + np.arange(gh), ph - 1)  # (boxes, gh)
        ci = np.minimum(c0[g, None] + np.arange(gw), pw - 1)  # (boxes, gw)
        # the indices lie on the map already (clamped above): "clip" skips the per-index range check
        cells = np.take(flat, (ri[:, :, None] * pw + ci[:, None, :]).ravel(), axis=1, mode="clip")
        cells = cells.reshape(-1, len(g), gh, gw)  # (32, boxes, gh, gw)
        lowres = _sigmoid(np.einsum("cbhw,bc->hwb", cells, coeffs[g]))
        up = cv2.resize(np.ascontiguousarray(lowres), (stride * gw, stride * gh), interpolation=cv2.INTER_LINEAR)
        # one threshold for the group, boxes first: each mask is then a view of whole rows
        above = cv2.transpose(up.reshape(-1, len(g))).reshape(len(g), stride * gh, stride * gw) > 0.5
        for j, k in enumerate(g.tolist()):
            oy, ox = stride * rs0[k], stride * cs0[k]
            if rs1[k] <= rs0[k] or cs1[k] <= cs0[k]:
                out[k] = np.zeros((max(0, ys1[k] - ys0[k]), max(0, xs1[k] - xs0[k])), bool)
            else:
                out[k] = above[j, ys0[k] - oy : ys1[k] - oy, xs0[k] - ox : xs1[k] - ox]
    return out


def _detector_contract(m: ModelManifest) -> tuple[list[CellKind], list[str]]:
    """A detector's classes as cell kinds and its outputs' names (predictions of shape batch x (4 box +
    classes + mask coefficients) x anchors, then the prototypes, batch x coefficients x h x w, where
    the model has them), whatever order its manifest lists them in; ManifestError for a model that is
    no such detector."""
    if m.task != "segmentation":
        raise ManifestError(f"{m.name}: a {m.task} model where the detector (segmentation) belongs")
    known = {k.value: k for k in SEG_CLASSES}
    unknown = [c for c in m.classes if c not in known]
    if unknown:
        raise ManifestError(f"{m.name}: classes {unknown} are none of the detector's {list(known)}")
    by_rank = {len(o.shape): o for o in m.outputs}
    pred, protos = by_rank.get(3), by_rank.get(4)
    if pred is None or len(m.outputs) != 1 + (protos is not None):
        raise ManifestError(f"{m.name}: a detector's outputs are its predictions (3 axes) and optionally its mask "
                            f"prototypes (4 axes), not {[o.shape for o in m.outputs]}")
    coefficients = protos.shape[1] if protos is not None else 0
    rows, have = 4 + len(m.classes) + coefficients, pred.shape[1]
    fits = have == rows if protos is not None else have >= rows  # without prototypes, rows past the classes unread
    if -1 not in (have, coefficients) and not fits:
        raise ManifestError(f"{m.name}: predictions of {have} rows where 4 box + {len(m.classes)} classes"
                            f"{' + the prototypes' if protos is not None else ''} make {rows}")
    return [known[c] for c in m.classes], [pred.name] + ([protos.name] if protos is not None else [])


class YoloSegmenter:
    """Runs the segmentation engine over tiles and returns frame-coordinate detections."""

    def __init__(self, engine: Engine, conf_threshold: float = 0.25, iou_threshold: float = 0.6,
                 views: Sequence[str] | None = None, platelet_conf_threshold: float | None = None) -> None:
        self.engine = engine
        m = engine.manifest
        if m.preprocessing.pad_value != PAD_VALUE:  # tiles and packed windows are padded with it
            raise ManifestError(f"{m.name}: trained with tiles padded with {m.preprocessing.pad_value}; the analysis "
                                f"pads them with {PAD_VALUE}")
        #: Test-time views the pipeline runs (service.analysis.tta); the calibration was fitted for m.tta.
        self.views = check_views(m.tta if views is None else views)
        if self.views != tuple(m.tta) and m.score_calibration:
            logger.warning("detector runs views %s but its scores were calibrated for %s: scores will shift",
                           "+".join(self.views), "+".join(m.tta))
        self.input_size = m.input_size
        self.classes, self._outputs = _detector_contract(m)
        self.conf_threshold = conf_threshold  # on the CALIBRATED score, applied last (`finish`)
        #: Platelets are kept from this score instead (service.analysis.platelet_rescue looks at
        #: the faint ones); None: `conf_threshold`.
        self.platelet_conf_threshold = conf_threshold if platelet_conf_threshold is None else platelet_conf_threshold
        self.iou_threshold = iou_threshold
        self.calibration = {k: tuple(v) for k, v in m.score_calibration.items()}

    def calibrated(self, kind_name: str, raw: np.ndarray) -> np.ndarray:
        """Detector scores of one kind as probabilities of a real cell (Platt scaling from the
        manifest; the arithmetic of `finish`)."""
        ab = self.calibration.get(kind_name)
        raw = np.asarray(raw, np.float64)
        return raw if ab is None else platt_array(raw, *ab)

    def finish(self, dets: Sequence[CellDetection]) -> list[CellDetection]:
        """Raw-scored detections -> calibrated scores, those below `conf_threshold` dropped."""
        raw = np.array([d.score for d in dets], np.float64)
        score = raw.copy()
        kinds = np.array([d.kind.value for d in dets], object)
        for kind, (a, b) in self.calibration.items():
            sel = kinds == kind
            if sel.any():
                score[sel] = platt_array(raw[sel], a, b)
        floor = np.where(kinds == CellKind.PLATELET.value, self.platelet_conf_threshold, self.conf_threshold)
        return [dataclasses.replace(d, score=float(s)) for d, s, f in zip(dets, score, floor) if s >= f]

    def detect(self, tiles: Iterable[Tile], frame_width: int, frame_height: int, calibrate: bool = True,
               wanted: Callable[[Tile, np.ndarray], np.ndarray] | None = None) -> list[CellDetection]:
        """Detections in frame coordinates; `calibrate=False` keeps raw scores (all above the raw
        floor) for the merge and test-time fusion, after which the caller applies `finish`.
        `wanted(tile, boxes)`: which of a tile's detections (boxes in frame coordinates) to make at
        all; the masks of the others are never decoded.

        Tiles are taken (and may be made) one engine batch at a time, so memory holds one batch
        of tiles and the detections, whatever the frame's size."""
        dets: list[CellDetection] = []
        names = self._outputs  # predictions, then the mask prototypes where the model has them
        for chunk in _batches(tiles, self.engine.manifest.batch.max):
            batch = to_model_input(stack_tiles([t.pixels for t in chunk]), self.engine.manifest.preprocessing)

            def decode(lo: int, hi: int, outs: dict[str, np.ndarray], chunk: list[Tile] = chunk) -> None:
                # tiles lo:hi, as soon as their part of the batch is ready (run_batched's on_part):
                # where the engine splits a batch, the first part is decoded while the rest still runs
                protos = outs[names[1]] if len(names) > 1 else None
                keep = None if wanted is None else (
                    lambda k, boxes: wanted(chunk[lo + k], _in_frame(boxes, chunk[lo + k], frame_width, frame_height)))
                decoded = decode_batch(outs[names[0]], protos, self.input_size, len(self.classes), RAW_SCORE_FLOOR,
                                       self.iou_threshold, wanted=keep)
                for tile, tile_decoded in zip(chunk[lo:hi], decoded):
                    dets.extend(self._tile_detections(tile, tile_decoded, frame_width, frame_height))

            run_batched(self.engine, batch, on_part=decode)
        return self.finish(dets) if calibrate else dets

    def _tile_detections(self, tile: Tile, decoded: list[tuple], frame_width: int,
                         frame_height: int) -> list[CellDetection]:
        """One tile's decoded detections (`decode_batch`) in frame coordinates."""
        if not decoded:
            return []
        b = _in_frame(np.array([d[1] for d in decoded], np.float64), tile, frame_width, frame_height)
        cut = cut_by_interior_tile_edges(b, tile, frame_width, frame_height)
        dets = []
        for (ci, _, raw, mask), (x0, y0, x1, y1), c in zip(decoded, b.tolist(), cut.tolist()):
            if x1 - x0 <= 1 or y1 - y0 <= 1:
                continue
            if mask is not None:
                h = math.ceil(y1) - int(y0)
                w = math.ceil(x1) - int(x0)
                mask = np.ascontiguousarray(mask[:h, :w])
            dets.append(CellDetection(kind=self.classes[ci], box=Box(x0, y0, x1, y1), score=raw, mask=mask,
                                      tile_index=tile.index, cut_by_tile_edge=c))
        return dets


def _in_frame(boxes: np.ndarray, tile: Tile, frame_width: int, frame_height: int) -> np.ndarray:
    """A tile's boxes (tile pixels) in frame coordinates, clipped to the real frame (tiles may
    extend into padding)."""
    b = np.asarray(boxes, np.float64) + [tile.x, tile.y, tile.x, tile.y]
    return np.minimum(b, [frame_width, frame_height, frame_width, frame_height])


def _batches(tiles: Iterable[Tile], size: int) -> Iterator[list[Tile]]:
    """Consecutive lists of at most `size` tiles."""
    it = iter(tiles)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
