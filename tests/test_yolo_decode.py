"""YOLO-seg output decoding: thresholds, class-aware NMS, mask assembly, frame coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from smearscope.service.analysis.records import Box, CellDetection, CellKind, Tile
from smearscope.service.analysis.yolo_decode import decode_tile, nms


def _pred(anchors, n_classes=3, n_masks=32):
    """Build a raw head output (4 + classes + masks, anchors) from (cx, cy, w, h, cls, score, coeff)."""
    p = np.zeros((4 + n_classes + n_masks, len(anchors)), np.float32)
    for j, (cx, cy, w, h, c, s, coeff) in enumerate(anchors):
        p[:4, j] = (cx, cy, w, h)
        p[4 + c, j] = s
        p[4 + n_classes :, j] = coeff
    return p


def test_nms_suppresses_overlaps_keeps_distinct():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    keep = nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5)
    assert sorted(keep.tolist()) == [0, 2]


def test_decode_tile_thresholds_and_class_aware_nms():
    coeff = np.zeros(32, np.float32)
    pred = _pred([
        (50, 50, 40, 40, 0, 0.9, coeff),  # rbc
        (52, 50, 40, 40, 0, 0.6, coeff),  # duplicate rbc -> suppressed
        (50, 50, 40, 40, 2, 0.7, coeff),  # platelet at the same place -> kept (other class)
        (150, 150, 30, 30, 1, 0.1, coeff),  # below confidence
    ])
    out = decode_tile(pred, None, 256, 3, conf_threshold=0.25, iou_threshold=0.5)
    assert sorted((c, round(s, 2)) for c, _, s, _ in out) == [(0, 0.9), (2, 0.7)]
    _, box, _, mask = next(o for o in out if o[0] == 0)
    np.testing.assert_allclose(box, [30, 30, 70, 70])
    assert mask is None


def test_decode_tile_masks_from_prototypes():
    protos = np.full((32, 64, 64), -10.0, np.float32)
    protos[0, 10:15, 10:15] = 10.0  # a blob at 40..60 px in a 256 input (stride 4)
    coeff = np.zeros(32, np.float32)
    coeff[0] = 1.0
    pred = _pred([(50, 50, 40, 40, 0, 0.9, coeff)])
    (_, _, _, mask), = decode_tile(pred, protos, 256, 3, 0.25, 0.5)
    assert mask.shape == (40, 40)
    # inside the blob true, box corners false
    assert mask[20, 20] and not mask[0, 0] and not mask[-1, -1]
    assert 250 < mask.sum() < 600


def test_box_mask_equals_the_whole_tile_mask_in_its_window():
    """The mask of a box is computed from the prototype cells under it only; it must be the whole
    tile's mask cut to the box."""
    import cv2

    from smearscope.service.analysis.yolo_decode import box_masks

    rng = np.random.default_rng(7)
    for _ in range(200):
        protos = rng.normal(0.0, 1.0, (32, 64, 64)).astype(np.float32)
        coeff = rng.normal(0.0, 1.0, 32).astype(np.float32)
        x0, y0 = (int(v) for v in rng.integers(0, 255, 2))
        x1, y1 = int(rng.integers(x0 + 1, 257)), int(rng.integers(y0 + 1, 257))
        lowres = 1.0 / (1.0 + np.exp(-np.einsum("c,chw->hw", coeff, protos)))
        whole = cv2.resize(lowres, (256, 256), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1] > 0.5
        np.testing.assert_array_equal(box_masks(coeff[None], protos, 256, [(y0, x0, y1, x1)])[0], whole)


