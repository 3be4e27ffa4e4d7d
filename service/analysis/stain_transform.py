"""A fitted stain transform, and its application at frame rate.

A normalizer fits a `StainTransform` to a field (or once to a specimen) and applies it to any
number of frames. Per pixel the transform is a fixed function of the pixel's colour: optical
density (OD) by Beer-Lambert, the two stains' concentrations in the field's own stain vectors,
each rescaled to the reference's range, and the colour those concentrations give in the
reference's stain vectors. Concentrations are either least squares (Macenko, as torchstain
computes them) or non-negative lasso codes (Vahadane: the sparse code of the dictionary learning).

`apply` runs it as a handful of OpenCV passes over strips of the frame, in float32: OD from a
256-entry table (cv2.LUT), the stain algebra as small matrices (cv2.transform), the non-negative
lasso in closed form (cv2.min / cv2.max), exp, and rounding. `apply_exact` is the float64 numpy
definition it is held to (tests: within one grey level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

#: Pixels per strip of `apply`: the float32 intermediates of a strip stay in a core's cache.
_STRIP_PIXELS = 1 << 16


@dataclass(frozen=True)
class StainFit:
    """What fitting a field gave: a transform, or None and the reason (a pass-through reason).

    With a transform, `reason` may still name what the fit could not learn from this field and
    took from the reference instead (e.g. an absent stain); `detail` is for logs."""

    transform: StainTransform | None
    reason: str | None = None
    detail: str = ""


@dataclass(frozen=True, eq=False)
class StainTransform:
    """One field's stains onto the reference's, per pixel; stain matrices are 3 x 2 RGB OD.

    `source_stains` and `target_stains` hold unit columns (azure/purple first, eosin/pink
    second); `scale` multiplies the source concentrations (reference over field robust maximum).
    `code_lambda` None: least-squares concentrations (may be negative); a number: non-negative
    lasso codes, argmin_h 0.5 * |od - S h|^2 + code_lambda * sum(h), h >= 0.
    """

    source_stains: np.ndarray
    target_stains: np.ndarray
    scale: np.ndarray
    io: float = 240.0
    code_lambda: float | None = None

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("source_stains", "target_stains", "scale"):
            a = np.array(getattr(self, name), dtype=np.float64)
            a.setflags(write=False)
            arrays[name] = a
            object.__setattr__(self, name, a)
        src, dst, scale = arrays["source_stains"], arrays["target_stains"], arrays["scale"]
        if src.shape != (3, 2) or dst.shape != (3, 2) or scale.shape != (2,):
            raise ValueError(f"stain transform shapes {src.shape}, {dst.shape}, {scale.shape}")
        if not (np.isfinite(src).all() and np.isfinite(dst).all() and np.isfinite(scale).all()):
            raise ValueError("stain transform must be finite")
        if self.io <= 0:
            raise ValueError(f"io must be positive, got {self.io}")
        if self.code_lambda is not None:
            if self.code_lambda < 0:
                raise ValueError(f"code_lambda must be >= 0, got {self.code_lambda}")
            # The closed-form lasso below holds for unit, non-negative, distinct stain vectors.
            if (src < 0).any() or not np.allclose(np.linalg.norm(src, axis=0), 1.0, atol=1e-6):
                raise ValueError("lasso codes need non-negative unit source stain vectors")
            if src[:, 0] @ src[:, 1] > 1.0 - 1e-9:
                raise ValueError("source stain vectors coincide")

    # -- the definition -------------------------------------------------------------------
    def concentrations(self, od_rgb: np.ndarray) -> np.ndarray:
        """N x 2 stain concentrations of N x 3 RGB optical densities (float64)."""
        od = np.asarray(od_rgb, dtype=np.float64)
        if self.code_lambda is None:
            return od @ np.linalg.pinv(self.source_stains).T
        return nonnegative_lasso_codes(od, self.source_stains, self.code_lambda)

    def apply_exact(self, image_bgr: np.ndarray) -> np.ndarray:
        """The transform in float64, pixel by pixel: what `apply` must reproduce."""
        rgb = image_bgr.reshape(-1, 3)[:, ::-1].astype(np.float64)
        od = -np.log((rgb + 1.0) / self.io)
        c = self.concentrations(od) * self.scale
        out = np.minimum(self.io * np.exp(-c @ self.target_stains.T), 255.0)
        return np.rint(out[:, ::-1]).astype(np.uint8).reshape(image_bgr.shape)

    # -- at frame rate --------------------------------------------------------------------
    def apply(self, image_bgr: np.ndarray) -> np.ndarray:
        """The transform of an H x W x 3 BGR uint8 frame, fast (float32, OpenCV)."""
        if image_bgr.size == 0:
            return image_bgr.copy()
        flat = np.ascontiguousarray(image_bgr).reshape(-1, 1, 3)  # a column of pixels
        out = np.empty_like(flat)
        table = _od_table(self.io)
        if self.code_lambda is None:
            linear = self._linear_matrix()
            for start in range(0, flat.shape[0], _STRIP_PIXELS):
                od = cv2.LUT(flat[start : start + _STRIP_PIXELS], table)
                log_out = cv2.transform(od, linear)
                # exp, then round and saturate to 0..255 (convertScaleAbs: |x| is x here)
                out[start : start + _STRIP_PIXELS] = cv2.convertScaleAbs(cv2.exp(log_out))
        else:
            code, gram_inv, render = self._code_matrix(), self._gram_inverse(), self._render_matrix()
            for start in range(0, flat.shape[0], _STRIP_PIXELS):
                od = cv2.LUT(flat[start : start + _STRIP_PIXELS], table)
                a = cv2.transform(od, code)  # S^T od - lambda
                both = cv2.transform(a, gram_inv)  # both stains active
                np.minimum(both, a, out=both)
                np.maximum(both, 0.0, out=both)  # the lasso codes (see nonnegative_lasso_codes)
                log_out = cv2.transform(both, render)
                out[start : start + _STRIP_PIXELS] = cv2.convertScaleAbs(cv2.exp(log_out))
        return out.reshape(image_bgr.shape)

    def _linear_matrix(self) -> np.ndarray:
        """3 x 4, BGR: log(out) = log(io) - T S' diag(scale) pinv(S) od."""
        m = self.target_stains @ np.diag(self.scale) @ np.linalg.pinv(self.source_stains)
        return np.hstack([-m[::-1, ::-1], np.full((3, 1), np.log(self.io))]).astype(np.float32)

    def _code_matrix(self) -> np.ndarray:
        """3 x 4: S^T od - lambda (od in BGR order), and a third, zero channel.

        Three channels throughout: cv2.transform has fast paths for 3 -> 3 but not 3 -> 2."""
        lam = float(self.code_lambda or 0.0)
        m = np.zeros((3, 4))
        m[:2, :3] = self.source_stains[::-1].T
        m[:2, 3] = -lam
        return m.astype(np.float32)

    def _gram_inverse(self) -> np.ndarray:
        m = np.zeros((3, 3))
        m[:2, :2] = np.linalg.inv(self.source_stains.T @ self.source_stains)
        return m.astype(np.float32)

    def _render_matrix(self) -> np.ndarray:
        """3 x 4, BGR rows: log(out) = log(io) - T diag(scale) h."""
        m = np.zeros((3, 4))
        m[:, :2] = -(self.target_stains @ np.diag(self.scale))[::-1]
        m[:, 3] = np.log(self.io)
        return m.astype(np.float32)


