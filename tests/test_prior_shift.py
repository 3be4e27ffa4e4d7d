"""A head's prior shift (manifest `class_log_prior_shift`): the analyzer adds it to that class's
calibrated log-odds, every other class untouched; a shift naming a class the head lacks is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_tta import rendered_crops

from smearscope.engines.manifest import ManifestError, load_manifest
from smearscope.engines.registry import create_engine
from smearscope.service.analysis.classify import CropClassifier, softmax

MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = pytest.mark.skipif(not (MODELS / "rbc_head.onnx").exists(), reason="committed models absent")


def _manifest_with(tmp_path: Path, shift: dict[str, float]) -> Path:
    m = json.loads((MODELS / "rbc_head.json").read_text())
    m["class_log_prior_shift"] = shift
    os.symlink(MODELS / m["file"], tmp_path / m["file"])
    path = tmp_path / "rbc_head.json"
    path.write_text(json.dumps(m))
    return path


def _run(manifest: Path, crops: np.ndarray) -> tuple[np.ndarray, list[str], float]:
    engine = create_engine("onnxruntime", manifest).load()
    try:
        clf = CropClassifier(engine, 0.0, views=("identity",))
        return clf.logits(crops), clf.classes, engine.manifest.temperature
    finally:
        engine.close()


def test_the_shift_moves_only_its_class_by_its_calibrated_amount(tmp_path: Path) -> None:
    crops = rendered_crops(load_manifest(MODELS / "rbc_head.json", verify_hash=False).crop, seed=8, n=40, width=320)
    (tmp_path / "none").mkdir()
    (tmp_path / "shift").mkdir()
    plain, classes, t = _run(_manifest_with(tmp_path / "none", {}), crops)
    shifted, _, _ = _run(_manifest_with(tmp_path / "shift", {"spherocyte": -3.0, "target": 1.0}), crops)
    s, tg = classes.index("spherocyte"), classes.index("target")
    delta = shifted / t - plain / t  # calibrated log-odds
    np.testing.assert_allclose(delta[:, s], -3.0, atol=1e-4)
    np.testing.assert_allclose(delta[:, tg], 1.0, atol=1e-4)
    others = [k for k in range(len(classes)) if k not in (s, tg)]
    np.testing.assert_allclose(delta[:, others], 0.0, atol=1e-4)
    p0, p1 = softmax(plain / t), softmax(shifted / t)
    assert (p1[:, s] < p0[:, s]).all() and (p1[:, tg] > p0[:, tg]).all()


def test_a_shift_for_a_class_the_head_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="class_log_prior_shift"):
        load_manifest(_manifest_with(tmp_path, {"drepanocyte": -1.0}))


def test_the_committed_rbc_head_carries_the_shifts_fitted_on_validation() -> None:
    m = load_manifest(MODELS / "rbc_head.json")
    record = m.metrics["class_log_prior_shift"]
    # the same raw logit shifts: chosen in calibrated units at the temperature of their fit, kept
    # when the temperature was refitted (the decision rule chosen on validation unchanged)
    fit_t = record.get("temperature", m.temperature)
    assert set(m.class_log_prior_shift) == set(record["chosen"])
    for c, s in record["chosen"].items():
        assert m.class_log_prior_shift[c] * m.temperature == pytest.approx(s * fit_t, abs=2e-4)
    # only the classes the fit may move, each the way its rule moves it (a zero shift is left out)
    assert set(record["chosen"]) <= {"normal", "spherocyte", "schistocyte"} and "normal" in record["chosen"]
    assert record["chosen"]["normal"] > 0
    assert all(record["chosen"].get(c, 0.0) <= 0 for c in ("spherocyte", "schistocyte"))
    # each ceiling class's shift is the smallest of its sweep that meets the ceiling
    for c, ceiling in (("spherocyte", 0.10), ("schistocyte", 0.02)):
        rows = record["val_by_shift_last_sweep"][c]
        chosen_c = abs(record["chosen"].get(c, 0.0))
        assert rows[f"{chosen_c:.2f}"][f"bccd_{c}_share"] <= ceiling
        assert all(r[f"bccd_{c}_share"] > ceiling or r["chula_macro_f1"] < record["val_unshifted"]["chula_macro_f1"] - 0.01
                   or r["idb1_sickle_vs_not"] < record["val_unshifted"]["idb1_sickle_vs_not"]
                   for k, r in rows.items() if float(k) < chosen_c)
    # normal's shift is the best Chula val macro-F1 of its sweep, and no higher than it needs to be
    sweep = record["val_by_shift_last_sweep"]["normal"]
    chosen = sweep[f"{record['chosen']['normal']:.2f}"]
    assert chosen["chula_macro_f1"] == max(r["chula_macro_f1"] for r in sweep.values()
                                           if r["idb1_sickle_vs_not"] >= record["val_unshifted"]["idb1_sickle_vs_not"])
    assert chosen["chula_macro_f1"] >= sweep["0.00"]["chula_macro_f1"] + 0.002
    assert not any(float(k) < record["chosen"]["normal"] and r["chula_macro_f1"] == chosen["chula_macro_f1"]
                   for k, r in sweep.items())  # the smallest shift with that figure
    val = record["val_shifted"]
    assert val["bccd_spherocyte_share"] <= 0.10 and val["bccd_schistocyte_share"] <= 0.02
    cost = record.get("max_f1_cost", 0.01)  # training.prior_shift --max-f1-cost, recorded with the shifts
    assert cost <= 0.02
    assert val["chula_macro_f1"] >= record["val_unshifted"]["chula_macro_f1"] - cost
    assert val["idb1_sickle_vs_not"] >= record["val_unshifted"]["idb1_sickle_vs_not"]


def test_the_fitting_replays_the_classifier_exactly(tmp_path: Path) -> None:
    """training.prior_shift scores every candidate shift by replaying the classifier's gating on
    each view's logits; the replay must give the classifier's own probabilities (more crops than
    one engine chunk, some sure and some unsure under the first view)."""
    from smearscope.service.analysis.classify import CHUNK_CROPS
    from training.prior_shift import gated_probs, view_logits

    crop = load_manifest(MODELS / "rbc_head.json", verify_hash=False).crop
    crops = np.concatenate([rendered_crops(crop, seed=s, n=400, width=900, height=700) for s in (8, 9, 10)])
    assert len(crops) > CHUNK_CROPS
    shifts = {"spherocyte": -3.0, "schistocyte": -2.0, "target": 0.5}
    engine = create_engine("onnxruntime", _manifest_with(tmp_path, shifts)).load()
    try:
        clf = CropClassifier(engine, 0.0)
        t = engine.manifest.temperature
        expected = softmax(clf.logits(crops) / t)
        shift = np.array([shifts.get(c, 0.0) for c in clf.classes], np.float32)
        vl = view_logits(clf, crops)
        got = gated_probs(vl, shift, t, clf.extra_views_below)
        first = softmax((vl[0] + shift * t) / t).max(1)
    finally:
        engine.close()
    assert 0 < (first < clf.extra_views_below).sum() < len(crops)
    np.testing.assert_allclose(got, expected, atol=1e-5)
