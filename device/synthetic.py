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
from smearscope.device.synthetic_cells import REFERENCE_STAIN, StainParams, cell_geometry, cell_od

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
        nx = math.ceil((bounds[2] - bounds[0]) / self.pitch) + 3
        ny = math.ceil((bounds[3] - bounds[1]) / self.pitch) + 3
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


def render_field(
    seed: int,
    width: int = 1280,
    height: int = 960,
    microns_per_pixel: float = 0.2,
    stain: StainParams = REFERENCE_STAIN,
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
    n_rbc = round(rbc_density * area_um2 / (np.pi * 3.8**2))
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
    geometry = [cell_geometry(kind, variant, rng) for kind, variant in plan]
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
        px0, py0 = math.floor(cx - rad), math.floor(cy - rad)
        px1, py1 = math.ceil(cx + rad) + 1, math.ceil(cy + rad) + 1
        X = ((np.arange(px0, px1) + 0.5 - cx) * mpp).astype(np.float32)[None, :]
        Y = ((np.arange(py0, py1) + 0.5 - cy) * mpp).astype(np.float32)[:, None]
        ca, sa = math.cos(g["angle"]), math.sin(g["angle"])
        u, v = X * ca + Y * sa, -X * sa + Y * ca
        od, sd = cell_od(kind, variant, g, u, v, mpp, stain, rng, tex_rng)
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
