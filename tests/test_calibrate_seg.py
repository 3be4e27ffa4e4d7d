"""Detector score calibration (training.calibrate_seg.fit_platt): fits, and never reverses the ranking."""

from __future__ import annotations

import numpy as np
import pytest

from smearscope.service.analysis.yolo_decode import platt
from training.calibrate_seg import MIN_SLOPE, fit_platt


def test_platt_fit_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.02, 0.98, 20000)
    true_a, true_b = 1.8, 0.6
    hits = rng.random(raw.size) < np.array([platt(r, true_a, true_b) for r in raw])
    a, b = fit_platt(raw, hits)
    assert a == pytest.approx(true_a, abs=0.1) and b == pytest.approx(true_b, abs=0.1)


def test_platt_fit_keeps_the_ranking_when_misses_are_few_and_confident():
    # 90 confident hits and 2 confident misses: an unconstrained fit slopes downward
    raw = np.r_[np.linspace(0.3, 0.9, 90), [0.97, 0.98]]
    hits = np.r_[np.ones(90), np.zeros(2)]
    a, b = fit_platt(raw, hits)
    assert a >= MIN_SLOPE
    assert platt(0.9, a, b) > platt(0.3, a, b) > 0.5
