"""Calibrate a station's scale from a stage micrometer image: micrometres per pixel, measured.

A stage micrometer is a slide ruled with lines at a known spacing (commonly 10 um divisions).
Imaged through the station's objective and camera, its line spacing in pixels gives the scale
that the station config's `microns_per_pixel` should hold: stations should be calibrated, not
guessed from the cells.

Method:

1. Direction: the ruling is a periodic pattern, so the strongest peaks of the 2-D Fourier spectrum
   of the image's detail (less the lamp), shrunk to 512 px and from a full-resolution central
   crop (fine rulings the shrinking would alias), give candidate directions of its lines, located
   between bins, tried strongest first (a baseline or a strip's edge can be the strongest).
2. Profile: the image is turned so the lines are vertical and only the rows that cross every tick
   are kept (at least 0.7 of the detail across the lines of the busiest rows): real reticles have
   short ticks with longer ones every 5 and 10 divisions, often along one edge of the field, and
   only the rows through every tick carry the division itself. Their column means, less a smooth
   polynomial (an uneven lamp or vignetting, which would otherwise add a plateau to the
   autocorrelation), are the profile; the angle is refined once from the shift between the profiles of the band's two halves.
   The same measured across the lines tells a grid (a warning: the division given must be the
   spacing of the lines measured).
3. Period: in the profile's autocorrelation (unbiased), the division is the shortest lag all of
   whose multiples peak up to the strongest peak: longer or bolder lines every 2nd, 5th or 10th
   division make the strongest peak at their spacing, while every line still matches its
   neighbour one division on. The period is then refined on the peaks at 2, 4, 8 ... periods,
   each searched near where the last estimate puts it, to a small fraction of a pixel. What the
   division's mean shape leaves unexplained must not be a second ruling at an unrelated spacing
   (an eyepiece reticle over the micrometer).
4. Checks: the lines must stand out from the field (the folded profile's depth at least
   `MIN_CONTRAST` of the field's brightness: faint lamp flicker bands are not a ruling), every
   division must look alike (one division's mean shape explains at least `MIN_REGULARITY` of the
   profile where the lines are, or every group between bolder lines does: a field of cells does
   not) and at least four divisions (five lines) must be in view. What fails says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from smearscope.service.analysis.micrometer_moire import moire_of

#: The ruling's depth (the folded profile's peak to peak) over the field's brightness, at least (a lamp's
#: flicker bands reach a few per cent; rulings in focus 10 to 90 %).
MIN_CONTRAST = 0.08
#: The share of the profile's variance one division's mean shape explains, at least (more over
#: few divisions, where chance explains more).
MIN_REGULARITY = 0.5
#: Divisions the ruling must span in view (five lines): over few, chance makes a field of cells look regular.
MIN_DIVISIONS = 4
#: The autocorrelation's peak at one division less its trough at half of one, at least.
MIN_PROMINENCE = 0.6
#: Lines across the ruling as alike as this make it a grid (the ends of ticks of different lengths,
#: also periodic across the lines, are far less alike: 0.55 where rendered grids reach 1.0).
GRID_REGULARITY = 0.8
#: Fewer divisions in view than this measure the scale less precisely (a warning).
FEW_DIVISIONS = 5


class MicrometerError(ValueError):
    """No usable ruling in the image (the message says why)."""


class TwoRulings(MicrometerError):
    """Two rulings at unrelated spacings: no other direction is tried (which one the division names
    cannot be told)."""

    @classmethod
    def of(cls, period: float, other: float, where: str = "") -> TwoRulings:
        return cls(f"two rulings in view, one every {period:.2f} px and one every {other:.2f} px{where} (an eyepiece "
                   "reticle over the stage micrometer, or two scales): photograph the stage micrometer's scale alone")


class TooFine(MicrometerError):
    """Lines finer than the camera resolves, seen through their moire: no other direction is tried."""


@dataclass(frozen=True)
class MicrometerResult:
    microns_per_pixel: float
    period_px: float
    angle_deg: float  # direction of the ruling's lines, degrees from the image's x axis
    periods_seen: float  # how many divisions the measurement spans
    prominence: float  # the division's autocorrelation peak less its trough at half a division
    contrast: float  # the ruling's depth over the field's brightness
    warnings: tuple[str, ...] = field(default=())


def _apart(a: float, b: float) -> float:
    """The angle between two line directions (radians, 0 to pi/2)."""
    return abs((a - b + np.pi / 2) % np.pi - np.pi / 2)


def _explained(span: np.ndarray, model: np.ndarray) -> float:
    """The share of `span`'s variance `model` (one division's, or group's, mean shape) explains."""
    return 1.0 - float(((span - model) ** 2).sum()) / max(float((span ** 2).sum()), 1e-12)


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


