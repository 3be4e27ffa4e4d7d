"""The real models on rendered fields: recall and precision against the renderer's exact truth.

The renderer's fields used here (seeds 900+) are never in the detector's training data (synthetic
training fields use seeds 10000+). Bars are set below what the committed models measure (see
docs/RESULTS.md, "Synthetic fields") so that a real regression fails, not noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smearscope.cli.demo import score_cells
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import Analyzer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")


@pytest.fixture(scope="module")
def analyzer():
    a = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    yield a
    a.close()


def test_recall_on_rendered_fields(analyzer):
    totals = {k: [0, 0, 0] for k in ("rbc", "wbc", "platelet")}
    for seed in range(900, 904):
        f = render_field(seed, width=1024, height=768, microns_per_pixel=0.1, n_wbc=3)
        rep = analyzer.analyze(f.frame).report
        for k, s in score_cells([(c.kind, c.bbox) for c in rep.cells], [(c.kind, c.bbox) for c in f.cells]).items():
            totals[k][0] += s.truth
            totals[k][1] += s.found
            totals[k][2] += s.matched
    recall = {k: m / t for k, (t, _, m) in totals.items() if t}
    precision = {k: m / fnd for k, (_, fnd, m) in totals.items() if fnd}
    print(f"\nrendered fields: recall {recall}, precision {precision}")
    assert recall["rbc"] >= 0.80 and precision["rbc"] >= 0.85
    assert recall["wbc"] >= 0.80 and precision.get("wbc", 0) >= 0.80


def test_scale_unknown_is_estimated_on_rendered_field(analyzer):
    f = render_field(950, width=1024, height=768, microns_per_pixel=0.13)
    frame = type(f.frame)(pixels=f.frame.pixels, frame_id="x", source="t", microns_per_pixel=None)
    rep = analyzer.analyze(frame).report
    assert rep.scale.method in ("rbc_size_classical", "rbc_size_detection")
    assert abs(rep.scale.microns_per_pixel / 0.13 - 1) < 0.15


@pytest.mark.parametrize("look", ["greyscale", "faded stain"])
def test_a_greyscale_or_faded_field_is_analysed_not_a_silent_zero(analyzer, look):
    """A monochrome camera or a weak stain has cells without colour: a tile is background only
    when nothing in it is stained or dark (before, every greyscale tile was skipped: 0 cells)."""
    import cv2
    import numpy as np

    f = render_field(900, width=1024, height=768, microns_per_pixel=0.1, n_wbc=3)
    if look == "greyscale":
        pixels = cv2.cvtColor(cv2.cvtColor(f.frame.pixels, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    else:
        hsv = cv2.cvtColor(f.frame.pixels, cv2.COLOR_BGR2HSV)
        hsv[..., 1] = (hsv[..., 1] * 0.3).astype(np.uint8)
        pixels = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    rep = analyzer.analyze(type(f.frame)(pixels=pixels, frame_id="x", source="t", microns_per_pixel=0.1)).report
    found = score_cells([(c.kind, c.bbox) for c in rep.cells], [(c.kind, c.bbox) for c in f.cells])
    assert found["rbc"].matched >= 0.85 * found["rbc"].truth, (look, found)
    assert found["wbc"].matched >= 1 and "no_cells_found" not in {fl.code for fl in rep.flags}
