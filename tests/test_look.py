"""training.look: one random lab's look, fixed by the caller's generator alone."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from training.look import DEFAULT_LOOK, fresnel_defocus, randomize_look

NOISY = replace(DEFAULT_LOOK, p_noise=1.0)


def _field() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((96, 128, 3), 225, np.uint8)
    for _ in range(12):
        x, y = (int(v) for v in rng.integers(10, 86, 2))
        cv2.circle(img, (x, y), 9, (150, 120, 190), -1)
    return img


def test_a_seed_gives_the_same_look_whatever_ran_before():
    """Sensor noise included: OpenCV's own generator, disturbed between the calls, changes nothing."""
    img = _field()
    first = randomize_look(img, np.random.default_rng(3), NOISY)
    cv2.setRNGSeed(12345)
    cv2.randn(np.empty((50, 50), np.float32), 0.0, 1.0)  # moves OpenCV's generator on
    again = randomize_look(img, np.random.default_rng(3), NOISY)
    assert np.array_equal(first, again)
    assert first.shape == img.shape and first.dtype == np.uint8


def test_different_seeds_give_different_looks():
    img = _field()
    looks = [randomize_look(img, np.random.default_rng(s), NOISY) for s in range(4)]
    assert all(not np.array_equal(looks[0], other) for other in looks[1:])


def _phase_disc(size: int = 112, radius_px: float = 19.0) -> np.ndarray:
    """A red cell's relative thickness: a disc 7.6 um across at 0.2 um/px, thicker at its rim."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - size / 2, yy - size / 2) / radius_px
    return np.where(r < 1.0, 0.6 + 0.4 * r ** 2, 0.0).astype(np.float32)


def test_a_transparent_cell_shows_only_out_of_focus():
    """A pure phase object (transmission 1 everywhere) is invisible in focus and shows rings a
    little out of focus, its centre dark on one side of focus and bright on the other; what the
    propagation moves around it does not create or lose (the mean intensity stays)."""
    thick = _phase_disc()
    glass = np.ones((*thick.shape, 3), np.float32)
    assert np.abs(fresnel_defocus(glass, thick, 0.0, 1.0) - 1.0).max() < 1e-4  # in focus: nothing to see
    above, below = fresnel_defocus(glass, thick, 2.0, 1.0), fresnel_defocus(glass, thick, -2.0, 1.0)
    for img in (above, below):
        inside = img[40:72, 40:72, 1]
        assert np.ptp(inside) > 0.2  # rings inside the cell
        assert abs(float(img.mean()) - 1.0) < 0.02
    centre = lambda img: float(img[50:62, 50:62, 1].mean())
    assert (centre(above) - 1.0) * (centre(below) - 1.0) < 0  # contrast reverses through focus


def test_a_defocused_cell_shows_a_fringe_brighter_than_the_glass_which_no_blur_can():
    """An absorbing cell (transmission 0.6) out of focus: light moved from the cell's edge shows as a
    fringe brighter than the glass around it; a blur only averages, so never exceeds the glass."""
    thick = _phase_disc()
    trans = np.repeat(np.where(thick > 0, 0.6, 1.0).astype(np.float32)[..., None], 3, axis=2)
    assert float(fresnel_defocus(trans, thick, 2.5, 1.0).max()) > 1.05
    assert float(fresnel_defocus(trans, thick, 0.0, 1.0).max()) < 1.0 + 1e-4  # in focus: the cell as it is
    assert float(cv2.GaussianBlur(trans, (0, 0), 2.0).max()) <= 1.0 + 1e-6


def test_defocus_is_drawn_when_asked():
    """The default look draws no defocus (the looks before it keep their random stream); asked for, it changes the look."""
    img = _field()
    assert DEFAULT_LOOK.p_defocus == 0.0
    with_rings = randomize_look(img, np.random.default_rng(5), replace(DEFAULT_LOOK, p_defocus=1.0))
    assert not np.array_equal(with_rings, randomize_look(img, np.random.default_rng(5), DEFAULT_LOOK))
