"""Stage 3 (stain): Macenko parity with torchstain's numpy backend, and honest pass-through.

Fields are rendered here from known stain vectors (Beer-Lambert), so the tests need no dataset;
the BCCD checks at the end run only where the dataset is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from smearscope.service.analysis.stain import (
    DEFAULT_REFERENCE_FILE,
    MacenkoNormalizer,
    PassThroughNormalizer,
    PassThroughReason,
    StainNormalizer,
    StainReference,
    StainResult,
    available_methods,
    create_normalizer,
)

torchstain = pytest.importorskip("torchstain", reason="torchstain (test extra) not installed")

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SMEARSCOPE_DATA", REPO.parent / "shared" / "datasets"))
BCCD_IMAGES = DATA / "bccd" / "BCCD" / "JPEGImages"


def _unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


#: Columns: purple (azure, nuclear) stain, pink (eosin) stain, as RGB optical density; close to
#: what Macenko finds in Wright-Giemsa smears.
REFERENCE_STAINS = np.column_stack([_unit([0.55, 0.75, 0.37]), _unit([0.20, 0.70, 0.68])])
#: Another lab's batch: hues tilted, so normalization has real work to do.
TARGET_STAINS = np.column_stack([_unit([0.40, 0.85, 0.34]), _unit([0.28, 0.80, 0.53])])


def concentration_maps(height: int, width: int, seed: int) -> np.ndarray:
    """2 x H x W stain amounts: pink discs (red cells), a few purple nuclei, empty background."""
    rng = np.random.default_rng(seed)
    purple = np.zeros((height, width), np.float32)
    pink = np.zeros((height, width), np.float32)
    for _ in range(height * width // 1500):
        c = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(pink, c, int(rng.integers(12, 20)), float(rng.uniform(0.6, 1.1)), -1)
    for _ in range(max(1, height * width // 10000)):
        c = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(pink, c, 30, 0.3, -1)
        cv2.circle(purple, c, int(rng.integers(12, 22)), float(rng.uniform(0.9, 1.5)), -1)
    maps = np.stack([purple, pink])
    maps = np.stack([cv2.GaussianBlur(m, (0, 0), 1.5) for m in maps])
    return maps * rng.uniform(0.9, 1.1, maps.shape).astype(np.float32)


def render(stains: np.ndarray, maps: np.ndarray, seed: int = 0, light: float = 250.0) -> np.ndarray:
    """Beer-Lambert: light * exp(-stains @ amounts) plus sensor noise, as BGR uint8."""
    rgb = light * np.exp(-np.einsum("ks,shw->hwk", stains, maps))
    rgb += np.random.default_rng(seed).normal(0.0, 1.5, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)[:, :, ::-1]


@pytest.fixture(scope="module")
def reference_field() -> np.ndarray:
    return render(REFERENCE_STAINS, concentration_maps(240, 320, seed=1), seed=1)


@pytest.fixture(scope="module")
def target_maps() -> np.ndarray:
    return concentration_maps(240, 320, seed=2)


@pytest.fixture(scope="module")
def target_field(target_maps: np.ndarray) -> np.ndarray:
    return render(TARGET_STAINS, 1.3 * target_maps, seed=2)  # other hues, and darker


def _torchstain_fitted(reference_bgr: np.ndarray):  # type: ignore[no-untyped-def]
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(reference_bgr[:, :, ::-1].copy(), Io=240, alpha=1, beta=0.15)
    return ts


def _torchstain_normalize(ts, image_bgr: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    out, _, _ = ts.normalize(image_bgr[:, :, ::-1].copy(), Io=240, alpha=1, beta=0.15, stains=False)
    return out[:, :, ::-1]


# --- parity with torchstain ------------------------------------------------------------------


def test_fit_matches_torchstain(reference_field: np.ndarray) -> None:
    ours = MacenkoNormalizer(max_fit_pixels=None)
    ours.fit(reference_field)
    theirs = _torchstain_fitted(reference_field)
    assert ours.reference is not None
    np.testing.assert_allclose(ours.reference.stain_matrix_rgb, theirs.HERef, atol=1e-9)
    # Our concentrations are float32: the 99th percentiles agree to float32 precision.
    np.testing.assert_allclose(ours.reference.max_concentrations, theirs.maxCRef, rtol=1e-5)


def test_normalize_matches_torchstain(
    reference_field: np.ndarray, target_field: np.ndarray
) -> None:
    """Same numbers up to quantisation: torchstain truncates to uint8, we round.

    So every pixel may differ by at most one grey level, and about half of them do.
    """
    ours = MacenkoNormalizer(max_fit_pixels=None)
    ours.fit(reference_field)
    result = ours.normalize(target_field)
    expected = _torchstain_normalize(_torchstain_fitted(reference_field), target_field)
    assert result.applied and result.reason is None
    diff = np.abs(result.pixels.astype(int) - expected.astype(int))
    assert diff.max() <= 1
    assert diff.mean() < 0.6
    # Rounding is never below truncation: the one-level differences all go one way.
    assert (result.pixels.astype(int) >= expected.astype(int)).all()


def test_subsampled_fit_stays_close_to_torchstain(reference_field: np.ndarray) -> None:
    """The default estimates the stain plane from a deterministic subset of stained pixels."""
    maps = concentration_maps(480, 640, seed=3)
    big_target = render(TARGET_STAINS, maps, seed=3)
    ours = MacenkoNormalizer(max_fit_pixels=20_000)
    stained = int((big_target.max(axis=2) <= 205).sum())
    assert stained > 3 * 20_000  # the subset really is a subset
    ours.fit(reference_field)
    first = ours.normalize(big_target)
    expected = _torchstain_normalize(_torchstain_fitted(reference_field), big_target)
    diff = np.abs(first.pixels.astype(int) - expected.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 2
    np.testing.assert_array_equal(ours.normalize(big_target).pixels, first.pixels)  # deterministic


# --- the method does its job ----------------------------------------------------------------


def test_fit_recovers_the_rendered_stain_vectors(reference_field: np.ndarray) -> None:
    ours = MacenkoNormalizer()
    ours.fit(reference_field)
    assert ours.reference is not None
    he = ours.reference.stain_matrix_rgb
    cos = np.sum(he * REFERENCE_STAINS, axis=0)  # both unit columns
    assert (cos > 0.99).all(), cos  # also checks the order: purple first, pink second


def test_normalized_target_looks_like_reference_stain(
    reference_field: np.ndarray, target_maps: np.ndarray, target_field: np.ndarray
) -> None:
    """Same cells rendered in two stains: normalization moves one onto the other."""
    ours = MacenkoNormalizer()
    ours.fit(reference_field)
    in_reference_stain = render(REFERENCE_STAINS, target_maps, seed=2).astype(float)
    cells = in_reference_stain.max(axis=2) <= 200
    before = np.abs(target_field.astype(float) - in_reference_stain)[cells].mean()
    after = np.abs(ours.normalize(target_field).pixels.astype(float) - in_reference_stain)[cells]
    assert after.mean() < before / 3, (before, after.mean())


def test_reference_field_is_nearly_a_fixed_point(reference_field: np.ndarray) -> None:
    ours = MacenkoNormalizer()
    ours.fit(reference_field)
    out = ours.normalize(reference_field)
    assert out.applied
    assert np.abs(out.pixels.astype(float) - reference_field).mean() < 3.0


def test_640x480_is_fast(reference_field: np.ndarray) -> None:
    """A guard against per-pixel Python, not a benchmark (the CI box may be busy)."""
    ours = MacenkoNormalizer()
    ours.fit(reference_field)
    frame = render(TARGET_STAINS, concentration_maps(480, 640, seed=4), seed=4)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        assert ours.normalize(frame).applied
        times.append(time.perf_counter() - t)
    assert min(times) < 0.5, times


# --- pass-through, never a crash ------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted() -> MacenkoNormalizer:
    return MacenkoNormalizer.from_reference_file()


def _nearly_blank() -> np.ndarray:
    field = np.full((240, 320, 3), 245, np.uint8)
    cv2.circle(field, (100, 100), 6, (170, 110, 190), -1)  # one speck of stain, ~110 pixels
    return field


@pytest.mark.parametrize(
    ("name", "field", "reason"),
    [
        ("white", np.full((240, 320, 3), 255, np.uint8), "too_few_stained_pixels"),
        ("background_grey", np.full((240, 320, 3), 238, np.uint8), "too_few_stained_pixels"),
        ("nearly_blank", _nearly_blank(), "too_few_stained_pixels"),
        (
            "tiny",
            render(REFERENCE_STAINS, concentration_maps(20, 20, seed=5) + 0.5),
            "too_few_stained_pixels",
        ),
        ("empty", np.zeros((0, 0, 3), np.uint8), "too_few_stained_pixels"),
        ("black", np.zeros((240, 320, 3), np.uint8), "degenerate_covariance"),
        (
            "one_flat_colour",
            np.full((240, 320, 3), (170, 110, 190), np.uint8),
            "degenerate_covariance",
        ),
    ],
)
def test_unusable_fields_pass_through(
    fitted: MacenkoNormalizer, name: str, field: np.ndarray, reason: str
) -> None:
    result = fitted.normalize(field)
    assert not result.applied
    assert result.reason == reason
    np.testing.assert_array_equal(result.pixels, field)


def _stained_pixels(n: int, height: int = 240, width: int = 320) -> np.ndarray:
    """Glass (245: optical density below 0 at io 240) with `n` pixels of both reference stains
    in random amounts (0.8-1.5 purple, 0.5-1.2 pink: OD over 0.5 in every channel, stained)."""
    amounts = np.random.default_rng(n).uniform([0.8, 0.5], [1.5, 1.2], (n, 2))
    rgb = np.rint(240.0 * np.exp(-amounts @ REFERENCE_STAINS.T)).astype(np.uint8)
    field = np.full((height * width, 3), 245, np.uint8)
    field[:n] = rgb[:, ::-1]
    return field.reshape(height, width, 3)


def test_the_fewest_stained_pixels_a_field_is_normalized_on(fitted: MacenkoNormalizer) -> None:
    """At least 1000 stained pixels, or 0.1 % of a larger frame's pixels (1200 of 1200 x 1000)."""
    assert not fitted.normalize(_stained_pixels(999)).applied
    assert fitted.normalize(_stained_pixels(999)).reason == "too_few_stained_pixels"
    assert fitted.normalize(_stained_pixels(1000)).applied
    big = fitted.normalize(_stained_pixels(1199, 1000, 1200))
    assert not big.applied and big.reason == "too_few_stained_pixels"
    # counted enough (1.3 % stained at 1000 above normalizes; 0.1 % passes the count, though its
    # 99th-percentile concentrations fall on the glass)
    assert fitted.normalize(_stained_pixels(1200, 1000, 1200)).reason != "too_few_stained_pixels"


