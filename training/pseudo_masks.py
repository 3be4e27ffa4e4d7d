"""Instance masks for box-only sets: colour thresholding inside each box, bounded by its ellipse.

The datasets give boxes (BCCD also WBC pixel masks). A mask is: Otsu on saturation inside the box,
AND the ellipse inscribed in the box, holes filled, largest component. When that finds too little
(faint cell), the inscribed ellipse itself is used.
"""

from __future__ import annotations

import cv2
import numpy as np


def ellipse_mask(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (w // 2, h // 2), (max(1, w // 2), max(1, h // 2)), 0, 0, 360, 1, -1)
    return m


def pseudo_mask(image_bgr: np.ndarray, box: tuple[int, int, int, int], hint: np.ndarray | None = None) -> np.ndarray:
    """Binary mask (box-sized, uint8 0/1) of the cell inside `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    roi = image_bgr[y0:y1, x0:x1]
    h, w = roi.shape[:2]
    ell = ellipse_mask(w, h)
    if hint is not None and hint.any():
        m = (hint > 0).astype(np.uint8) & ell
    else:
        sat = cv2.cvtColor(roi, cv2.COLOR_BGR2HSV)[:, :, 1]
        sat = cv2.GaussianBlur(sat, (3, 3), 0)
        _, m = cv2.threshold(sat, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        m = m.astype(np.uint8) & ell
    # fill holes (pale RBC centres)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(m)
    if contours:
        biggest = max(contours, key=cv2.contourArea)
        cv2.drawContours(filled, [biggest], -1, 1, -1)
    filled = cv2.morphologyEx(filled, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    ys, xs = np.nonzero(filled)
    # The training box is derived from the mask polygon, so a mask that does not reproduce the
    # annotated box (ragged threshold on overlapping cells) would shrink it: use the ellipse.
    if xs.size == 0 or filled.sum() < 0.6 * ell.sum():
        return ell
    if (xs.max() - xs.min() + 1) < 0.9 * w or (ys.max() - ys.min() + 1) < 0.9 * h:
        return ell
    return filled


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """Largest outer contour of a binary mask as an (N, 2) float array of x, y."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), float)
    c = max(contours, key=cv2.contourArea)
    eps = 0.01 * cv2.arcLength(c, True)
    c = cv2.approxPolyDP(c, eps, True)
    return c.reshape(-1, 2).astype(float)
