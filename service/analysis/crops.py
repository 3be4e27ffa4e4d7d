"""One crop function for both training-data preparation and inference, so they never drift.

A crop has a fixed PHYSICAL extent around the cell centre at the canonical scale (so the red-cell
head can see absolute size), is padded by edge replication at frame borders, then resized to the
head's input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX


@dataclass(frozen=True)
class CropSpec:
    extent_um: float  # side of the square crop in micrometres
    input_size: int  # side in pixels handed to the head

    @property
    def extent_px(self) -> int:
        return round(self.extent_um / CANONICAL_UM_PER_PX)


RBC_CROP = CropSpec(extent_um=11.2, input_size=40)
WBC_CROP = CropSpec(extent_um=25.6, input_size=96)


def crop_cell(canonical_image: np.ndarray, center_xy: tuple[float, float], spec: CropSpec) -> np.ndarray:
    """Square crop of `spec.extent_um` centred on `center_xy` (canonical pixels), resized."""
    side = spec.extent_px
    cx, cy = center_xy
    x0 = round(cx - side / 2.0)
    y0 = round(cy - side / 2.0)
    h, w = canonical_image.shape[:2]
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + side - w), max(0, y0 + side - h)
    # ends kept at 0 or more: a negative end would count from the frame's far side
    window = canonical_image[max(0, y0) : max(0, min(h, y0 + side)), max(0, x0) : max(0, min(w, x0 + side))]
    if pad_l or pad_t or pad_r or pad_b:
        if window.size == 0:  # wholly off the frame, on any side: a blank crop
            window = np.zeros((1, 1, canonical_image.shape[2]), canonical_image.dtype)
            pad_t, pad_l, pad_b, pad_r = 0, 0, side - 1, side - 1
        window = cv2.copyMakeBorder(window, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
    if side != spec.input_size:
        interp = cv2.INTER_AREA if spec.input_size < side else cv2.INTER_LINEAR
        window = cv2.resize(window, (spec.input_size, spec.input_size), interpolation=interp)
    return np.ascontiguousarray(window)
