"""Held-out images that copy a fitted one are found and left out (training.overlap), on rendered
fields: a resized JPEG copy is a copy, another field is not, and a held-out frame that shows a
train frame's cell (the scan came back to it) is seen."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from training import overlap


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(overlap, "CACHE", tmp_path / "cache")


def _field(seed: int, width: int = 640, height: int = 480) -> np.ndarray:
    return np.asarray(render_field(seed, width=width, height=height, microns_per_pixel=0.1).frame.pixels)


def _write(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return path


def test_a_resized_copy_is_found_and_left_out_of_the_held_out_parts(tmp_path):
    fields = {i: _field(i) for i in range(6)}
    paths = {f"f{i}": _write(tmp_path / "a", f"f{i}.jpg", px) for i, px in fields.items()}
    # f3's copy at another size and quality (as TXL-PBC resized BCCD's fields), in another dataset
    copy = _write(tmp_path / "b", "copy.jpg", cv2.resize(fields[3], (416, 312), interpolation=cv2.INTER_AREA))
    assert overlap.copies([paths["f3"], paths["f4"]], [copy]) == {paths["f3"]}
    assert overlap.copies([paths["f3"]], [paths["f3"]]) == set()  # never its own copy
    parts = {"train": ["f0", "f1"], "val": ["f2", "f3"], "test": ["f4", "f5"]}
    kept = overlap.held_out_parts(parts, paths.__getitem__, fitted=[copy])
    assert kept == {"train": ["f0", "f1"], "val": ["f2"], "test": ["f4", "f5"]}
    # a test image that copies a val image (validation chose the models) is left out too
    again = _write(tmp_path / "a", "f5.jpg", fields[2])
    assert again == paths["f5"]
    kept = overlap.held_out_parts(parts, paths.__getitem__)
    assert kept["test"] == ["f4"] and kept["val"] == ["f2", "f3"]


def test_a_held_out_frame_showing_a_train_frames_cell_is_seen(tmp_path, monkeypatch):
    """Two frames of one slide overlapping by half a field (the scan came back) and a frame of
    another part of the slide: only the overlapping one is seen in train."""
    slide = _field(9, width=1280, height=480)
    frames = {"S_1": slide[:, :640], "S_2": slide[:, 320:960], "S_3": slide[:, 640:], "T_1": _field(10)}
    paths = {s: _write(tmp_path / "rpi", f"{s}.jpg", np.ascontiguousarray(px)) for s, px in frames.items()}
    # one labelled cell per held-out frame, in the part a train frame also shows (S_2's left half is
    # S_1's right half) or not (S_3 shares nothing with S_1)
    cells = {"S_2": [(100, 150, 200, 250)], "S_3": [(400, 150, 500, 250)], "T_1": [(100, 150, 200, 250)]}
    parts = {"train": ["S_1"], "val": ["S_2", "T_1"], "test": ["S_3"]}
    def cells_of(s, w, h):
        return cells.get(s, [])

    def slide_of(s):
        return s.split("_")[0]

    assert overlap.rpi_revisited(parts, paths.__getitem__, cells_of, slide_of) == {"S_2"}
    # cached: asked again, the same answer without matching; other labels are another question
    def no_matching(*args, **kwargs):
        raise AssertionError("matched again")
    monkeypatch.setattr(overlap.cv2, "matchTemplate", no_matching)
    assert overlap.rpi_revisited(parts, paths.__getitem__, cells_of, slide_of) == {"S_2"}
    cells["S_2"] = [(400, 150, 500, 250)]  # relabelled: the key changes, the matching runs again
    with pytest.raises(AssertionError, match="matched again"):
        overlap.rpi_revisited(parts, paths.__getitem__, cells_of, slide_of)
