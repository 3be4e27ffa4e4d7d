"""The red-cell focus judgement on real validation fields (service.analysis.rbc_focus): BCCD's red
cells are sharp enough to grade, the same fields blurred by 1 um are not, and the Raspberry Pi
station's red cells, whose defocus shows as sharp fringes rather than blur, measure as sharp
(models/README.md, "Red cells out of focus")."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
from realdata import DATA, needs_models

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import Analyzer
from smearscope.service.analysis.rbc_focus import MAX_EDGE_WIDTH_UM, RBC_OUT_OF_FOCUS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [needs_models, pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "bccd" / "BCCD").is_dir() or not (DATA / "chula_wbc_rpi").is_dir(),
                                 reason=f"BCCD or chula_wbc_rpi not found under {DATA} (set SMEARSCOPE_DATA)")]


@pytest.fixture(scope="module")
def analyzer():
    a = Analyzer.from_models_dir(ROOT / "models", warmup=False)
    yield a
    a.close()


def _reports(analyzer, lab: str, n: int, blur_um: float = 0.0):
    from training.lab_table import lab_images

    for img in lab_images(lab, "val")[:n]:
        px = cv2.imread(str(img.path))
        if blur_um:
            px = cv2.GaussianBlur(px, (0, 0), blur_um / img.known_mpp)
        yield analyzer.analyze(Frame(px, img.path.name, lab, microns_per_pixel=img.known_mpp)).report


def test_bccd_red_cells_are_graded_and_a_micrometre_of_blur_is_not(analyzer):
    sharp = list(_reports(analyzer, "bccd", 6))
    assert all(r.rbc_focus.judged and RBC_OUT_OF_FOCUS not in {f.code for f in r.flags} for r in sharp)
    widths = [r.rbc_focus.edge_width_um for r in sharp if r.rbc_focus.edge_width_um is not None]
    assert len(widths) >= 4 and max(widths) < MAX_EDGE_WIDTH_UM
    blurred = [r for r in _reports(analyzer, "bccd", 6, blur_um=1.0) if r.rbc_focus.edge_width_um is not None]
    assert blurred and all(RBC_OUT_OF_FOCUS in {f.code for f in r.flags} for r in blurred)
    assert all(not s.assessable and s.grade is None for r in blurred for s in r.rbc_morphology)


def test_the_raspberry_pi_stations_red_cells_measure_sharp(analyzer):
    """A known limit, pinned: these red cells read mostly target, and this judgement does not catch it."""
    reports = list(_reports(analyzer, "rpi", 4))
    widths = [r.rbc_focus.edge_width_um for r in reports]
    assert all(w is not None and w < MAX_EDGE_WIDTH_UM for w in widths)
    assert not any(RBC_OUT_OF_FOCUS in {f.code for f in r.flags} for r in reports)