def test_single_direction_stain_is_degenerate(fitted: MacenkoNormalizer) -> None:
    """Every stained pixel on one OD ray (one dye, varying amount): no plane, no second stain."""
    amount = np.linspace(0.3, 1.5, 240 * 320).reshape(240, 320)
    rgb = 240.0 * np.exp(-amount[:, :, None] * REFERENCE_STAINS[:, 1])
    field = np.rint(rgb).astype(np.uint8)[:, :, ::-1]
    result = fitted.normalize(field)
    assert not result.applied
    assert result.reason in {r.value for r in PassThroughReason}


def test_fit_on_blank_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="too_few_stained_pixels"):
        MacenkoNormalizer().fit(np.full((240, 320, 3), 250, np.uint8))


def test_contract_violations_raise(fitted: MacenkoNormalizer) -> None:
    with pytest.raises(TypeError):
        fitted.normalize(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError):
        fitted.normalize(np.zeros((64, 64), np.uint8))
    with pytest.raises(RuntimeError):
        MacenkoNormalizer().normalize(np.zeros((64, 64, 3), np.uint8))


# --- registry and shipped reference ---------------------------------------------------------


def test_registry() -> None:
    assert available_methods() == ("macenko", "none", "vahadane")
    macenko = create_normalizer("macenko")
    assert isinstance(macenko, MacenkoNormalizer) and isinstance(macenko, StainNormalizer)
    assert macenko.reference is not None
    none = create_normalizer("none")
    assert isinstance(none, PassThroughNormalizer) and isinstance(none, StainNormalizer)
    frame = np.full((64, 64, 3), 200, np.uint8)
    assert none.normalize(frame) == StainResult(frame, applied=False, reason="disabled")
    for unknown in ("Vahadane", "Macenko", ""):
        with pytest.raises(ValueError, match="known: macenko, none, vahadane"):
            create_normalizer(unknown)


