"""Illumination and colour-cast correction: the first thing done to a field's pixels.

In a transmitted-light microscope, what the camera records is lamp x optics x (transmission of
the smear). Empty glass between the cells shows the lamp alone: its colour (the lamp's colour
temperature and the camera's white balance) and its unevenness (vignetting, a decentred
condenser, colour shading of a phone or Raspberry Pi lens). None of that is the cell. This stage
estimates that background as a smooth surface per channel and divides it out, so the glass
becomes one neutral white (`TARGET_WHITE`) everywhere and each pixel reads as the smear's
transmission. It is flat-field correction with the field itself as its own flat: nothing needs
to be calibrated at the station.

The estimate takes the brightest pixels of small blocks (glass, or at worst a red cell's pale
centre) and fits a low-order surface (quadratic in x and y, per channel, in linear intensity) with
an asymmetric robust fit: blocks that fall well below the surface are cells, not glass, and lose
their weight. A field with no glass left at all (a crowded smear) still gets a sensible white
point from its brightest blocks; a field too dark or too flat to tell is passed through with the
reason.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

#: Grey level the glass is mapped to. Below 255, so halos and bright pallor keep some headroom.
TARGET_WHITE = 235.0
#: Side of the blocks whose bright pixels sample the background, in pixels of the reduced image.
_BLOCK = 8
#: The reduced image's long side: the background is smooth, so this is plenty.
_REDUCED_LONG_SIDE = 128
#: The fitted surface is evaluated on a grid this coarse and interpolated up (it is quadratic).
_SURFACE_GRID = 24
#: Fixed-point scale of the gain map (gain x 2**7 in uint16: gains up to 512 without overflow).
_GAIN_ONE = 128.0
#: A block's background sample: the mean of its pixels at or above this luminance percentile.
_BRIGHT_PERCENTILE = 80.0
#: Blocks this far below the fitted surface (in log intensity) are cells: their weight drops.
_CELL_RESIDUAL = 0.06
#: A background darker than this (0-255) is no lit glass: the correction would amplify noise.
_MIN_WHITE = 20.0
#: A background below this share of the brightest is no lit glass (a field stop's dark surround):
#: it gets no more gain than this share of the brightest would (a lamp vignetted to 0.45 is lit).
_LIT_SHARE = 0.25


@dataclass(frozen=True)
class IlluminationResult:
    """The corrected field (BGR uint8), or the input passed through with the reason why.

    `white_bgr` is the median background colour found before correction; `uniformity` the ratio
    of the darkest to the brightest background luminance over the field (1.0: even lighting).
    """

    pixels: np.ndarray
    applied: bool
    white_bgr: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uniformity: float = 1.0
    reason: str | None = None


def _design(xs: np.ndarray, ys: np.ndarray, order: int) -> np.ndarray:
    cols = [np.ones_like(xs)]
    if order >= 1:
        cols += [xs, ys]
    if order >= 2:
        cols += [xs * xs, xs * ys, ys * ys]
    return np.stack(cols, axis=1)


@functools.lru_cache(maxsize=16)
def _grid_design(gh: int, gw: int) -> np.ndarray:
    """The quadratic's design matrix on the coarse gh x gw surface grid (a frame size's grid is
    the same for every frame of that size). Read-only: it is shared."""
    gy, gx = np.meshgrid(np.linspace(-1, 1, gh), np.linspace(-1, 1, gw), indexing="ij")
    d = _design(gx.ravel(), gy.ravel(), 2)
    d.flags.writeable = False
    return d


@dataclass(frozen=True)
class _BlockGrid:
    """A reduced image's blocks and the fit's design over their centres: the same for every
    frame of a size, so made once per size (`_block_grid`; its design is read-only, shared).

    `rows` x `cols` blocks of `height` x `width` pixels; `rank`: the bright-pixel percentile's
    rank within a block; `design`: the surface's terms at the block centres (x, y in [-1, 1];
    quadratic from 24 blocks, linear from 6, else constant); `full_rank`: whether the blocks span
    every term."""

    rows: int
    cols: int
    height: int
    width: int
    rank: int
    design: np.ndarray
    full_rank: bool


@functools.lru_cache(maxsize=16)
def _block_grid(h: int, w: int) -> _BlockGrid:
    bh, bw = max(1, h // _BLOCK), max(1, w // _BLOCK)
    sy, sx = h // bh, w // bw
    rank = min(max(round(sy * sx * _BRIGHT_PERCENTILE / 100.0), 0), sy * sx - 1)
    cy, cx = np.meshgrid((np.arange(bh) + 0.5) * sy, (np.arange(bw) + 0.5) * sx, indexing="ij")
    xs = (cx.ravel() / w) * 2.0 - 1.0
    ys = (cy.ravel() / h) * 2.0 - 1.0
    n = len(xs)
    design = _design(xs, ys, 2 if n >= 24 else (1 if n >= 6 else 0))
    full_rank = bool(np.linalg.matrix_rank(design) == design.shape[1])
    design.flags.writeable = False
    return _BlockGrid(bh, bw, sy, sx, rank, design, full_rank)


def _block_colours(reduced: np.ndarray, grid: _BlockGrid) -> np.ndarray:
    """Per block of `grid`: the mean colour of its brightest pixels.

    `reduced` is uint8: luminance is summed in integers."""
    bh, bw, sy, sx = grid.rows, grid.cols, grid.height, grid.width
    img = reduced[: bh * sy, : bw * sx].reshape(bh, sy, bw, sx, 3).swapaxes(1, 2)
    img = img.reshape(bh * bw, sy * sx, 3)
    # Three uint8 planes summed in uint16 (at most 765): a third of the time of an int32 sum
    # over the channel axis, the same integers.
    lum = img[..., 0].astype(np.uint16)
    lum += img[..., 1]
    lum += img[..., 2]
    thr = np.partition(lum, grid.rank, axis=1)[:, grid.rank : grid.rank + 1]
    sel = (lum >= thr).astype(np.float32)
    # Per block, the selected pixels' colour sum as one batched (1 x p) @ (p x 3) product.
    return (np.matmul(sel[:, None, :], img.astype(np.float32))[:, 0, :]
            / np.maximum(sel.sum(axis=1), 1)[:, None])


def _fit_surface(grid: _BlockGrid, colour: np.ndarray) -> np.ndarray:
    """Coefficients (terms x 3) of the robust upper-envelope fit of the background colour.

    The surface is quadratic in x and y in linear intensity, as a lamp's fall-off towards the
    corners is (vignetting ~ 1 - k r^2); fitted in log intensity it overshot the corners of a
    strongly vignetted field by 8 to 19 % (tests/test_illumination.py). Blocks well below the
    surface (relative residual, `_CELL_RESIDUAL` in log units) are cells and lose their weight."""
    a = grid.design
    log_lum = np.log(np.maximum(colour.mean(axis=1), 1.0))
    # blocks darker than `_LIT_SHARE` of the bright ones are no glass (a field stop's surround):
    # next to no weight, else the surface sags over the whole disc towards them
    lit = np.where(log_lum >= np.log(_LIT_SHARE) + np.percentile(log_lum, 95), 1.0, 1e-4)
    weights = lit
    # Weighted least squares by its normal equations where the blocks span every term (a 6 x 6
    # solve costs a fraction of an SVD-based lstsq per iteration; weights 0.02 or 1 keep it well
    # conditioned). A frame a block or two high (a strip: every block at one or two y) does not
    # span y or y^2: there the SVD's minimum-norm solution, as lstsq gives it.
    coef = None
    for _ in range(5):
        if grid.full_rank:
            aw = a.T * weights
            coef = np.linalg.solve(aw @ a, aw @ colour)
        else:
            sw = np.sqrt(weights)[:, None]
            coef, *_ = np.linalg.lstsq(a * sw, colour * sw, rcond=None)
        resid = log_lum - np.log(np.maximum((a @ coef).mean(axis=1), 1.0))
        new = np.where(resid < -_CELL_RESIDUAL, 0.02, 1.0) * lit
        if np.array_equal(new, weights):
            break
        weights = new
    assert coef is not None
    if coef.shape[0] < 6:  # pad to the quadratic's six terms so callers see one shape
        full = np.zeros((6, 3))
        full[: coef.shape[0]] = coef
        coef = full
    return coef


def _reduce(image_bgr: np.ndarray, width: int, height: int) -> np.ndarray:
    """The frame shrunk to width x height by area averaging; halved first while it is 16 or more
    times as large.

    OpenCV's INTER_AREA is slow for large frames at ratios other than 2 (a 4000x3000 frame to
    128x96 took 39 ms in one step, 12 ms halved once first). Frames up to 2048 px on the long
    side are shrunk in one step, exactly as before. An odd last row or column is left out of a
    halving (the background is smooth)."""
    while image_bgr.shape[1] >= 16 * width and image_bgr.shape[0] >= 16 * height:
        h, w = image_bgr.shape[:2]
        image_bgr = cv2.resize(image_bgr[: h - h % 2, : w - w % 2], (w // 2, h // 2),
                               interpolation=cv2.INTER_AREA)
    return cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_AREA)


def estimate_background(image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The fitted background at a reduced size (float32 BGR) and its surface coefficients.

    None when the frame is too small or too dark to hold lit glass.
    """
    est = _estimate(image_bgr)
    return None if est is None else est[:2]