def test_box_masks_of_many_boxes_at_once_equal_each_whole_tile_mask():
    """A tile's boxes are decoded together (grouped by size, gathered, upsampled as channels of
    one resize): each mask must still be the whole tile's mask cut to its box, for boxes of every
    size, at the map's borders and empty ones."""
    import cv2

    from smearscope.service.analysis.yolo_decode import box_masks

    rng = np.random.default_rng(11)
    for _ in range(10):
        protos = rng.normal(0.0, 1.0, (32, 64, 64)).astype(np.float32)
        n = int(rng.integers(1, 150))
        coeffs = rng.normal(0.0, 1.0, (n, 32)).astype(np.float32)
        windows = []
        for _ in range(n):
            size = int(rng.choice([3, 12, 40, 120, 256]))
            x0, y0 = (int(v) for v in rng.integers(0, 256, 2))
            x1, y1 = min(256, x0 + int(rng.integers(0, size + 1))), min(256, y0 + int(rng.integers(0, size + 1)))
            windows.append((y0, x0, y1, x1))
        masks = box_masks(coeffs, protos, 256, windows)
        assert len(masks) == n
        for coeff, (y0, x0, y1, x1), mask in zip(coeffs, windows, masks):
            lowres = 1.0 / (1.0 + np.exp(-np.einsum("c,chw->hw", coeff, protos)))
            whole = cv2.resize(lowres, (256, 256), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1] > 0.5
            np.testing.assert_array_equal(mask, whole)


def test_decode_batch_decodes_each_tile_on_its_own():
    """A batch is decoded as its tiles one by one would be: the same boxes at the same place in
    two tiles both stay (no suppression across tiles), each tile's masks come from its own
    prototypes, and a tile with no candidate gives an empty list."""
    from smearscope.service.analysis.yolo_decode import decode_batch

    coeff = np.zeros(32, np.float32)
    coeff[0] = 1.0
    same = [(50, 50, 40, 40, 0, 0.9, coeff), (52, 50, 40, 40, 0, 0.6, coeff), (150, 60, 30, 30, 1, 0.8, coeff)]
    low = (90, 90, 20, 20, 2, 0.1, coeff)  # below the threshold
    preds = np.stack([_pred(same), _pred([low, low, low]), _pred(same)])
    protos = np.full((3, 32, 64, 64), -10.0, np.float32)
    protos[0, 0, 10:15, 10:15] = 10.0  # tile 0: a blob under the rbc; tile 2: none
    out = decode_batch(preds, protos, 256, 3, 0.25, 0.5)
    assert [len(t) for t in out] == [2, 0, 2]
    for t in (0, 2):
        alone = decode_tile(preds[t], protos[t], 256, 3, 0.25, 0.5)
        assert [(c, s) for c, _, s, _ in out[t]] == [(c, s) for c, _, s, _ in alone]
        for (_, box, _, mask), (_, box1, _, mask1) in zip(out[t], alone):
            np.testing.assert_array_equal(box, box1)
            np.testing.assert_array_equal(mask, mask1)
    assert out[0][0][3].any() and not out[2][0][3].any()
    rng = np.random.default_rng(3)  # many random candidates per tile: the plain per-tile decoding's lists
    for max_det, with_protos in ((1000, True), (5, True), (1000, False)):
        preds = rng.uniform(0, 1, (4, 4 + 3 + 32, 300)).astype(np.float32)
        preds[:, :2] *= 256
        preds[:, 2:4] *= 60
        preds[2, 4:7] *= 0.01  # a tile with no candidate between others
        protos = rng.normal(0, 1, (4, 32, 64, 64)).astype(np.float32) if with_protos else None
        out = decode_batch(preds, protos, 256, 3, 0.05, 0.6, max_det)
        for t in range(4):
            alone = _plain_decode_tile(preds[t], None if protos is None else protos[t], 256, 3, 0.05, 0.6, max_det)
            assert len(out[t]) == len(alone) and (len(alone) > 0) == (t != 2)
            for a, b in zip(out[t], alone):
                assert a[0] == b[0] and a[2] == b[2]
                np.testing.assert_array_equal(a[1], b[1])
                if with_protos:
                    np.testing.assert_array_equal(a[3], b[3])
                else:
                    assert a[3] is None and b[3] is None


