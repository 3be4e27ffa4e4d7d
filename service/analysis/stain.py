"""Stage 3: stain normalization, so every frame reaches the models in one reference stain.

API after torchstain: `fit(reference)` once, `normalize(image)` per frame. The daemon does not
fit a reference at run time: references are fitted offline (tools/fit_stain_reference.py) and
ship as numbers in service/analysis/data/. Per frame a normalizer fits the frame's own stains
(`transform_for`, on a subsample) and applies the resulting `StainTransform` at frame rate; a
caller may also fit once per specimen and apply that transform to every field.

Images are BGR uint8 (OpenCV order) at the boundary; stain vectors are kept in RGB optical
density, as in the literature and in torchstain, so the numbers compare directly.

Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI
2009. The method is written for H&E; in a Wright-Giemsa blood smear its first vector (the one
absorbing most red light) is the purple azure/nuclear stain and the second the pink eosin.
Vahadane (sparse non-negative factorization) is in stain_vahadane.py.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from smearscope.service.analysis.stain_transform import (
    StainFit,
    StainTransform,
    optical_density_table,
)

logger = logging.getLogger(__name__)

DEFAULT_REFERENCE_FILE = Path(__file__).parent / "data" / "stain_reference.json"


@dataclass(frozen=True)
class StainResult:
    """A normalized frame (BGR uint8), or the input passed through with the reason why.

    A normalized frame may carry a reason too (`FallbackReason`): part of the reference stood in
    for what the frame could not show."""

    pixels: np.ndarray
    applied: bool
    reason: str | None = None


def normalized_by(fitted: StainFit, image_bgr: np.ndarray) -> StainResult:
    """A frame through its own field's fit (a normalizer's `normalize`): the transform applied,
    with what the reference stood in for (the fit's reason), or the frame passed through with why."""
    if fitted.transform is None:
        logger.debug("stain normalization skipped: %s (%s)", fitted.reason, fitted.detail)
        return StainResult(image_bgr, applied=False, reason=fitted.reason)
    return StainResult(fitted.transform.apply(image_bgr), applied=True, reason=fitted.reason)


class PassThroughReason(str, Enum):
    """Why a frame was left unnormalized (StainResult.reason). Values are stable strings."""

    #: Method "none" was configured.
    DISABLED = "disabled"
    #: Fewer stained pixels than the minimum: blank, nearly blank or tiny field.
    TOO_FEW_STAINED_PIXELS = "too_few_stained_pixels"
    #: The stained pixels' optical densities span less than a plane (e.g. one flat colour).
    DEGENERATE_COVARIANCE = "degenerate_covariance"
    #: The two extreme stain directions coincide or are not finite.
    DEGENERATE_STAIN_MATRIX = "degenerate_stain_matrix"
    #: A stain's 99th-percentile concentration is not positive: nothing to rescale.
    DEGENERATE_CONCENTRATIONS = "degenerate_concentrations"


class FallbackReason(str, Enum):
    """Why a normalized frame used part of the reference (StainResult.reason, applied=True)."""

    #: Too few pixels carry the azure (nuclear) stain: its vector and range are the reference's.
    AZURE_ABSENT = "azure_stain_absent"
    #: Too few pixels carry the eosin (red-cell) stain: its vector and range are the reference's.
    EOSIN_ABSENT = "eosin_stain_absent"


@runtime_checkable
class StainNormalizer(Protocol):
    """Maps a frame's stain appearance onto a fitted reference appearance."""

    def fit(self, reference_bgr: np.ndarray) -> None:
        """Learn the target appearance from a reference field (BGR uint8)."""
        ...

    def normalize(self, image_bgr: np.ndarray) -> StainResult:
        """The frame in the reference appearance; never raises for a field's content."""
        ...


#: method name -> "module:Class"; a class is imported only when its method is chosen. Each class
#: provides `default()`, a normalizer ready to use (fitted to the shipped reference if it needs
#: one).
_REGISTRY: dict[str, str] = {
    "none": "smearscope.service.analysis.stain:PassThroughNormalizer",
    "macenko": "smearscope.service.analysis.stain:MacenkoNormalizer",
    "vahadane": "smearscope.service.analysis.stain_vahadane:VahadaneNormalizer",
}


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def create_normalizer(method: str) -> StainNormalizer:
    """The ready-to-use normalizer registered under `method`; ValueError for an unknown name."""
    try:
        target = _REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"unknown stain normalization method {method!r}; "
            f"known: {', '.join(available_methods())}"
        ) from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    normalizer: StainNormalizer = cls.default()
    return normalizer


