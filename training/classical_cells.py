"""A classical cell segmenter for pseudo-labels where a lab's annotations are incomplete.

Chula RBC-12 marks a centre for some red cells of each field (often only the abnormal ones),
`chula_wbc_rpi` boxes the white cell(s) of interest and nothing else. A detector trained on such
fields as if they were complete would learn that an unmarked red cell is background. This module
labels every cell of an illumination-corrected field at the canonical scale, with no model:

- foreground: optical density above the field's own Otsu level (floored), pale centres filled;
- instances: a watershed of the distance transform, seeded by the lab's own centres where it has
  them and by distance maxima elsewhere;
- kind: a region whose stain absorbs red light as much as green (violet: nuclei, platelets) is a
  white cell when large, a platelet when small; the rest are red cells when their size is a red
  cell's. Regions that fit nothing (clumps, debris, cut fragments) are returned as `unsure`: the
  data preparation paints them over with the background so they teach nothing either way.

Checked against the labels that exist (`training.evaluate`'s lab table reports how many Chula
centres fall in a pseudo-labelled red cell, and the prep logs it per lab).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.service.analysis.illumination import TARGET_WHITE
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX

UM2_PER_PX = CANONICAL_UM_PER_PX**2
RBC_DIAMETER_UM = (3.5, 12.5)
WBC_MIN_DIAMETER_UM = 6.0
PLATELET_DIAMETER_UM = (1.0, 4.5)
#: Violet: red-channel optical density at least this share of the green one (eosin-pink red
#: cells absorb green and pass red: about 0.2-0.5; azure-violet nuclei and platelets: 0.7+).
VIOLET_RATIO = 0.68
MIN_NUCLEUS_AREA_UM2 = 6.0


@dataclass(frozen=True)
class CellRegion:
    kind: str  # rbc | wbc | platelet | unsure
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in canonical pixels
    mask: np.ndarray  # bool, the box's size
    seeded: bool = False  # grown from one of the lab's own centres


def optical_density(corrected_bgr: np.ndarray) -> np.ndarray:
    """Per-channel optical density (BGR order) against the corrected field's white."""
    return -np.log(np.clip(corrected_bgr.astype(np.float32) + 1.0, 1.0, TARGET_WHITE + 1.0) / (TARGET_WHITE + 1.0))


