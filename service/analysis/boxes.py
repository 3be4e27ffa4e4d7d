"""Box overlap on plain coordinates (x0, y0, x1, y1): IoU and the inside fraction (numpy only).

Used by the view fusion (service.analysis.tta), the demo's scoring and the evaluation metrics.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (N, 4) and b (M, 4) as x0, y0, x1, y1."""
    a = np.asarray(a, float).reshape(-1, 4)
    b = np.asarray(b, float).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    # Exact where the union is positive (an IoU of exactly 0.5 is 0.5, as pycocotools computes it);
    # 0 for degenerate boxes.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def inside_fraction(inner, outer) -> float:
    """Fraction of box `inner`'s area that lies inside box `outer` (both x0, y0, x1, y1)."""
    ix = max(0.0, min(inner[2], outer[2]) - max(inner[0], outer[0]))
    iy = max(0.0, min(inner[3], outer[3]) - max(inner[1], outer[1]))
    area = (inner[2] - inner[0]) * (inner[3] - inner[1])
    return ix * iy / area if area > 0 else 0.0
