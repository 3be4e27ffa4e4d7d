"""Stage 3 (stain): Vahadane normalization, held against SPAMS and against the renderer's stains.

No Vahadane implementation ships in torchstain (Macenko and Reinhard only); the independent
reference here is SPAMS itself (spams-bin, the library Vahadane et al. and staintools use):
the same dictionary learning problem, solved by its own code. The rest are properties on fields
rendered with known stains (`smearscope.device.synthetic`), corrected for illumination as the
analyzer's frames are before this stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smearscope.device.synthetic import render_field

# The renderer's per-stain optical densities and hue tilt: the ground truth of its stains.
from smearscope.device.synthetic_cells import _OD_NUCLEUS, _OD_RBC, StainParams, _tilt
from smearscope.service.analysis.illumination import TARGET_WHITE, correct_illumination
from smearscope.service.analysis.stain import StainNormalizer, create_normalizer
from smearscope.service.analysis.stain_transform import nonnegative_lasso_codes
from smearscope.service.analysis.stain_vahadane import (
    DEFAULT_REFERENCE_FILE,
    ROMANOWSKY_PRIOR,
    VahadaneNormalizer,
    VahadaneReference,
    learn_stain_vectors,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SMEARSCOPE_DATA", REPO.parent / "shared" / "datasets"))


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) / np.linalg.norm(v)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))))


def rendered_stains(stain: StainParams) -> np.ndarray:
    """3 x 2 unit RGB OD: the renderer's nuclear (azure) and red-cell (eosin) colours."""
    return np.column_stack(
        [_unit(_tilt(_OD_NUCLEUS, stain.azure_hue)), _unit(_tilt(_OD_RBC, stain.eosin_hue))]
    )


def field(stain: StainParams, seed: int = 3, **kwargs: int) -> np.ndarray:
    """A rendered field, illumination-corrected (glass at the stain stage's white)."""
    size = {"width": 640, "height": 480, **kwargs}
    frame = render_field(seed, microns_per_pixel=0.2, stain=stain, **size).frame.pixels
    return correct_illumination(frame).pixels


#: Another lab's stain: hues turned and strengths changed about 1.5 to 2 standard deviations of
#: `StainParams.sample`, on a bluish lamp (illumination correction takes that out).
OTHER_LAB = StainParams(background_rgb=(225.0, 232.0, 240.0), eosin_strength=1.3,
                        azure_strength=0.75, eosin_hue=0.8, azure_hue=-0.7)


@pytest.fixture(scope="module")
def reference_field() -> np.ndarray:
    return field(StainParams())


@pytest.fixture(scope="module")
def fitted(reference_field: np.ndarray) -> VahadaneNormalizer:
    normalizer = VahadaneNormalizer()
    normalizer.fit(reference_field)
    return normalizer


# --- the independent reference: SPAMS -----------------------------------------------------


def test_dictionary_learning_matches_spams(reference_field: np.ndarray) -> None:
    """Same problem (0.5|V - WH|^2 + 0.1|H|_1, W and H non-negative, unit atoms), same answer."""
    spams = pytest.importorskip("spams", reason="spams-bin (test extra) not installed")
    normalizer = VahadaneNormalizer()
    od = normalizer._od_lut[reference_field.reshape(-1, 3)[::7, ::-1]]
    od = od[np.linalg.norm(od, axis=1) >= normalizer.tissue_od]
    ours = learn_stain_vectors(od, ROMANOWSKY_PRIOR, 0.1, iterations=300)
    theirs = spams.trainDL(X=np.asfortranarray(od.T), D=np.asfortranarray(ROMANOWSKY_PRIOR),
                           K=2, lambda1=0.1, mode=2, modeD=0, posAlpha=True, posD=True,
                           iter=-10, verbose=False)
    theirs = theirs / np.linalg.norm(theirs, axis=0)
    angles = [_angle(ours[:, k], theirs[:, k]) for k in range(2)]
    assert max(angles) < 0.5, angles
    # And the codes SPAMS gives for our stain vectors are ours.
    codes = spams.lasso(np.asfortranarray(od[:2000].T), D=np.asfortranarray(ours), mode=2,
                        lambda1=0.01, pos=True)
    np.testing.assert_allclose(nonnegative_lasso_codes(od[:2000], ours, 0.01),
                               codes.toarray().T, atol=1e-6)


