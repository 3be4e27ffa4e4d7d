"""How sharp a field's red cells are: the width of their outline's edge, in micrometres.

The frame quality gate (device.quality) judges the whole frame and passes fields whose white
cells are in focus; a station focused on the white cells can leave the red cells blurred, and
the RBC head was not trained to type blurred red cells. Red-cell morphology therefore gets its
own judgement of focus.

The measure is physical: at the canonical scale, on the lamp-corrected field (mean of its three
channels), each whole red cell's edge width is its contrast (its darkest tenth against the glass
0.6 to 1.2 um around it) over the steepest intensity gradient across its outline. A step blurred
by a Gaussian of SD s is sqrt(2 pi) s wide (2.5 um for s = 1 um); in focus, red cells' edges at
0.2 um/px measure 0.4 to 1.2 um. The field's figure is the median over its whole red cells (at
least `MIN_CELLS`, at most `MAX_MEASURED_CELLS` spread over the field); it costs one Sobel pass and a
few mask operations over the measured cells' windows stacked into one strip. It reads blur, not
the sharp dark and bright fringes a defocused, nearly transparent red cell can show instead (the Raspberry Pi station's red cells measure as sharp as other labs';
models/README.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from smearscope.service.analysis.records import CellDetection, CellKind
from smearscope.service.analysis.report import Flag
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
from smearscope.service.analysis.wording import counted

logger = logging.getLogger(__name__)

#: The flag a field raises when its red cells are too blurred to judge their shape.
RBC_OUT_OF_FOCUS = "rbc_morphology_out_of_focus"
#: Default bound on the field's red-cell edge width (um); chosen on validation (models/README.md).
MAX_EDGE_WIDTH_UM = 1.4
#: Whole red cells a field needs before its edge width is judged.
MIN_CELLS = 5
#: Red-cell detections at least this confident take part (their outline is the detector's mask).
MIN_SCORE = 0.5
#: Cells whose contrast against the glass is below this (0-255) tell nothing about focus.
MIN_CONTRAST = 12.0
#: Pixels (canonical) either side of the mask's outline searched for the steepest gradient, and
#: out to where the glass around a cell is read; a cell needs this many pixels of such glass.
_BAND_PX = 3
_GLASS_PX = 6
MIN_GLASS_PX = 8
#: Whole red cells measured at most, spread over the field: the median of this many is steady,
#: and the cost stays that of a few dozen small windows however many cells a large field holds.
MAX_MEASURED_CELLS = 64


@dataclass(frozen=True)
class RbcFocus:
    """A field's red-cell edge width (median over `cells` whole red cells; None below MIN_CELLS)."""

    edge_width_um: float | None
    cells: int

    def out_of_focus(self, max_edge_width_um: float | None) -> bool:
        return (max_edge_width_um is not None and self.edge_width_um is not None
                and self.edge_width_um > max_edge_width_um)

    def flag(self, max_edge_width_um: float) -> Flag:
        """The warning of a field `out_of_focus` at this bound."""
        return Flag(code=RBC_OUT_OF_FOCUS, severity="warning",
                    message=f"the red cells are too blurred to judge their shape (edge {self.edge_width_um:.2f} um wide "
                            f"over {counted(self.cells, 'red cell')}, above {max_edge_width_um:g} um): red-cell morphology is not "
                            "graded for this field (a defocus ring reads as target cells); refocus on the red cells. "
                            "Counts are kept")


def _whole(d: CellDetection, shape: tuple[int, ...]) -> bool:
    h, w = shape[:2]
    b = d.box
    return (d.kind is CellKind.RBC and d.mask is not None and d.score >= MIN_SCORE and not d.cut_by_tile_edge
            and b.x0 > _GLASS_PX and b.y0 > _GLASS_PX and b.x1 < w - _GLASS_PX and b.y1 < h - _GLASS_PX)


#: The mean of a window's three channels, as one cv2.transform.
_CHANNEL_MEAN = np.full((1, 3), 1.0 / 3.0, np.float32)


