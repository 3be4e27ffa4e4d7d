"""One synthetic cell: its random geometry and its optical density (the renderer's drawing kit).

Shapes are signed distances in micrometres (circles, capsules, a sickle, lobed nuclei) with a
smoothly wobbling outline; colour is optical density per stain (Beer-Lambert), tilted by the
slide's `StainParams`. `device.synthetic.render_field` places the cells and exposes the field.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# Optical density per unit concentration, in RGB order (the image is converted to BGR at the end).
_OD_RBC = np.array([0.04, 0.40, 0.33], np.float32)  # haemoglobin + eosin: salmon pink
_OD_NUCLEUS = np.array([0.85, 1.30, 0.45], np.float32)  # azure-eosin complex on chromatin: purple
_OD_NEUTRO_CYTO = np.array([0.05, 0.13, 0.07], np.float32)  # pale lilac-pink
_OD_LYMPHO_CYTO = np.array([0.34, 0.20, 0.04], np.float32)  # sky blue
_OD_MONO_CYTO = np.array([0.17, 0.18, 0.11], np.float32)  # grey-blue
_OD_EOS_GRANULE = np.array([0.02, 0.60, 0.85], np.float32)  # orange-red
_OD_BASO_GRANULE = np.array([1.05, 1.45, 0.55], np.float32)  # dark blue-purple
_OD_PLATELET = np.array([0.40, 0.75, 0.25], np.float32)  # purple granulomere
_OD_HYALOMERE = np.array([0.22, 0.22, 0.06], np.float32)  # faint blue rim of a platelet


@dataclass(frozen=True)
class StainParams:
    """How the slide was stained and imaged. `*_hue` tilt the stain colour (-1..1)."""

    background_rgb: tuple[float, float, float] = (234.0, 229.0, 233.0)
    eosin_strength: float = 1.0  # red cells, eosinophil granules, pink cytoplasm
    azure_strength: float = 1.0  # nuclei, blue cytoplasm, platelets, basophil granules
    eosin_hue: float = 0.0  # >0 more orange, <0 more magenta
    azure_hue: float = 0.0  # >0 more blue, <0 more red-purple
    blur_um: float = 0.18  # optical blur (Gaussian sigma)
    noise_dn: float = 1.5  # sensor read noise (plus shot noise) in 8-bit levels
    vignetting: float = 0.06  # relative fall-off of illumination at the corners

    @staticmethod
    def sample(rng: np.random.Generator) -> StainParams:
        """A plausible lab-to-lab / slide-to-slide variation around the reference stain."""
        bg = np.array([234.0, 229.0, 233.0]) + rng.normal(0, 4, 3)
        return StainParams(
            background_rgb=tuple(float(v) for v in np.clip(bg, 200, 250)),  # type: ignore[arg-type]
            eosin_strength=float(np.clip(rng.normal(1.0, 0.15), 0.6, 1.5)),
            azure_strength=float(np.clip(rng.normal(1.0, 0.15), 0.6, 1.5)),
            eosin_hue=float(np.clip(rng.normal(0, 0.4), -1, 1)),
            azure_hue=float(np.clip(rng.normal(0, 0.4), -1, 1)),
            blur_um=float(rng.uniform(0.1, 0.3)),
            noise_dn=float(rng.uniform(1.0, 3.0)),
            vignetting=float(rng.uniform(0.0, 0.1)),
        )


#: The reference stain (StainParams' defaults); frozen, so one instance serves every default.
REFERENCE_STAIN = StainParams()


def _tilt(od: np.ndarray, hue: float) -> np.ndarray:
    return (od * np.exp(hue * np.array([-0.35, 0.0, 0.35]))).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with features of about `sigma_px`."""
    white = rng.standard_normal(shape).astype(np.float32)
    n: np.ndarray = cv2.GaussianBlur(white, (0, 0), max(sigma_px, 0.3))
    return n / max(float(n.std()), 1e-6)


_EDGE_SAMPLES = 256
_EDGE_ANGLES = np.linspace(-np.pi, np.pi, _EDGE_SAMPLES, endpoint=False)


def _harmonic_edge(
    rng: np.random.Generator, theta: np.ndarray, amp: float, k: int = 4
) -> np.ndarray:
    """1 + a smooth random wobble of the outline as a function of angle (a lookup table)."""
    table = np.ones(_EDGE_SAMPLES, np.float32)
    for h in range(2, 2 + k):
        table += amp / h * rng.normal() * np.cos(h * _EDGE_ANGLES + rng.uniform(0, 2 * np.pi))
    idx = ((theta + np.pi) * (_EDGE_SAMPLES / (2 * np.pi))).astype(np.intp) % _EDGE_SAMPLES
    return table[idx]


