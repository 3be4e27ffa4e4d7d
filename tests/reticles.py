"""Rendered stage micrometers, as a station's camera photographs them (tests and the calibration
figures in docs/RESULTS.md)."""

from __future__ import annotations

import cv2
import numpy as np


def render_micrometer(width: int, height: int, microns_per_pixel: float, division_um: float = 10.0,
                      angle_deg: float = 0.0, line_um: float = 1.2, blur_px: float = 1.0, noise: float = 4.0,
                      seed: int = 0, ticks_um: tuple[float, float, float] | None = (20.0, 40.0, 40.0),
                      ticks_at: float = 0.0, lamp: float = 0.0, grid: bool = False) -> np.ndarray:
    """A rendered stage micrometer (BGR uint8): dark lines on a lit field, for tests and demos.

    `ticks_um`: each tick's half length for a plain division, every 5th and every 10th (None: lines
    across the whole field), centred `ticks_at` of the half height below the centre (0.8: along the
    bottom edge); `lamp`: the light falls by this share across the field; `grid`: lines the other
    way too, at the same spacing."""
    rng = np.random.default_rng(seed)
    ss = 4  # supersampling
    H, W = height * ss, width * ss
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / ss
    t = np.radians(angle_deg)
    # coordinate across the lines (um) and along them
    u = ((xx - width / 2) * np.cos(t) + (yy - height / 2) * np.sin(t)) * microns_per_pixel
    v = (-(xx - width / 2) * np.sin(t) + (yy - height / 2) * np.cos(t)) * microns_per_pixel
    k = np.round(u / division_um)
    line = np.abs(u - k * division_um) < line_um / 2
    if ticks_um is not None:
        length = np.where(k % 10 == 0, ticks_um[2], np.where(k % 5 == 0, ticks_um[1], ticks_um[0]))
        line &= np.abs(v - ticks_at * height / 2 * microns_per_pixel) < length
    if grid:
        line |= np.abs(v - np.round(v / division_um) * division_um) < line_um / 2
    img = np.where(line, 60.0, 225.0).astype(np.float32)
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    if lamp:
        img *= np.linspace(1.0, 1.0 - lamp, width, dtype=np.float32)[None, :]
    if blur_px > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur_px)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
