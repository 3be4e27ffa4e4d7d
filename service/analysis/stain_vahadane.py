"""Vahadane stain normalization: sparse non-negative factorization of optical density, in numpy.

Vahadane et al., "Structure-preserving color normalization and sparse stain separation for
histological images", IEEE TMI 35(8), 2016. A field's optical densities V (pixels x RGB) are
factored as V ~ H W^T with both factors non-negative and the concentrations H sparse (an L1
penalty): each pixel is explained mostly by one stain. The paper solves this with SPAMS'
dictionary learning; here it is two alternating exact steps on a subsample of stained pixels:
the codes (for two stains the non-negative lasso has a closed form,
`stain_transform.nonnegative_lasso_codes`) and the stain vectors (block-coordinate descent,
Mairal et al. JMLR 2010 Alg. 2, projected onto non-negative unit vectors).

For a Wright-Giemsa or May-Gruenwald-Giemsa smear the two stains are the azure (purple: nuclei,
platelets, basophilic cytoplasm; first) and the eosin (pink: red cells; second). A field with
few nuclei is normal in blood: a stain that too few pixels carry is not learned from noise; the
reference's vector and range stand in for it, and the result says so (`FallbackReason`).

Frames are expected illumination-corrected (`illumination`: glass at TARGET_WHITE), as the
reference's fields were: then the glass has optical density 0 and everything above
`tissue_od` is stain. On an uncorrected frame a dim or tinted lamp reads as stain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscope.service.analysis.illumination import TARGET_WHITE
from smearscope.service.analysis.stain import (
    FallbackReason,
    PassThroughReason,
    StainResult,
    check_frame,
    checked_stain_arrays,
    normalized_by,
    parse_reference_json,
    reference_json,
)
from smearscope.service.analysis.stain_transform import (
    StainFit,
    StainTransform,
    nonnegative_lasso_codes,
    optical_density_table,
)

logger = logging.getLogger(__name__)

DEFAULT_REFERENCE_FILE = Path(__file__).parent / "data" / "stain_reference_vahadane.json"

#: Where learning starts when no reference is fitted yet, and what names the learned stains:
#: a Romanowsky azure (purple chromatin) and eosin (pink red cells), unit RGB optical density,
#: rounded from single fields of BCCD, TXL-PBC and PBC (their azure agrees within a few degrees;
#: red cells range from pink to lilac, 20 degrees and more).
ROMANOWSKY_PRIOR = np.column_stack(
    [np.array([0.45, 0.89, 0.08]) / np.linalg.norm([0.45, 0.89, 0.08]),
     np.array([0.30, 0.72, 0.62]) / np.linalg.norm([0.30, 0.72, 0.62])]
)
STAIN_NAMES = ("azure", "eosin")
#: Frames reach this stage with their glass at the illumination stage's white; with this light
#: level the glass has optical density 0 (OD = -log((value + 1) / io)).
DEFAULT_IO = TARGET_WHITE + 1.0
_ABSENT = (FallbackReason.AZURE_ABSENT, FallbackReason.EOSIN_ABSENT)


@dataclass(frozen=True, eq=False)
class VahadaneReference:
    """The fitted target appearance, committed as numbers (data/stain_reference_vahadane.json)."""

    stain_matrix_rgb: np.ndarray  # 3 x 2 unit OD vectors; rows R, G, B; columns azure, eosin
    max_concentrations: np.ndarray  # (2,) robust maximum of each stain's concentration
    io: float = DEFAULT_IO
    source: str = ""

    def __post_init__(self) -> None:
        w, max_c = checked_stain_arrays(self.stain_matrix_rgb, self.max_concentrations)
        if (w < 0).any() or not np.allclose(np.linalg.norm(w, axis=0), 1.0, atol=1e-5):
            raise ValueError("Vahadane stain vectors must be non-negative unit vectors")
        if self.io <= 0:
            raise ValueError(f"io must be positive, got {self.io}")
        w = w / np.linalg.norm(w, axis=0)
        w.setflags(write=False)
        object.__setattr__(self, "stain_matrix_rgb", w)
        object.__setattr__(self, "max_concentrations", max_c)

    def to_json(self) -> str:
        return reference_json("vahadane", self.stain_matrix_rgb, self.max_concentrations,
                              stains=list(STAIN_NAMES), io=self.io, source=self.source)

    @classmethod
    def from_json(cls, text: str) -> VahadaneReference:
        raw = parse_reference_json(text, "vahadane")
        return cls(raw["stain_matrix_rgb"], raw["max_concentrations"], float(raw["io"]),
                   str(raw.get("source", "")))


def learn_stain_vectors(
    od: np.ndarray,
    init: np.ndarray,
    lam: float,
    *,
    learn: tuple[bool, bool] = (True, True),
    iterations: int = 100,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """Sparse non-negative dictionary learning: argmin over W >= 0 (unit columns) and H >= 0 of
    0.5 |V - H W^T|^2 + lam |H|_1, from `init`; V is N x 3, W 3 x 2. Columns not in `learn`
    stay as given. Stops when no column turns by more than `tolerance` radians (about)."""
    w = np.array(init, dtype=np.float64)
    w /= np.linalg.norm(w, axis=0)
    for _ in range(iterations):
        h = nonnegative_lasso_codes(od, w, lam)
        hh = h.T @ h  # 2 x 2
        vh = od.T @ h  # 3 x 2
        before = w.copy()
        for k in range(2):
            if not learn[k] or hh[k, k] <= 1e-12:
                continue  # a stain no pixel uses keeps its vector
            u = np.maximum(w[:, k] + (vh[:, k] - w @ hh[:, k]) / hh[k, k], 0.0)
            norm = np.linalg.norm(u)
            if norm > 1e-12:
                w[:, k] = u / norm
        if np.max(np.linalg.norm(w - before, axis=0)) < tolerance:
            break
    return w


@dataclass(frozen=True)
class _FieldStains:
    stains: np.ndarray | None  # 3 x 2
    max_concentrations: np.ndarray | None  # (2,)
    absent: tuple[bool, bool]
    reason: PassThroughReason | None
    detail: str = ""


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


class VahadaneNormalizer:
    """Vahadane stain normalization with a reference fallback for absent stains.

    Per field, on a deterministic subsample of at most `max_code_pixels` pixels: pixels whose
    OD norm reaches `tissue_od` are stain; of those, the ones at least `dark_ratio` times the
    median stain OD are dark (nuclei, platelets: in any Romanowsky stain the azure-stained
    chromatin is the darkest thing in the field), the rest light (mostly red cells). A stain
    whose pixels are fewer than `min_stain_fraction` of the stain pixels (and at least
    `min_stain_pixels`) is absent. The stains are learned on at most `max_fit_pixels` pixels,
    half dark and half light where there are enough (a few nuclei weigh as much as a field of
    them), starting from the reference's vectors (each learned vector keeps the name of the
    reference's it lies nearer). The learned azure is kept only if it stands `min_separation_deg` from the
    eosin (else both vectors split the red cells' colours) and within `max_azure_deviation_deg`
    of the reference's (else it is an artefact: a scale bar, a scratch); otherwise the azure is
    absent and the eosin is learned alone. Robust maximum of a stain: the `percentile`-th
    percentile of its code over the stain pixels it dominates.
    """

    def __init__(
        self,
        reference: VahadaneReference | None = None,
        *,
        io: float = DEFAULT_IO,
        dictionary_lambda: float = 0.1,
        code_lambda: float = 0.01,
        tissue_od: float = 0.15,
        dark_ratio: float = 2.0,
        min_stain_pixels: int = 100,
        min_stain_fraction: float = 0.003,
        min_separation_deg: float = 12.0,
        max_azure_deviation_deg: float = 45.0,
        max_code_pixels: int | None = 200_000,
        max_fit_pixels: int = 20_000,
        iterations: int = 100,
        percentile: float = 99.0,
    ) -> None:
        self.reference = reference
        self.io = float(reference.io if reference is not None else io)
        self.dictionary_lambda = float(dictionary_lambda)
        self.code_lambda = float(code_lambda)
        self.tissue_od = float(tissue_od)
        self.dark_ratio = float(dark_ratio)
        self.min_stain_pixels = int(min_stain_pixels)
        self.min_stain_fraction = float(min_stain_fraction)
        self.min_separation_deg = float(min_separation_deg)
        self.max_azure_deviation_deg = float(max_azure_deviation_deg)
        self.max_code_pixels = max_code_pixels
        self.max_fit_pixels = int(max_fit_pixels)
        self.iterations = int(iterations)
        self.percentile = float(percentile)
        self._od_lut = optical_density_table(self.io)

    @classmethod
    def default(cls) -> VahadaneNormalizer:
        return cls.from_reference_file()

    @classmethod
    def from_reference_file(cls, path: Path | str | None = None) -> VahadaneNormalizer:
        file = Path(path) if path is not None else DEFAULT_REFERENCE_FILE
        reference = VahadaneReference.from_json(file.read_text(encoding="utf-8"))
        logger.info("Vahadane stain reference %s (%s)", file, reference.source or "unknown")
        return cls(reference)

    # -- the StainNormalizer protocol -----------------------------------------------------
    def fit(self, reference_bgr: np.ndarray) -> None:
        """Fit the target appearance; ValueError unless the field shows both stains."""
        check_frame(reference_bgr)
        found = self.field_stains(reference_bgr, prior=ROMANOWSKY_PRIOR)
        if found.reason is not None or any(found.absent):
            why = found.reason.value if found.reason else "a stain is absent"
            raise ValueError(f"reference field unusable: {why} ({found.detail})")
        assert found.stains is not None and found.max_concentrations is not None
        self.reference = VahadaneReference(found.stains, found.max_concentrations, self.io)

    def normalize(self, image_bgr: np.ndarray) -> StainResult:
        return normalized_by(self.transform_for(image_bgr), image_bgr)

    def transform_for(self, image_bgr: np.ndarray) -> StainFit:
        """This field's transform onto the reference (fit once, apply to a specimen's fields)."""
        check_frame(image_bgr)
        ref = self.reference
        if ref is None:
            raise RuntimeError("VahadaneNormalizer used before fit() or a reference file")
        found = self.field_stains(image_bgr, prior=ref.stain_matrix_rgb)
        if found.reason is not None:
            return StainFit(None, found.reason.value, found.detail)
        assert found.stains is not None and found.max_concentrations is not None
        # An absent stain keeps the reference's vector (field_stains) and range (scale 1).
        max_c = np.where(found.absent, ref.max_concentrations, found.max_concentrations)
        transform = StainTransform(
            found.stains, ref.stain_matrix_rgb, ref.max_concentrations / max_c, self.io,
            code_lambda=self.code_lambda,
        )
        absent = [_ABSENT[k].value for k in range(2) if found.absent[k]]
        return StainFit(transform, ",".join(absent) or None, found.detail)

    # -- estimation -------------------------------------------------------------------------
    def field_stains(self, image_bgr: np.ndarray, prior: np.ndarray) -> _FieldStains:
        """A field's stain vectors and robust maxima; an absent stain keeps the prior's vector."""
        flat = image_bgr.reshape(-1, 3)
        if self.max_code_pixels is not None and flat.shape[0] > self.max_code_pixels:
            flat = flat[np.linspace(0, flat.shape[0] - 1, self.max_code_pixels).astype(np.int64)]
        od = self._od_lut[flat[:, ::-1]]  # N x 3, RGB
        norm = np.sqrt(np.einsum("nk,nk->n", od, od))
        stained = norm >= self.tissue_od
        tissue, norm = od[stained], norm[stained]
        if tissue.shape[0] < 2 * self.min_stain_pixels:
            return _FieldStains(None, None, (True, True), PassThroughReason.TOO_FEW_STAINED_PIXELS,
                                f"{tissue.shape[0]} stained of {flat.shape[0]} sampled pixels")
        # Colour must span a plane: a greyscale frame (one OD direction) has no stains to tell.
        singular = np.linalg.svd(tissue[:: max(1, tissue.shape[0] // 20_000)], compute_uv=False)
        if not singular[1] > 1e-3 * singular[0]:
            return _FieldStains(None, None, (True, True), PassThroughReason.DEGENERATE_COVARIANCE,
                                f"stain optical densities on one direction (singular {singular})")
        dark = norm >= self.dark_ratio * np.median(norm)
        needed = max(self.min_stain_pixels, int(self.min_stain_fraction * tissue.shape[0]))
        n_dark, n_light = int(dark.sum()), int((~dark).sum())
        absent = [n_dark < needed, n_light < needed]
        detail = f"{n_dark} dark and {n_light} light of {tissue.shape[0]} stained pixels"
        sample = np.concatenate(
            [self._evenly(tissue[dark]), self._evenly(tissue[~dark])]
        )
        w = self._learn(sample, prior, absent)
        if not any(absent):
            # Each learned vector is the stain of the prior's it lies nearer (as a pair).
            kept = _angle_deg(w[:, 0], prior[:, 0]) + _angle_deg(w[:, 1], prior[:, 1])
            if _angle_deg(w[:, 1], prior[:, 0]) + _angle_deg(w[:, 0], prior[:, 1]) < kept:
                w = w[:, ::-1].copy()
            separation = _angle_deg(w[:, 0], w[:, 1])
            deviation = _angle_deg(w[:, 0], prior[:, 0])
            if separation < self.min_separation_deg or deviation > self.max_azure_deviation_deg:
                detail += f"; azure {separation:.1f} deg from eosin, {deviation:.1f} from reference"
                absent[0] = True
                if separation >= self.min_separation_deg:
                    # A third colour, neither stain (a scale bar, a mark): the dark pixels are left
                    # out of the eosin's fit and range, the densest red cells among them too (they
                    # stay in where the azure was refused for lying near the eosin).
                    tissue = tissue[~dark]
                    sample = self._evenly(tissue)
                w = self._learn(sample, prior, absent)
        if all(absent):
            return _FieldStains(None, None, (True, True), PassThroughReason.TOO_FEW_STAINED_PIXELS,
                                detail)
        if not np.isfinite(w).all() or _angle_deg(w[:, 0], w[:, 1]) < 1.0:
            return _FieldStains(None, None, (absent[0], absent[1]),
                                PassThroughReason.DEGENERATE_STAIN_MATRIX, detail)
        codes = nonnegative_lasso_codes(tissue, w, self.code_lambda)
        mine = np.argmax(codes, axis=1)
        max_c = np.ones(2)
        for k in range(2):
            if not absent[k] and (mine == k).any():
                max_c[k] = np.percentile(codes[mine == k, k], self.percentile)
        if not (np.isfinite(max_c).all() and (max_c > 0).all()):
            return _FieldStains(None, None, (absent[0], absent[1]),
                                PassThroughReason.DEGENERATE_CONCENTRATIONS,
                                f"robust maxima {max_c.tolist()}")
        return _FieldStains(w, max_c, (absent[0], absent[1]), None, detail)

    def _learn(self, sample: np.ndarray, prior: np.ndarray, absent: list[bool]) -> np.ndarray:
        return learn_stain_vectors(sample, prior, self.dictionary_lambda,
                                   learn=(not absent[0], not absent[1]),
                                   iterations=self.iterations)

    def _evenly(self, pixels: np.ndarray) -> np.ndarray:
        """At most half of `max_fit_pixels` rows, evenly spaced."""
        cap = self.max_fit_pixels // 2
        if pixels.shape[0] <= cap:
            return pixels
        return pixels[np.linspace(0, pixels.shape[0] - 1, cap).astype(np.int64)]
