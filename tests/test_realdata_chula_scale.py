"""Chula RBC-12's scale in the analyzer's own ruler (training.measure_scale): the constant the RBC
head's crops are cut with must agree with what the committed detector measures on Chula train
images, or the head learns a 'normal' size the analyzer never reports (it did: at Chula's nominal
0.23 um/px, BCCD's normal red cells were called schistocytes and microcytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from realdata import DATA, needs_models

from training import head_data as hd
from training.measure_scale import CHULA_IMAGES, measure_chula

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [needs_models, pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "chula_rbc12" / "Label").is_dir(),
                                 reason=f"Chula RBC-12 not found under {DATA} (set SMEARSCOPE_DATA)")]


@pytest.mark.xfail(strict=True, reason=(
    "known mismatch: the RBC head's Chula constant (0.175 um/px) was measured with the previous "
    "detector's ruler; the multi-lab detector reads Chula at 0.196. Heads retrained at 0.196 (with "
    "and without random lab looks) over-called schistocytes on BCCD, whose scale comes from its "
    "annotated boxes, so the constant waits for one ruler for both labs. Remove this mark when the "
    "constant and the head move (strict: the test fails here once they agree)."))
def test_chula_constant_matches_the_detectors_ruler():
    # The images the constant was measured on (`measure_scale`'s default). A 30-image subset read
    # 1.6 % low with the detector that set the constant (0.172 against 0.1749), and the 2026-11-27
    # detector reads 0.1716 on all 150 but 0.166 on those 30: a subset that small tests its own bias.
    mpp, n = measure_chula(ROOT / "models", n_images=CHULA_IMAGES, at_um_per_px=hd.CHULA_MICRONS_PER_PIXEL)
    assert n >= 500
    assert mpp == pytest.approx(hd.CHULA_MICRONS_PER_PIXEL, rel=0.04), (mpp, n)