def _estimate(image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`estimate_background`, and the reduced frame it was fitted on."""
    h, w = image_bgr.shape[:2]
    if h < 16 or w < 16:
        return None
    scale = min(1.0, _REDUCED_LONG_SIDE / max(h, w))
    rw, rh = max(_BLOCK, round(w * scale)), max(_BLOCK, round(h * scale))
    reduced = _reduce(image_bgr, rw, rh)
    grid = _block_grid(rh, rw)
    colour = _block_colours(reduced, grid)
    if float(np.median(colour.mean(axis=1))) < _MIN_WHITE:
        return None
    coef = _fit_surface(grid, colour)
    gh = max(2, round(_SURFACE_GRID * rh / max(rh, rw)))
    gw = max(2, round(_SURFACE_GRID * rw / max(rh, rw)))
    surf = _grid_design(gh, gw) @ coef
    bg = np.maximum(surf, 1.0).reshape(gh, gw, 3).astype(np.float32)
    return bg, coef, reduced


@dataclass(frozen=True)
class Illumination:
    """A field's lamp, as measured from its glass: a smooth gain map that makes the glass white.

    `gain` is given on a coarse grid (rows x cols x 3, float32) spanning the whole frame, so it
    applies to the frame at any resolution (the input, or the frame resampled to the canonical
    scale). `uniformity` is the darkest over the brightest background luminance (1.0: even
    lighting); `greyscale` says the frame has no colour at all (a monochrome camera or a
    greyscale export). None of the gain when the frame holds no lit glass (`reason`).
    """

    gain: np.ndarray | None
    white_bgr: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uniformity: float = 1.0
    greyscale: bool = False
    reason: str | None = None

    @property
    def applied(self) -> bool:
        return self.gain is not None


def _is_greyscale(image_bgr: np.ndarray) -> bool:
    small = image_bgr[:: max(1, image_bgr.shape[0] // 64), :: max(1, image_bgr.shape[1] // 64)].astype(np.int16)
    return int(np.abs(small - small[..., :1]).max()) <= 2


def estimate_illumination(image_bgr: np.ndarray, target_white: float = TARGET_WHITE) -> Illumination:
    """Measure the field's background and the gain that maps it to `target_white`."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 BGR frame, got {image_bgr.shape} {image_bgr.dtype}")
    grey = _is_greyscale(image_bgr)
    est = _estimate(image_bgr)
    if est is None:
        return Illumination(None, greyscale=grey, reason="no_lit_background")
    bg, _, reduced = est
    lum = bg.mean(axis=2)
    white = tuple(round(float(v), 2) for v in np.median(bg.reshape(-1, 3), axis=0))
    # over the lit field only: a field stop's dark surround is no unevenness of the lamp
    seen = cv2.resize(reduced, lum.shape[::-1], interpolation=cv2.INTER_AREA).mean(axis=2)  # the frame on the grid
    lit = seen >= _LIT_SHARE * float(np.percentile(seen, 95))
    uniformity = round(float(lum[lit].min() / max(float(lum[lit].max()), 1e-6)), 4)
    # no gain past the lit glass's: the dark surround of a field stop (a round field of view)
    # stays dark, its sensor noise is not raised to the glass's white, where it looked like cells
    lit = np.maximum(bg, _LIT_SHARE * bg.reshape(-1, 3).max(axis=0))
    return Illumination(target_white / lit, white, uniformity, grey)  # type: ignore[arg-type]


def apply_illumination(image_bgr: np.ndarray, illumination: Illumination) -> np.ndarray:
    """The frame (any resolution of the measured one) with its lamp divided out."""
    return image_bgr if illumination.gain is None else apply_gain(image_bgr, illumination.gain)


def correct_illumination(image_bgr: np.ndarray, target_white: float = TARGET_WHITE) -> IlluminationResult:
    """Divide the field by its own background so the glass reads `target_white` everywhere."""
    ill = estimate_illumination(image_bgr, target_white)
    if not ill.applied:
        return IlluminationResult(image_bgr, applied=False, reason=ill.reason)
    return IlluminationResult(apply_illumination(image_bgr, ill), applied=True, white_bgr=ill.white_bgr,
                              uniformity=ill.uniformity)


def apply_gain(image_bgr: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Multiply a frame by a smooth per-channel gain map given on a coarse grid (saturating uint8).

    The coarse grid's cell centres are aligned with the frame (INTER_LINEAR upsampling); the
    product is taken in 16-bit fixed point, the cheapest exact-enough way OpenCV offers.
    """
    h, w = image_bgr.shape[:2]
    g16 = np.clip(gain * _GAIN_ONE + 0.5, 0, 65535).astype(np.uint16)
    full = cv2.resize(g16, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.multiply(image_bgr, full, scale=1.0 / _GAIN_ONE, dtype=cv2.CV_8U)


def in_lit_field(corrected: np.ndarray, boxes: Sequence, dark: float = 0.2, most: float = 0.1) -> list[bool]:
    """Whether each cell's box (pixels of `corrected`, the frame with its lamp divided out) lies in
    the lit field: under `most` of it darker than `dark` of `TARGET_WHITE` (`dark_shares`). Stained
    cells transmit more (white cells of five labs, basophils included: none of their boxes'
    pixels); a field stop's dark surround and dim edge do not, where a cut red cell reads as a dark
    white cell."""
    return [share < most for share in dark_shares(corrected, boxes, dark)]


def dark_shares(corrected: np.ndarray, boxes: Sequence, dark: float = 0.2) -> list[float]:
    """The share of each box's pixels (the box rounded out, clipped to the frame, at least one
    pixel) whose channels' mean is under `dark` of `TARGET_WHITE` (a sum bound of at most 255). One pass over the frame (a channel
    sum saturating at 255 is enough to tell a sum under 3 x 47), then each box's count from an
    integral image; a frame without such pixels (almost every field) costs the pass alone."""
    h, w = corrected.shape[:2]
    channels = corrected.shape[2] if corrected.ndim == 3 else 1
    total = cv2.transform(corrected, np.ones((1, channels), np.float32)) if channels > 1 else corrected
    # whole sums under the bound: at most its ceiling less one (1 there, 0 elsewhere)
    below = math.ceil(channels * (dark * TARGET_WHITE)) - 1
    is_dark = cv2.threshold(total.reshape(h, w), below, 1, cv2.THRESH_BINARY_INV)[1]
    if not cv2.countNonZero(is_dark):
        return [0.0] * len(boxes)
    integral = cv2.integral(is_dark)
    out = []
    for box in boxes:
        x0, y0 = min(max(int(box.x0), 0), w - 1), min(max(int(box.y0), 0), h - 1)
        x1, y1 = min(max(math.ceil(box.x1), x0 + 1), w), min(max(math.ceil(box.y1), y0 + 1), h)
        n_dark = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out.append(float(n_dark) / ((y1 - y0) * (x1 - x0)))
    return out