def cell_geometry(kind: str, variant: str, rng: np.random.Generator) -> dict[str, float]:
    """Random physical parameters (um) of one cell; 'bound' is a circumscribed radius."""
    g: dict[str, float] = {"angle": rng.uniform(0, np.pi), "density": rng.normal(1.0, 0.06)}
    if kind == "rbc":
        d = rng.normal(7.6, 0.35)
        if variant == "spherocyte":
            d = rng.normal(6.2, 0.3)
        a = b = d / 2
        if variant == "ovalocyte":
            a, b = d / 2 * rng.uniform(1.15, 1.3), d / 2 * rng.uniform(0.6, 0.75)
        elif variant != "sickle":
            b = a * rng.uniform(0.93, 1.0)
        if variant == "sickle":
            a, b = rng.uniform(5.0, 6.5), rng.uniform(1.6, 2.3)  # half length, width
        g.update(a=a, b=b, bound=max(a, b) * (1.08 if variant == "echinocyte" else 1.0))
    elif kind == "wbc":
        d = {
            "neutrophil": rng.uniform(10.5, 12.5),
            "lymphocyte": rng.uniform(8.5, 11.0),
            "monocyte": rng.uniform(13.0, 16.0),
            "eosinophil": rng.uniform(11.5, 14.0),
            "basophil": rng.uniform(10.0, 12.5),
        }[variant]
        g.update(a=d / 2, b=d / 2, bound=d / 2 * 1.05)
    else:
        d = rng.uniform(2.0, 3.2)
        g.update(a=d / 2, b=d / 2, bound=d / 2 * 1.25)
    return g


