"""Calibrate a station's scale from a stage micrometer image: micrometres per pixel, measured.

A stage micrometer is a slide ruled with lines at a known spacing (commonly 10 um divisions).
Imaged through the station's objective and camera, its line spacing in pixels gives the scale
that the station config's `microns_per_pixel` should hold: stations should be calibrated, not
guessed from the cells.

Method: the ruling is a periodic pattern, so its spacing is the strongest peak of the image's
2-D Fourier spectrum (any orientation). The peak gives the direction of the lines; the image is
then projected along them into a 1-D profile, whose spectrum (zero-padded, peak interpolated)
gives the period to a small fraction of a pixel. Longer lines every 5 or 10 divisions add
sub-harmonics; the fundamental is the highest-frequency strong peak whose period is a whole
fraction of theirs, so those never win.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


class MicrometerError(ValueError):
    """No usable ruling in the image (the message says why)."""


@dataclass(frozen=True)
class MicrometerResult:
    microns_per_pixel: float
    period_px: float
    angle_deg: float  # direction of the ruling's lines, degrees from the image's x axis
    periods_seen: float  # how many divisions the measurement spans
    prominence: float  # spectral peak over the spectrum's median: the ruling's clarity


def _grey(image: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return g.astype(np.float32)


def _parabolic(y: np.ndarray, i: int) -> float:
    if 0 < i < len(y) - 1:
        a, b, c = y[i - 1], y[i], y[i + 1]
        d = a - 2 * b + c
        if d != 0:
            return i + 0.5 * (a - c) / d
    return float(i)


def _direction(g: np.ndarray, min_period: float) -> tuple[float, float]:
    """(angle of the lines' normal in radians, rough period in px) from the 2-D spectrum."""
    n = 512
    small = cv2.resize(g, (n, n), interpolation=cv2.INTER_AREA) if max(g.shape) > n else g
    h, w = small.shape
    win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    f = np.abs(np.fft.fftshift(np.fft.fft2((small - small.mean()) * win)))
    cy, cx = h // 2, w // 2
    yy, xx = np.mgrid[0:h, 0:w]
    fy, fx = (yy - cy) / h, (xx - cx) / w
    rad = np.hypot(fx, fy)
    scale = g.shape[1] / w  # small-image px -> image px (the resize keeps the aspect only when square)
    f[(rad < 2.0 / min(h, w)) | (rad > 1.0 / max(min_period / scale, 2.0))] = 0
    i = int(np.argmax(f))
    py, px = divmod(i, w)
    # back to the full image's cycles per pixel (the resize may differ per axis)
    fxx, fyy = fx[py, px] * w / g.shape[1], fy[py, px] * h / g.shape[0]
    freq = float(np.hypot(fxx, fyy))
    if freq <= 0:
        raise MicrometerError("no periodic ruling found")
    return float(np.arctan2(fyy, fxx)), 1.0 / freq


def measure_micrometer(image: np.ndarray, division_um: float = 10.0, min_period_px: float = 3.0) -> MicrometerResult:
    """Micrometres per pixel of `image`, a stage micrometer ruled every `division_um`."""
    if division_um <= 0:
        raise MicrometerError("the division must be positive")
    g = _grey(image)
    if min(g.shape) < 32:
        raise MicrometerError(f"image too small ({g.shape[1]}x{g.shape[0]})")
    if float(g.std()) < 1.0:
        raise MicrometerError("image is blank")
    theta, rough = _direction(g, min_period_px)
    # Rotate so the normal is the x axis, keep the central part free of rotation borders, and
    # average along the lines into one profile.
    h, w = g.shape
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), np.degrees(theta), 1.0)
    r = cv2.warpAffine(g, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    side = int(min(h, w) / np.sqrt(2))
    y0, x0 = (h - side) // 2, (w - side) // 2
    core = r[y0:y0 + side, x0:x0 + side]
    profile = core.mean(axis=0)
    profile = profile - profile.mean()
    n = len(profile)
    # Autocorrelation (via the zero-padded spectrum): every division line matches the next one at
    # a lag of one period, so the first strong peak after lag 0 is the division spacing; longer
    # lines every few divisions only add weaker peaks at multiples of it.
    spec = np.fft.rfft(profile, n=2 * n)
    ac = np.fft.irfft(np.abs(spec) ** 2)[:n]
    ac = ac / max(float(ac[0]), 1e-9)
    lag_min = max(2, int(min_period_px))
    first = None
    for i in range(lag_min, n // 2):
        if ac[i] > ac[i - 1] and ac[i] >= ac[i + 1] and ac[i] > 0.3:
            first = i
            break
    if first is None:
        raise MicrometerError("no periodic ruling found")
    # Precision: the peak nearest k periods for the largest k that fits, divided by k.
    p0 = _parabolic(ac, first)
    k = max(1, int((n // 2) / p0) - 1)
    j = round(k * p0)
    lo, hi = max(1, j - 3), min(n - 1, j + 4)
    jj = lo + int(np.argmax(ac[lo:hi]))
    period = _parabolic(ac, jj) / k
    if abs(period - p0) > 0.5 + 0.02 * p0:
        period = p0  # the k-th peak was not the same ruling: keep the first
    prominence = float(ac[first] / max(float(np.median(np.abs(ac[lag_min:n // 2]))), 1e-6))
    if ac[first] < 0.3 or prominence < 2.0:
        raise MicrometerError(f"no clear ruling (autocorrelation peak {ac[first]:.2f})")
    del rough
    return MicrometerResult(microns_per_pixel=float(division_um / period), period_px=float(period),
                            angle_deg=float((np.degrees(theta) + 90.0) % 180.0), periods_seen=float(side / period),
                            prominence=float(prominence))


def render_micrometer(width: int, height: int, microns_per_pixel: float, division_um: float = 10.0,
                      angle_deg: float = 0.0, long_every: int = 5, line_um: float = 1.2, blur_px: float = 1.0,
                      noise: float = 4.0, seed: int = 0) -> np.ndarray:
    """A rendered stage micrometer (BGR uint8): dark lines on a lit field, for tests and demos."""
    rng = np.random.default_rng(seed)
    ss = 4  # supersampling
    H, W = height * ss, width * ss
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / ss
    t = np.radians(angle_deg)
    # coordinate across the lines (um) and along them
    u = ((xx - width / 2) * np.cos(t) + (yy - height / 2) * np.sin(t)) * microns_per_pixel
    v = (-(xx - width / 2) * np.sin(t) + (yy - height / 2) * np.cos(t)) * microns_per_pixel
    k = np.round(u / division_um)
    d = np.abs(u - k * division_um)
    length = np.where(k % long_every == 0, 40.0, 20.0)
    line = (d < line_um / 2) & (np.abs(v) < length * 1.0 + 1e9 * (long_every <= 0))
    img = np.where(line, 60.0, 225.0).astype(np.float32)
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    if blur_px > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur_px)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
