"""The lamp correction (service.analysis.illumination) on rendered fields with a known lamp.

The renderer exposes each field as lamp x (1 - vignetting x r^2) x exp(-OD): its glass is the lamp
and nothing else. After the correction the glass must read `TARGET_WHITE` in every channel, in
the middle and in the corners; the reported white point and uniformity must be the lamp's own.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from smearscope.device.synthetic_cells import StainParams
from smearscope.service.analysis.field_flags import UNEVEN_ILLUMINATION
from smearscope.service.analysis.illumination import (
    TARGET_WHITE,
    apply_illumination,
    correct_illumination,
    estimate_illumination,
)
from smearscope.service.analysis.scale import resample_to_canonical

LAMPS = {  # background_rgb, vignetting
    "neutral, even": ((234.0, 229.0, 233.0), 0.0),
    "warm, vignetted": ((250.0, 205.0, 160.0), 0.4),
    "dim, bluish, strongly vignetted": ((120.0, 150.0, 190.0), 0.55),
}


def _field(lamp: str, width: int = 1280, height: int = 960, mpp: float = 0.1, density: float = 0.3, seed: int = 3):
    rgb, vignetting = LAMPS[lamp]
    stain = StainParams(background_rgb=rgb, vignetting=vignetting, noise_dn=1.0)
    return render_field(seed, width=width, height=height, microns_per_pixel=mpp, stain=stain, rbc_density=density,
                        n_wbc=2, n_platelets=3)


def _glass(field, grow: int = 6) -> np.ndarray:
    """Pixels at least `grow` pixels away from every drawn cell."""
    h, w = field.frame.pixels.shape[:2]
    cells = np.zeros((h, w), np.uint8)
    for c in field.cells:
        x0, y0, x1, y1 = c.bbox
        cells[y0:y1, x0:x1] |= c.mask.astype(np.uint8)
    return cv2.dilate(cells, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) == 0


def _lamp_light(lamp: str, w: int, h: int) -> np.ndarray:
    """The renderer's lamp (h, w, 3) in BGR, exactly as it lit the field."""
    rgb, vignetting = LAMPS[lamp]
    norm = (w / 2) ** 2 + (h / 2) ** 2
    xx = ((np.arange(w) - w / 2) ** 2 / norm)[None, :]
    yy = ((np.arange(h) - h / 2) ** 2 / norm)[:, None]
    return (1.0 - vignetting * (xx + yy))[..., None] * np.asarray(rgb[::-1], float)


