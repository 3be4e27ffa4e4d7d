"""The canonical resample's shrink (service.analysis.scale.area_resize): the two-step path for
ratios of 2 or more must give the footprint average OpenCV's one-step INTER_AREA gives, at the
same size, with every pixel in its place."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.scale import area_resize, resample_factor, resample_to_canonical


@pytest.mark.parametrize(("width", "height", "mpp"), [(640, 480, 0.072), (1000, 750, 0.05), (1920, 1080, 0.06),
                                                      (640, 480, 0.1), (641, 479, 0.072), (500, 401, 0.131)])
def test_shrink_matches_one_step_inter_area(width, height, mpp):
    frame = render_field(7, width=width, height=height, microns_per_pixel=mpp).frame.pixels
    factor = resample_factor(mpp)
    size = (round(width * factor), round(height * factor))
    ours = resample_to_canonical(frame, mpp)
    ref = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    assert ours.shape == ref.shape
    k = int(1 / factor)
    if width % k or height % k:  # no whole-number first step: OpenCV's own result
        assert np.array_equal(ours, ref)
        return
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.mean() < 0.6 and diff.max() <= 6


@pytest.mark.parametrize("factor", [0.36, 0.25, 0.2 / 0.59, 0.45])
def test_a_dot_lands_where_one_step_puts_it(factor):
    """A bright square's centroid, near the corners and in the middle, is where OpenCV's one-step
    INTER_AREA puts it (within a tenth of a pixel)."""
    h, w = 480, 660
    img = np.zeros((h, w, 3), np.uint8)
    centres = ((40, 30), (w - 21, h - 16), (w // 2, h // 2))
    for cx, cy in centres:
        img[cy - 6 : cy + 7, cx - 6 : cx + 7] = 255
    size = (round(w * factor), round(h * factor))
    out = area_resize(img, factor, size).astype(float)[..., 0]
    ref = cv2.resize(img, size, interpolation=cv2.INTER_AREA).astype(float)[..., 0]
    assert out.shape == ref.shape == (size[1], size[0])
    yy, xx = np.mgrid[: out.shape[0], : out.shape[1]]

    def centroid(a, near):
        wts = a * near
        return (wts * xx).sum() / wts.sum(), (wts * yy).sum() / wts.sum()

    for cx, cy in centres:
        near = (np.abs(xx - cx * factor) < 8) & (np.abs(yy - cy * factor) < 8)
        (ox, oy), (rx, ry) = centroid(out, near), centroid(ref, near)
        assert np.hypot(ox - rx, oy - ry) < 0.1
