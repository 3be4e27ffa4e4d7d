"""training.pack_remote: the folder a lent GPU machine trains from keeps every image and label."""

from __future__ import annotations

import tarfile

import cv2
import numpy as np

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