def _plain_decode_tile(pred, protos, input_size, n_classes, conf_threshold, iou_threshold, max_det):
    """One tile decoded on its own, step by step: the reference `decode_batch` must reproduce."""
    from smearscope.service.analysis.yolo_decode import box_masks

    scores_all = pred[4 : 4 + n_classes].T
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    sel = score >= conf_threshold
    if not sel.any():
        return []
    xywh = pred[:4].T[sel]
    boxes = np.stack([xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2,
                      xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2], 1).clip(0, input_size)
    cls, score = cls[sel], score[sel]
    keep = nms(boxes + cls[:, None] * (input_size + 1.0), score, iou_threshold)[:max_det]
    windows = [(int(b[1]), int(b[0]), int(np.ceil(b[3])), int(np.ceil(b[2]))) for b in boxes[keep]]
    masks = (box_masks(pred[4 + n_classes :].T[sel][keep], protos, input_size, windows) if protos is not None
             else [None] * len(keep))
    return [(int(cls[k]), boxes[k], float(score[k]), mask) for k, mask in zip(keep, masks)]


class _FakeEngine:
    """Stands in for an engine: returns a fixed raw output per tile (decode is what is tested)."""

    def __init__(self, pred):
        from smearscope.engines.manifest import (
            BatchProfile,
            ModelManifest,
            Preprocessing,
            TensorSpec,
        )

        self.pred = pred
        self.manifest = ModelManifest(
            name="seg", task="segmentation", file="x.onnx", sha256="0" * 64, opset=17,
            inputs=[TensorSpec(name="images", shape=[-1, 3, 256, 256])],
            outputs=[TensorSpec(name="output0", shape=[-1, pred.shape[0], pred.shape[1]])],
            batch=BatchProfile(min=1, opt=1, max=4), input_size=256, canonical_um_per_px=0.2,
            preprocessing=Preprocessing(), classes=["rbc", "wbc", "platelet"])
        self.output_names = ["output0"]
        self.pads_to_opt = False

    def run(self, batch):
        return {"output0": np.repeat(self.pred[None], batch.shape[0], 0)}


def test_segmenter_maps_to_frame_coordinates_and_flags_cut_cells():
    from smearscope.service.analysis.yolo_decode import YoloSegmenter

    coeff = np.zeros(32, np.float32)
    pred = _pred([(100, 100, 40, 40, 0, 0.9, coeff), (240, 100, 30, 30, 1, 0.8, coeff)])
    seg = YoloSegmenter(_FakeEngine(pred))
    tiles = [Tile(0, 0, 0, np.zeros((256, 256, 3), np.uint8)), Tile(1, 200, 0, np.zeros((256, 256, 3), np.uint8))]
    dets = seg.detect(tiles, 456, 256)
    by_tile = {(d.tile_index, d.kind.value): d for d in dets}
    assert by_tile[(1, "rbc")].box.x0 == 280  # 80 + tile offset 200
    assert by_tile[(0, "wbc")].cut_by_tile_edge  # touches tile 0's right edge (x = 256 < frame width)
    assert not by_tile[(0, "rbc")].cut_by_tile_edge