# --- the method does its job --------------------------------------------------------------


@pytest.mark.parametrize(
    "stain",
    [StainParams(), StainParams(azure_hue=0.5, eosin_hue=0.15), OTHER_LAB,
     StainParams(eosin_strength=0.8, azure_strength=1.2, eosin_hue=-0.3, azure_hue=-0.2)],
    ids=["reference", "bluer", "other_lab", "pale_magenta"],
)
def test_recovers_the_rendered_stain_vectors(stain: StainParams) -> None:
    """Azure within 3 degrees (the renderer's nuclei sit in cytoplasm of other blues), eosin
    within 1 (measured: 0.6-1.7 and 0.0-0.2 on these and on sampled stains)."""
    found = VahadaneNormalizer().field_stains(field(stain), prior=ROMANOWSKY_PRIOR)
    assert found.reason is None and not any(found.absent), found.detail
    assert found.stains is not None
    truth = rendered_stains(stain)
    assert _angle(found.stains[:, 0], truth[:, 0]) < 3.0
    assert _angle(found.stains[:, 1], truth[:, 1]) < 1.0


def _errors(image: np.ndarray, target: np.ndarray, normalizer: VahadaneNormalizer
            ) -> dict[str, float]:
    """Mean absolute grey-level error against `target` over its purple and its pink pixels."""
    od = normalizer._od_lut[target[..., ::-1]]
    purple = od[..., 0] > 0.35  # absorbs red: nuclei and the darkest platelets
    pink = (np.linalg.norm(od, axis=2) > 0.2) & ~purple
    diff = np.abs(image.astype(float) - target)
    return {"purple": float(diff[purple].mean()), "pink": float(diff[pink].mean())}


def test_restained_field_comes_back_to_the_reference(fitted: VahadaneNormalizer) -> None:
    """The same cells in the reference stain and in another lab's: normalization moves one onto
    the other. Measured (640x480): purple 17.7 -> 5.1, pink 16.5 -> 2.0 grey levels."""
    target = field(StainParams())
    restained = field(OTHER_LAB)
    result = fitted.normalize(restained)
    assert result.applied and result.reason is None
    before, after = _errors(restained, target, fitted), _errors(result.pixels, target, fitted)
    assert after["pink"] < before["pink"] / 4, (before, after)
    assert after["purple"] < before["purple"] / 2, (before, after)


def test_reference_field_is_nearly_a_fixed_point(
    fitted: VahadaneNormalizer, reference_field: np.ndarray
) -> None:
    """Stained pixels come back within a few levels; glass comes back as flat `io` (the lasso
    codes its noise as no stain at all)."""
    out = fitted.normalize(reference_field)
    assert out.applied
    od = fitted._od_lut[reference_field[..., ::-1]]
    stained = np.linalg.norm(od, axis=2) > fitted.tissue_od
    diff = np.abs(out.pixels.astype(float) - reference_field)
    assert diff[stained].mean() < 2.5, diff[stained].mean()
    glass = np.linalg.norm(od, axis=2) < 0.02
    assert np.abs(out.pixels[glass].astype(float) - fitted.io).mean() < 0.5


def test_fit_once_per_specimen(fitted: VahadaneNormalizer) -> None:
    """A transform fitted on one field of a slide applies to the next field as it is."""
    first, second = field(OTHER_LAB, seed=4), field(OTHER_LAB, seed=5)
    fit = fitted.transform_for(first)
    assert fit.transform is not None
    np.testing.assert_array_equal(fit.transform.apply(first), fitted.normalize(first).pixels)
    per_specimen = fit.transform.apply(second)
    per_field = fitted.normalize(second).pixels
    assert np.abs(per_specimen.astype(float) - per_field).mean() < 1.5


# --- robust to fields with few nuclei, never a crash ----------------------------------------


def test_field_without_nuclei_keeps_the_reference_azure(fitted: VahadaneNormalizer) -> None:
    """Red cells only: the azure cannot be learned, so the reference's stands in, and says so."""
    frame = render_field(6, width=640, height=480, microns_per_pixel=0.2, stain=OTHER_LAB,
                         n_wbc=0, n_platelets=0).frame.pixels
    frame = correct_illumination(frame).pixels
    fit = fitted.transform_for(frame)
    assert fit.transform is not None and fit.reason == "azure_stain_absent", fit.detail
    assert fitted.reference is not None
    np.testing.assert_allclose(fit.transform.source_stains[:, 0],
                               fitted.reference.stain_matrix_rgb[:, 0])
    assert fit.transform.scale[0] == pytest.approx(1.0)
    assert _angle(fit.transform.source_stains[:, 1], rendered_stains(OTHER_LAB)[:, 1]) < 1.0
    result = fitted.normalize(frame)
    assert result.applied and result.reason == "azure_stain_absent"