def _circle_sd(u: np.ndarray, v: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.hypot(u - cx, v - cy) - r


def _capsule_sd(u: np.ndarray, v: np.ndarray, p: np.ndarray, q: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to the segment p-q thickened by r."""
    pu, pv, du, dv = u - p[0], v - p[1], q[0] - p[0], q[1] - p[1]
    h = np.clip((pu * du + pv * dv) / max(du * du + dv * dv, 1e-9), 0, 1)
    return np.hypot(pu - h * du, pv - h * dv) - r


def _sickle_sd(u: np.ndarray, v: np.ndarray, half_length: float, width: float) -> np.ndarray:
    """A banana: inside an outer disc, outside a larger inner disc; tips at u = +-half_length."""
    ro = 1.15 * half_length
    v_tip = -math.sqrt(ro * ro - half_length * half_length)
    e = (ro * ro - (ro - width) ** 2) / (2.0 * (v_tip + ro - width))
    ri = e + ro - width
    vo = v + (v_tip - ro) / 2.0  # centre the crescent's extent on the origin
    return np.maximum(np.hypot(u, vo) - ro, -(np.hypot(u, vo - e) - ri))


def _nucleus_sd(
    variant: str, u: np.ndarray, v: np.ndarray, R: float, rng: np.random.Generator
) -> np.ndarray:
    """Signed distance (um) of a white cell's nucleus, in cell-local coordinates."""
    if variant in ("neutrophil", "eosinophil"):
        n_lobes = 2 if variant == "eosinophil" else int(rng.integers(3, 6))
        lobe_r = R * (0.3 if n_lobes == 2 else rng.uniform(0.19, 0.23))
        # Lobes strung along an arc, far enough apart to stay distinct, joined by thin strands.
        arc_r = R * rng.uniform(0.45, 0.55)
        step = 2.3 * lobe_r / arc_r  # radians between neighbouring lobes
        angles = (np.arange(n_lobes) - (n_lobes - 1) / 2) * step + rng.normal(0, 0.08, n_lobes)
        pts = np.stack([arc_r * np.cos(angles), arc_r * np.sin(angles)], 1)
        pts -= pts.mean(0)  # centre the nucleus in the cell
        reach = float(np.max(np.hypot(pts[:, 0], pts[:, 1]))) + 1.15 * lobe_r
        pts *= min(1.0, 0.85 * R / reach)
        sd = np.min([np.hypot((u - x) / 1.15, v - y) - lobe_r for x, y in pts], axis=0)
        for p, q in itertools.pairwise(pts):
            sd = np.minimum(sd, _capsule_sd(u, v, p, q, 0.2))
        return sd
    if variant == "lymphocyte":
        off = R * rng.uniform(0.0, 0.12)
        return np.hypot((u - off) / 1.03, v) - R * rng.uniform(0.78, 0.86)
    if variant == "monocyte":
        # Kidney / horseshoe: an ellipse with a bite taken out of one side.
        body = np.hypot(u / 0.72, v / 0.95) - R * 0.62
        bite = _circle_sd(u, v, R * 0.55, 0.0, R * rng.uniform(0.28, 0.38))
        return np.maximum(body, -bite)
    # basophil: a rounded, partly hidden nucleus
    return np.hypot(u / 1.1, v) - R * 0.55


def cell_od(
    kind: str,
    variant: str,
    g: dict,
    u: np.ndarray,
    v: np.ndarray,
    mpp: float,
    stain: StainParams,
    rng: np.random.Generator,
    tex_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(optical density HxWx3, signed distance HxW in um) of one cell in its local patch.

    Shape parameters come from `rng` (a fixed number of draws per cell, so the layout does not
    depend on the scale); pixel textures, whose draws scale with the patch, from `tex_rng`."""
    a, b = g["a"], g["b"]
    theta = np.arctan2(v, u)
    eos = _tilt(_OD_RBC, stain.eosin_hue) * stain.eosin_strength * g["density"]
    if kind == "rbc":
        rho = np.hypot(u / a, v / b)
        if variant == "sickle":
            # Crescent: a disc minus an offset disc, stretched along u, with pointed ends.
            sd = _sickle_sd(u, v, a, g["b"])
            thickness = np.full_like(u, 1.15)
        else:
            edge = _harmonic_edge(rng, theta, 0.04)
            if variant == "echinocyte":
                edge = edge + 0.07 * np.cos(int(rng.integers(10, 16)) * theta + rng.uniform(0, 6.3))
            sd = (rho - edge) * min(a, b)
            pallor = {
                "normal": 0.62,
                "ovalocyte": 0.55,
                "target": 0.75,
                "spherocyte": 0.0,
                "echinocyte": 0.35,
            }[variant] * rng.uniform(0.85, 1.1)
            r2 = np.square(rho * (1.0 / 0.48))
            thickness = 1.0 - pallor * np.exp(-(r2 * r2))
            if variant == "target":
                thickness += 0.8 * np.exp(-((rho / 0.2) ** 2))
            if variant == "spherocyte":
                thickness = 1.35 - 0.1 * rho**2
            thickness = thickness + 0.12 * np.exp(-(((rho - 0.9) / 0.12) ** 2))  # darker rim
        cov = np.clip(0.5 - sd / mpp, 0.0, 1.0)
        return (cov * thickness)[..., None] * eos, sd
    if kind == "platelet":
        r_edge = a * _harmonic_edge(rng, theta, 0.35)
        sd = np.hypot(u, v) - r_edge
        cov = np.clip(0.5 - sd / mpp, 0.0, 1.0)
        tex = _smooth_noise(tex_rng, u.shape, 0.25 / mpp)
        core = np.clip(1.3 - np.hypot(u, v) / a, 0, 1) * np.clip(0.9 + 0.45 * tex, 0.2, 1.8)
        od = cov[..., None] * _OD_HYALOMERE + (cov * core)[..., None] * _OD_PLATELET
        return od * stain.azure_strength * g["density"], sd
    # White cell: cytoplasm + nucleus + granules.
    R = a
    sd = (np.hypot(u, v) / (R * _harmonic_edge(rng, theta, 0.03)) - 1.0) * R
    cov = np.clip(0.5 - sd / mpp, 0.0, 1.0)
    nuc_sd = _nucleus_sd(variant, u, v, R, rng)
    nuc = np.clip(0.5 - nuc_sd / mpp, 0.0, 1.0) * cov
    azure = stain.azure_strength
    chromatin = np.clip(1.0 + 0.22 * _smooth_noise(tex_rng, u.shape, 0.35 / mpp), 0.5, 1.6)
    nuc_od = _tilt(_OD_NUCLEUS, stain.azure_hue) * azure
    cyto_od = {
        "neutrophil": _OD_NEUTRO_CYTO * stain.eosin_strength,
        "eosinophil": _OD_NEUTRO_CYTO * stain.eosin_strength,
        "lymphocyte": _tilt(_OD_LYMPHO_CYTO, stain.azure_hue) * azure,
        "monocyte": _tilt(_OD_MONO_CYTO, stain.azure_hue) * azure,
        "basophil": _OD_NEUTRO_CYTO * stain.eosin_strength,
    }[variant]
    cyto = cov * (1.0 - nuc)
    if variant == "monocyte":
        chromatin = chromatin * 0.75  # lacy, paler chromatin
    if variant == "lymphocyte":
        chromatin = chromatin * 1.15
    od = cyto[..., None] * cyto_od + (nuc * chromatin)[..., None] * nuc_od
    if variant in ("eosinophil", "basophil", "neutrophil"):
        grain_px = {"eosinophil": 0.22, "basophil": 0.32, "neutrophil": 0.15}[variant] / mpp
        grains = _smooth_noise(tex_rng, u.shape, grain_px)
        frac = {"eosinophil": -0.3, "basophil": 0.3, "neutrophil": 1.0}[variant]
        dots = np.clip((grains - frac) * 2.0, 0.0, 1.0)
        if variant == "eosinophil":
            eos_od = _tilt(_OD_EOS_GRANULE, stain.eosin_hue) * stain.eosin_strength
            od += (dots * cyto * 0.9)[..., None] * eos_od
        elif variant == "basophil":
            od += (dots * cov * 1.1)[..., None] * _tilt(_OD_BASO_GRANULE, stain.azure_hue) * azure
        else:
            od += (dots * cyto * 0.25)[..., None] * _tilt(_OD_NUCLEUS, stain.azure_hue) * azure
    return od, sd
