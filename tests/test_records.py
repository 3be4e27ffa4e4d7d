"""Cell records' geometry: what every count and size rests on."""

from __future__ import annotations

import math

import pytest

from smearscope.service.analysis.records import Box, CellDetection, CellKind


def test_an_inverted_box_has_no_area():
    assert Box(5.0, 5.0, 0.0, 0.0).area == 0.0  # both sides negative: not a positive product
    assert Box(0.0, 0.0, 4.0, -1.0).area == 0.0
    assert Box(1.0, 2.0, 4.0, 6.0).area == 12.0


def test_a_detection_without_a_mask_is_the_ellipse_inscribed_in_its_box():
    """Boxes-only engines: a 40 x 40 px box holds a circle of diameter 40 px (area 400 pi)."""
    det = CellDetection(CellKind.RBC, Box(10.0, 10.0, 50.0, 50.0), 0.9)
    assert det.mask_area_px == pytest.approx(math.pi * 20.0**2)
    assert det.diameter_px == pytest.approx(40.0)
