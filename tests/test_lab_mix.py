"""training.lab_mix: how often each lab's tiles are listed, and a lab left out of a run entirely."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from training.lab_mix import lab_of, mix


def _prepared_set(root: Path) -> Path:
    """A prepared set's layout (training.prep_labs) with empty tiles: lab_mix reads only names."""
    for split, per_lab in (("train", 10), ("val", 3)):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        for prefix in ("BloodImage_", "chula_", "txl_575_", "rpi_", "synthetic_"):
            for i in range(per_lab):
                (folder / f"{prefix}{i:03d}.png").touch()
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {{}}\n")
    return root


def _listed(path: Path) -> Counter:
    return Counter(lab_of(Path(line).name) for line in path.read_text().splitlines())


def test_weights_list_tiles_that_many_times(tmp_path):
    data = _prepared_set(tmp_path)
    counts = mix(data, {"bccd": 2, "chula": 0.5})
    listed = _listed(data / "train_mix.txt")
    assert listed == Counter({"bccd": 20, "chula": 5, "txl_575": 10, "rpi": 10, "synthetic": 10})
    assert {k: v for k, v in counts.items() if v} == dict(listed)
    yaml = (data / "data_mix.yaml").read_text()
    assert "train: train_mix.txt" in yaml and "val: images/val" in yaml  # validation as prepared


def test_a_lab_at_weight_zero_leaves_training_and_validation(tmp_path):
    data = _prepared_set(tmp_path)
    mix(data, {"chula": 0}, name="no_chula")
    assert "chula" not in _listed(data / "train_no_chula.txt")
    val = _listed(data / "val_no_chula.txt")
    assert "chula" not in val and val["bccd"] == 3 and val["rpi"] == 3
    yaml = (data / "data_no_chula.yaml").read_text()
    assert "train: train_no_chula.txt" in yaml and "val: val_no_chula.txt" in yaml
    assert not (data / "data_mix.yaml").exists()  # a named run leaves the default mix alone


def test_an_unknown_lab_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown labs"):
        mix(_prepared_set(tmp_path), {"chulaa": 0})


def test_the_txl_group_leaves_out_every_txl_source_and_a_source_keeps_its_own_weight(tmp_path):
    data = _prepared_set(tmp_path)
    for i in range(4):
        (data / "images" / "train" / f"txl_416_{i:03d}.png").touch()
        (data / "images" / "val" / f"txl_416_{i:03d}.png").touch()
    mix(data, {"txl": 0}, name="no_txl")
    assert not {"txl_575", "txl_416"} & set(_listed(data / "train_no_txl.txt"))
    assert not {"txl_575", "txl_416"} & set(_listed(data / "val_no_txl.txt"))
    mix(data, {"txl": 2, "txl_416": 0.5})
    listed = _listed(data / "train_mix.txt")
    assert listed["txl_575"] == 20 and listed["txl_416"] == 2


def test_a_mix_renamed_without_a_lab_left_out_drops_the_earlier_validation_list(tmp_path):
    """Otherwise pack_remote would ship the earlier, smaller validation list with the new mix."""
    data = _prepared_set(tmp_path)
    mix(data, {"chula": 0}, name="run")
    assert (data / "val_run.txt").exists()
    mix(data, {"chula": 0.5}, name="run")
    assert not (data / "val_run.txt").exists()
    assert "val: images/val" in (data / "data_run.yaml").read_text()
