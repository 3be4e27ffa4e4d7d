"""Look randomization: show the models every lab's microscope, lamp, stain and camera on purpose.

A station in a new lab is the normal case. What changes between labs is mostly not the cell:
the lamp's colour and unevenness, the stain's hue and strength, focus, the camera's resolution,
noise and compression. `randomize_look` draws one such "lab" per call and applies it to a field
(BGR uint8, at the canonical scale), in the order light meets them: stain (in optical density),
lamp colour and illumination field, focus, camera resolution, exposure and gamma, sensor noise,
JPEG. The models are then trained on `correct_illumination(randomize_look(x))`, exactly what the
analyzer feeds them, so the lamp part is mostly undone and what remains is what the correction
cannot remove.

Pure numpy/OpenCV, seeded by the caller's `numpy.random.Generator` (the same generator state
gives the same look, sensor noise included); used by the detector's and the heads' training.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Haematoxylin / eosin / DAB optical-density vectors (Ruifrok & Johnston 2001, as in skimage's
#: `rgb_from_hed`), RGB order. In a Romanowsky stain the first plays the azure (purple, nuclei),
#: the second the eosin (pink, red cells); the HED jitter of Tellez et al. 2018 perturbs both.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)


@dataclass(frozen=True)
class LookConfig:
    """Probabilities and ranges of each randomization (defaults: wide, on purpose)."""

    p_stain: float = 0.85
    stain_scale: tuple[float, float] = (0.55, 1.5)
    p_hue: float = 0.5
    hue_deg: float = 18.0
    saturation: tuple[float, float] = (0.35, 1.6)
    p_pale: float = 0.3
    pale: tuple[float, float] = (0.35, 0.9)
    p_lamp: float = 0.8
    lamp_gain: tuple[float, float] = (0.6, 1.0)
    p_field: float = 0.6
    vignette: tuple[float, float] = (0.0, 0.5)
    p_colour_shading: float = 0.35
    exposure: tuple[float, float] = (0.6, 1.1)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.6, 1.6)
    p_grey: float = 0.08
    p_lowres: float = 0.3
    lowres: tuple[float, float] = (1.3, 3.0)
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.4, 2.0)
    p_noise: float = 0.4
    noise_sigma: tuple[float, float] = (1.0, 8.0)
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 95)
    #: Defocus of a nearly transparent cell (`fresnel_defocus`): rings along the outline and a
    #: dark or bright centre, with the edges still steep (not a blur). 0 by default: drawn only
    #: when asked, so every other look keeps its random stream.
    p_defocus: float = 0.0
    defocus_um: tuple[float, float] = (0.8, 3.5)
    defocus_phase_rad: tuple[float, float] = (0.3, 1.2)


DEFAULT_LOOK = LookConfig()


def _grey_axis_transform(theta: float, sat: float) -> np.ndarray:
    """Rotation by `theta` about the grey axis and scaling of the chroma by `sat` (3 x 3, any channel order)."""
    n = np.full(3, 1.0 / np.sqrt(3.0))
    k = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    rot = np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)
    p = np.outer(n, n)
    return rot @ (p + sat * (np.eye(3) - p))


def _lamp_field(h: int, w: int, rng: np.random.Generator, cfg: LookConfig) -> np.ndarray:
    """A smooth multiplicative lamp field (h x w x 3): vignetting, off-centre, colour shading."""
    gh, gw = max(2, round(16 * h / max(h, w))), max(2, round(16 * w / max(h, w)))
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
    ys, xs = (ys + 0.5) * (h / gh), (xs + 0.5) * (w / gw)
    # A field's vignetting is set by the whole camera frame: this tile may be any part of it.
    span = float(rng.uniform(1.2, 4.0)) * max(h, w)
    cx, cy = rng.uniform(-0.5, 1.5) * w, rng.uniform(-0.5, 1.5) * h
    r2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / (span / 2) ** 2
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    linear = 1.0 + gx * (xs / w - 0.5) + gy * (ys / h - 0.5)
    strength = rng.uniform(*cfg.vignette)
    per = strength * (rng.uniform(0.3, 1.3, size=3) if rng.random() < cfg.p_colour_shading else np.ones(3))
    field = np.stack([np.clip(1.0 - s * r2, 0.3, 1.0) for s in per], axis=2) * linear[..., None]
    return cv2.resize(np.clip(field, 0.1, 1.3).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


#: Wavelengths (um) of the camera's blue, green and red channels, for `fresnel_defocus`.
_LAMBDA_BGR_UM = (0.47, 0.55, 0.62)


def cell_thickness(image_bgr: np.ndarray) -> np.ndarray:
    """Each pixel's relative path through cell matter, 0 (glass) to 1 (the densest cell), from the
    green channel's optical density above the glass (a red cell's haemoglobin absorbs there)."""
    od = -np.log((image_bgr[..., 1].astype(np.float32) + 1.0) / 256.0)
    glass, dense = np.percentile(od, 5), np.percentile(od, 99.5)
    t = np.clip((od - glass) / max(float(dense - glass), 1e-3), 0.0, 1.0)
    return cv2.GaussianBlur(t, (0, 0), 0.7)  # the sensor's noise is no phase


def fresnel_defocus(transmission_bgr: np.ndarray, thickness: np.ndarray, dz_um: float, phase_rad: float,
                    um_per_px: float = 0.2) -> np.ndarray:
    """The intensity of a thin specimen `dz_um` out of focus (paraxial angular-spectrum propagation,
    each channel at its wavelength): amplitude sqrt(transmission), phase `phase_rad` x `thickness`
    (at 550 nm; a red cell shifts light by about 1 rad). A nearly transparent cell then shows what a
    microscope shows a little out of focus: dark and bright rings along the outline and a dark or
    bright centre, with steep edges (a Gaussian blur shows none of it). Same shape and dtype out."""
    h, w = thickness.shape
    pad = 32  # reflected, so the frame's border does not ring into it
    fy = np.fft.fftfreq(h + 2 * pad, d=um_per_px)[:, None]
    fx = np.fft.fftfreq(w + 2 * pad, d=um_per_px)[None, :]
    f2 = fy * fy + fx * fx
    out = np.empty_like(transmission_bgr)
    for c, lam in enumerate(_LAMBDA_BGR_UM):
        amp = np.sqrt(np.maximum(transmission_bgr[..., c], 0.0))
        field = np.pad(amp * np.exp(1j * (phase_rad * 0.55 / lam) * thickness), pad, mode="reflect")
        moved = np.fft.ifft2(np.fft.fft2(field) * np.exp(-1j * np.pi * lam * dz_um * f2))
        out[..., c] = np.abs(moved[pad:pad + h, pad:pad + w]) ** 2
    return out


def randomize_look(image_bgr: np.ndarray, rng: np.random.Generator, cfg: LookConfig = DEFAULT_LOOK) -> np.ndarray:
    """One random lab's look applied to a field (BGR uint8 in, BGR uint8 out, same size).

    Stain, hue, pale films, lamp colour, exposure and the lamp field all act on optical density
    (OD = -log transmission): stain and colour as one 3 x 3 map, lamp and exposure as an added
    OD offset. So they cost one log and one exp per pixel together.
    """
    h, w = image_bgr.shape[:2]
    od = cv2.log((image_bgr.astype(np.float32) + 1.0) * np.float32(1.0 / 256.0))
    od = cv2.multiply(od, -1.0)
    m = np.eye(3)  # row-vector convention on BGR OD: od_out = od_in @ m
    if rng.random() < cfg.p_stain:
        a = rng.uniform(*cfg.stain_scale, size=3)
        bgr_from_hed = _RGB_FROM_HED[:, ::-1]
        m = m @ (np.linalg.inv(bgr_from_hed) @ np.diag(a) @ bgr_from_hed)
    do_hue = rng.random() < cfg.p_hue
    if do_hue or rng.random() < 0.5:
        theta = np.deg2rad(rng.uniform(-cfg.hue_deg, cfg.hue_deg)) if do_hue else 0.0
        m = m @ _grey_axis_transform(theta, rng.uniform(*cfg.saturation)).T
    if rng.random() < cfg.p_pale:  # thinner stain: transmission t -> t**k
        m = m * rng.uniform(*cfg.pale)
    od = cv2.transform(od, m.T.astype(np.float32))
    gain = np.full(3, rng.uniform(*cfg.exposure))
    if rng.random() < cfg.p_lamp:
        g = rng.uniform(*cfg.lamp_gain, size=3)
        gain = gain * g / g.max()
    od = od + (-np.log(gain)).astype(np.float32)
    if rng.random() < cfg.p_field:
        od = od - cv2.log(_lamp_field(h, w, rng, cfg))
    img = cv2.exp(-od)  # BGR transmission x lamp, [0, ~1.3]
    # The optics and the camera.
    if cfg.p_defocus > 0 and rng.random() < cfg.p_defocus:
        dz = float(rng.uniform(*cfg.defocus_um)) * (1.0 if rng.random() < 0.5 else -1.0)
        img = fresnel_defocus(img, cell_thickness(image_bgr), dz, float(rng.uniform(*cfg.defocus_phase_rad)))
    if rng.random() < cfg.p_blur:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(*cfg.blur_sigma)))
    if rng.random() < cfg.p_lowres:
        f = rng.uniform(*cfg.lowres)
        small = cv2.resize(img, (max(4, round(w / f)), max(4, round(h / f))), interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    img = np.clip(img, 0.0, 1.0)
    if rng.random() < cfg.p_gamma:
        img = cv2.pow(img, 1.0 / rng.uniform(*cfg.gamma))
    if rng.random() < cfg.p_grey:
        img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    if rng.random() < cfg.p_noise:
        noise = np.empty_like(img)
        sigma = rng.uniform(*cfg.noise_sigma) / 255.0
        # OpenCV draws from its own (thread-global) generator: seed it from ours, so a look is
        # fixed by the caller's generator alone, whatever ran before in the process
        cv2.setRNGSeed(int(rng.integers(2**31 - 1)))
        cv2.randn(noise, 0.0, sigma)
        img = img + noise
    out = cv2.convertScaleAbs(np.clip(img, 0.0, 1.0), alpha=255.0)
    if rng.random() < cfg.p_jpeg:
        q = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(out)
