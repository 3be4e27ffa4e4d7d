"""The committed heads are the ones their manifests describe: each head's held-out figures,
measured the way the analyzer runs it (service.analysis.classify: the manifest's test-time views and
temperature), are the figures written in its manifest, and meet the issue's bars where they do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realdata import DATA

from training import head_data as hd
from training.evaluate import eval_head, head_crop, rbc_crop_sets, wbc_crop_sets

MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (MODELS / "rbc_head.json").exists(), reason="committed models absent")]
needs_pbc = pytest.mark.skipif(not (DATA / "pbc").is_dir(), reason=f"PBC not found under {DATA} (set SMEARSCOPE_DATA)")
needs_rpi = pytest.mark.skipif(not (DATA / "chula_wbc_rpi").is_dir(),
                               reason=f"chula_wbc_rpi not found under {DATA} (set SMEARSCOPE_DATA)")
needs_rbc_sets = pytest.mark.skipif(
    not ((DATA / "chula_rbc12" / "Label").is_dir() and (DATA / "erythrocytesidb1").is_dir()),
    reason=f"Chula RBC-12 or erythrocytesIDB1 not found under {DATA} (set SMEARSCOPE_DATA)")


def _manifest(name: str) -> dict:
    return json.loads((MODELS / f"{name}.json").read_text())


@needs_rbc_sets
def test_rbc_head_figures_are_its_manifests_and_sickle_bar_holds():
    m = _manifest("rbc_head")
    sets = rbc_crop_sets(MODELS / "rbc_head.json", head_crop(MODELS / "rbc_head.json"), "test")
    rep, _, _ = eval_head(MODELS / "rbc_head.json", *sets["chula"], hd.RBC_CLASSES)
    assert rep["macro_f1"] == pytest.approx(m["metrics"]["test"]["macro_f1"], abs=1e-6)
    assert rep["accuracy"] == pytest.approx(m["metrics"]["test"]["accuracy"], abs=1e-6)
    assert m["metrics"]["test_time_views"]["chosen"] == m["tta"]  # measured in the views it runs in
    idb_images, idb_labels, is_sickle = sets["idb1"]
    _, probs, names = eval_head(MODELS / "rbc_head.json", idb_images, idb_labels, hd.RBC_CLASSES)
    acc = float(((probs.argmax(1) == names.index("sickle")) == is_sickle).mean())
    assert acc == pytest.approx(m["metrics"]["idb1_test_sickle_vs_not_accuracy"], abs=1e-6)
    assert acc >= 0.96


@needs_pbc
@needs_rpi
def test_wbc_head_figures_are_its_manifests_and_meet_the_bars():
    """Per lab (PBC, BCCD, rpi test crops, lamp-corrected as the manifest says), the accuracy the
    analyzer's classifier gives is the manifest's, and PBC stays >= 0.95 (issue 16). (The other labs
    read 0.825 and 0.714 on the test parts no model saw: models/README.md; the station's 0.818
    before counted 20 cells a train frame shows.)"""
    m = _manifest("wbc_head")
    recorded = m["metrics"]["test_closed_set"]
    sets = wbc_crop_sets(MODELS / "wbc_head.json", "test")
    assert set(sets) == set(recorded) == {"pbc", "bccd", "rpi"}
    got = {}
    for lab, (images, labels) in sets.items():
        rep, _, _ = eval_head(MODELS / "wbc_head.json", images, labels, hd.PBC_CLASSES)
        got[lab] = rep["accuracy"]
        assert rep["accuracy"] == pytest.approx(recorded[lab]["accuracy"], abs=1e-4), lab
    assert got["pbc"] >= 0.95, got