def test_shipped_reference_is_sane() -> None:
    raw = json.loads(DEFAULT_REFERENCE_FILE.read_text())
    ref = MacenkoNormalizer.from_reference_file().reference
    assert ref is not None
    np.testing.assert_allclose(ref.stain_matrix_rgb, raw["stain_matrix_rgb"])
    np.testing.assert_allclose(np.linalg.norm(ref.stain_matrix_rgb, axis=0), 1.0, atol=1e-5)
    assert (ref.stain_matrix_rgb > 0).all() and (ref.max_concentrations > 0).all()
    assert ref.stain_matrix_rgb[0, 0] > ref.stain_matrix_rgb[0, 1]  # purple absorbs more red
    assert (ref.io, ref.alpha, ref.beta) == (240.0, 1.0, 0.15)
    assert "BCCD" in ref.source


def test_reference_validation_and_round_trip() -> None:
    ref = StainReference(REFERENCE_STAINS, np.array([1.2, 0.8]), source="synthetic")
    again = StainReference.from_json(ref.to_json())
    np.testing.assert_allclose(again.stain_matrix_rgb, ref.stain_matrix_rgb, atol=1e-6)
    assert again.source == "synthetic"
    with pytest.raises(ValueError):
        StainReference(REFERENCE_STAINS[:2], np.array([1.0, 1.0]))
    with pytest.raises(ValueError):
        StainReference(REFERENCE_STAINS, np.array([1.0, 0.0]))
    with pytest.raises(ValueError):
        StainReference.from_json(json.dumps({"method": "vahadane"}))
    # alpha is the percentile each extreme angle is taken at: 0 <= alpha < 50
    for bad in ({"alpha": 50.0}, {"alpha": -1.0}, {"io": 0.0}, {"beta": -0.1}):
        with pytest.raises(ValueError, match="parameters"):
            StainReference(REFERENCE_STAINS, np.array([1.0, 1.0]), **bad)  # type: ignore[arg-type]
    StainReference(REFERENCE_STAINS, np.array([1.0, 1.0]), alpha=0.0, beta=0.0)


