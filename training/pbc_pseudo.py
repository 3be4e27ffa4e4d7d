"""Detector pseudo-labels for PBC crops: another lab's look, with the centre cell's class known.

PBC gives one class per image (the folder) and no boxes. The detector has never seen that lab
(CellaVision DM96, May-Grunwald-Giemsa), and through the analyzer it misses about a third of
the held-out PBC platelets and splits some large monocytes. Self-training with a prior:

- the committed analyzer (all its detector views) labels every confident cell in the image;
- platelets: every compact violet blob outside a white cell (red-channel optical density, the
  light that violet absorbs and pink red cells pass) is a platelet; in a `platelet` image the
  blob at the centre must exist, or the image is not used;
- white cells: in a WBC-class image the white cell at the centre must be found; pieces of it that
  the detector split are joined into one box; an image without it is not used.

Only PBC *train* images (`training.head_data.pbc_splits`) are used; val and test stay held out.
Boxes are returned in the input image's pixels, as `training.prep_seg.write_field` takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.service.analysis.boxes import box_iou, inside_fraction
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    resample_factor,
    resample_to_canonical,
)
from training.data import BoxAnnotation

PLATELET_DIAMETER_UM = (1.2, 9.0)  # equivalent-circle diameter of a blob kept as a platelet
#: Off-centre blobs larger than this are not called platelets: an erythroblast's round nucleus
#: looks like a PBC giant platelet's granulomere, and only the folder says which the centre is.
OFF_CENTRE_MAX_DIAMETER_UM = 4.5
#: A blob is the platelet's dense granulomere; the detector's own boxes for PBC platelets are
#: larger (the pale rim): median 1.34 (width) and 1.36 (height) times the blob's box over 103
#: PBC train platelets the committed detector found. Blob boxes are grown by this about their
#: centre so that the pseudo-labels follow one box convention (an IoU-0.5 metric cares).
BLOB_BOX_GROWTH = 1.35
#: A platelet's granules are dense: the 90th percentile of a blob's red-channel optical density.
#: On PBC train images, platelets read 0.66-1.3; the dark rims and overlaps of red cells 0.36-0.48
#: and the granules and cytoplasm of white cells 0.43-0.58 (150 images inspected by eye).
MIN_PEAK_OD = 0.6
CENTRE_RADIUS_UM = 6.0  # the labelled cell's blob/box centre lies this close to the image centre
MIN_SCORE = 0.5  # calibrated detector score for a pseudo-label


@dataclass(frozen=True)
class Blob:
    x0: int
    y0: int
    x1: int
    y1: int


def _grown(b, shape_hw, factor: float = BLOB_BOX_GROWTH):
    cx, cy, hw, hh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) * factor / 2, (b[3] - b[1]) * factor / 2
    return (max(0.0, cx - hw), max(0.0, cy - hh), min(float(shape_hw[1]), cx + hw), min(float(shape_hw[0]), cy + hh))


def violet_blobs(canon_bgr: np.ndarray) -> list[Blob]:
    """Compact violet components of a canonical-scale image (platelets, nuclei), as boxes."""
    r = canon_bgr[:, :, 2].astype(np.float32)
    raw = -np.log((r + 1.0) / 256.0)
    od = cv2.GaussianBlur(raw, (3, 3), 0)
    thr = max(0.35, float(np.percentile(od, 50)) + 0.25)
    m = (od > thr).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n, lab, st, _ = cv2.connectedComponentsWithStats(m)
    lo, hi = (np.pi / 4 * (d / CANONICAL_UM_PER_PX) ** 2 for d in PLATELET_DIAMETER_UM)
    out = []
    for i in range(1, n):
        x, y, w, h, a = (int(v) for v in st[i])
        if lo <= a <= hi and max(w, h) <= 2.5 * min(w, h) and \
                np.percentile(raw[y : y + h, x : x + w][lab[y : y + h, x : x + w] == i], 90) >= MIN_PEAK_OD:
            out.append(Blob(x, y, x + w, y + h))
    return out


def _iou(a, b) -> float:
    return float(box_iou(a, b)[0, 0])


def pseudo_boxes(image_bgr: np.ndarray, mpp: float, folder_class: str, cells) -> list[BoxAnnotation] | None:
    """Boxes (input pixels) for one PBC image, or None when the centre cell cannot be placed.

    `cells` are the analyzer's report cells for this image (`kind`, `bbox` in input pixels, `score`).
    """
    h, w = image_bgr.shape[:2]
    f = resample_factor(mpp)
    cx, cy = w / 2, h / 2
    near = CENTRE_RADIUS_UM / mpp
    conf = [c for c in cells if c.score >= MIN_SCORE]
    wbc = [tuple(c.bbox) for c in conf if c.kind == "wbc"]
    rbc = [tuple(c.bbox) for c in conf if c.kind == "rbc"]
    plt = [tuple(c.bbox) for c in conf if c.kind == "platelet"]

    if folder_class != "platelet":
        # the white cell at the centre: every confident WBC box covering the centre, joined
        hit = [b for b in wbc if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
        if not hit:
            return None
        centre_wbc = (min(b[0] for b in hit), min(b[1] for b in hit), max(b[2] for b in hit), max(b[3] for b in hit))
        wbc = [centre_wbc] + [b for b in wbc if b not in hit and _iou(b, centre_wbc) < 0.3]
        rbc = [b for b in rbc if inside_fraction(b, centre_wbc) < 0.7]

    canon = resample_to_canonical(image_bgr, mpp)
    blobs = [(b.x0 / f, b.y0 / f, b.x1 / f, b.y1 / f) for b in violet_blobs(canon)]
    blobs = [b for b in blobs if all(inside_fraction(b, wb) < 0.2 for wb in wbc)]
    central = [b for b in blobs if np.hypot((b[0] + b[2]) / 2 - cx, (b[1] + b[3]) / 2 - cy) <= near]
    max_side = OFF_CENTRE_MAX_DIAMETER_UM / mpp  # the box's inscribed ellipse at most that circle
    blobs = [b for b in blobs if (folder_class == "platelet" and b in central) or (b[2] - b[0]) * (b[3] - b[1]) <= max_side**2]
    if folder_class == "platelet":
        centre = central
        if not centre:
            return None
        # a detection that took the centre platelet for a red or white cell is dropped
        rbc = [b for b in rbc if all(_iou(b, c) < 0.4 for c in centre)]
        wbc = [b for b in wbc if all(inside_fraction(c, b) < 0.5 for c in centre)]
    blobs = [_grown(b, (h, w)) for b in blobs]
    # platelets: the violet blobs; a detector platelet box is kept (it includes the pale rim) only
    # where it holds a blob, so a detector false positive is not taught back to it
    plt = [next((p for p in plt if inside_fraction(b, p) >= 0.6 and _iou(b, p) >= 0.2), b) for b in blobs]
    return ([BoxAnnotation("wbc", *b) for b in wbc] + [BoxAnnotation("rbc", *b) for b in rbc]
            + [BoxAnnotation("platelet", *b) for b in plt])
