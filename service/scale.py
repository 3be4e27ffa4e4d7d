"""Stage 2: bring every frame to one canonical micrometres-per-pixel.

0.2 um/px keeps a platelet ~10 px and a normal red cell (7.5 um) ~37 px. Training data goes
through `resample_to_canonical` too, so the models only ever see cells at this scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

CANONICAL_UM_PER_PX = 0.2
NORMAL_RBC_DIAMETER_UM = 7.5
#: Plausible range of microscope scales (100x oil at high zoom .. 20x objective).
MIN_UM_PER_PX = 0.02
MAX_UM_PER_PX = 1.0


@dataclass(frozen=True)
class ScaleEstimate:
    microns_per_pixel: float
    method: str  # "given" | "rbc_size_classical" | "rbc_size_detection" | "default"
    rbc_count: int = 0


def resample_factor(microns_per_pixel: float) -> float:
    """Factor by which an image at `microns_per_pixel` is resized to reach the canonical scale."""
    return microns_per_pixel / CANONICAL_UM_PER_PX


def resample_to_canonical(image: np.ndarray, microns_per_pixel: float) -> np.ndarray:
    """Resize `image` so that one pixel spans CANONICAL_UM_PER_PX."""
    factor = resample_factor(microns_per_pixel)
    if abs(factor - 1.0) < 1e-3:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def scale_from_rbc_diameters(diameters_px: np.ndarray) -> float | None:
    """um/px implied by a set of red-cell diameters in pixels (median of the middle half).

    Returns None with fewer than 5 cells: too few to trust.
    """
    d = np.asarray(diameters_px, dtype=float)
    d = d[np.isfinite(d) & (d > 0)]
    if d.size < 5:
        return None
    lo, hi = np.percentile(d, [25, 75])
    core = d[(d >= lo) & (d <= hi)]
    median = float(np.median(core if core.size else d))
    return float(np.clip(NORMAL_RBC_DIAMETER_UM / median, MIN_UM_PER_PX, MAX_UM_PER_PX))


def estimate_scale_classical(image_bgr: np.ndarray) -> ScaleEstimate | None:
    """First guess of um/px from isolated, round, stained blobs (mostly red cells).

    Cells are darker / more saturated than the background: Otsu on the saturation channel,
    then keep compact, convex components and take their equivalent diameters.
    """
    hsv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)
    sat = cv2.GaussianBlur(hsv[:, :, 1], (5, 5), 0)
    if int(sat.max()) - int(sat.min()) < 10:
        return None
    _, fg = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Red cells have pale centres: fill holes so a ring counts as a disc.
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    h, w = fg.shape
    diameters = []
    for c in contours:
        area = cv2.contourArea(c)
        if area < 20:
            continue
        x, y, bw, bh = cv2.boundingRect(c)
        if x <= 0 or y <= 0 or x + bw >= w or y + bh >= h:
            continue  # cut by the frame edge
        hull = cv2.convexHull(c)
        hull_area = cv2.contourArea(hull)
        if hull_area <= 0 or area / hull_area < 0.9:
            continue  # touching cells or irregular debris
        if max(bw, bh) / max(1, min(bw, bh)) > 1.4:
            continue
        diameters.append(2.0 * np.sqrt(hull_area / np.pi))
    mpp = scale_from_rbc_diameters(np.array(diameters))
    if mpp is None:
        return None
    return ScaleEstimate(mpp, "rbc_size_classical", len(diameters))
