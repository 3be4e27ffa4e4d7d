"""A synthetic Wright/Giemsa peripheral-blood smear: the virtual microscope behind `simulated`.

`render_field(seed, ...)` draws a field of red cells, white cells and platelets and returns the
`Frame` together with exact ground truth (`TruthCell`s). Physical sizes are in micrometres and
only turned into pixels through `microns_per_pixel`, so any scale from 0.05 to 0.5 um/px draws
the same smear. Colour follows Beer-Lambert: each stain adds optical density (OD) and the image is
background * exp(-OD), so overlapping cells darken each other as in a real thin smear.
Deterministic per seed (one `numpy.random.Generator`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from smearscope.device.frame import Frame

logger = logging.getLogger(__name__)

CellKindName = Literal["rbc", "wbc", "platelet"]

WBC_SUBTYPES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
RBC_MORPHOLOGIES: tuple[str, ...] = (
    "normal",
    "target",
    "spherocyte",
    "ovalocyte",
    "sickle",
    "echinocyte",
)
#: Roughly a normal differential.
DEFAULT_WBC_MIX: Mapping[str, float] = {
    "neutrophil": 0.55,
    "lymphocyte": 0.30,
    "monocyte": 0.07,
    "eosinophil": 0.05,
    "basophil": 0.03,
}
#: Mostly normal red cells with a few of each abnormal shape, so every shape shows up in a demo.
DEFAULT_RBC_MIX: Mapping[str, float] = {
    "normal": 0.88,
    "target": 0.025,
    "spherocyte": 0.025,
    "ovalocyte": 0.03,
    "sickle": 0.02,
    "echinocyte": 0.02,
}

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


@dataclass(frozen=True)
class TruthCell:
    """One drawn cell, exactly as drawn.

    `bbox` is (x0, y0, x1, y1) in whole pixels of the rendered image, end exclusive, clipped to
    the frame and tight to `mask`. `mask` is boolean and bbox-LOCAL: shape (y1-y0, x1-x0), pixel
    [r, c] is frame pixel (y0+r, x0+c). Masks are whole outlines (amodal): where two cells overlap
    both masks include the overlap. `center` is in frame pixels and may lie outside the frame for
    a cell cut by the frame edge; `diameter_um` is the equivalent-circle diameter of the whole
    (unclipped) outline.
    """

    kind: CellKindName
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    center: tuple[float, float]
    diameter_um: float
    cut_by_frame_edge: bool
    subtype: str | None = None  # WBC only: one of WBC_SUBTYPES
    morphology: str | None = None  # RBC only: one of RBC_MORPHOLOGIES

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The mask pasted into a height x width frame."""
        out = np.zeros((height, width), bool)
        x0, y0, x1, y1 = self.bbox
        out[y0:y1, x0:x1] = self.mask
        return out


@dataclass(frozen=True)
class SyntheticField:
    frame: Frame
    cells: tuple[TruthCell, ...]


def _tilt(od: np.ndarray, hue: float) -> np.ndarray:
    return (od * np.exp(hue * np.array([-0.35, 0.0, 0.35]))).astype(np.float32)