def foreground(od: np.ndarray, min_level: float = 0.06) -> np.ndarray:
    total = cv2.GaussianBlur(od.sum(axis=2), (0, 0), 1.0)
    scaled = np.clip(total / 1.5 * 255, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    level = max(min_level, 0.6 * otsu / 255 * 1.5)
    fg = (total > level).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    # Fill holes smaller than a red cell (pale centres), not the glass enclosed by a ring of cells.
    contours, hier = cv2.findContours(fg, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    max_hole = np.pi * (4.0 / CANONICAL_UM_PER_PX) ** 2
    if hier is not None:
        for c, h in zip(contours, hier[0]):
            if h[3] >= 0 and cv2.contourArea(c) < max_hole:
                cv2.drawContours(fg, [c], -1, 1, -1)
    return fg.astype(bool)


def _peaks(dist: np.ndarray, min_distance: int, min_value: float) -> list[tuple[int, int]]:
    dil = cv2.dilate(dist, np.ones((2 * min_distance + 1, 2 * min_distance + 1), np.uint8))
    ys, xs = np.nonzero((dist >= dil) & (dist >= min_value))
    return list(zip(xs.tolist(), ys.tolist()))


def segment(corrected_bgr: np.ndarray, seeds: list[tuple[float, float]] | None = None) -> list[CellRegion]:
    """Every cell of a corrected field at CANONICAL_UM_PER_PX, as kind + box + mask."""
    od = optical_density(corrected_bgr)
    fg = foreground(od)
    h, w = fg.shape
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    r_rbc = 3.75 / CANONICAL_UM_PER_PX
    markers = np.zeros((h, w), np.int32)
    n = 0
    seeded_ids = set()
    for x, y in seeds or []:
        xi, yi = round(x), round(y)
        if 0 <= xi < w and 0 <= yi < h and fg[yi, xi]:
            n += 1
            cv2.circle(markers, (xi, yi), 2, n, -1)
            seeded_ids.add(n)
    for x, y in _peaks(dist, max(3, int(0.55 * r_rbc)), 0.3 * r_rbc):
        if markers[max(0, y - int(0.6 * r_rbc)):y + int(0.6 * r_rbc) + 1,
                   max(0, x - int(0.6 * r_rbc)):x + int(0.6 * r_rbc) + 1].any():
            continue  # a seed (or an earlier peak) already claims this cell
        n += 1
        markers[y, x] = n
    # Small violet blobs (platelets) have no distance peak of a red cell's size: seed them too.
    violet = (od[..., 2] > VIOLET_RATIO * od[..., 1]) & (od[..., 2] > 0.25) & fg
    nv, _vlab, vstats, vcent = cv2.connectedComponentsWithStats(violet.astype(np.uint8))
    for i in range(1, nv):
        cx, cy = int(vcent[i][0]), int(vcent[i][1])
        if vstats[i, cv2.CC_STAT_AREA] * UM2_PER_PX >= 0.5 and markers[cy, cx] == 0 and 0 <= cy < h and 0 <= cx < w:
            n += 1
            markers[cy, cx] = n
    if n == 0:
        return []
    background_label = n + 1
    markers[(dist == 0) & ~fg] = background_label
    ws_input = cv2.cvtColor(np.clip(255 - dist * (255.0 / max(float(dist.max()), 1.0)), 0, 255).astype(np.uint8),
                            cv2.COLOR_GRAY2BGR)
    labels = cv2.watershed(ws_input, markers.copy())
    labels[~fg] = 0
    out = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        if len(xs) < 3:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        m = labels[y0:y1, x0:x1] == i
        area_um2 = float(m.sum()) * UM2_PER_PX
        diam = 2.0 * np.sqrt(area_um2 / np.pi)
        vmask = violet[y0:y1, x0:x1] & m
        v_um2 = float(vmask.sum()) * UM2_PER_PX
        if v_um2 >= MIN_NUCLEUS_AREA_UM2 and diam >= WBC_MIN_DIAMETER_UM:
            kind = "wbc"
        elif v_um2 >= 0.5 * area_um2 and PLATELET_DIAMETER_UM[0] <= diam <= PLATELET_DIAMETER_UM[1]:
            kind = "platelet"
        elif RBC_DIAMETER_UM[0] <= diam <= RBC_DIAMETER_UM[1] and v_um2 < 0.2 * area_um2:
            kind = "rbc"
        else:
            kind = "unsure"
        out.append(CellRegion(kind, (int(x0), int(y0), int(x1), int(y1)), m, i in seeded_ids))
    return out


def rbc_diameter_px(corrected_bgr: np.ndarray) -> tuple[float, int] | None:
    """Area-weighted median diameter (pixels) of the field's isolated, round blobs, and their number.

    Model-free and scale-free: blobs whose area is near their convex hull's and whose bounding
    box is near square are single red cells (clumps and white cells are rarer and less round).
    """
    fg = foreground(optical_density(corrected_bgr)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg)
    diam = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area < 30 or x == 0 or y == 0 or x + w >= fg.shape[1] or y + h >= fg.shape[0]:
            continue
        if not 0.8 <= w / h <= 1.25:
            continue
        m = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.contourArea(cv2.convexHull(max(cs, key=cv2.contourArea)))
        if hull > 0 and area / hull >= 0.92:
            diam.append(2.0 * np.sqrt(area / np.pi))
    if len(diam) < 5:
        return None
    # Area-weighted median: the many small specks (platelets, dust, noise) must not outvote cells.
    d = np.sort(np.array(diam))
    cum = np.cumsum(d**2)
    return float(d[np.searchsorted(cum, cum[-1] / 2.0)]), len(diam)
