"""Real data: the BCCD test split through the `smearscope analyze --json` CLI.

Box mAP50 over rbc/wbc/platelet is computed here from the CLI's `cells`, and the WBC count per
image is compared with the annotation.

Issue 2 asks for mAP50 >= 0.80 from the CLI, and this test asserts exactly that bar. The committed
detector measures 0.805 with its three test-time views (identity, horizontal and vertical flip;
service.tta); with one view it measured 0.771.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from realdata import BCCD, BCCD_MICRONS_PER_PIXEL, bccd_test_ids, bccd_truth, needs_bccd, needs_models
from service.metrics import detection_map50

pytestmark = [needs_bccd, needs_models, pytest.mark.realdata]
MAP50_FLOOR = 0.80  # issue 2's bar; measured 0.805 with the committed models
WBC_COUNT_AGREEMENT_BAR = 0.90  # issue 2's bar; measured 0.944
SMEARSCOPE = [sys.executable, "-m", "service.cli"]


def _analyze(image_id: str, extra: list[str]) -> dict:
    path = BCCD / "JPEGImages" / f"{image_id}.jpg"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*SMEARSCOPE, "analyze", str(path), "--json", *extra], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, "stdout must hold exactly one JSON report"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def bccd_reports() -> dict[str, dict]:
    ids = bccd_test_ids()
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda i: _analyze(i, ["--microns-per-pixel", str(BCCD_MICRONS_PER_PIXEL)]), ids))
    return dict(zip(ids, reports))


def test_bccd_test_map50_from_cli(bccd_reports):
    per_image = []
    for image_id, rep in bccd_reports.items():
        per_image.append({
            "pred": [(c["kind"], c["bbox"], c["score"]) for c in rep["cells"]],
            "truth": bccd_truth(image_id),
        })
    m = detection_map50(per_image, ("rbc", "wbc", "platelet"))
    print(f"\nBCCD test ({len(per_image)} images) box AP50: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    assert m["mAP50"] >= MAP50_FLOOR, m


def test_bccd_wbc_count_per_image(bccd_reports):
    agree = [sum(k == "wbc" for k, _ in bccd_truth(i)) == r["counts"]["wbc"] for i, r in bccd_reports.items()]
    frac = sum(agree) / len(agree)
    print(f"\nBCCD test WBC count agreement: {sum(agree)}/{len(agree)} = {frac:.3f}")
    assert frac >= WBC_COUNT_AGREEMENT_BAR


def test_cli_cells_carry_the_contract_fields(bccd_reports):
    rep = next(iter(bccd_reports.values()))
    assert rep["schema_version"] == "1.0" and rep["scale"]["method"] == "given"
    for c in rep["cells"]:
        assert c["kind"] in ("rbc", "wbc", "platelet")
        x0, y0, x1, y1 = c["bbox"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480  # INPUT image pixels
        assert (c["label"] is None) == (c["kind"] == "platelet")
        assert c["diameter_um"] > 0


def test_scale_estimated_when_not_given():
    """Without --microns-per-pixel the analyzer measures the scale from red cells (BCCD ~0.072)."""
    scales = [_analyze(i, [])["scale"] for i in bccd_test_ids()[:6]]
    for s in scales:
        assert s["method"] in ("rbc_size_classical", "rbc_size_detection")
        assert abs(s["microns_per_pixel"] / BCCD_MICRONS_PER_PIXEL - 1) < 0.2, scales
