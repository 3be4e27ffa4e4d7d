"""Real data: the BCCD test split through `smearscope analyze --json --detections`, in ONE process.

Box mAP50 over rbc/wbc/platelet is computed here from the CLI's output two ways, as issue 2 and
issue 3 ask:

- from the counted cells of each report (calibrated confidence >= 0.5): issue 2's bar, 0.80;
- from `--detections` (every detection down to 0.001, the counted cells marked): issue 3 asks
  this whole-pipeline figure to be within 3 points of the model level, which is measured here too,
  in this process, from an Analyzer ranking every detection down to 0.001.

The WBC count per image is compared with the annotation, and the AP itself with pycocotools.
The figures these tests print are in docs/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from coco_reference import AP_TOLERANCE, coco_ap, coco_eval
from realdata import (
    BCCD,
    BCCD_MICRONS_PER_PIXEL,
    ROOT,
    bccd_test_ids,
    bccd_truth,
    needs_bccd,
    needs_models,
)

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.roi import RoiFilter
from training.metrics import detection_map50

pytestmark = [needs_bccd, needs_models, pytest.mark.realdata]
MAP50_FLOOR = 0.80  # issue 2's bar
#: Below this a change broke the detector or the counting: the committed detector's counted cells
#: read 0.786 on the 65 test images no model saw (training.overlap), under issue 2's bar.
REGRESSION_FLOOR = 0.77
WBC_COUNT_AGREEMENT_BAR = 0.90  # issue 2's bar
WHOLE_PIPELINE_GAP = 0.03  # issue 3: the CLI's figure within 3 points of the model level
FLOOR = 0.001  # as training.evaluate's ALL_CONF: every detection above the detector's raw floor
KINDS = ("rbc", "wbc", "platelet")


def _image(image_id: str) -> Path:
    return BCCD / "JPEGImages" / f"{image_id}.jpg"


def _analyze_batch(ids: list[str], extra: list[str], tmp: Path) -> tuple[list[dict], list[dict]]:
    listing, dets = tmp / "images.txt", tmp / "detections.jsonl"
    listing.write_text("".join(f"{_image(i)}\n" for i in ids))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", f"@{listing}", "--json",
                           "--detections", str(dets), "--detections-floor", str(FLOOR), *extra],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in dets.read_text().splitlines()]
    assert len(reports) == len(ids) == len(records), "one report and one detections line per image, in order"
    return reports, records


@pytest.fixture(scope="module")
def bccd_cli(tmp_path_factory) -> tuple[list[str], list[dict], list[dict]]:
    ids = bccd_test_ids()
    reports, records = _analyze_batch(ids, ["--microns-per-pixel", str(BCCD_MICRONS_PER_PIXEL)],
                                      tmp_path_factory.mktemp("bccd_cli"))
    return ids, reports, records


def test_bccd_test_map50_from_cli_counted_cells(bccd_cli):
    ids, reports, _ = bccd_cli
    per_image = [{"pred": [(c["kind"], c["bbox"], c["score"]) for c in rep["cells"]], "truth": bccd_truth(i)}
                 for i, rep in zip(ids, reports)]
    m = detection_map50(per_image, KINDS)
    print(f"\nBCCD test ({len(per_image)} images), counted cells, box AP50: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    assert m["mAP50"] >= REGRESSION_FLOOR, m


@pytest.mark.xfail(strict=True, reason="issue 2's bar, 0.80, is not met on the BCCD test images no model saw: 0.786 "
                   "(65 of 72; the committed detector trained on 5 of the others, through TXL-PBC)")
def test_bccd_test_counted_cells_meet_issue_2s_bar(bccd_cli):
    ids, reports, _ = bccd_cli
    per_image = [{"pred": [(c["kind"], c["bbox"], c["score"]) for c in rep["cells"]], "truth": bccd_truth(i)}
                 for i, rep in zip(ids, reports)]
    assert detection_map50(per_image, KINDS)["mAP50"] >= MAP50_FLOOR


def test_bccd_whole_pipeline_within_three_points_of_model_level(bccd_cli):
    ids, _, records = bccd_cli
    cli = detection_map50([{"pred": [(d["kind"], d["bbox"], d["score"]) for d in rec["detections"]],
                            "truth": bccd_truth(i)} for i, rec in zip(ids, records)], KINDS)
    options = AnalyzerOptions(detector_conf=FLOOR, roi=RoiFilter.every_kind_from(FLOOR))
    analyzer = Analyzer.from_models_dir(options=options, warmup=False)
    per_image = []
    for i in ids:
        rep = analyzer.analyze(Frame(cv2.imread(str(_image(i))), i, "bccd", microns_per_pixel=BCCD_MICRONS_PER_PIXEL)).report
        per_image.append({"pred": [(c.kind, c.bbox, c.score) for c in rep.cells], "truth": bccd_truth(i)})
    analyzer.close()
    model = detection_map50(per_image, KINDS)
    print(f"\nBCCD test mAP50: model level {model['mAP50']:.4f}, CLI --detections {cli['mAP50']:.4f}")
    assert cli["mAP50"] >= model["mAP50"] - WHOLE_PIPELINE_GAP, (cli, model)
    assert cli["mAP50"] > 0.80  # the committed detector ranks 0.831; a broken export would rank far lower


def test_detections_hold_the_counted_cells_and_the_candidates_below(bccd_cli):
    _, reports, records = bccd_cli
    for rep, rec in zip(reports, records):
        assert rec["report_id"] == rep["report_id"]
        counted = [d for d in rec["detections"] if d["counted"]]
        assert sorted((d["kind"], d["bbox"], d["score"]) for d in counted) == \
            sorted((c["kind"], c["bbox"], c["score"]) for c in rep["cells"])
        below = [d for d in rec["detections"] if not d["counted"]]
        assert all(FLOOR <= d["score"] < 0.5 and d["label"] is None for d in below)
        scores = [d["score"] for d in rec["detections"]]
        assert scores == sorted(scores, reverse=True)
    assert sum(len(r["detections"]) for r in records) > 1.5 * sum(len(r["cells"]) for r in reports)


def test_detections_change_no_counted_cell(bccd_cli, tmp_path):
    """The same images without --detections (the detector at its own threshold) count the same cells."""
    ids, reports, _ = bccd_cli
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{_image(i)}\n" for i in ids[:8]))
    proc = subprocess.run([sys.executable, "-m", "smearscope", "analyze", f"@{listing}", "--json",
                           "--microns-per-pixel", str(BCCD_MICRONS_PER_PIXEL)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert [r["cells"] for r in plain] == [r["cells"] for r in reports[:8]]


def test_bccd_wbc_count_per_image(bccd_cli):
    ids, reports, _ = bccd_cli
    agree = [sum(k == "wbc" for k, _ in bccd_truth(i)) == r["counts"]["wbc"] for i, r in zip(ids, reports)]
    frac = sum(agree) / len(agree)
    print(f"\nBCCD test WBC count agreement: {sum(agree)}/{len(agree)} = {frac:.3f}")
    assert frac >= WBC_COUNT_AGREEMENT_BAR


def test_cli_cells_carry_the_contract_fields(bccd_cli):
    rep = bccd_cli[1][0]
    assert rep["schema_version"] == "1.5" and rep["scale"]["method"] == "given"
    for c in rep["cells"]:
        assert c["kind"] in ("rbc", "wbc", "platelet")
        x0, y0, x1, y1 = c["bbox"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480  # INPUT image pixels
        assert (c["label"] is None) == (c["kind"] == "platelet")
        assert c["diameter_um"] > 0


def test_scale_estimated_when_not_given(tmp_path):
    """Without --microns-per-pixel the analyzer measures the scale from red cells (BCCD ~0.072)."""
    reports, _ = _analyze_batch(bccd_test_ids()[:6], [], tmp_path)
    for s in (r["scale"] for r in reports):
        assert s["method"] in ("rbc_size_classical", "rbc_size_detection")
        assert abs(s["microns_per_pixel"] / BCCD_MICRONS_PER_PIXEL - 1) < 0.2, s


@pytest.mark.slow
def test_map50_agrees_with_pycocotools(bccd_cli):
    """The project's AP against pycocotools on real detections: every detection down to 0.001
    (thousands of boxes, many equal rounded scores, crowded red cells) and the counted cells."""
    ids, reports, records = bccd_cli
    for found in ([rec["detections"] for rec in records], [rep["cells"] for rep in reports]):
        per_image = [{"pred": [(d["kind"], d["bbox"], d["score"]) for d in cells], "truth": bccd_truth(i)}
                     for i, cells in zip(ids, found)]
        ours, ref = detection_map50(per_image, KINDS), coco_ap(coco_eval(per_image, KINDS), KINDS)
        print("\nBCCD test AP50 (project / pycocotools, dense recall grid): "
              + ", ".join(f"{c} {ours[c]:.4f} / {ref[c]:.4f}" for c in (*KINDS, "mAP50")))
        for c in (*KINDS, "mAP50"):
            assert ours[c] == pytest.approx(ref[c], abs=AP_TOLERANCE), (c, ours, ref)
