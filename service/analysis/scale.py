"""Stage 2: bring every frame to one canonical micrometres-per-pixel.

The canonical scale is part of the model contract (`engines.manifest.CANONICAL_UM_PER_PX`, 0.2
um/px), re-exported here. Training data goes through `resample_to_canonical` too, so the models
only ever see cells at this scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.engines.manifest import CANONICAL_UM_PER_PX
from smearscope.service.ingest import IngestError, RejectReason

logger = logging.getLogger(__name__)

NORMAL_RBC_DIAMETER_UM = 7.5
#: Plausible range of microscope scales (100x oil at high zoom .. 20x objective).
MIN_UM_PER_PX = 0.02
MAX_UM_PER_PX = 1.0
#: The largest frame the analysis works on, in canonical pixels (17 MP: a 64 MP camera frame at
#: 0.1 um/px, 924x693 um; a 4760x3570 field at 0.2 um/px). Memory grows about linearly with the
#: area: the detector streams its tiles and the heads classify crops in chunks (bench.scaling:
#: 64 MP at 0.1 um/px, 6 682 cells, peaked near 1 GB of RSS with the ONNX Runtime backend; a dense
#: field at the cap stays under 2 GB, tests/test_cli_limits.py). Larger frames are refused, never
#: downscaled: the models only know cells at the canonical scale.
MAX_CANONICAL_PIXELS = 17_000_000


@dataclass(frozen=True)
class ScaleEstimate:
    microns_per_pixel: float
    method: str  # "given" | "rbc_size_classical" | "rbc_size_detection" | "specimen" | "default"
    rbc_count: int = 0


def resample_factor(microns_per_pixel: float) -> float:
    """Factor by which an image at `microns_per_pixel` is resized to reach the canonical scale."""
    return microns_per_pixel / CANONICAL_UM_PER_PX


def _canonical(side: int, factor: float) -> int:
    """A side of `side` px once resized by `factor`, as resample_to_canonical sizes it."""
    return max(1, round(side * factor))


def fitting_field(w: int, h: int, factor: float, max_pixels: int) -> tuple[int, int]:
    """The largest field of about a w x h frame's shape whose canonical size is within `max_pixels`:
    the shape shrunk to the limit, then a pixel at a time off the side that rounds it over (whole
    pixels round up past the limit), or the other side's length where one is down to 1 px."""
    fit = (max_pixels / (_canonical(w, factor) * _canonical(h, factor))) ** 0.5
    cw, ch = max(1, int(w * fit)), max(1, int(h * fit))
    while _canonical(cw, factor) * _canonical(ch, factor) > max_pixels:
        if min(cw, ch) == 1:  # a strip: the long side is what fits beside one pixel
            room = max_pixels // _canonical(1, factor)
            side = int((room + 0.5) / factor)
            while side > 1 and _canonical(side, factor) > room:
                side -= 1
            return (cw, min(side, h)) if cw == 1 else (min(side, w), ch)
        if ch * w > cw * h:  # the side that took more of its own length gives a pixel
            ch -= 1
        else:
            cw -= 1
    return cw, ch


def resample_to_canonical(image: np.ndarray, microns_per_pixel: float,
                          max_pixels: int | None = None) -> np.ndarray:
    """Resize `image` so that one pixel spans CANONICAL_UM_PER_PX; IngestError
    (`too_large_at_scale`) when that would exceed `max_pixels`."""
    factor = resample_factor(microns_per_pixel)
    h, w = image.shape[:2]
    size = (_canonical(w, factor), _canonical(h, factor))
    max_pixels = MAX_CANONICAL_PIXELS if max_pixels is None else max_pixels
    if size[0] * size[1] > max_pixels:
        crop = fitting_field(w, h, factor, max_pixels)
        raise IngestError(RejectReason.TOO_LARGE_AT_SCALE,
                          f"{w}x{h} px at {microns_per_pixel:g} um/px is {size[0]}x{size[1]} px at "
                          f"the canonical {CANONICAL_UM_PER_PX} um/px, over the limit of "
                          f"{max_pixels} px: check the scale (a wrong um/px makes an image look this "
                          f"large), or crop it into fields of at most {crop[0]}x{crop[1]} px "
                          "and analyse each (a whole-slide scan is many fields)")
    if abs(factor - 1.0) < 1e-3:
        return image
    if factor >= 1.0:
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    # OpenCV's area resize is several times faster at a factor of exactly 1/2 than at others:
    # halve first while the rest still shrinks by more than half (averages of 2x2 blocks, then
    # the remaining area resize; within a few grey levels of the one-step resize)
    while size[0] * 2 <= w and size[1] * 2 <= h and w % 2 == 0 and h % 2 == 0:
        image = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    return image if (w, h) == size else cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def scale_from_rbc_diameters(diameters_px: np.ndarray, min_cells: int = 5,
                             normal_um: float = NORMAL_RBC_DIAMETER_UM) -> float | None:
    """um/px implied by a set of red-cell diameters in pixels (median of the middle half), a
    normal red cell measuring `normal_um` by the ruler that measured them (7.5 um: BCCD's boxes,
    the convention the datasets' scales were set with).

    Returns None with fewer than `min_cells` cells: too few to trust.
    """
    d = np.asarray(diameters_px, dtype=float)
    d = d[np.isfinite(d) & (d > 0)]
    if d.size < min_cells:
        return None
    lo, hi = np.percentile(d, [25, 75])
    core = d[(d >= lo) & (d <= hi)]
    median = float(np.median(core if core.size else d))
    return float(np.clip(normal_um / median, MIN_UM_PER_PX, MAX_UM_PER_PX))