def nonnegative_lasso_codes(od: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """argmin_h 0.5 |od - S h|^2 + lam * sum(h), h >= 0, for every row of `od`, in closed form.

    With two unit stain vectors of non-negative cosine g, the problem is a 2-D quadratic over
    the positive quadrant: a = S^T od - lam; both stains active gives G^-1 a, one stain alone
    gives max(a_k, 0). Where G^-1 a has a negative entry the other one exceeds its a_k (g >= 0),
    and where it has none it does not; so h = max(0, min(G^-1 a, a)), row by row, is the optimum.
    """
    a = od @ stains - lam
    both = a @ np.linalg.inv(stains.T @ stains).T
    return np.maximum(np.minimum(both, a), 0.0)


def optical_density_table(io: float) -> np.ndarray:
    """256 float64: the optical density (natural log) of every 8-bit value under a lamp of
    intensity `io`, value + 1 so that black stays finite; the one definition of OD the normalizers'
    fits and `apply` share, so a pixel's per-pixel log becomes a table lookup."""
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / io)


_OD_TABLES: dict[float, np.ndarray] = {}


def _od_table(io: float) -> np.ndarray:
    """256 x 1 x 3 float32: the optical density of every 8-bit value, for cv2.LUT."""
    table = _OD_TABLES.get(io)
    if table is None:
        od = optical_density_table(io)
        table = np.repeat(od[:, None, None], 3, axis=2).astype(np.float32)
        _OD_TABLES[io] = table
    return table
