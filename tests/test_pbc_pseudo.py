"""PBC pseudo-labels for the detector (training.pbc_pseudo), on rendered fields with exact truth."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.boxes import inside_fraction
from training.pbc_pseudo import MIN_PEAK_OD, _iou, pseudo_boxes, violet_blobs

MPP = 0.2


def _box(b):
    return tuple(float(v) for v in b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_violet_blobs_are_the_platelets_and_white_cell_nuclei(seed):
    f = render_field(seed, width=512, height=512, microns_per_pixel=MPP, n_wbc=1, n_platelets=6)
    px = np.asarray(f.frame.pixels)
    blobs = [(b.x0, b.y0, b.x1, b.y1) for b in violet_blobs(px)]
    plts = [_box(c.bbox) for c in f.cells if c.kind == "platelet"]
    wbcs = [_box(c.bbox) for c in f.cells if c.kind == "wbc"]
    dense = [_box(c.bbox) for c in f.cells if c.kind == "platelet" and _peak_od(px, c) >= MIN_PEAK_OD + 0.05
             and c.bbox[0] > 2 and c.bbox[1] > 2 and c.bbox[2] < 509 and c.bbox[3] < 509]
    pale = [_box(c.bbox) for c in f.cells if c.kind == "platelet" and _peak_od(px, c) < MIN_PEAK_OD - 0.05]
    assert dense
    for p in dense:  # every whole, dense platelet is found with its extent
        assert max(_iou(p, b) for b in blobs) >= 0.5, p
    for p in pale:  # a pale one (like a red cell's dark rim) is not
        assert all(_iou(p, b) < 0.3 for b in blobs), p
    for b in blobs:  # and nothing else outside a white cell
        if all(inside_fraction(b, w) < 0.5 for w in wbcs):
            assert max(_iou(b, p) for p in plts) >= 0.3, b


def _peak_od(px, cell) -> float:
    """90th percentile of the red channel's optical density over a rendered cell's exact mask."""
    x0, y0 = int(cell.bbox[0]), int(cell.bbox[1])
    m = cell.mask.astype(bool)
    od = -np.log((px[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1], 2].astype(np.float32) + 1) / 256)
    return float(np.percentile(od[m[: od.shape[0], : od.shape[1]]], 90))


def _window(field, centre, size=192):
    x, y = (round(v) for v in centre)
    x0, y0 = x - size // 2, y - size // 2
    px = np.asarray(field.frame.pixels)[y0 : y0 + size, x0 : x0 + size]
    cells = []
    for c in field.cells:
        b = (c.bbox[0] - x0, c.bbox[1] - y0, c.bbox[2] - x0, c.bbox[3] - y0)
        if b[2] > 0 and b[3] > 0 and b[0] < size and b[1] < size:
            cells.append((c.kind, tuple(float(v) for v in np.clip(b, 0, size))))
    return np.ascontiguousarray(px), cells


def _rec(kind, bbox, score=0.9):
    return SimpleNamespace(kind=kind, bbox=list(bbox), score=score)


def _field_with(kind):
    for seed in range(40):
        f = render_field(seed, width=640, height=640, microns_per_pixel=MPP, n_wbc=1, n_platelets=6)
        for c in f.cells:
            cx, cy = (c.bbox[0] + c.bbox[2]) / 2, (c.bbox[1] + c.bbox[3]) / 2
            dense = kind != "platelet" or _peak_od(np.asarray(f.frame.pixels), c) >= MIN_PEAK_OD + 0.05
            if c.kind == kind and dense and 120 < cx < 520 and 120 < cy < 520:
                others = [o for o in f.cells if o.kind != "rbc" and o is not c
                          and abs((o.bbox[0] + o.bbox[2]) / 2 - cx) < 60 and abs((o.bbox[1] + o.bbox[3]) / 2 - cy) < 60]
                if not others:
                    return f, (cx, cy)
    raise AssertionError(f"no rendered field with a lone {kind}")


def test_platelet_image_gets_its_centre_platelet_and_loses_a_red_cell_that_took_it():
    f, centre = _field_with("platelet")
    img, truth = _window(f, centre)
    plt = next(b for k, b in truth if k == "platelet" and abs((b[0] + b[2]) / 2 - 96) < 3)
    rbcs = [b for k, b in truth if k == "rbc"]
    # the detector found the red cells but called the centre platelet a red cell, and missed it
    cells = [_rec("rbc", b) for b in rbcs] + [_rec("rbc", plt, 0.7)]
    boxes = pseudo_boxes(img, MPP, "platelet", cells)
    assert boxes is not None
    got_plt = [(b.x0, b.y0, b.x1, b.y1) for b in boxes if b.kind == "platelet"]
    assert max(_iou(plt, p) for p in got_plt) >= 0.5
    assert all(_iou(plt, (b.x0, b.y0, b.x1, b.y1)) < 0.4 for b in boxes if b.kind == "rbc")
    assert sum(b.kind == "rbc" for b in boxes) >= len(rbcs) - 1  # the real red cells stay
    # low-confidence detections are not pseudo-labels
    assert sum(b.kind == "rbc" for b in pseudo_boxes(img, MPP, "platelet", [_rec("rbc", b, 0.3) for b in rbcs])) == 0


def test_platelet_image_without_a_centre_platelet_is_not_used():
    f, centre = _field_with("rbc")
    img, truth = _window(f, centre)
    assert pseudo_boxes(img, MPP, "platelet", [_rec(k, b) for k, b in truth if k == "rbc"]) is None


def test_white_cell_image_joins_the_split_centre_cell_and_needs_it():
    f, centre = _field_with("wbc")
    img, truth = _window(f, centre)
    w = next(b for k, b in truth if k == "wbc")
    mid = (w[0] + w[2]) / 2
    pieces = [_rec("wbc", (w[0], w[1], mid + 2, w[3])), _rec("wbc", (mid - 2, w[1], w[2], w[3]), 0.6)]
    boxes = pseudo_boxes(img, MPP, "monocyte", pieces + [_rec("rbc", b) for k, b in truth if k == "rbc"])
    wb = [(b.x0, b.y0, b.x1, b.y1) for b in boxes if b.kind == "wbc"]
    assert len(wb) == 1 and wb[0] == pytest.approx(w)
    # its nucleus is not a platelet
    assert all(inside_fraction((b.x0, b.y0, b.x1, b.y1), w) < 0.2 for b in boxes if b.kind == "platelet")
    assert pseudo_boxes(img, MPP, "monocyte", [_rec(k, b) for k, b in truth if k == "rbc"]) is None