def _spectrum_directions(img: np.ndarray, min_period: float, scale: tuple[float, float], k: int) -> list[tuple[float, float]]:
    """Up to `k` (strength, angle of the lines' normal) from `img`'s 2-D spectrum, at least 5 degrees
    apart; `scale` maps its pixels to the image's (x, y)."""
    h, w = img.shape
    # less the lamp: a strong gradient or vignetting would otherwise be the spectrum's peak
    detail = img - cv2.GaussianBlur(img, (0, 0), min(h, w) / 16)
    win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    full = np.abs(np.fft.fftshift(np.fft.fft2(detail * win)))
    f = full.copy()
    yy, xx = np.mgrid[0:h, 0:w]
    fy, fx = (yy - h // 2) / h / scale[1], (xx - w // 2) / w / scale[0]  # cycles per image pixel
    rad = np.hypot(fx, fy)
    f[(rad < 2.0 / min(h * scale[1], w * scale[0])) | (rad > 1.0 / max(min_period, 2.0 * max(scale)))] = 0
    f[: h // 2] = 0  # the spectrum is symmetric: one half (with the centre row) holds every direction
    out: list[tuple[float, float]] = []
    for i in np.argsort(f, axis=None)[::-1][:2000]:
        py, px = divmod(int(i), w)
        if f[py, px] <= 0:
            break
        # the peak between bins (a bin is 0.5 degrees at 4 px spacing in 512 px: lines 900 px
        # long would drift by two divisions)
        ox = _parabolic(full[py], px) - px if 0 < px < w - 1 else 0.0
        oy = _parabolic(full[:, px], py) - py if 0 < py < h - 1 else 0.0
        angle = float(np.arctan2(fy[py, px] + oy / h / scale[1], fx[py, px] + ox / w / scale[0]))
        if all(_apart(angle, o) > np.radians(5) for _, o in out):
            out.append((float(f[py, px]), angle))
            if len(out) == k:
                break
    return out


def _directions(g: np.ndarray, min_period: float) -> list[float]:
    """Candidate angles of the lines' normal (radians), strongest first: from the whole image
    shrunk to 512 px (coarse rulings) and, for a larger image, from its central 512 px at full
    resolution (fine rulings the shrinking would alias). A ruling's baseline or the edge of a strip
    of ticks can make the strongest peak; the next ones are tried too."""
    n = 512
    h, w = g.shape
    found = []
    if max(h, w) > n:
        small = cv2.resize(g, (n, n), interpolation=cv2.INTER_AREA)
        found += _spectrum_directions(small, min_period, (w / n, h / n), 3)
        y0, x0 = max(0, (h - n) // 2), max(0, (w - n) // 2)
        found += _spectrum_directions(g[y0:y0 + n, x0:x0 + n], min_period, (1.0, 1.0), 2)
    else:
        found += _spectrum_directions(g, min_period, (1.0, 1.0), 3)
    if not found:
        raise MicrometerError("no periodic ruling found")
    angles: list[float] = []
    for _, a in sorted(found, key=lambda t: -t[0]):
        if all(_apart(a, o) > np.radians(1) for o in angles):
            angles.append(a)
    return angles


def _band_profiles(g: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """The image turned so the lines are vertical: (profile of the rows through the ruling, the
    profiles of that band's upper and lower halves, the vertical distance between the halves, the
    field's brightness there), from the rows crossing every tick. Worked in blocks
    of rows, so a 48-megapixel frame needs about its own size again."""
    h, w = g.shape
    c, s_ = abs(np.cos(theta)), abs(np.sin(theta))
    nw, nh = int(np.ceil(w * c + h * s_)), int(np.ceil(w * s_ + h * c))  # the whole image, turned
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), np.degrees(theta), 1.0)
    rot[0, 2] += (nw - w) / 2
    rot[1, 2] += (nh - h) / 2
    r = cv2.warpAffine(g, rot, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # lit pixels only, 3 px in from the border (those next to it are blended with the black fill)
    # and from a field stop's dark surround (a round field of view): what is over half the
    # brightest, with the gaps up to a quarter of the field between closed (dark lines on glass,
    # dark glass between bright lines), at 1/200 of the field's short side, one step in
    f = max(1.0, min(g.shape) / 200.0)
    small = cv2.resize(g, (max(1, round(g.shape[1] / f)), max(1, round(g.shape[0] / f))), interpolation=cv2.INTER_AREA)
    bright = (small >= 0.5 * float(np.percentile(small, 99))).astype(np.uint8)
    bright = cv2.morphologyEx(bright, cv2.MORPH_CLOSE, np.ones((51, 51), np.uint8), borderType=cv2.BORDER_REPLICATE)
    lit = cv2.resize(cv2.erode(bright, np.ones((3, 3), np.uint8)), g.shape[::-1], interpolation=cv2.INTER_NEAREST)
    valid = cv2.erode(cv2.warpAffine(lit, rot, (nw, nh), flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0), np.ones((7, 7), np.uint8)).astype(bool)
    h, w = nh, nw
    block = 256
    energy = np.zeros(h)
    for y in range(0, h, block):
        rb, vb = r[y:y + block], valid[y:y + block]
        dx = np.diff(rb, axis=1)
        both = vb[:, 1:] & vb[:, :-1]
        energy[y:y + block] = (dx * dx * both).sum(axis=1) / np.maximum(both.sum(axis=1), 1)
    energy[valid.sum(axis=1) < 32] = 0.0
    # the rows through every tick: at least 0.7 of the detail of the busiest ones (over 3 rows: not
    # one row of noise); rows through only the longer ticks (every 2nd: half) are left out
    ref = float(np.convolve(energy, np.ones(3) / 3, mode="same").max())
    if ref <= 0:
        raise MicrometerError("image is blank")
    band = np.flatnonzero(energy >= 0.7 * ref)
    half = len(band) // 2
    part = np.zeros(h, np.int8)  # 1: the band's upper half, 2: its lower half
    part[band[:max(half, 1)]] = 1
    part[band[half:]] = 2 if half else 1
    sums = np.zeros((3, w))
    counts = np.zeros((3, w))
    for y in range(0, h, block):
        pb = part[y:y + block]
        for k in (1, 2):
            m = pb == k
            if m.any():
                vb = valid[y:y + block][m]
                sums[k] += (r[y:y + block][m] * vb).sum(axis=0)
                counts[k] += vb.sum(axis=0)
    sums[0], counts[0] = sums[1] + sums[2], counts[1] + counts[2]
    # the columns every band row reaches (at the band's ends, fewer rows would make false lines)
    full = np.flatnonzero((counts[0] >= 0.9 * counts[0].max()) & (counts[1] > 0) & (counts[2] > 0 if half else True))
    if full.size < 32:
        raise MicrometerError("image too small to measure")
    x0, x1 = int(full[0]), int(full[-1]) + 1
    profiles = sums[:, x0:x1] / np.maximum(counts[:, x0:x1], 1.0)
    distance = float(band[half:].mean() - band[:half].mean()) if half else 0.0
    sample = band[::max(1, len(band) // 64)]  # the lit field (or bright lines on a dark one)
    level = float(np.percentile(r[sample][valid[sample]], 95))
    return profiles[0], profiles[1], profiles[2], distance, level


def _detrend(p: np.ndarray) -> np.ndarray:
    """The profile less a smooth polynomial (lamp shading, vignetting)."""
    x = np.linspace(-1.0, 1.0, len(p))
    return (p - np.polyval(np.polyfit(x, p, 4), x)).astype(np.float64)


def _autocorrelation(p: np.ndarray) -> np.ndarray:
    """Unbiased, normalised autocorrelation of `p` (lags 0 .. len - 1)."""
    n = len(p)
    spec = np.fft.rfft(p, n=2 * n)
    ac = np.fft.irfft(np.abs(spec) ** 2)[:n]
    ac = ac / (n - np.arange(n))
    return ac / max(float(ac[0]), 1e-12)


def _peak_near(ac: np.ndarray, x: float, half: float) -> int | None:
    """The autocorrelation's local maximum within `half` of lag `x`, if there is one."""
    lo, hi = max(1, int(np.floor(x - half))), min(len(ac) - 1, int(np.ceil(x + half)) + 1)
    if hi - lo < 1:
        return None
    j = lo + int(np.argmax(ac[lo:hi]))
    return j if 0 < j < len(ac) - 1 and ac[j] >= ac[j - 1] and ac[j] >= ac[j + 1] else None


def _period(ac: np.ndarray, lag_min: int) -> tuple[float, int, int]:
    """(the division in px, the lag of its first peak, the divisions spanned by the strongest
    peak) from the autocorrelation; MicrometerError when there is none.

    The division is the shortest lag whose multiples all peak, up to the strongest peak: bolder or
    longer lines every 2nd, 5th or 10th division make the strongest peak at their spacing, while
    every line still matches its neighbour one division on."""
    top = len(ac) // 2
    lags = np.arange(lag_min, top)
    if lags.size < 3:
        raise MicrometerError("image too small to measure")
    maxima = lags[(ac[lags] > ac[lags - 1]) & (ac[lags] >= ac[lags + 1])]
    peaks = maxima[ac[maxima] > 0.1]
    if peaks.size == 0:
        raise MicrometerError("no periodic ruling found (no lines, or fewer than two divisions in view)")
    strongest = int(peaks[np.argmax(ac[peaks])])
    at = _parabolic(ac, strongest)

    def rise(j: int, width: float) -> float:
        """How far a peak stands above the lowest point within `width` on either side (thin lines
        beside much bolder ones peak below zero, but still above their troughs)."""
        w = max(1, int(width))
        return float(ac[j] - ac[max(1, j - w):j + w + 1].min())

    first, multiple = strongest, 1
    for c in maxima[maxima <= strongest]:
        pc = _parabolic(ac, int(c))
        m = round(at / pc)
        if m < 1 or abs(at - m * pc) > max(1.5, 0.03 * at):
            continue
        height = rise(int(c), 0.5 * pc)
        if height < max(0.05, 0.1 * float(ac[strongest])):
            continue
        if all((j := _peak_near(ac, k * pc, min(max(1.5, 0.1 * pc), 0.4 * pc))) is not None
               and rise(j, 0.5 * pc) >= 0.5 * height for k in range(1, min(m, 10) + 1)):
            first, multiple = int(c), m
            break
    p = _parabolic(ac, first)
    if not 0.5 * first <= p <= first + 0.5:
        p = float(first)
    k = 1
    while 2 * k * p <= top:  # each step doubles the span the period is measured over
        jj = _peak_near(ac, 2 * k * p, min(max(2.0, 0.15 * p), 0.4 * p))
        # a real peak of the same ruling (not noise where few lines overlap)
        if jj is None or rise(jj, 0.5 * p) < 0.5 * rise(first, 0.5 * p) or jj <= k * p:
            break
        k *= 2
        p = min(max(_parabolic(ac, jj), jj - 0.5), jj + 0.5) / k
    return p, first, multiple


@dataclass(frozen=True)
class _Ruling:
    period: float
    theta: float
    divisions: float  # between the first and the last line in view
    prominence: float
    contrast: float
    regularity: float
    alternate: bool  # every second line differs (longer or bolder)


def _fold(d: np.ndarray, period: float) -> tuple[np.ndarray, np.ndarray]:
    """(one division's mean shape, each sample's place in it) of profile `d`."""
    win = max(round(period), 1)
    bins = np.minimum(((np.arange(len(d)) % period) / period * win).astype(int), win - 1)
    folded = np.bincount(bins, d, win) / np.maximum(np.bincount(bins, minlength=win), 1)
    return folded, bins


def _divisions(d: np.ndarray, period: float, folded: np.ndarray) -> float:
    """Lines found in profile `d`, less one: places one division apart where the division's mean
    shape (`folded`) has its line, each standing at least half as far out as the mean line does (a
    line missing between others counts as none)."""
    if len(d) < 2 * period:
        return 0.0
    centre = folded - folded.mean()
    at = int(np.argmax(np.abs(centre)))
    depth, sign = abs(float(centre[at])), np.sign(centre[at])
    xs = np.arange((at + 0.5) / len(folded) * period, len(d), period)
    half = max(1, int(0.15 * period))
    lines = [x for x in xs
             if (sign * (d[max(0, int(x) - half):int(x) + half + 1] - folded.mean())).max(initial=-np.inf) >= 0.5 * depth]
    return float(len(lines) - 1) if lines else 0.0


def _ruling(g: np.ndarray, theta: float, lag_min: int, refine_angle: bool) -> _Ruling:
    """The ruling whose lines' normal is at `theta`: its period, checked (MicrometerError if none)."""
    profile, upper, lower, distance, level = _band_profiles(g, theta)
    d = _detrend(profile)
    ac = _autocorrelation(d)
    period, first, multiple = _period(ac, lag_min)
    if refine_angle and distance >= 8:
        # the band's halves are shifted by the angle's error times their distance
        a, b = _detrend(upper), _detrend(lower)
        xc = np.fft.irfft(np.fft.rfft(a, 2 * len(a)) * np.conj(np.fft.rfft(b, 2 * len(b))))
        span = int(max(1, period // 2))
        vals = np.concatenate([xc[-span:], xc[:span + 1]])  # lags -span .. span
        i = int(np.argmax(vals))
        shift = _parabolic(vals, i) - span
        dtheta = float(np.arctan2(shift, distance))
        if abs(dtheta) > np.radians(0.05):
            theta += dtheta
            profile, _, _, _, level = _band_profiles(g, theta)
            d = _detrend(profile)
            ac = _autocorrelation(d)
            period, first, multiple = _period(ac, lag_min)
    # the group of divisions the profile repeats best at: one, or the few between bolder lines
    near = min(max(1.5, 0.1 * period), 0.4 * period)
    top = _peak_near(ac, multiple * period, near)
    group, at = 1, first
    for k in range(2, multiple + 1):
        j = _peak_near(ac, k * period, near)
        if top is not None and j is not None and ac[j] >= 0.9 * ac[top]:
            group, at = k, j
            break
    # how clearly the profile repeats: its peak at one division (or group) over its trough at half of one
    mid = ac[max(1, int(0.3 * period)):max(2, int(0.7 * period) + 1)]
    prominence = float(ac[first] - (mid.min() if mid.size else 0.0))
    if group > 1:
        mid = ac[int((group - 0.7) * period):int((group - 0.3) * period) + 1]
        prominence = max(prominence, float(ac[at] - (mid.min() if mid.size else 0.0)))
    # the ruling's extent: where the profile varies (lines may fill part of the field only)
    win = max(round(period), 1)
    local = np.convolve(d * d, np.ones(win) / win, mode="same")
    on = np.flatnonzero(local >= 0.1 * float(local.max()))
    a, b = (int(on[0]), int(on[-1]) + 1) if on.size else (0, 0)
    span = d[a:b]
    folded, bins = _fold(span, period)
    divisions = _divisions(span, period, folded)
    if divisions < MIN_DIVISIONS:
        raise MicrometerError(
            f"fewer than {MIN_DIVISIONS} evenly spaced divisions in view ({max(divisions, 0.0):.1f} of {period:.1f} px): "
            "not a ruling (a field of cells?), or one too magnified or filling part of the field: photograph the "
            "stage micrometer's lines at a lower magnification, filling the field")
    # how much of the profile one division's mean shape explains: every division of a ruling
    # looks alike, a field of cells or dust does not
    residual = span - folded[bins]
    regularity = _explained(span, folded[bins])
    # by chance, the mean of n divisions explains about 1/n of any profile: over few, ask more
    need = max(MIN_REGULARITY, 0.35 + 1.0 / (divisions + 1.0))
    if group > 1 and len(span) >= 3 * group * period:  # or every group (bolder lines every few) alike
        grouped, gbins = _fold(span, group * period)
        alike = _explained(span, grouped[gbins])
        group_need = max(MIN_REGULARITY, 0.35 + group * period / len(span))
        if alike - group_need > regularity - need:
            regularity, need = alike, group_need
    contrast = float(np.ptp(folded)) / max(level, 1.0)
    if contrast < MIN_CONTRAST or regularity < need or prominence < MIN_PROMINENCE:
        raise MicrometerError(
            f"no clear ruling: a pattern every {period:.1f} px, {100 * contrast:.1f} % deep (a ruling's lines need "
            f"at least {100 * MIN_CONTRAST:.0f} %), its divisions alike by {regularity:.2f} and repeating by "
            f"{prominence:.2f} (a ruling's, at least {need:.2f} and {MIN_PROMINENCE}): focus on the "
            "micrometer's lines and fill the field with them")
    if (fine := moire_of(span, period, lag_min)) is not None:
        raise TooFine(f"lines closer than {lag_min} px apart (every {fine:.2f} px, their moire every {period:.2f} "
                              "px): finer than the camera resolves; photograph the micrometer at a higher magnification")
    _no_second_ruling(residual, period, level, lag_min)
    # every second line differs: only when their peak clearly stands above the division's
    alternate = group == 2 and ac[at] >= 1.25 * ac[first]
    return _Ruling(period, theta, divisions, prominence, contrast, regularity, alternate)


def _related(q: float, period: float) -> bool:
    """Spacing `q` belongs to the ruling of `period`: lines every few divisions (q a multiple of the
    division), or every few half divisions (twice q a multiple: bolder lines every 5th of a finer
    ruling's half ticks)."""
    return any(round(a * q / period) >= 1 and abs(a * q - round(a * q / period) * period) <= max(1.5, 0.01 * a * q)
               for a in (1, 2))


def _no_second_ruling(residual: np.ndarray, period: float, level: float, lag_min: int) -> None:
    """MicrometerError when what the division's shape leaves unexplained is a ruling of its own, at
    a spacing that is no multiple of the division (an eyepiece reticle photographed over the stage
    micrometer, two scales side by side): which one the division names cannot be told."""
    if len(residual) < 4 * lag_min:
        return
    ac = _autocorrelation(residual - residual.mean())
    try:
        q, _, _ = _period(ac, lag_min)
    except MicrometerError:
        return
    if _related(q, period) or len(residual) < MIN_DIVISIONS * q:  # repeating fewer times is no ruling
        return
    folded, bins = _fold(residual, q)
    alike = _explained(residual, folded[bins])
    if float(np.ptp(folded)) / max(level, 1.0) >= MIN_CONTRAST and alike >= MIN_REGULARITY:
        raise TwoRulings.of(period, q)


def measure_micrometer(image: np.ndarray, division_um: float = 10.0, min_period_px: float = 3.0) -> MicrometerResult:
    """Micrometres per pixel of `image`, a stage micrometer ruled every `division_um`."""
    if not division_um > 0:
        raise MicrometerError("the division must be positive")
    g = _grey(image)
    if min(g.shape) < 32:
        raise MicrometerError(f"image too small ({g.shape[1]}x{g.shape[0]})")
    if float(g.std()) < 1.0:
        raise MicrometerError("image is blank")
    lag_min = max(2, int(min_period_px))
    errors: list[MicrometerError] = []
    candidates = _directions(g, min_period_px)
    for i, theta in enumerate(candidates):
        try:
            r = _ruling(g, theta, lag_min, refine_angle=True)
            break
        except (TwoRulings, TooFine):
            raise
        except MicrometerError as exc:
            errors.append(exc)
    else:
        raise errors[0]
    for other in candidates[i + 1:]:  # a ruling at another angle too (a grid's other lines are checked below)
        off = _apart(other, r.theta)
        if np.radians(10) < off < np.radians(80):
            try:
                second = _ruling(g, other, lag_min, refine_angle=False)
            except MicrometerError:
                continue
            seen_across = second.period * np.cos(off)  # the same lines, seen at an angle, measure about this
            if abs(seen_across - r.period) <= 0.03 * r.period or _related(seen_across, r.period):
                continue
            raise TwoRulings.of(r.period, second.period, f" at {np.degrees(off):.0f} deg to it")
    seen = r.divisions
    warnings = []
    if seen < FEW_DIVISIONS:
        warnings.append(f"only {seen:.1f} divisions in view: a lower magnification or a larger field measures "
                        "the scale more precisely")
    if r.alternate:
        warnings.append(f"every second line differs (longer or bolder, as where half divisions are ruled): "
                        f"{r.period:.2f} px is the spacing of neighbouring lines, which --division-um must name "
                        f"(if it names every second line's, the scale is {division_um / (2 * r.period):.5f} um/px)")
    try:  # lines across these too (as alike as a grid's, not tick ends): the division may name their spacing
        across = _ruling(g, r.theta + np.pi / 2, lag_min, refine_angle=False)
        if across.regularity >= GRID_REGULARITY:
            warnings.append(f"lines in two directions (a grid, the other lines every {across.period:.2f} px): the "
                            f"division given must be the spacing of the lines measured, every {r.period:.2f} px")
    except MicrometerError:
        pass
    return MicrometerResult(microns_per_pixel=float(division_um / r.period), period_px=float(r.period),
                            angle_deg=float((np.degrees(r.theta) + 90.0) % 180.0), periods_seen=float(seen),
                            prominence=r.prominence, contrast=round(r.contrast, 4), warnings=tuple(warnings))