def test_one_nucleus_is_enough(fitted: VahadaneNormalizer) -> None:
    frame = render_field(8, width=640, height=480, microns_per_pixel=0.2, stain=OTHER_LAB,
                         n_wbc=1, n_platelets=0).frame.pixels
    fit = fitted.transform_for(correct_illumination(frame).pixels)
    assert fit.transform is not None and fit.reason is None, fit.detail
    assert _angle(fit.transform.source_stains[:, 0], rendered_stains(OTHER_LAB)[:, 0]) < 5.0


def _drawn_field(light_od: tuple[float, float], dark_stain: np.ndarray, dark_pixels: int,
                 dark_od: float, seed: int = 0, light_pixels: int = 38400) -> np.ndarray:
    """240 x 320, illumination-corrected: glass at the stain stage's white (optical density 0),
    `light_pixels` of the shipped reference's eosin alone in amounts `light_od`, and `dark_pixels`
    along `dark_stain` at about `dark_od` (each pixel drawn as io * exp(-OD) - 1, the LUT's inverse)."""
    ref = VahadaneReference.from_json(DEFAULT_REFERENCE_FILE.read_text())
    rng = np.random.default_rng(seed)
    od = np.zeros((240 * 320, 3))
    od[:light_pixels] = rng.uniform(*light_od, (light_pixels, 1)) * ref.stain_matrix_rgb[:, 1]
    od[light_pixels:light_pixels + dark_pixels] = dark_od * rng.uniform(0.9, 1.1, (dark_pixels, 1)) * _unit(dark_stain)
    rgb = np.clip(np.rint(ref.io * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[:, ::-1]).reshape(240, 320, 3)


def test_a_few_nuclei_on_pale_red_cells_leave_the_azure_to_the_reference() -> None:
    """Pale red cells (OD 0.18-0.28: over `tissue_od` 0.15, so stain) and 50 dark azure pixels:
    twice the median OD or more, but fewer than max(100, 0.3 % of 38450) = 115: the azure is
    absent (the reference's stands in), the eosin is learned from the red cells."""
    normalizer = VahadaneNormalizer.default()
    ref = normalizer.reference
    assert ref is not None
    fit = normalizer.transform_for(_drawn_field((0.18, 0.28), ref.stain_matrix_rgb[:, 0], 50, 1.0))
    assert fit.transform is not None and fit.reason == "azure_stain_absent", fit.detail
    np.testing.assert_allclose(fit.transform.source_stains[:, 0], ref.stain_matrix_rgb[:, 0])
    assert _angle(fit.transform.source_stains[:, 1], ref.stain_matrix_rgb[:, 1]) < 1.0


def test_a_field_needs_twice_the_minimum_of_one_stain_in_stained_pixels() -> None:
    """Fewer than 2 x `min_stain_pixels` (200) stained pixels is too few, even where one stain
    alone (120 pale red-cell pixels, over the 100 minimum) could be learned."""
    normalizer = VahadaneNormalizer.default()
    ref = normalizer.reference
    assert ref is not None
    few = _drawn_field((0.3, 0.6), ref.stain_matrix_rgb[:, 0], 30, 1.5, light_pixels=120)  # 150 stained
    result = normalizer.normalize(few)
    assert not result.applied and result.reason == "too_few_stained_pixels"
    np.testing.assert_array_equal(result.pixels, few)


def test_a_dark_artefact_far_from_the_azure_is_no_azure() -> None:
    """600 dark pixels absorbing blue (a yellow mark: 66 degrees from the reference's azure, more
    than `max_azure_deviation_deg` 45) are enough pixels, but no azure: the reference's stands in."""
    normalizer = VahadaneNormalizer.default()
    ref = normalizer.reference
    assert ref is not None
    fit = normalizer.transform_for(_drawn_field((0.3, 0.6), np.array([0.2, 0.2, 1.0]), 600, 1.5))
    assert fit.transform is not None and fit.reason == "azure_stain_absent", fit.detail
    assert "from reference" in fit.detail
    np.testing.assert_allclose(fit.transform.source_stains[:, 0], ref.stain_matrix_rgb[:, 0])
    # the same count of real azure pixels is learned
    found = normalizer.transform_for(_drawn_field((0.3, 0.6), ref.stain_matrix_rgb[:, 0], 600, 1.5))
    assert found.transform is not None and found.reason is None, found.detail


@pytest.mark.parametrize("mark", [[0.2, 0.2, 1.0], [1.0, 0.15, 0.1]])
def test_a_dark_artefact_sets_neither_the_eosin_nor_how_the_red_cells_come_out(mark: list[float]) -> None:
    """A yellow or cyan mark on 0.8 % of the field, refused as azure, is left out of the eosin's
    fit and range: the eosin is learned from the red cells (the reference's, within a degree; the
    mark pulled it 40 and 54 degrees away) and the red cells normalize as in the same field
    without the mark (they came out 32 grey levels off on average, 62 at most)."""
    normalizer = VahadaneNormalizer.default()
    ref = normalizer.reference
    assert ref is not None
    marked, clean = _drawn_field((0.3, 0.6), np.array(mark), 600, 1.5), _drawn_field((0.3, 0.6), np.array(mark), 0, 1.5)
    fit = normalizer.transform_for(marked)
    assert fit.transform is not None and fit.reason == "azure_stain_absent", fit.detail
    assert _angle(fit.transform.source_stains[:, 1], ref.stain_matrix_rgb[:, 1]) < 1.0
    red = np.zeros(240 * 320, bool)
    red[:38400] = True  # the red-cell pixels, the same in both fields
    out_marked = normalizer.normalize(marked).pixels.reshape(-1, 3)[red].astype(int)
    out_clean = normalizer.normalize(clean).pixels.reshape(-1, 3)[red].astype(int)
    assert np.abs(out_marked - out_clean).max() <= 3


def test_glass_at_the_illumination_stages_white_is_no_stain() -> None:
    """Frames come with their glass at TARGET_WHITE: its optical density is 0 for a normalizer
    fitted now, and a fitted one works at the shipped reference's light level."""
    fresh = VahadaneNormalizer()
    assert fresh._od_lut[int(TARGET_WHITE)] == pytest.approx(0.0, abs=1e-12)
    assert fresh.io == VahadaneNormalizer.default().io


def test_learned_stain_vectors_are_projected_onto_non_negative_ones() -> None:
    """Pixels of one stain or the other, their blue read 0.05 OD under the glass (brighter than
    `io`): the first stain's unconstrained blue is negative, its projection is exactly 0."""
    truth = np.column_stack([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    codes = np.random.default_rng(0).uniform(0.2, 1.0, (3000, 2))
    codes[:1500, 1] = 0.0
    codes[1500:, 0] = 0.0
    od = codes @ truth.T - np.array([0.0, 0.0, 0.05])
    w = learn_stain_vectors(od, ROMANOWSKY_PRIOR, 0.1)
    assert (w >= 0).all() and np.allclose(np.linalg.norm(w, axis=0), 1.0)
    assert w[2, 0] == 0.0
    assert _angle(w[:, 0], truth[:, 0]) < 0.5


def _greyscale() -> np.ndarray:
    grey = field(StainParams()).mean(axis=2).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


@pytest.mark.parametrize(
    ("name", "frame", "reason"),
    [
        ("white", np.full((240, 320, 3), 255, np.uint8), "too_few_stained_pixels"),
        ("glass", np.full((240, 320, 3), 235, np.uint8), "too_few_stained_pixels"),
        ("empty", np.zeros((0, 0, 3), np.uint8), "too_few_stained_pixels"),
        ("black", np.zeros((240, 320, 3), np.uint8), "degenerate_covariance"),
        ("one_colour", np.full((240, 320, 3), (170, 110, 190), np.uint8), "degenerate_covariance"),
        ("greyscale", _greyscale(), "degenerate_covariance"),
    ],
)
def test_unusable_fields_pass_through(
    fitted: VahadaneNormalizer, name: str, frame: np.ndarray, reason: str
) -> None:
    result = fitted.normalize(frame)
    assert not result.applied and result.reason == reason, name
    np.testing.assert_array_equal(result.pixels, frame)


def test_fit_needs_both_stains() -> None:
    frame = render_field(6, width=320, height=240, microns_per_pixel=0.2, n_wbc=0,
                         n_platelets=0).frame.pixels
    with pytest.raises(ValueError, match="absent"):
        VahadaneNormalizer().fit(correct_illumination(frame).pixels)
    with pytest.raises(ValueError, match="too_few_stained_pixels"):
        VahadaneNormalizer().fit(np.full((64, 64, 3), 235, np.uint8))
    with pytest.raises(RuntimeError):
        VahadaneNormalizer().normalize(np.full((64, 64, 3), 200, np.uint8))
    with pytest.raises(TypeError):
        VahadaneNormalizer.default().normalize(np.zeros((8, 8, 3), np.float32))


# --- registry and shipped reference ---------------------------------------------------------


def test_registry_builds_it_from_the_shipped_reference() -> None:
    normalizer = create_normalizer("vahadane")
    assert isinstance(normalizer, VahadaneNormalizer) and isinstance(normalizer, StainNormalizer)
    assert normalizer.reference is not None


def test_shipped_reference_is_sane() -> None:
    raw = json.loads(DEFAULT_REFERENCE_FILE.read_text())
    ref = VahadaneNormalizer.from_reference_file().reference
    assert ref is not None and raw["stains"] == ["azure", "eosin"]
    w = ref.stain_matrix_rgb
    assert (w >= 0).all() and np.allclose(np.linalg.norm(w, axis=0), 1.0, atol=1e-5)
    assert _angle(w[:, 0], w[:, 1]) > 15.0
    assert _angle(w[:, 0], ROMANOWSKY_PRIOR[:, 0]) < _angle(w[:, 0], ROMANOWSKY_PRIOR[:, 1])
    assert (ref.max_concentrations > 0).all() and ref.io == 236.0
    for lab in ("bccd", "txl_575", "txl_416", "txl_360", "chula"):
        assert lab in ref.source
    assert "training-split" in ref.source


def test_reference_validation_and_round_trip() -> None:
    ref = VahadaneReference(ROMANOWSKY_PRIOR, np.array([1.2, 0.8]), source="synthetic")
    again = VahadaneReference.from_json(ref.to_json())
    np.testing.assert_allclose(again.stain_matrix_rgb, ref.stain_matrix_rgb, atol=1e-6)
    assert again.source == "synthetic"
    with pytest.raises(ValueError):
        VahadaneReference(-ROMANOWSKY_PRIOR, np.array([1.0, 1.0]))
    with pytest.raises(ValueError):
        VahadaneReference(ROMANOWSKY_PRIOR, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="not a vahadane"):
        VahadaneReference.from_json(json.dumps({"method": "macenko"}))


def test_vahadane_is_imported_only_when_chosen() -> None:
    code = (
        "import sys, numpy as np\n"
        "import smearscope.service.analysis.stain as stain\n"
        "stain.create_normalizer('macenko')\n"
        "assert 'smearscope.service.analysis.stain_vahadane' not in sys.modules\n"
        "stain.create_normalizer('vahadane').normalize(np.full((64, 64, 3), 200, np.uint8))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'spams', 'sklearn')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


needs_data = pytest.mark.skipif(
    not (DATA / "bccd" / "BCCD" / "ImageSets" / "Main" / "train.txt").is_file()
    or not (DATA / "txl_pbc").is_dir() or not (DATA / "chula_rbc12").is_dir(),
    reason=f"datasets not found under {DATA} (set SMEARSCOPE_DATA)",
)


@pytest.mark.realdata
@pytest.mark.slow
@needs_data
def test_shipped_reference_is_what_the_fit_tool_produces(tmp_path: Path) -> None:
    out = tmp_path / "ref.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "fit_stain_reference.py"), "--method", "vahadane",
         "--out", str(out)],
        check=True, timeout=300, capture_output=True,
    )
    fresh = VahadaneReference.from_json(out.read_text())
    shipped = VahadaneReference.from_json(DEFAULT_REFERENCE_FILE.read_text())
    np.testing.assert_allclose(fresh.stain_matrix_rgb, shipped.stain_matrix_rgb, atol=1e-6)
    np.testing.assert_allclose(fresh.max_concentrations, shipped.max_concentrations, atol=1e-6)
    assert fresh.source == shipped.source