@pytest.mark.parametrize("lamp", LAMPS)
def test_the_glass_reads_the_target_white_everywhere_after_correction(lamp):
    f = _field(lamp)
    out = correct_illumination(f.frame.pixels)
    assert out.applied
    glass = _glass(f)
    h, w = glass.shape
    centre = np.zeros_like(glass)
    centre[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = True
    corners = np.zeros_like(glass)
    for ys in (slice(0, h // 6), slice(h - h // 6, h)):
        for xs in (slice(0, w // 6), slice(w - w // 6, w)):
            corners[ys, xs] = True
    px = out.pixels.astype(float)
    for region in (centre & glass, corners & glass):
        assert region.sum() > 2000
        np.testing.assert_allclose(px[region].mean(axis=0), TARGET_WHITE, atol=4.0)


@pytest.mark.parametrize("lamp", LAMPS)
def test_white_point_and_uniformity_are_the_lamps(lamp):
    f = _field(lamp)
    h, w = f.frame.pixels.shape[:2]
    light = _lamp_light(lamp, w, h)
    ill = estimate_illumination(f.frame.pixels)
    np.testing.assert_allclose(ill.white_bgr, np.median(light.reshape(-1, 3), axis=0), rtol=0.03)
    lum = light.mean(axis=2)
    assert ill.uniformity == pytest.approx(lum.min() / lum.max(), abs=0.04)
    assert not ill.greyscale


def test_a_crowded_field_still_gets_its_lamp():
    """Little glass left between the cells: the white point comes from the brightest blocks."""
    f = _field("warm, vignetted", density=0.7)
    h, w = f.frame.pixels.shape[:2]
    ill = estimate_illumination(f.frame.pixels)
    np.testing.assert_allclose(ill.white_bgr, np.median(_lamp_light("warm, vignetted", w, h).reshape(-1, 3), axis=0),
                               rtol=0.06)


def test_the_gain_applies_at_the_canonical_scale_too():
    """Measured on the input frame, applied to the frame resampled to 0.2 um/px: the glass there
    reads the target white as well (the gain map spans the frame at any resolution)."""
    f = _field("dim, bluish, strongly vignetted")
    ill = estimate_illumination(f.frame.pixels)
    canon = apply_illumination(resample_to_canonical(f.frame.pixels, 0.1), ill)
    glass = cv2.resize(_glass(f).astype(np.uint8), (canon.shape[1], canon.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    glass = cv2.erode(glass.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    np.testing.assert_allclose(canon[glass].astype(float).mean(axis=0), TARGET_WHITE, atol=4.0)


def test_each_model_gets_the_frame_its_training_images_had():
    """A field at the canonical scale (stages 2-3): none | flatfield, then the stain method, each
    variant built from the one before it, once per field, the stain result kept for the report."""
    from smearscope.service.analysis.prepare import CanonicalField, Preparation
    from smearscope.service.analysis.stain import MacenkoNormalizer

    f = _field("warm, vignetted", width=640, height=480, mpp=0.1)
    ill = estimate_illumination(f.frame.pixels)
    macenko = MacenkoNormalizer.from_reference_file()
    timing: dict[str, float] = {}
    field = CanonicalField(f.frame.pixels, 0.1, ill, {"macenko": macenko}, timing)
    raw = resample_to_canonical(f.frame.pixels, 0.1)
    lamp = apply_illumination(raw, ill)
    assert field.shape == raw.shape and not np.array_equal(lamp, raw)  # a vignetted lamp: it matters
    np.testing.assert_array_equal(field.pixels(Preparation()), raw)
    np.testing.assert_array_equal(field.pixels(Preparation("flatfield")), lamp)
    want = macenko.normalize(lamp)
    got = field.pixels(Preparation("flatfield", "macenko"))
    np.testing.assert_array_equal(got, want.pixels)
    assert field.pixels(Preparation("flatfield", "macenko")) is got  # once per field
    assert field.stain_results["macenko"].applied == want.applied
    assert field.stain_results["macenko"].reason == want.reason
    np.testing.assert_array_equal(field.pixels(Preparation("none", "macenko")), macenko.normalize(raw).pixels)
    assert {"resample_ms", "illumination_ms", "stain_ms"} <= set(timing)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (4000, 3000), (333, 517)])
def test_frame_size_does_not_change_the_lamp_measured(width, height):
    """The frame is shrunk before the lamp is fitted (a 12 MP frame halved first): any size,
    odd ones included, gives the same white point."""
    f = _field("warm, vignetted", width=width, height=height, mpp=0.1)
    light = _lamp_light("warm, vignetted", width, height)
    ill = estimate_illumination(f.frame.pixels)
    np.testing.assert_allclose(ill.white_bgr, np.median(light.reshape(-1, 3), axis=0), rtol=0.03)


def test_greyscale_is_recognised():
    f = _field("neutral, even")
    grey = cv2.cvtColor(cv2.cvtColor(f.frame.pixels, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    ill = estimate_illumination(grey)
    assert ill.greyscale and ill.applied


def test_a_dark_frame_is_passed_through_with_the_reason():
    dark = np.full((480, 640, 3), 6, np.uint8)
    out = correct_illumination(dark)
    assert not out.applied and out.reason == "no_lit_background"
    assert out.pixels is dark


def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        estimate_illumination(np.zeros((100, 100), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        estimate_illumination(np.zeros((100, 100, 3), np.float32))


@pytest.mark.parametrize("height,width", [(40, 640), (100, 2000), (480, 40)])
def test_a_strip_of_a_frame_gets_its_lamp(height, width):
    """A frame one or two blocks high (or wide) does not span every term of the surface: the fit
    still gives the lamp (no singular-matrix error) and the glass reads the target white."""
    field = _field("warm, vignetted", width=1280, height=960)
    y0, x0 = 480 - height // 2, 640 - width // 2
    strip = np.ascontiguousarray(field.frame.pixels[y0 : y0 + height, x0 : x0 + width])
    ill = estimate_illumination(strip)
    assert ill.applied
    glass = _glass(field)[y0 : y0 + height, x0 : x0 + width]
    corrected = apply_illumination(strip, ill)[glass].astype(float)
    assert np.abs(np.median(corrected, axis=0) - TARGET_WHITE).max() < 6


def _behind_field_stop(pixels: np.ndarray, radius: float, seed: int = 0,
                       edge: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """`pixels` as a camera that sees the microscope's field stop records them: a lit disc of
    `radius` px falling off over its last `edge` (a share of the radius), in a dark surround of sensor noise (8 +- 3 grey
    levels). Returns the frame and the surround's mask (outside the disc's edge)."""
    h, w = pixels.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2) / radius
    lit = np.clip((1.0 - r) / edge, 0.0, 1.0)[..., None]
    noise = 8.0 + np.random.default_rng(seed).normal(0.0, 3.0, pixels.shape)
    out = pixels.astype(np.float64) * lit + noise * (1.0 - lit)
    return np.clip(out, 0, 255).astype(np.uint8), r > 1.0


def test_a_field_stops_dark_surround_stays_dark():
    """A round field of view: the lamp is measured on the disc's glass, and the dark surround is
    not raised to the glass's white (it was: up to 235 / 1 gain turned its sensor noise into
    bright mottling the detector took for white cells, "atypical_wbc_present" on a normal smear)."""
    f = _field("neutral, even")
    frame, surround = _behind_field_stop(f.frame.pixels, 0.5 * f.frame.pixels.shape[0])
    out = correct_illumination(frame)
    assert out.applied
    centre = np.zeros(surround.shape, bool)
    h, w = surround.shape
    centre[h // 3: 2 * h // 3, w // 3: 2 * w // 3] = True
    np.testing.assert_allclose(out.pixels[centre & _glass(f)].astype(float).mean(axis=0), TARGET_WHITE, atol=6.0)
    assert float(out.pixels[surround].mean()) < 60.0


def test_no_cells_are_found_in_a_field_stops_dark_surround():
    """End to end: the analyzer counts the disc's cells and none in the black around it (a cell
    cut by the disc's dim edge is another matter: only the surround a tenth of the radius out)."""
    from realdata import ROOT

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer

    if not (ROOT / "models" / "seg.json").exists():
        pytest.skip("no models")
    f = render_field(5, width=1280, height=960, microns_per_pixel=0.1, n_wbc=2, n_platelets=4)
    radius = 0.5 * 960
    frame, _ = _behind_field_stop(f.frame.pixels, radius, seed=1)
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    try:
        report = analyzer.analyze(Frame(pixels=frame, frame_id="stop", source="test", microns_per_pixel=0.1)).report
    finally:
        analyzer.close()
    outside = [(c.kind, c.bbox) for c in report.cells
               if np.hypot((c.bbox[0] + c.bbox[2]) / 2 - 640, (c.bbox[1] + c.bbox[3]) / 2 - 480) > 1.1 * radius]
    assert outside == []
    assert report.counts.rbc >= 45  # of the 58 cells rendered inside the disc


def test_red_cells_cut_by_a_field_stops_dim_edge_are_not_white_cells():
    """The disc's edge falls off into the dark: a red cell cut there is dark, and it was counted
    as an unidentified white cell (six on this field, which holds none inside the disc:
    "atypical_wbc_present", blasts possible, on a normal smear). A cell whose box is a tenth or
    more darker than a fifth of the glass's white lies outside the lit field and is not counted."""
    from realdata import ROOT

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer

    if not (ROOT / "models" / "seg.json").exists():
        pytest.skip("no models")
    f = render_field(5, width=1280, height=960, microns_per_pixel=0.1, n_wbc=2, n_platelets=4)
    assert all(c.bbox[2] < 100 for c in f.cells if c.kind == "wbc")  # both outside the disc
    frame, _ = _behind_field_stop(f.frame.pixels, 0.5 * 960, seed=1)
    analyzer = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    try:
        report = analyzer.analyze(Frame(pixels=frame, frame_id="stop", source="test", microns_per_pixel=0.1)).report
    finally:
        analyzer.close()
    assert report.counts.wbc == 0
    assert "atypical_wbc_present" not in [fl.code for fl in report.flags]
    assert report.counts.rbc >= 40  # of the 58 cells rendered inside the disc


def test_a_field_stop_is_no_uneven_lamp():
    """An evenly lit disc whose edge falls off softly into a dark surround (a field stop a little
    out of focus) read as uniformity 0.2 or less, and every field of such a camera carried
    "uneven_illumination: ... check the condenser and lamp alignment". The lamp's evenness is
    judged over the lit field; a lamp falling off inside it is still measured."""
    f = _field("neutral, even")
    for edge in (0.1, 0.3):
        frame, _ = _behind_field_stop(f.frame.pixels, 0.5 * f.frame.pixels.shape[0], edge=edge)
        assert estimate_illumination(frame).uniformity > UNEVEN_ILLUMINATION, edge
    g = _field("dim, bluish, strongly vignetted")
    frame, _ = _behind_field_stop(g.frame.pixels, 0.5 * g.frame.pixels.shape[0])
    # the renderer's lamp at the disc's edge (r^2 = 480^2 / (640^2 + 480^2) of its corner's): 1 - 0.55 * 0.36
    assert estimate_illumination(frame).uniformity == pytest.approx(1 - 0.55 * 0.36, abs=0.05)


def test_each_box_is_judged_in_or_out_of_the_lit_field_by_its_own_pixels():
    """in_lit_field (one pass, an integral image) against its definition box by box: the mean of
    the channels under a fifth of the target white on a tenth or more of the box's pixels. Boxes
    in the disc, across its edge, in the surround, past the frame and one pixel small; a frame
    with no dark pixel at all is lit everywhere."""
    from smearscope.service.analysis.illumination import dark_shares, in_lit_field
    from smearscope.service.analysis.records import Box

    f = _field("neutral, even")
    frame, _ = _behind_field_stop(f.frame.pixels, 0.5 * f.frame.pixels.shape[0], seed=2)
    corrected = correct_illumination(frame).pixels
    h, w = corrected.shape[:2]
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(400):
        x0, y0 = rng.uniform(-20, w), rng.uniform(-20, h)
        boxes.append(Box(x0, y0, x0 + rng.uniform(0.2, 120), y0 + rng.uniform(0.2, 120)))

    def share(box: Box) -> float:
        x0, y0 = min(max(int(box.x0), 0), w - 1), min(max(int(box.y0), 0), h - 1)
        crop = corrected[y0:max(int(np.ceil(box.y1)), y0 + 1), x0:max(int(np.ceil(box.x1)), x0 + 1)]
        return float((crop.mean(axis=2) < 0.2 * TARGET_WHITE).mean())

    want = [share(b) for b in boxes]
    assert dark_shares(corrected, boxes) == pytest.approx(want, abs=1e-12)
    assert in_lit_field(corrected, boxes) == [s < 0.1 for s in want]
    assert 50 < sum(s < 0.1 for s in want) < 350 and 0 < sum(0 < s < 1 for s in want)  # every case met
    assert in_lit_field(np.full((50, 60, 3), 200, np.uint8), boxes[:5]) == [True] * 5