def estimate_scale_classical(image_bgr: np.ndarray) -> ScaleEstimate | None:
    """First guess of um/px from the size of stained blobs (mostly red cells), no model needed.

    Foreground = darker or more saturated than the background (Otsu), holes filled (pale RBC
    centres). Each blob's largest inscribed circle (distance-transform maximum) gives a cell
    radius that touching cells do not inflate; the area-weighted median radius is taken, so the
    many red cells outvote platelets, debris and the few larger white cells.
    """
    hsv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)
    sat = hsv[:, :, 1].astype(np.float32)
    gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    bg_gray = float(np.percentile(gray, 95))
    bg_sat = float(np.percentile(sat, 5))
    score = np.maximum((bg_gray - gray) / max(bg_gray, 1.0) * 255.0, sat - bg_sat)
    score = cv2.GaussianBlur(np.clip(score, 0, 255).astype(np.uint8), (5, 5), 0)
    if int(score.max()) < 20:
        return None  # nothing stained
    _, fg = cv2.threshold(score, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(fg)
    cv2.drawContours(filled, contours, -1, 255, -1)
    filled = cv2.morphologyEx(filled, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels = cv2.connectedComponents(filled)
    if n < 2:
        return None
    dist = cv2.distanceTransform(filled, cv2.DIST_L2, 5)
    radius = np.zeros(n)
    np.maximum.at(radius, labels.ravel(), dist.ravel())
    area = np.bincount(labels.ravel(), minlength=n).astype(float)
    radius, area = radius[1:], area[1:]
    keep = radius >= 2.0
    if keep.sum() < 3:
        return None
    r, a = radius[keep], area[keep]
    order = np.argsort(r)
    cum = np.cumsum(a[order])
    median_r = float(r[order][np.searchsorted(cum, cum[-1] / 2.0)])
    mpp = float(np.clip(NORMAL_RBC_DIAMETER_UM / (2.0 * median_r), MIN_UM_PER_PX, MAX_UM_PER_PX))
    return ScaleEstimate(mpp, "rbc_size_classical", int(keep.sum()))


#: The first guess works on a frame of at most this many pixels (a scale is a size ratio).
_GUESS_MAX_PIXELS = 2_000_000


def first_scale_guess(image_bgr: np.ndarray, illumination) -> ScaleEstimate | None:
    """`estimate_scale_classical` on the frame (reduced when large) as stored; where that finds
    nothing, on the lamp-corrected frame.

    Dividing out the lamp matters on vignetted, pale or tinted fields (a low-cost station's
    camera), where the raw frame's darkest corners look like stained cells; on other labs'
    ordinary fields the stored frame's guess was the better start (TXL-PBC test, see
    `scale_search`).
    """
    from smearscope.service.analysis.illumination import apply_illumination

    h, w = image_bgr.shape[:2]
    k = min(1.0, float(np.sqrt(_GUESS_MAX_PIXELS / max(h * w, 1))))
    small = image_bgr if k >= 1.0 else cv2.resize(image_bgr, (max(1, round(w * k)), max(1, round(h * k))),
                                                 interpolation=cv2.INTER_AREA)
    est = estimate_scale_classical(small) or estimate_scale_classical(apply_illumination(small, illumination))
    if est is None:
        return None
    return ScaleEstimate(est.microns_per_pixel * k, est.method, est.rbc_count)
