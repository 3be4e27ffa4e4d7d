"""The committed models' manifests as a reader reproducing them meets them, and what the exporters
write into a new one: each file's sha256, the split seed and held-out parts named, every split
recorded (no placeholder), and the training budget a trial run asks for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smearscope.engines.manifest import ModelManifest, load_manifest, sha256_file
from smearscope.export.onnx_export import parity_gap
from training.data import SPLIT_SEED, split_record, splits_record
from training.export_seg import describe
from training.train_seg import DEFAULT_HOURS, budget

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("seg", "wbc_head", "rbc_head")


@pytest.mark.parametrize("name", MODELS)
def test_committed_manifests_match_their_files_and_name_their_splits(name):
    path = ROOT / "models" / f"{name}.json"
    manifest = load_manifest(path)  # verifies the ONNX file's sha256
    assert manifest.sha256 == sha256_file(ROOT / "models" / manifest.file)
    if manifest.feature_space is not None:  # the WBC head's class means and precision beside it
        assert manifest.feature_space.sha256 == sha256_file(ROOT / "models" / manifest.feature_space.file)
    splits = manifest.training_data["splits"]
    assert splits["seed"] == SPLIT_SEED == 20261126
    assert "training.overlap" in splits["held_out"]
    assert manifest.split_hashes and not any("None" in v for v in manifest.split_hashes.values())
    if manifest.task == "classification":  # the held-out lists their figures were measured on
        assert {"pbc_test", "chula_test", "bccd_test", "rpi_test"} <= set(manifest.split_hashes)


def test_split_records_say_what_each_prepared_split_holds():
    assert split_record({"fields": 205, "tiles": 205, "hash": "efae5680ef9a99d7"}) == "efae5680ef9a99d7"
    assert split_record({"n": 150, "seeds": [10000, 10150]}) == "seeds 10000..10150"
    # TXL-PBC's own split, counted per source (it has no list hash of its own): once 'n=None'
    assert split_record({"txl_416": 158, "txl_575": 350, "txl_360": 115}) == "txl_360 115, txl_416 158, txl_575 350"
    assert split_record({"n": 12}) == "n=12"


def test_export_seg_describes_the_multilab_data_with_its_seed_and_every_split():
    """On the committed detector's own prepared-data record (training_data.labs of seg.json, what
    prep_labs wrote): the manifest the exporter would write again names the seed, records TXL-PBC's
    splits, keeps every hash, and the runtime's manifest model accepts it."""
    committed = json.loads((ROOT / "models" / "seg.json").read_text())
    training_data, hashes = describe({"splits": committed["training_data"]["labs"]}, multilab=True)
    assert training_data["splits"] == splits_record()
    assert hashes["txl_train"] == "txl_360 115, txl_416 158, txl_575 350"
    assert hashes["txl_val"] == "txl_360 29, txl_416 44, txl_575 100"
    for key in ("bccd_train", "bccd_val", "chula_train", "chula_val", "rpi_train", "rpi_val", "synthetic_train"):
        assert hashes[key] == committed["split_hashes"][key]
    ModelManifest.model_validate({**committed, "training_data": training_data, "split_hashes": hashes})


def test_export_seg_counts_bccd_as_prepared_not_as_once_prepared():
    """prep_seg's meta.json of today (BCCD val and test cleared of copies: 66 and 65): the manifest
    says those counts, where it once always said 87 and 72."""
    meta = {"bccd_microns_per_pixel": 0.0721, "splits": {
        "bccd_train": {"n": 205, "hash": "efae5680ef9a99d7"}, "bccd_val": {"n": 66, "hash": "afbb8d1b695577e6"},
        "synthetic_train": {"n": 0, "seeds": [10000, 10000]},
        "bccd_test_heldout": {"n": 65, "hash": "cfc5eb2752fca54b"}}}
    training_data, hashes = describe(meta, multilab=False)
    assert "train split (205)" in training_data["bccd"] and "val (66)" in training_data["bccd"]
    assert "test (65) held out" in training_data["bccd"]
    assert training_data["splits"]["seed"] == SPLIT_SEED
    assert hashes == {"bccd_train": "efae5680ef9a99d7", "bccd_val": "afbb8d1b695577e6",
                      "synthetic_train": "seeds 10000..10000", "bccd_test_heldout": "cfc5eb2752fca54b"}


def test_train_seg_budget_is_the_epochs_asked_for_when_no_hours_are():
    """`train_seg --epochs 1` trains one epoch; ultralytics' `time` overrides epochs, so a default
    hour there once turned a trial run into an hour's training."""
    assert budget(1, None) == (1, None)
    assert budget(None, 0.5) == (300, 0.5)
    assert budget(None, None) == (300, DEFAULT_HOURS)
    assert budget(20, 1.2) == (20, 1.2)


def test_export_parity_allows_float32_rounding_of_a_large_distance_but_not_a_wrong_output():
    """Measured on a WBC head trained for two steps (train_wbc, exported by export_head): logits
    within 1.2e-7, its `ood` distance 358978.06 in PyTorch and 0.3125 off in ONNX Runtime (8.7e-7
    relative); the absolute bound alone (0.01) refused that export."""
    logits = np.array([[0.3011762, -0.12, 0.05]], np.float32)
    ood = np.array([358978.06, 1204.5], np.float32)
    assert parity_gap([logits + 1.2e-7, ood + np.array([0.3125, 0.0], np.float32)], [logits, ood], atol=1e-2) == pytest.approx(0.3125)
    with pytest.raises(RuntimeError, match="differs"):  # a logit off by 0.02
        parity_gap([logits + 0.02, ood], [logits, ood], atol=1e-2)
    with pytest.raises(RuntimeError, match="differs"):  # a distance off by 1 %
        parity_gap([logits, ood * np.float32(1.01)], [logits, ood], atol=1e-2)
    with pytest.raises(RuntimeError, match="differs"):  # a small distance off by more than the bound
        parity_gap([logits, ood - np.array([0, 0.05], np.float32)], [logits, ood], atol=1e-2)


def test_export_parity_refuses_nan_a_lost_infinity_a_missing_output_and_another_shape():
    """What no tolerance admits: an ONNX output that is NaN (or infinite where PyTorch's is
    finite) passed before, as NaN compares false against any bound; so did a missing output
    (zip stops at the shorter list) and an output of another shape that broadcasts."""
    logits = np.array([[0.3011762, -0.12, 0.05]], np.float32)
    ood = np.array([358978.06, 1204.5], np.float32)
    assert parity_gap([logits, np.array([np.inf, 1204.5], np.float32)],
                      [logits, np.array([np.inf, 1204.5], np.float32)], atol=1e-2) == 0.0
    for outs in ([logits, np.array([np.nan, 1204.5], np.float32)],
                 [logits, np.array([np.inf, 1204.5], np.float32)],
                 [np.full_like(logits, np.nan), ood]):
        with pytest.raises(RuntimeError, match="NaN"):
            parity_gap(outs, [logits, ood], atol=1e-2)
    with pytest.raises(RuntimeError, match="outputs"):
        parity_gap([logits], [logits, ood], atol=1e-2)
    with pytest.raises(RuntimeError, match="shape"):
        parity_gap([logits[0], ood], [logits, ood], atol=1e-2)
