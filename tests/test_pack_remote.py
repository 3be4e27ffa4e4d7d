"""training.pack_remote: the folder a GPU machine trains from keeps every image and label."""

from __future__ import annotations

import json
import tarfile

import cv2
import numpy as np
import pytest

from smearscope.device.synthetic import render_field
from training.pack_remote import pack_seg


def test_pack_seg_keeps_every_image_and_label(tmp_path):
    seg = tmp_path / "seg"
    for split, seeds in (("train", (1, 2)), ("val", (3,))):
        (seg / "images" / split).mkdir(parents=True)
        (seg / "labels" / split).mkdir(parents=True)
        for s in seeds:
            img = render_field(seed=s, width=96, height=80).frame.pixels
            cv2.imwrite(str(seg / "images" / split / f"f{s}.png"), img)
            (seg / "labels" / split / f"f{s}.txt").write_text(f"0 0.1 0.1 0.2 0.1 0.2 0.2 # {s}\n")
    out = tmp_path / "seg.tgz"
    assert pack_seg(seg, out) == 3
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        assert names == ["seg/images/train/f1.jpg", "seg/images/train/f2.jpg", "seg/images/val/f3.jpg",
                         "seg/labels/train/f1.txt", "seg/labels/train/f2.txt", "seg/labels/val/f3.txt"]
        assert tar.extractfile("seg/labels/val/f3.txt").read().decode().endswith("# 3\n")
        jpg = np.frombuffer(tar.extractfile("seg/images/train/f2.jpg").read(), np.uint8)
    back = cv2.imdecode(jpg, cv2.IMREAD_COLOR)
    src = cv2.imread(str(seg / "images" / "train" / "f2.png"))
    assert back.shape == src.shape
    assert np.abs(back.astype(int) - src.astype(int)).mean() < 4.0  # JPEG 93, not another image


def test_pack_mix_lists_and_sizes_name_the_packed_tiles(tmp_path):
    """lab_mix's lists travel as ./images/... entries of the packed format, repeats kept, and the
    valid sizes train_seg --look reads are keyed by the packed names (else the pad enters the look)."""
    seg = tmp_path / "seg"
    for split, names in (("train", ("rpi_a", "bccd_b")), ("val", ("rpi_c",))):
        (seg / "images" / split).mkdir(parents=True)
        (seg / "labels" / split).mkdir(parents=True)
        for i, name in enumerate(names):
            img = render_field(seed=i, width=64, height=64).frame.pixels
            cv2.imwrite(str(seg / "images" / split / f"{name}.png"), img)
            (seg / "labels" / split / f"{name}.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")
    train = seg / "images" / "train"
    (seg / "train_mix.txt").write_text(f"{train / 'rpi_a.png'}\n{train / 'rpi_a.png'}\n{train / 'bccd_b.png'}\n")
    (seg / "valid_sizes.json").write_text(json.dumps({"rpi_a.png": [40, 50]}))
    out = tmp_path / "seg.tgz"
    assert pack_seg(seg, out, mix="mix", ext=".webp") == 3
    with tarfile.open(out) as tar:
        read = lambda name: tar.extractfile(name).read().decode()
        assert read("seg/train.txt").splitlines() == [
            "./images/train/rpi_a.webp", "./images/train/rpi_a.webp", "./images/train/bccd_b.webp"]
        assert read("seg/val.txt").splitlines() == ["./images/val/rpi_c.webp"]  # no val_mix.txt: every val tile
        assert json.loads(read("seg/valid_sizes.json")) == {"rpi_a.webp": [40, 50]}
        assert "seg/images/train/rpi_a.webp" in tar.getnames()
        webp = np.frombuffer(tar.extractfile("seg/images/train/rpi_a.webp").read(), np.uint8)
    assert cv2.imdecode(webp, cv2.IMREAD_COLOR).shape == (64, 64, 3)


def test_pack_mix_refuses_a_list_naming_a_tile_not_in_the_folder(tmp_path):
    seg = tmp_path / "seg"
    for split in ("train", "val"):
        (seg / "images" / split).mkdir(parents=True)
        (seg / "labels" / split).mkdir(parents=True)
    cv2.imwrite(str(seg / "images" / "train" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (seg / "train_mix.txt").write_text(f"{tmp_path / 'elsewhere' / 'images' / 'train' / 'gone.png'}\n")
    with pytest.raises(SystemExit, match="not a train tile"):
        pack_seg(seg, tmp_path / "seg.tgz", mix="mix")
