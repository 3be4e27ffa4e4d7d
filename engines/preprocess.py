"""uint8 BGR images -> the float tensor layout a manifest asks for."""

from __future__ import annotations

import numpy as np

from smearscope.engines.manifest import Preprocessing


def to_model_input(images_bgr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """N x H x W x 3 uint8 BGR -> float32 batch per `pre` (colour order, scale, layout)."""
    x = images_bgr
    if pre.color == "RGB":
        x = x[..., ::-1]
    x = x.astype(np.float32) * np.float32(pre.scale)
    if pre.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)