def _choose(rng: np.random.Generator, mix: Mapping[str, float], allowed: tuple[str, ...]) -> str:
    names = list(mix)
    unknown = set(names) - set(allowed)
    if unknown:
        raise ValueError(f"unknown names {sorted(unknown)}; allowed {allowed}")
    p = np.array([mix[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


class _Placer:
    """Sequential dart throwing in micrometres; a cell either keeps clear of all others or is
    placed against a random neighbour, overlapping it by at most ~18% of the summed radii.

    Placed cells live in a bucket grid whose pitch exceeds any clearance that can be asked for,
    so a candidate is only checked against the 3 x 3 buckets around it.
    """

    GAP_UM = 0.3
    MIN_TOUCH_RATIO = 0.82

    def __init__(self, bounds: tuple[float, float, float, float], capacity: int, max_r: float):
        self.bounds = bounds
        self.xy = np.zeros((capacity, 2))
        self.r = np.zeros(capacity)
        self.n = 0
        self.pitch = 2.0 * max_r + self.GAP_UM
        nx = int(math.ceil((bounds[2] - bounds[0]) / self.pitch)) + 3
        ny = int(math.ceil((bounds[3] - bounds[1]) / self.pitch)) + 3
        self.grid = np.full((ny, nx, 8), -1, np.intp)
        self.count = np.zeros((ny, nx), np.intp)

    def _bucket(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bx = np.clip(
            ((pts[:, 0] - self.bounds[0]) // self.pitch).astype(np.intp) + 1,
            1,
            self.grid.shape[1] - 2,
        )
        by = np.clip(
            ((pts[:, 1] - self.bounds[1]) // self.pitch).astype(np.intp) + 1,
            1,
            self.grid.shape[0] - 2,
        )
        return bx, by

    def place(
        self, r: float, touching: bool, rng: np.random.Generator, rounds: int = 4
    ) -> tuple[float, float] | None:
        """Centre (um) of a new cell of bounding radius `r`, or None when no room was found."""
        for _ in range(rounds):
            pos = self._try(r, touching, rng, 8)
            if pos is not None:
                return pos
        return None

    def _try(
        self, r: float, touching: bool, rng: np.random.Generator, tries: int
    ) -> tuple[float, float] | None:
        x0, y0, x1, y1 = self.bounds
        if touching and self.n:
            partner = rng.integers(0, self.n, tries)
            ang = rng.uniform(0, 2 * np.pi, tries)
            dist = (r + self.r[partner]) * rng.uniform(self.MIN_TOUCH_RATIO + 0.02, 1.0, tries)
            cand = self.xy[partner] + dist[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
            clearance, ratio = 0.0, self.MIN_TOUCH_RATIO
        else:
            cand = np.stack([rng.uniform(x0, x1, tries), rng.uniform(y0, y1, tries)], 1)
            clearance, ratio = self.GAP_UM, 1.0
        ok = (cand[:, 0] > x0) & (cand[:, 0] < x1) & (cand[:, 1] > y0) & (cand[:, 1] < y1)
        bx, by = self._bucket(cand)
        d3 = np.arange(-1, 2)
        near = self.grid[
            by[:, None, None] + d3[None, :, None], bx[:, None, None] + d3[None, None, :]
        ]
        near = near.reshape(tries, -1)
        valid = near >= 0
        idx = np.where(valid, near, 0)
        d = np.hypot(cand[:, None, 0] - self.xy[idx, 0], cand[:, None, 1] - self.xy[idx, 1])
        need = (r + self.r[idx]) * ratio + clearance
        ok &= ((d >= need) | ~valid).all(1)
        hits = np.flatnonzero(ok)
        if hits.size == 0:
            return None
        c = cand[hits[0]]
        self._add(c, r)
        return float(c[0]), float(c[1])

    def _add(self, c: np.ndarray, r: float) -> None:
        i = self.n
        self.xy[i], self.r[i] = c, r
        self.n += 1
        bx, by = (int(b[0]) for b in self._bucket(c[None, :]))
        k = self.count[by, bx]
        if k == self.grid.shape[2]:
            grow = np.full(self.grid.shape[:2] + (k,), -1, np.intp)
            self.grid = np.concatenate([self.grid, grow], axis=2)
        self.grid[by, bx, k] = i
        self.count[by, bx] = k + 1


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


def _cell_geometry(kind: str, variant: str, rng: np.random.Generator) -> dict[str, float]:
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
        for p, q in zip(pts[:-1], pts[1:]):
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


def _cell_od(
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


def render_field(
    seed: int,
    width: int = 1280,
    height: int = 960,
    microns_per_pixel: float = 0.2,
    stain: StainParams = StainParams(),
    rbc_density: float = 0.38,
    n_wbc: int | None = None,
    n_platelets: int | None = None,
    touching_fraction: float = 0.25,
    rbc_mix: Mapping[str, float] = DEFAULT_RBC_MIX,
    wbc_mix: Mapping[str, float] = DEFAULT_WBC_MIX,
    frame_id: str | None = None,
    source: str = "synthetic",
) -> SyntheticField:
    """Render one field of view and its ground truth.

    `rbc_density` is the fraction of the field's area covered by red cells (a monolayer is about
    0.3-0.5); denser requests are filled as far as dart throwing allows. `touching_fraction` is
    the probability that a cell is placed against another one (touching or overlapping slightly)
    rather than clear of all others. `n_wbc` / `n_platelets` default to typical numbers for the
    field's area (about 3 white cells and 1 platelet per 15 red cells in a 256 x 192 um field).
    The same seed and the same physical field size (width x height x microns_per_pixel) give the
    same cells at any scale; `seed` must be non-negative.
    """
    if not 0.05 <= microns_per_pixel <= 0.5:
        raise ValueError(f"microns_per_pixel must be within 0.05..0.5, got {microns_per_pixel}")
    if width < 1 or height < 1:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    # Separate streams: the layout (what is where) is the same for a seed at any scale.
    layout_seq, texture_seq, sensor_seq = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(layout_seq)
    tex_rng = np.random.default_rng(texture_seq)
    mpp = microns_per_pixel
    w_um, h_um = width * mpp, height * mpp
    margin = 8.0  # um: centres may lie just outside so that cells are cut by the frame edge
    bounds = (-margin / 2, -margin / 2, w_um + margin / 2, h_um + margin / 2)
    area_um2 = (w_um + margin) * (h_um + margin)
    n_rbc = int(round(rbc_density * area_um2 / (np.pi * 3.8**2)))
    if n_wbc is None:
        n_wbc = int(rng.poisson(3.0 * w_um * h_um / (256.0 * 192.0)))
    if n_platelets is None:
        n_platelets = int(rng.poisson(n_rbc / 15.0))

    # WBCs first (largest), then red cells, then platelets in the gaps.
    plan = (
        [("wbc", _choose(rng, wbc_mix, WBC_SUBTYPES)) for _ in range(n_wbc)]
        + [("rbc", _choose(rng, rbc_mix, RBC_MORPHOLOGIES)) for _ in range(n_rbc)]
        + [("platelet", "")] * n_platelets
    )
    geometry = [_cell_geometry(kind, variant, rng) for kind, variant in plan]
    max_r = max((g["bound"] for g in geometry), default=1.0)
    placer = _Placer(bounds, len(plan), max_r)
    od_map = np.zeros((height, width, 3), np.float32)
    cells: list[TruthCell] = []
    for (kind, variant), g in zip(plan, geometry):
        pos = placer.place(g["bound"], bool(rng.random() < touching_fraction), rng)
        if pos is None:
            continue
        cx, cy = pos[0] / mpp, pos[1] / mpp  # centre in pixels
        rad = g["bound"] * 1.1 / mpp + 2
        px0, py0 = int(math.floor(cx - rad)), int(math.floor(cy - rad))
        px1, py1 = int(math.ceil(cx + rad)) + 1, int(math.ceil(cy + rad)) + 1
        X = ((np.arange(px0, px1) + 0.5 - cx) * mpp).astype(np.float32)[None, :]
        Y = ((np.arange(py0, py1) + 0.5 - cy) * mpp).astype(np.float32)[:, None]
        ca, sa = math.cos(g["angle"]), math.sin(g["angle"])
        u, v = X * ca + Y * sa, -X * sa + Y * ca
        od, sd = _cell_od(kind, variant, g, u, v, mpp, stain, rng, tex_rng)
        whole = sd < 0
        cx0, cy0, cx1, cy1 = max(px0, 0), max(py0, 0), min(px1, width), min(py1, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        local = (slice(cy0 - py0, cy1 - py0), slice(cx0 - px0, cx1 - px0))
        od_map[cy0:cy1, cx0:cx1] += od[local]
        visible = whole[local]
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        mask = np.ascontiguousarray(visible[r0:r1, c0:c1])
        mask.setflags(write=False)
        cells.append(
            TruthCell(
                kind=kind,  # type: ignore[arg-type]
                bbox=(int(cx0 + c0), int(cy0 + r0), int(cx0 + c1), int(cy0 + r1)),
                mask=mask,
                center=(cx, cy),
                diameter_um=float(2.0 * math.sqrt(whole.sum() * mpp * mpp / math.pi)),
                cut_by_frame_edge=bool(visible.sum() < whole.sum()),
                subtype=variant if kind == "wbc" else None,
                morphology=variant if kind == "rbc" else None,
            )
        )
    pixels = _expose(od_map, stain, mpp, np.random.default_rng(sensor_seq))
    logger.debug("rendered field seed=%d %dx%d: %d cells", seed, width, height, len(cells))
    frame = Frame(
        pixels=pixels,
        frame_id=frame_id if frame_id is not None else f"synthetic-{seed}",
        source=source,
        microns_per_pixel=mpp,
    )
    return SyntheticField(frame=frame, cells=tuple(cells))


def _expose(
    od_map: np.ndarray, stain: StainParams, mpp: float, rng: np.random.Generator
) -> np.ndarray:
    """Optical density -> BGR uint8: illumination, blur, shot + read noise."""
    h, w = od_map.shape[:2]
    norm = (w / 2) ** 2 + (h / 2) ** 2
    xx = ((np.arange(w, dtype=np.float32) - w / 2) ** 2 / norm)[None, :]
    yy = ((np.arange(h, dtype=np.float32) - h / 2) ** 2 / norm)[:, None]
    light = (1.0 - stain.vignetting * (xx + yy))[..., None] * np.asarray(
        stain.background_rgb, np.float32
    )
    img = light * np.exp(-od_map)
    if stain.blur_um > 0:
        img = cv2.GaussianBlur(img, (0, 0), stain.blur_um / mpp)
    noise_sd = np.sqrt(stain.noise_dn**2 + 0.02 * img)
    img = img + noise_sd * rng.standard_normal(img.shape, dtype=np.float32)
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])
