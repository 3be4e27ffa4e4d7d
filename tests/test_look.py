"""training.look: one random lab's look, fixed by the caller's generator alone."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from training.look import DEFAULT_LOOK, randomize_look

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
