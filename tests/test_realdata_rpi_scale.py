"""A pale low-cost camera at an unknown scale (`chula_wbc_rpi`, a Raspberry Pi station): the scale
search must not settle where the station's red cells are seen as white cells by the dozen
(service.analysis.scale_search.plausible). Two of its test fields did: searched to 2.4 and 2.6
times their scale, they reported 21 and 38 white cells where one is labelled."""

from __future__ import annotations

import cv2
import pytest
from realdata import DATA, needs_models

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import Analyzer
from training.labs import RPI_MICRONS_PER_PIXEL

pytestmark = [needs_models, pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "chula_wbc_rpi" / "train" / "images").is_dir(),
                                 reason=f"chula_wbc_rpi not found under {DATA} (set SMEARSCOPE_DATA)")]


@pytest.fixture(scope="module")
def analyzer():
    a = Analyzer.from_models_dir()
    yield a
    a.close()


@pytest.mark.parametrize("stem", ["N-3B_0182", "N-3B_0195"])
def test_a_searched_scale_is_blood(analyzer, stem):
    path = DATA / "chula_wbc_rpi" / "train" / "images" / f"{stem}.jpg"
    rep = analyzer.analyze(Frame(cv2.imread(str(path)), stem, "rpi")).report
    assert 0.7 < rep.scale.microns_per_pixel / RPI_MICRONS_PER_PIXEL < 1.3, rep.scale
    assert rep.counts.wbc <= 3, rep.counts