def check_frame(image_bgr: np.ndarray) -> None:
    if not isinstance(image_bgr, np.ndarray) or image_bgr.dtype != np.uint8:
        raise TypeError("stain normalization takes a uint8 numpy array")
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 BGR frame, got shape {image_bgr.shape}")


class PassThroughNormalizer:
    """Method "none": frames go on as they came."""

    @classmethod
    def default(cls) -> PassThroughNormalizer:
        return cls()

    def fit(self, reference_bgr: np.ndarray) -> None:
        check_frame(reference_bgr)

    def normalize(self, image_bgr: np.ndarray) -> StainResult:
        check_frame(image_bgr)
        return StainResult(image_bgr, applied=False, reason=PassThroughReason.DISABLED.value)


@dataclass(frozen=True)
class StainReference:
    """The fitted target appearance: what is committed instead of a reference image."""

    stain_matrix_rgb: np.ndarray  # 3 x 2 unit OD vectors; rows R, G, B; columns H, E
    max_concentrations: np.ndarray  # (2,) 99th-percentile concentration of H and E
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    source: str = ""

    def __post_init__(self) -> None:
        he, max_c = checked_stain_arrays(self.stain_matrix_rgb, self.max_concentrations)
        if self.io <= 0 or not 0 <= self.alpha < 50 or self.beta < 0:
            raise ValueError(
                f"stain reference parameters io={self.io} alpha={self.alpha} beta={self.beta}"
            )
        object.__setattr__(self, "stain_matrix_rgb", he)
        object.__setattr__(self, "max_concentrations", max_c)

    def to_json(self) -> str:
        return reference_json(
            "macenko", self.stain_matrix_rgb, self.max_concentrations,
            io=self.io, alpha=self.alpha, beta=self.beta, source=self.source,
        )

    @classmethod
    def from_json(cls, text: str) -> StainReference:
        raw = parse_reference_json(text, "macenko")
        return cls(raw["stain_matrix_rgb"], raw["max_concentrations"], float(raw["io"]),
                   float(raw["alpha"]), float(raw["beta"]), str(raw.get("source", "")))


