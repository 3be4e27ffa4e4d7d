"""Test-time augmentation of the detector: views map back exactly, fusion follows its rules, and
the whole pipeline with a flip-closed set of views is equivariant to flipping the input. Of the
heads: views of each crop, logits averaged."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.merge import mask_window
from smearscope.service.analysis.records import Box, CellDetection, CellKind
from smearscope.service.analysis.tta import VIEWS, check_views, fuse_views, unview, view_frame

MODELS = Path(__file__).resolve().parents[1] / "models"


def rendered_crops(crop, seed: int, n: int, width: int = 300, height: int = 240) -> np.ndarray:
    """Head crops (manifest `crop` geometry) of the first `n` cells of a rendered field without
    white cells, cut as the analyzer cuts them."""
    from smearscope.service.analysis.crops import CropSpec, crop_cell
    from smearscope.service.analysis.scale import resample_factor, resample_to_canonical

    field = render_field(seed, width=width, height=height, n_wbc=0)
    spec = CropSpec(crop.extent_um, crop.input_size)
    mpp = field.frame.microns_per_pixel
    canonical, factor = resample_to_canonical(field.frame.pixels, mpp), resample_factor(mpp)
    return np.stack([crop_cell(canonical, (c.center[0] * factor, c.center[1] * factor), spec)
                     for c in field.cells[:n]])


def _blob_detection(label: np.ndarray, box: Box) -> CellDetection:
    r0, c0, r1, c1 = mask_window(box)
    return CellDetection(CellKind.RBC, box, 0.9, mask=label[r0:r1, c0:c1].copy())


@pytest.mark.parametrize("view", VIEWS)
def test_unview_maps_box_and_mask_of_a_flipped_frame_back_exactly(view):
    h, w = 61, 83
    label = np.zeros((h, w), bool)
    cv2.ellipse(label.view(np.uint8), (30, 20), (9, 6), 30, 0, 360, 1, -1)
    box = Box(20.3, 12.6, 40.2, 28.9)  # fractional: rounding outward must survive the flip
    original = _blob_detection(label, box)
    flipped_label = view_frame(label, view)
    fx, fy = view in ("hflip", "rot180"), view in ("vflip", "rot180")
    seen = Box(w - box.x1 if fx else box.x0, h - box.y1 if fy else box.y0,
               w - box.x0 if fx else box.x1, h - box.y0 if fy else box.y1)
    back = unview(_blob_detection(flipped_label, seen), view, w, h)
    assert back.box.as_list() == pytest.approx(box.as_list())
    assert back.mask.shape == original.mask.shape
    assert np.array_equal(back.mask, original.mask)
    assert unview(back, view, w, h).box.as_list() == pytest.approx(seen.as_list())  # each view is its own inverse


def _det(kind, box, score, tile=0, mask=None):
    return CellDetection(kind, Box(*box), score, mask=mask, tile_index=tile)


def test_fusion_averages_over_all_views_and_keeps_cells_and_classes_apart():
    rbc, plt = CellKind.RBC, CellKind.PLATELET
    views = [
        [_det(rbc, (10, 10, 30, 30), 0.9), _det(rbc, (31, 10, 51, 30), 0.8), _det(plt, (10, 10, 30, 30), 0.6)],
        [_det(rbc, (12, 10, 32, 30), 0.6)],
        [_det(rbc, (11, 11, 31, 31), 0.3), _det(rbc, (100, 100, 120, 120), 0.9)],
    ]
    fused = fuse_views(views)
    by = {(d.kind, round(d.box.x0)): d for d in fused}
    assert len(fused) == 4  # three views of one cell fuse; its neighbour, a lone cell and the platelet stay
    first = by[(rbc, 11)]
    assert first.score == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert first.box.x0 == pytest.approx((10 * 0.9 + 12 * 0.6 + 11 * 0.3) / 1.8)
    assert by[(rbc, 31)].score == pytest.approx(0.8 / 3)  # touching neighbour in the same view: not fused
    assert by[(rbc, 100)].score == pytest.approx(0.9 / 3)  # found by one view of three
    assert by[(plt, 10)].score == pytest.approx(0.6 / 3)  # same place, other class
    assert fuse_views([views[0]]) == views[0]  # one view: unchanged


def test_fused_mask_is_the_majority_of_the_views():
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = a.copy()
    b[5:15, 5:7] = False  # one view misses a strip: the majority keeps it
    c = a.copy()
    c[0:2, :] = True  # one view adds a strip: the majority drops it
    box = (0, 0, 20, 20)
    fused = fuse_views([[_det(CellKind.WBC, box, 0.9, mask=m)] for m in (a, b, c)])
    assert len(fused) == 1
    assert np.array_equal(fused[0].mask, a)


def test_pieces_of_a_white_cell_count_for_the_whole_cell_not_for_red_cells():
    wbc, rbc = CellKind.WBC, CellKind.RBC
    whole = (0, 0, 60, 60)
    left, right = (2, 5, 32, 55), (30, 4, 58, 56)  # another view split the cell in two
    views = [[_det(wbc, whole, 0.9)], [_det(wbc, left, 0.7), _det(wbc, right, 0.5)], [_det(wbc, right, 0.6)]]
    fused = fuse_views(views)
    assert len(fused) == 1
    assert fused[0].box.as_list() == pytest.approx(list(whole))  # the whole cell's box, not a piece's
    assert fused[0].score == pytest.approx((0.9 + 0.7 + 0.6) / 3)  # each view votes once, with its best piece
    # without the rule the whole cell keeps a third of its score and the pieces survive
    plain = fuse_views(views, absorb_kinds=frozenset())
    assert len(plain) == 3 and max(d.score for d in plain) == pytest.approx((0.6 + 0.5) / 3)
    # red cells are never joined: a large box over two touching red cells leaves both cells
    reds = fuse_views([[_det(rbc, whole, 0.9)], [_det(rbc, left, 0.7), _det(rbc, right, 0.5)]])
    assert len(reds) == 3
    # a white cell beside (not inside) the large one stays a cell of its own
    apart = fuse_views([[_det(wbc, whole, 0.9), _det(wbc, (50, 50, 90, 90), 0.8)], [_det(wbc, whole, 0.8)]])
    assert len(apart) == 2


def test_unknown_views_are_refused():
    assert check_views(["identity", "hflip"]) == ("identity", "hflip")
    for bad in ([], ["identity", "rot90"]):
        with pytest.raises(ValueError, match="test-time views"):
            check_views(bad)


@pytest.mark.skipif(not (MODELS / "seg.onnx").exists(), reason="committed models absent")
def test_pipeline_with_all_four_views_is_equivariant_to_flipping_the_input():
    """{identity, hflip, vflip, rot180} is closed under flips: analyzing a mirrored frame runs the
    detector on the same four images, so every cell must come back mirrored (real models)."""
    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

    field = render_field(11, width=420, height=330, n_wbc=1)
    analyzer = Analyzer.from_models_dir(MODELS, warmup=False, options=AnalyzerOptions(detector_views=VIEWS,
                                                                                  detector_views_where="everywhere"))
    try:
        plain = analyzer.analyze(field.frame).report
        pixels = np.ascontiguousarray(field.frame.pixels[:, ::-1])
        mirrored = analyzer.analyze(Frame(pixels, "m", "test", microns_per_pixel=field.frame.microns_per_pixel)).report
    finally:
        analyzer.close()
    w = field.frame.pixels.shape[1]
    assert len(plain.cells) > 20
    assert plain.counts == mirrored.counts

    def key(c, flip):
        x0, y0, x1, y1 = c.bbox
        return (c.kind, round(w - x1 if flip else x0), round(y0), round(w - x0 if flip else x1), round(y1))

    def close(a, b):
        return a[0] == b[0] and all(abs(p - q) <= 1 for p, q in zip(a[1:], b[1:]))

    want = sorted(key(c, False) for c in plain.cells)
    got = sorted(key(c, True) for c in mirrored.cells)
    unmatched = [k for k in want if not any(close(k, g) for g in got)]
    assert not unmatched


@pytest.mark.skipif(not (MODELS / "rbc_head.onnx").exists(), reason="committed models absent")
def test_head_views_average_the_logits_of_flipped_crops_and_make_flips_invisible(caplog):
    """A head's views (manifest `tta`) are each crop flipped, run in one batch, logits averaged;
    with the flip-closed set of four, mirroring every crop cannot change a result (real RBC head)."""
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.classify import CropClassifier
    from smearscope.service.analysis.tta import view_crops

    engine = create_engine("onnxruntime", MODELS / "rbc_head.json").load()
    try:
        crops = rendered_crops(engine.manifest.crop, seed=5, n=24)
        default = CropClassifier(engine, 0.3)
        assert default.views == tuple(engine.manifest.tta)
        one = CropClassifier(engine, 0.3, views=("identity",))
        two = CropClassifier(engine, 0.3, views=("identity", "hflip"), extra_views_below=None)
        assert "temperature was fitted for" in caplog.text  # views other than the manifest's are logged
        by_hand = (one.logits(crops) + one.logits(np.ascontiguousarray(crops[:, :, ::-1]))) / 2
        assert np.allclose(two.logits(crops), by_hand, atol=1e-4)
        assert not np.allclose(two.logits(crops), one.logits(crops), atol=1e-3)  # the views do something
        four = CropClassifier(engine, 0.3, views=VIEWS, extra_views_below=None)
        for v in VIEWS:
            assert np.allclose(four.logits(np.ascontiguousarray(view_crops(crops, v))), four.logits(crops), atol=1e-4)
    finally:
        engine.close()


@pytest.mark.skipif(not (MODELS / "rbc_head.onnx").exists(), reason="committed models absent")
def test_a_heads_other_views_run_only_on_the_crops_its_first_view_is_unsure_of():
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.classify import CropClassifier, softmax

    engine = create_engine("onnxruntime", MODELS / "rbc_head.json").load()
    try:
        crops = rendered_crops(engine.manifest.crop, seed=6, n=30)
        first = CropClassifier(engine, 0.3, views=VIEWS[:1]).logits(crops)
        every = CropClassifier(engine, 0.3, views=VIEWS, extra_views_below=None).logits(crops)
        sure = softmax(first / engine.manifest.temperature).max(1)
        gate = float(np.median(sure))  # about half the crops are unsure
        calls = []
        run = engine.run
        engine.run = lambda batch: calls.append(len(batch)) or run(batch)  # type: ignore[method-assign]
        gated = CropClassifier(engine, 0.3, views=VIEWS, extra_views_below=gate).logits(crops)
        unsure = sure < gate
        assert 0 < unsure.sum() < len(crops)
        np.testing.assert_allclose(gated[~unsure], first[~unsure], atol=1e-6)
        np.testing.assert_allclose(gated[unsure], every[unsure], atol=1e-6)
        assert sum(calls) == len(crops) + (len(VIEWS) - 1) * int(unsure.sum())
    finally:
        engine.close()


@pytest.mark.skipif(not (MODELS / "rbc_head.onnx").exists(), reason="committed models absent")
def test_a_single_view_head_runs_in_that_view_and_an_empty_batch_is_empty():
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.classify import CropClassifier

    engine = create_engine("onnxruntime", MODELS / "rbc_head.json").load()
    try:
        s = engine.manifest.input_size
        crops = np.random.default_rng(3).integers(0, 255, (5, s, s, 3), dtype=np.uint8)
        one = CropClassifier(engine, 0.3, views=("identity",))
        hflip = CropClassifier(engine, 0.3, views=("hflip",))
        assert np.allclose(hflip.logits(crops), one.logits(np.ascontiguousarray(crops[:, :, ::-1])), atol=1e-5)
        assert not np.allclose(hflip.logits(crops), one.logits(crops), atol=1e-3)
        for clf in (one, hflip, CropClassifier(engine, 0.3)):
            assert clf.logits(crops[:0]).shape == (0, len(engine.manifest.classes))
    finally:
        engine.close()


def test_a_white_cell_is_a_piece_of_a_larger_one_from_four_fifths_inside_it():
    wbc = CellKind.WBC
    whole = (0, 0, 60, 60)
    # 40 of its 50 px wide lie inside the whole cell: 0.8 (IoU 0.49, so not fused): a piece
    piece = (20, 0, 70, 50)
    fused = fuse_views([[_det(wbc, whole, 0.9)], [_det(wbc, piece, 0.6)]])
    assert len(fused) == 1 and fused[0].score == pytest.approx((0.9 + 0.6) / 2)
    # 30 of 50 px inside (0.6): a cell beside it that the large one overlaps, kept apart
    beside = (30, 0, 80, 50)
    fused = fuse_views([[_det(wbc, whole, 0.9)], [_det(wbc, beside, 0.6)]])
    assert sorted(d.score for d in fused) == pytest.approx([0.6 / 2, 0.9 / 2])


def test_a_pixel_half_the_views_vote_for_is_in_the_fused_mask():
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = a.copy()
    b[5:15, 5:8] = False  # the other view misses a strip: one vote of two keeps it
    fused = fuse_views([[_det(CellKind.WBC, (0, 0, 20, 20), 0.9, mask=m)] for m in (a, b)])
    assert len(fused) == 1 and np.array_equal(fused[0].mask, a)


def test_a_cluster_takes_one_cell_from_each_view():
    rbc = CellKind.RBC
    # the second view holds two overlapping cells over the first view's one: only its best joins
    views = [[_det(rbc, (0, 0, 20, 20), 0.9)], [_det(rbc, (1, 0, 21, 20), 0.8), _det(rbc, (0, 1, 20, 21), 0.7)]]
    fused = fuse_views(views)
    assert sorted(d.score for d in fused) == pytest.approx([0.7 / 2, (0.9 + 0.8) / 2])


def test_views_of_a_cell_overlapping_exactly_at_the_fusion_iou_are_fused():
    from smearscope.service.analysis.tta import FUSE_IOU

    a, b = (0, 0, 31, 10), (9, 0, 40, 10)  # IoU 22 / 40 = 0.55
    assert FUSE_IOU == 0.55
    fused = fuse_views([[_det(CellKind.RBC, a, 0.9)], [_det(CellKind.RBC, b, 0.7)]])
    assert len(fused) == 1 and fused[0].score == pytest.approx((0.9 + 0.7) / 2)


def test_a_cluster_takes_from_each_view_the_cell_overlapping_its_lead_most():
    rbc = CellKind.RBC
    lead = _det(rbc, (0, 0, 20, 20), 0.9)
    close = _det(rbc, (1, 0, 21, 20), 0.5)  # IoU 0.90 with the lead
    shifted = _det(rbc, (4, 0, 24, 20), 0.8)  # IoU 0.67: scored higher, overlaps less
    fused = fuse_views([[lead], [shifted, close]])
    assert sorted(d.score for d in fused) == pytest.approx([0.8 / 2, (0.9 + 0.5) / 2])
