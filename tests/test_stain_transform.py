"""Stage 3 (stain), fast application: `StainTransform.apply` against its float64 definition.

Every 8-bit colour is pushed through (a 2^24-colour cube is too slow for a test, so every
colour on a 5-bit grid plus a dense slab of dark values, where the log is steepest), for the
least-squares (Macenko) and the lasso (Vahadane) transforms. No timing here: speed lives in
bench/bench_stain.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.device.synthetic_cells import StainParams
from smearscope.service.analysis.stain_transform import StainTransform, nonnegative_lasso_codes


def _unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


FIELD = np.column_stack([_unit(0.45, 0.89, 0.10), _unit(0.30, 0.72, 0.62)])
REFERENCE = np.column_stack([_unit(0.42, 0.90, 0.14), _unit(0.47, 0.68, 0.56)])


def _colours() -> np.ndarray:
    """Every colour on a 5-bit grid, and every colour with all channels below 24: N x 1 x 3."""
    grid = np.arange(0, 256, 8, dtype=np.uint8)
    dark = np.arange(0, 24, dtype=np.uint8)
    cubes = [np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3) for v in (grid, dark)]
    return np.concatenate(cubes)[:, None, :]


TRANSFORMS = {
    "least_squares": StainTransform(FIELD, REFERENCE, np.array([0.8, 1.3]), 240.0),
    "lasso": StainTransform(FIELD, REFERENCE, np.array([0.8, 1.3]), 236.0, code_lambda=0.01),
    "lasso_strong_l1": StainTransform(FIELD, REFERENCE, np.array([1.5, 0.6]), 236.0, code_lambda=0.2),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_fast_matches_exact_on_every_colour(name: str) -> None:
    transform = TRANSFORMS[name]
    colours = _colours()
    diff = np.abs(transform.apply(colours).astype(int) - transform.apply_exact(colours))
    assert diff.max() <= 1, (name, diff.max())  # float32 vs float64 at a rounding edge
    assert (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_fast_matches_exact_on_a_rendered_field(name: str) -> None:
    """A whole frame, several strips long and of an odd size (the last strip is short)."""
    stain = StainParams(eosin_hue=0.4, azure_hue=-0.3)
    frame = render_field(7, width=613, height=301, microns_per_pixel=0.2, stain=stain).frame.pixels
    transform = TRANSFORMS[name]
    out = transform.apply(frame)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - transform.apply_exact(frame)).max() <= 1


def test_identity_transform_returns_the_frame_one_level_up() -> None:
    """Source = target and scale 1 (least squares): a colour in the stain plane comes back one
    grey level brighter, torchstain's convention (OD of value + 1, rendered as io * exp(-OD))."""
    transform = StainTransform(REFERENCE, REFERENCE, np.ones(2), 240.0)
    amounts = np.random.default_rng(0).uniform(0, 2, (5000, 2))
    rgb = 240.0 * np.exp(-amounts @ REFERENCE.T) - 1.0
    colours = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)[:, None, ::-1]
    in_plane = colours.min(axis=2)[:, 0] > 20  # rounding moves dark colours off the plane most
    diff = transform.apply(colours).astype(int) - colours - 1
    assert np.abs(diff[in_plane]).max() <= 1 and np.abs(diff[in_plane]).mean() < 0.5


def test_lasso_codes_satisfy_the_optimality_conditions() -> None:
    """KKT of argmin 0.5|v - S h|^2 + lam sum(h), h >= 0: the gradient g = S^T(S h - v) + lam is
    zero where h > 0 and non-negative where h = 0."""
    rng = np.random.default_rng(1)
    od = np.concatenate([rng.uniform(-0.1, 2.0, (20000, 3)), rng.uniform(0, 0.05, (2000, 3))])
    for lam in (0.0, 0.01, 0.1, 0.5):
        h = nonnegative_lasso_codes(od, FIELD, lam)
        grad = (h @ FIELD.T - od) @ FIELD + lam
        assert (h >= 0).all()
        assert np.abs(grad[h > 1e-12]).max() < 1e-9
        assert grad[h <= 1e-12].min() > -1e-9
        assert (h == 0).any(axis=1).mean() > 0.05  # the penalty and the bound really bite


def test_lasso_codes_match_spams() -> None:
    """The closed form against SPAMS' LARS lasso (what staintools' Vahadane calls per pixel)."""
    spams = pytest.importorskip("spams", reason="spams-bin (test extra) not installed")
    od = np.random.default_rng(2).uniform(0, 1.5, (5000, 3))
    for lam in (0.01, 0.1):
        theirs = spams.lasso(np.asfortranarray(od.T), D=np.asfortranarray(FIELD), mode=2,
                             lambda1=lam, pos=True)
        np.testing.assert_allclose(nonnegative_lasso_codes(od, FIELD, lam), theirs.toarray().T,
                                   atol=1e-6)


def test_empty_frame_and_validation() -> None:
    transform = TRANSFORMS["lasso"]
    empty = np.zeros((0, 5, 3), np.uint8)
    assert transform.apply(empty).shape == (0, 5, 3)
    with pytest.raises(ValueError, match="shapes"):
        StainTransform(FIELD[:2], REFERENCE, np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        StainTransform(FIELD, REFERENCE, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="unit"):
        StainTransform(2 * FIELD, REFERENCE, np.ones(2), code_lambda=0.01)
    with pytest.raises(ValueError, match="coincide"):
        StainTransform(np.column_stack([FIELD[:, 0]] * 2), REFERENCE, np.ones(2), code_lambda=0.01)
    # a microradian apart: the Gram matrix of the closed-form lasso is singular to working precision
    turned = FIELD[:, 0] + 1e-6 * np.cross(FIELD[:, 0], FIELD[:, 1])
    with pytest.raises(ValueError, match="coincide"):
        StainTransform(np.column_stack([FIELD[:, 0], turned / np.linalg.norm(turned)]), REFERENCE, np.ones(2),
                       code_lambda=0.01)
    with pytest.raises(ValueError, match="code_lambda"):
        StainTransform(FIELD, REFERENCE, np.ones(2), code_lambda=-0.01)
    for io in (0.0, -240.0):
        with pytest.raises(ValueError, match="io must be positive"):
            StainTransform(FIELD, REFERENCE, np.ones(2), io)
    StainTransform(FIELD, REFERENCE, np.ones(2), code_lambda=0.0)  # no penalty: still the lasso's bound