def checked_stain_arrays(stain_matrix: object, max_concentrations: object
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Read-only float64 copies of a reference's 3 x 2 stain matrix and (2,) robust maxima;
    ValueError unless both are finite and the maxima positive."""
    matrix = np.array(stain_matrix, dtype=np.float64)
    max_c = np.array(max_concentrations, dtype=np.float64)
    if matrix.shape != (3, 2) or max_c.shape != (2,):
        raise ValueError(f"stain reference shapes {matrix.shape}, {max_c.shape}; want (3,2), (2,)")
    if not (np.isfinite(matrix).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
        raise ValueError("stain reference must be finite with positive max concentrations")
    matrix.setflags(write=False)
    max_c.setflags(write=False)
    return matrix, max_c


def reference_json(method: str, stain_matrix: np.ndarray, max_concentrations: np.ndarray,
                   **fields: object) -> str:
    """A reference as committed: the method, its numbers (6 decimals) and its other fields."""
    return json.dumps(
        {
            "method": method,
            "stain_matrix_rgb": stain_matrix.round(6).tolist(),
            "max_concentrations": max_concentrations.round(6).tolist(),
            **fields,
        },
        indent=2,
    )


def parse_reference_json(text: str, method: str) -> dict:
    """The fields of a committed reference of `method` (arrays as float64); ValueError otherwise."""
    raw = json.loads(text)
    if raw.get("method") != method:
        raise ValueError(f"not a {method} stain reference (method={raw.get('method')!r})")
    for key in ("stain_matrix_rgb", "max_concentrations"):
        raw[key] = np.array(raw[key], dtype=np.float64)
    return dict(raw)


@dataclass(frozen=True)
class _StainEstimate:
    stain_matrix: np.ndarray | None  # 3 x 2
    max_concentrations: np.ndarray | None  # (2,)
    reason: PassThroughReason | None
    detail: str = ""


def _unusable(reason: PassThroughReason, detail: str) -> _StainEstimate:
    return _StainEstimate(None, None, reason, detail)


class MacenkoNormalizer:
    """Macenko stain normalization, vectorised numpy, numerically the method torchstain ships.

    Departures from torchstain's numpy backend, none of which changes a well-posed result:
    * the stain plane is estimated on at most `max_fit_pixels` stained pixels, and the 99th
      percentiles on at most `max_fit_pixels` of all pixels, taken at evenly spaced indices
      (deterministic and fast); None uses them all, as torchstain does;
    * the transform is applied in float32 with OpenCV (`StainTransform.apply`, within one grey
      level of float64) and the output is rounded to the nearest grey level (torchstain truncates);
    * ill-posed fields are passed through with a reason instead of producing NaN or garbage.
    (The eigenvectors' arbitrary signs need no fixing: flipping either one mirrors the angles,
    and the two extreme angles map back to the same pair of stain vectors.)
    """

    def __init__(
        self,
        reference: StainReference | None = None,
        *,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_stained_pixels: int = 1000,
        min_stained_fraction: float = 0.001,
        max_fit_pixels: int | None = 100_000,
        min_stain_angle_deg: float = 1.0,
    ) -> None:
        if reference is not None:
            io, alpha, beta = reference.io, reference.alpha, reference.beta
        self.io = float(io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.min_stained_pixels = int(min_stained_pixels)
        self.min_stained_fraction = float(min_stained_fraction)
        self.max_fit_pixels = max_fit_pixels
        self.min_stain_angle_deg = float(min_stain_angle_deg)
        self.reference = reference
        self._od_lut = optical_density_table(self.io)
        # OD falls as intensity rises, so "OD >= beta in every channel" is "brightest channel
        # <= this value": one comparison per pixel instead of three logs.
        stained_values = np.flatnonzero(self._od_lut >= self.beta)
        self._max_stained_value = int(stained_values.max()) if stained_values.size else -1

    @classmethod
    def default(cls) -> MacenkoNormalizer:
        return cls.from_reference_file()

    @classmethod
    def from_reference_file(cls, path: Path | str | None = None) -> MacenkoNormalizer:
        """A normalizer fitted to the shipped (or a given) reference JSON."""
        file = Path(path) if path is not None else DEFAULT_REFERENCE_FILE
        reference = StainReference.from_json(file.read_text(encoding="utf-8"))
        logger.info("stain reference %s (fitted on %s)", file, reference.source or "unknown")
        return cls(reference)

    def fit(self, reference_bgr: np.ndarray) -> None:
        """Fit the target appearance; ValueError when the field cannot define one."""
        check_frame(reference_bgr)
        est = self._estimate(reference_bgr)
        if est.reason is not None:
            raise ValueError(f"reference field unusable: {est.reason.value} ({est.detail})")
        assert est.stain_matrix is not None and est.max_concentrations is not None
        self.reference = StainReference(
            est.stain_matrix, est.max_concentrations, self.io, self.alpha, self.beta
        )

    def normalize(self, image_bgr: np.ndarray) -> StainResult:
        return normalized_by(self.transform_for(image_bgr), image_bgr)

    def transform_for(self, image_bgr: np.ndarray) -> StainFit:
        """This field's transform onto the reference (fit once, apply to a specimen's fields)."""
        check_frame(image_bgr)
        if self.reference is None:
            raise RuntimeError("MacenkoNormalizer.normalize before fit() or a reference file")
        est = self._estimate(image_bgr)
        if est.reason is not None:
            return StainFit(None, est.reason.value, est.detail)
        assert est.stain_matrix is not None and est.max_concentrations is not None
        scale = self.reference.max_concentrations / est.max_concentrations
        return StainFit(
            StainTransform(est.stain_matrix, self.reference.stain_matrix_rgb, scale, self.io)
        )

    def _evenly(self, n: int) -> np.ndarray | slice:
        """At most `max_fit_pixels` evenly spaced indices of n (all of them when None)."""
        if self.max_fit_pixels is None or n <= self.max_fit_pixels:
            return slice(None)
        return np.linspace(0, n - 1, self.max_fit_pixels).astype(np.int64)

    def _estimate(self, image_bgr: np.ndarray) -> _StainEstimate:
        """Stain matrix and the 99th percentiles of its concentrations for one field."""
        flat = image_bgr.reshape(-1, 3)
        if flat.shape[0] == 0:
            return _unusable(PassThroughReason.TOO_FEW_STAINED_PIXELS, "empty field")
        brightest = cv2.max(cv2.max(image_bgr[:, :, 0], image_bgr[:, :, 1]), image_bgr[:, :, 2])
        stained_idx = np.flatnonzero(brightest.reshape(-1) <= self._max_stained_value)
        needed = max(self.min_stained_pixels, int(self.min_stained_fraction * flat.shape[0]))
        if stained_idx.size < needed:
            return _unusable(
                PassThroughReason.TOO_FEW_STAINED_PIXELS,
                f"{stained_idx.size} stained pixels < {needed}",
            )
        stained_idx = stained_idx[self._evenly(stained_idx.size)]
        stained = self._od_lut[flat[stained_idx][:, ::-1]]  # n x 3 RGB optical density

        cov = np.cov(stained.T)
        if not np.isfinite(cov).all():
            return _unusable(PassThroughReason.DEGENERATE_COVARIANCE, "non-finite covariance")
        eigvals, eigvecs = np.linalg.eigh(cov)
        # Below (1e-3 OD)^2 the second direction is numerical dust, far under one grey level.
        if not eigvals[1] > 1e-6:
            return _unusable(
                PassThroughReason.DEGENERATE_COVARIANCE, f"eigenvalues {eigvals.tolist()}"
            )
        plane = eigvecs[:, 1:3]  # the two largest; angles are measured from the second
        projected = np.einsum("nk,kj->nj", stained, plane)
        phi = np.arctan2(projected[:, 1], projected[:, 0])
        min_phi, max_phi = np.percentile(phi, [self.alpha, 100.0 - self.alpha])
        v_min = plane @ np.array([np.cos(min_phi), np.sin(min_phi)])
        v_max = plane @ np.array([np.cos(max_phi), np.sin(max_phi)])
        # Hematoxylin (here: the azure/nuclear stain) absorbs more red: it goes first.
        he = np.column_stack((v_min, v_max) if v_min[0] > v_max[0] else (v_max, v_min))
        cos_angle = float(np.clip(he[:, 0] @ he[:, 1], -1.0, 1.0))
        angle = np.degrees(np.arccos(cos_angle))
        if not np.isfinite(he).all() or angle < self.min_stain_angle_deg:
            return _unusable(
                PassThroughReason.DEGENERATE_STAIN_MATRIX, f"stain vectors {angle:.2f} degrees apart"
            )

        # Least squares for the (sampled) pixels at once: the pseudo-inverse is what lstsq would
        # apply. float32: half the memory traffic, far below one grey level of error. einsum,
        # not @: BLAS threads on a skinny 2x3 product cost more than the arithmetic (and stall
        # badly when the cores are busy).
        sampled = flat[self._evenly(flat.shape[0])]
        od = self._od_lut.astype(np.float32)[sampled.T[::-1]]  # 3 x n, rows R, G, B
        concentrations = np.einsum("sk,kn->sn", np.linalg.pinv(he).astype(np.float32), od)
        max_c = np.percentile(concentrations, 99, axis=1)
        if not (np.isfinite(max_c).all() and (max_c > 0).all()):
            return _unusable(
                PassThroughReason.DEGENERATE_CONCENTRATIONS, f"99th percentiles {max_c.tolist()}"
            )
        return _StainEstimate(he, max_c.astype(np.float64), None)