def test_daemon_imports_stay_torch_free() -> None:
    code = (
        "import sys, numpy as np\n"
        "import smearscope.service.ingest, smearscope.service.analysis.stain as stain\n"
        "stain.create_normalizer('macenko').normalize(np.full((64, 64, 3), 200, np.uint8))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchstain')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# --- real stained fields (only where the dataset is present) --------------------------------

needs_bccd = pytest.mark.skipif(
    not (BCCD_IMAGES / "BloodImage_00000.jpg").is_file(),
    reason=f"BCCD images not found under {BCCD_IMAGES} (set SMEARSCOPE_DATA)",
)


@pytest.mark.realdata
@needs_bccd
def test_shipped_reference_is_what_the_fit_tool_produces(tmp_path: Path) -> None:
    out = tmp_path / "ref.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "fit_stain_reference.py"), "--out", str(out)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    fresh = StainReference.from_json(out.read_text())
    shipped = StainReference.from_json(DEFAULT_REFERENCE_FILE.read_text())
    np.testing.assert_allclose(fresh.stain_matrix_rgb, shipped.stain_matrix_rgb, atol=1e-6)
    np.testing.assert_allclose(fresh.max_concentrations, shipped.max_concentrations, atol=1e-6)


@pytest.mark.realdata
@needs_bccd
@pytest.mark.parametrize("name", ["BloodImage_00100.jpg", "BloodImage_00250.jpg"])
def test_bccd_field_matches_torchstain(fitted: MacenkoNormalizer, name: str) -> None:
    path = BCCD_IMAGES / name
    if not path.is_file():
        pytest.skip(f"{path} not in this copy of BCCD")
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    reference_bgr = cv2.imread(str(BCCD_IMAGES / "BloodImage_00000.jpg"), cv2.IMREAD_COLOR)
    result = fitted.normalize(frame)
    assert result.applied
    expected = _torchstain_normalize(_torchstain_fitted(reference_bgr), frame)
    diff = np.abs(result.pixels.astype(int) - expected.astype(int))
    # Default settings estimate the plane on 100k of the stained pixels: a little beyond 1 level.
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 2