def test_platt_calibration_maps_scores_and_threshold_uses_calibrated_score():
    from smearscope.service.analysis.yolo_decode import YoloSegmenter, platt

    assert platt(0.3, 1.0, 0.0) == pytest.approx(0.3)
    assert platt(0.4, 1.0, 1.0) > 0.5 > platt(0.6, 1.0, -1.0)
    coeff = np.zeros(32, np.float32)
    pred = _pred([(100, 100, 40, 40, 0, 0.4, coeff), (200, 200, 20, 20, 2, 0.4, coeff)])
    eng = _FakeEngine(pred)
    eng.manifest = eng.manifest.model_copy(update={"score_calibration": {"rbc": [1.0, 1.0], "platelet": [1.0, -2.0]}})
    seg = YoloSegmenter(eng, conf_threshold=0.25)
    dets = seg.detect([Tile(0, 0, 0, np.zeros((256, 256, 3), np.uint8))], 256, 256)
    # rbc raised above its raw 0.4; platelet pushed below the 0.25 threshold and dropped
    assert [(d.kind.value, round(d.score, 3)) for d in dets] == [("rbc", round(platt(0.4, 1.0, 1.0), 3))]


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Greedy NMS written out plainly: best score first (ties by index), IoU in float64."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            a, b = boxes[i].astype(float), boxes[j].astype(float)
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_nms_is_greedy_nms_on_crowded_float_boxes(seed):
    """A tile's worth of candidates (clusters of near-duplicates, sub-pixel coordinates, tied
    scores): the kept indices and their order are exactly those of the plain greedy loop."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 256, (40, 2))
    pick = rng.integers(0, 40, 300)
    xy = centres[pick] + rng.normal(0, 4, (300, 2))
    wh = rng.uniform(20, 45, (300, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    scores = np.round(rng.uniform(0.05, 1.0, 300), 2).astype(np.float32)  # many ties
    for thr in (0.3, 0.6):
        assert nms(boxes, scores, thr).tolist() == _greedy_nms(boxes, scores, thr)


def test_nms_of_nothing():
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_the_unsure_test_calibrates_many_scores_exactly_as_finish_does():
    """`calibrated` takes one kind's raw scores at once and gives, bit for bit, the score `finish`
    gives each (and the identity for a kind without calibration)."""
    from smearscope.service.analysis.yolo_decode import YoloSegmenter

    eng = _FakeEngine(_pred([(100, 100, 40, 40, 0, 0.4, np.zeros(32, np.float32))]))
    eng.manifest = eng.manifest.model_copy(update={"score_calibration": {"rbc": [1.5735, 0.5218]}})
    seg = YoloSegmenter(eng, conf_threshold=0.0)
    raw = np.random.default_rng(3).uniform(0.05, 1.0, 500)
    dets = [CellDetection(CellKind.RBC, Box(0, 0, 10, 10), float(r)) for r in raw]
    finished = np.array([d.score for d in seg.finish(dets)])
    assert len(finished) == len(raw)
    np.testing.assert_array_equal(seg.calibrated("rbc", raw), finished)
    np.testing.assert_array_equal(seg.calibrated("wbc", raw), raw)


def test_a_tile_whose_detections_are_all_unwanted_gives_none_and_decodes_no_mask():
    """`wanted` may turn down every box of a tile (a packed tile whose cells are all cut by
    window sides): that tile gives nothing, the others are decoded as without it."""
    from smearscope.service.analysis.yolo_decode import decode_batch

    rng = np.random.default_rng(5)
    coeff = rng.normal(0, 1, 32).astype(np.float32)
    preds = np.stack([_pred([(100, 100, 40, 40, 0, 0.9, coeff), (30, 200, 20, 20, 2, 0.7, coeff)]),
                      _pred([(60, 60, 30, 30, 1, 0.8, coeff), (10, 10, 5, 5, 0, 0.01, coeff)])])
    protos = rng.normal(0, 1, (2, 32, 64, 64)).astype(np.float32)
    every = decode_batch(preds, protos, 256, 3, 0.05, 0.6)
    some = decode_batch(preds, protos, 256, 3, 0.05, 0.6,
                        wanted=lambda t, boxes: np.full(len(boxes), t == 1))
    assert len(every[0]) == 2 and some[0] == []
    assert [(c, s) for c, _, s, _ in some[1]] == [(c, s) for c, _, s, _ in every[1]]
    np.testing.assert_array_equal(some[1][0][3], every[1][0][3])


@pytest.mark.parametrize("map_side", [64, 60])  # an integer stride, and one that is not (the whole map)
def test_box_masks_of_no_box_are_no_masks(map_side):
    """A tile whose boxes the caller turns down every one of asks for no mask: an empty list, not
    an error (decode_batch skips such a tile before asking; box_masks holds on its own)."""
    from smearscope.service.analysis.yolo_decode import box_masks

    protos = np.random.default_rng(0).normal(0.0, 1.0, (32, map_side, map_side)).astype(np.float32)
    assert box_masks(np.zeros((0, 32), np.float32), protos, 256, np.zeros((0, 4), np.int64)) == []
    assert box_masks(np.zeros((0, 32), np.float32), protos, 256, []) == []
