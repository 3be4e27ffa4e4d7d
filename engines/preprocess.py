"""uint8 BGR images -> the float tensor layout a manifest asks for."""

from __future__ import annotations

import cv2
import numpy as np

from smearscope.engines.manifest import Preprocessing

#: Images of at least this many pixels are split into planes first (see `to_model_input`).
_SPLIT_FROM_PIXELS = 128 * 128


def to_model_input(images_bgr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """N x H x W x 3 uint8 BGR -> float32 batch per `pre` (colour order, scale, layout).

    One pass per channel straight into the output layout (no float copy of the whole batch to
    transpose afterwards); the values are those of `uint8 -> float32, times scale`. For NCHW an
    image of a detector tile's size is first split into contiguous planes (cv2.split), which the
    multiply then reads at unit stride: 30 % faster than reading every third byte; a head's small
    crops are not (a split per crop costs more than it saves)."""
    n, h, w, c = images_bgr.shape
    scale = np.float32(pre.scale)
    order = range(c - 1, -1, -1) if pre.color == "RGB" else range(c)
    if pre.layout == "NCHW":
        out = np.empty((n, c, h, w), np.float32)
        if h * w < _SPLIT_FROM_PIXELS:
            for k, src in enumerate(order):
                np.multiply(images_bgr[..., src], scale, out=out[:, k], dtype=np.float32)
            return out
        for i in range(n):
            planes = cv2.split(np.ascontiguousarray(images_bgr[i]))
            for k, src in enumerate(order):
                np.multiply(planes[src], scale, out=out[i, k], dtype=np.float32)
        return out
    out = np.empty((n, h, w, c), np.float32)
    for k, src in enumerate(order):
        np.multiply(images_bgr[..., src], scale, out=out[..., k], dtype=np.float32)
    return out
