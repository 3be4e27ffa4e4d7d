"""A models folder holds what each role of the analysis needs, or the analysis does not start:
the detector a segmentation model of the pipeline's cell kinds whose predictions fit its classes,
each head a crop classifier with one logit per class. A wrong model is a ManifestError at load
(`engine_unavailable` from the CLI), never a traceback or fields failing one by one; outputs are
found by name and shape, not by the order a manifest lists them in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest

from smearscope.device.synthetic import render_field
from smearscope.engines.manifest import ManifestError
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions

MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = pytest.mark.skipif(not (MODELS / "seg.json").exists(), reason="committed models absent")


def _models(tmp_path: Path, name: str, edit: Callable[[dict], None]) -> Path:
    """The committed models copied to tmp_path, `edit` applied to one manifest."""
    folder = tmp_path / "models"
    shutil.copytree(MODELS, folder, ignore=shutil.ignore_patterns("README.md"))
    m = json.loads((folder / f"{name}.json").read_text())
    edit(m)
    (folder / f"{name}.json").write_text(json.dumps(m))
    return folder


def _seg_classes(m: dict) -> None:
    m["classes"] = ["erythrocyte", "leukocyte", "thrombocyte"]
    m["score_calibration"] = {}


def _seg_two_classes(m: dict) -> None:
    m["classes"] = ["rbc", "wbc"]
    del m["score_calibration"]["platelet"]


@pytest.mark.parametrize(("name", "edit", "says"), [
    ("wbc_head", lambda m: m.update(task="segmentation"), "a segmentation model where a crop classifier belongs"),
    ("seg", lambda m: m.update(task="classification", crop={"extent_um": 51.2, "input_size": 256}),
     "does not hold one logit per class (3)"),  # refused by the manifest itself
    ("seg", _seg_classes, "are none of the detector's ['rbc', 'wbc', 'platelet']"),
    ("seg", _seg_two_classes, "predictions of 39 rows where 4 box + 2 classes + the prototypes make 38"),
    ("rbc_head", lambda m: m.update(classes=m["classes"][:-1]), "does not hold one logit per class (13)"),
])
def test_a_model_that_does_not_fit_its_role_stops_the_analyzer_at_load(tmp_path, name, edit, says) -> None:
    with pytest.raises(ManifestError) as err:
        Analyzer.from_models_dir(_models(tmp_path, name, edit), warmup=False)
    assert says in str(err.value)


def test_the_cli_says_engine_unavailable_for_a_detector_of_other_classes(tmp_path) -> None:
    """Once a ValueError traceback from the detector's class table."""
    image = tmp_path / "field.png"
    cv2.imwrite(str(image), render_field(3, width=320, height=240, microns_per_pixel=0.1).frame.pixels)
    out = subprocess.run([sys.executable, "-m", "smearscope", "analyze", str(image), "--json",
                          "--models", str(_models(tmp_path, "seg", _seg_classes))],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert json.loads(out.stdout.splitlines()[0])["error"]["code"] == "engine_unavailable"
    assert "Traceback" not in out.stderr


def _summary(analyzer: Analyzer) -> list[tuple]:
    field = render_field(0, width=480, height=360, microns_per_pixel=0.1)  # a typed neutrophil among its cells
    try:
        cells = analyzer.analyze(field.frame).cells
    finally:
        analyzer.close()
    return [(c.detection.kind, c.label, None if c.label_score is None else round(c.label_score, 5), c.detection.box)
            for c in cells]


def test_outputs_listed_in_another_order_give_the_same_cells(tmp_path) -> None:
    """The detector's predictions and prototypes, and the WBC head's logits, distance and features,
    listed in reverse: the same cells, types and confidences (the first output was taken for the
    predictions and the logits)."""
    one = AnalyzerOptions(detector_views=("identity",), rbc_views=("identity",), wbc_views=("identity",))
    want = _summary(Analyzer.from_models_dir(MODELS, options=one, warmup=False))
    folder = _models(tmp_path, "seg", lambda m: m["outputs"].reverse())
    m = json.loads((folder / "wbc_head.json").read_text())
    m["outputs"].reverse()
    (folder / "wbc_head.json").write_text(json.dumps(m))
    got = _summary(Analyzer.from_models_dir(folder, options=one, warmup=False))
    assert got == want and any(kind.value == "wbc" and label == "neutrophil" for kind, label, *_ in got)


def test_reports_tell_a_recalibrated_head_from_the_one_before(tmp_path) -> None:
    """The same ONNX file with another temperature (a head recalibrated on validation) types cells
    otherwise: its reports' models carry another manifest_sha256 (the FHIR Device's version says
    it too), while new test figures in the manifest change nothing a report names."""
    from smearscope.service.fhir.bundle import report_bundle

    field = render_field(5, width=640, height=480, microns_per_pixel=0.1).frame
    one = AnalyzerOptions(detector_views=("identity",), rbc_views=("identity",), wbc_views=("identity",))

    def models_of(folder: Path) -> dict:
        report = Analyzer.from_models_dir(folder, options=one, warmup=False).analyze(field).report
        return {role: (m.sha256, m.manifest_sha256) for role, m in report.models.items()}, report

    base, report = models_of(MODELS)
    assert all(h is not None and len(h) == 64 for _, h in base.values())
    recal, _ = models_of(_models(tmp_path / "t", "rbc_head", lambda m: m.update(temperature=m["temperature"] * 1.1)))
    assert recal["rbc_head"][0] == base["rbc_head"][0] and recal["rbc_head"][1] != base["rbc_head"][1]
    assert {k: v for k, v in recal.items() if k != "rbc_head"} == {k: v for k, v in base.items() if k != "rbc_head"}
    figures, _ = models_of(_models(tmp_path / "f", "rbc_head", lambda m: m["metrics"].update(test={"macro_f1": 0.0})))
    assert figures == base
    device = next(e["resource"] for e in report_bundle(report)["entry"] if e["resource"]["resourceType"] == "Device")
    assert any(f"manifest sha256:{base['rbc_head'][1]}" in v["value"] for v in device["version"])