def _segment_quantiles(values: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """numpy's default (linear) quantile of each consecutive segment of `values` (`counts` long,
    every count at least 1), in the values' float32 arithmetic: each segment sorted in place (numpy's
    vectorized sort of a few hundred floats), then the two ranks around q of each read at once."""
    ends = np.cumsum(counts)
    starts = ends - counts
    for s, e in zip(starts.tolist(), ends.tolist()):
        values[s:e].sort()
    pos = q * (counts - 1)
    lo = pos.astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    low = values[starts + lo]
    return low + (values[starts + hi] - low) * (pos - lo).astype(values.dtype)


def cell_edge_widths(pixels: np.ndarray, detections: Sequence[CellDetection],
                     max_cells: int | None = MAX_MEASURED_CELLS) -> list[float]:
    """Whole red cells' edge widths in canonical pixels (`pixels`: the canonical, lamp-corrected
    field): of at most `max_cells` of them, spread evenly over the field's whole red cells in
    detection order (None: every one), each measured in its own window.

    The windows are stacked one under the other into one strip, and each filter runs once over the
    strip: a window holds its cell `pad` pixels in from its border, which is more than any filter
    reaches (the gradient reads 1 pixel, the widest dilation 6 from the cell), so no window's
    figures see its neighbours in the strip; and the strip's rows keep each window's pixels
    together, so every selection comes out window by window."""
    cells = [d for d in detections if d.mask is not None]
    whole = [d for d in cells if _whole(d, pixels.shape)]
    if max_cells is not None and len(whole) > max_cells:
        whole = [whole[i] for i in np.linspace(0, len(whole) - 1, max_cells).round().astype(int)]
    boxes = np.array([d.box.as_list() for d in cells], np.float64).reshape(-1, 4)
    pad = _GLASS_PX + 1
    # each measured cell's window (its box, `pad` wider each side) and the cells whose boxes reach into it
    wins = np.array([(int(d.box.x0) - pad, int(d.box.y0) - pad, int(d.box.x0) - pad + d.mask.shape[1] + 2 * pad,
                      int(d.box.y0) - pad + d.mask.shape[0] + 2 * pad) for d in whole], np.int64).reshape(-1, 4)
    reach = ((boxes[None, :, 2] > wins[:, None, 0]) & (boxes[None, :, 3] > wins[:, None, 1])
             & (boxes[None, :, 0] < wins[:, None, 2]) & (boxes[None, :, 1] < wins[:, None, 3]))
    inside = ((wins[:, 0] >= 0) & (wins[:, 1] >= 0) & (wins[:, 2] <= pixels.shape[1]) & (wins[:, 3] <= pixels.shape[0]))
    owns = [d.mask.astype(bool, copy=False) for d in whole]  # masks are bool (records); 0/1 or 0/255 as their nonzero
    keep = [i for i in range(len(whole)) if inside[i] and owns[i].any()]
    if not keep:
        return []
    heights, widths = wins[keep, 3] - wins[keep, 1], wins[keep, 2] - wins[keep, 0]
    tops = np.concatenate([[0], np.cumsum(heights)[:-1]]).tolist()
    strip_w = int(widths.max())
    strip = np.zeros((int(heights.sum()), strip_w) + pixels.shape[2:], pixels.dtype)
    m = np.zeros(strip.shape[:2], np.uint8)
    # how many cells' masks cover each pixel, over the cells that reach a measured window
    occupied = np.zeros(pixels.shape[:2], np.uint8)
    for j in np.flatnonzero(reach[keep].any(axis=0)).tolist():
        o = cells[j]
        oy, ox = int(o.box.y0), int(o.box.x0)
        mask = o.mask[max(0, -oy):, max(0, -ox):].astype(bool, copy=False)  # an index: a 0/1 int one picks rows
        sub = occupied[max(0, oy):max(0, oy) + mask.shape[0], max(0, ox):max(0, ox) + mask.shape[1]]
        sub += mask[:sub.shape[0], :sub.shape[1]]
    others = np.zeros(m.shape, np.uint8)
    for top, i in zip(tops, keep):
        x0, y0, x1, y1 = wins[i].tolist()
        strip[top:top + y1 - y0, :x1 - x0] = pixels[y0:y1, x0:x1]
        others[top:top + y1 - y0, :x1 - x0] = occupied[y0:y1, x0:x1]
        mh, mw = owns[i].shape
        m[top + pad:top + pad + mh, pad:pad + mw] = owns[i]
    window = strip.astype(np.float32)
    g = cv2.transform(window, _CHANNEL_MEAN).reshape(window.shape[:2]) if window.ndim == 3 else window
    grad = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3),
                         cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)) / 8.0  # 3x3 weights sum to 8 per step
    # the glass around each cell: a ring from 0.6 to 1.2 um out, less any other cell (0 there)
    glass = cv2.dilate(m, np.ones((2 * _GLASS_PX + 1,) * 2, np.uint8))
    glass[others > m] = 0  # covered by a cell other than the window's own
    band_kernel = np.ones((2 * _BAND_PX + 1,) * 2, np.uint8)  # 3 steps of a 3x3 square: one 7x7 square
    outer = cv2.dilate(m, band_kernel)  # masks hold 0 or 1, so do their dilations and erosions
    ring, band, own = glass > outer, outer > cv2.erode(m, band_kernel), m.view(bool)
    row_starts = np.asarray(tops, np.int64)

    def per_window(sel: np.ndarray) -> np.ndarray:
        return np.add.reduceat(sel.sum(axis=1), row_starts)

    n_glass, n_own, n_band = per_window(ring), per_window(own), per_window(band)
    glass_px, own_px, band_px = g[ring], g[own], grad[band]
    ok = n_glass >= MIN_GLASS_PX  # a window short of glass takes no part
    if not ok.any():
        return []
    if not ok.all():
        glass_px, own_px, band_px = (px[np.repeat(ok, n)] for px, n in ((glass_px, n_glass), (own_px, n_own),
                                                                        (band_px, n_band)))
        n_glass, n_own, n_band = n_glass[ok], n_own[ok], n_band[ok]
    contrast = (_segment_quantiles(glass_px, n_glass, 0.5).astype(np.float64)
                - _segment_quantiles(own_px, n_own, 0.1).astype(np.float64))
    steepest = _segment_quantiles(band_px, n_band, 0.9).astype(np.float64)
    return [float(c / s) for c, s in zip(contrast.tolist(), steepest.tolist()) if c >= MIN_CONTRAST and s > 0]


def measure_rbc_focus(pixels: np.ndarray, detections: Sequence[CellDetection]) -> RbcFocus:
    """The field's red-cell edge width (um at the canonical scale) over its whole red cells."""
    widths = cell_edge_widths(pixels, detections)
    if len(widths) < MIN_CELLS:
        return RbcFocus(None, len(widths))
    return RbcFocus(round(float(np.median(widths)) * CANONICAL_UM_PER_PX, 3), len(widths))
