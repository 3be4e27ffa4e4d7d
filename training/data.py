"""Dataset adapters: read the public sets from SMEARSCOPE_DATA, with fixed, seeded splits.

Nothing here copies images into the repository; prepared training data goes under `build/`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscope.service.analysis.scale import scale_from_rbc_diameters

SPLIT_SEED = 20261126


def data_root() -> Path:
    return Path(os.environ.get("SMEARSCOPE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))


def require_data_root() -> Path:
    """The datasets' folder; a command that reads them exits first, naming the folder, when it is
    not there (a clone without ../shared beside it, SMEARSCOPE_DATA unset or mistyped)."""
    root = data_root()
    if not root.is_dir():
        raise SystemExit(f"no datasets at {root}: set SMEARSCOPE_DATA to the folder holding bccd/, txl_pbc/, pbc/, "
                         "chula_rbc12/, chula_wbc_rpi/ and erythrocytesidb1/ (default: ../shared/datasets beside "
                         "the repository)")
    return root


@dataclass(frozen=True)
class BoxAnnotation:
    kind: str  # rbc | wbc | platelet
    x0: float
    y0: float
    x1: float
    y1: float


_VOC_KIND = {"RBC": "rbc", "WBC": "wbc", "Platelets": "platelet"}


def bccd_dir() -> Path:
    return data_root() / "bccd" / "BCCD"


def _voc_ids(name: str) -> list[str]:
    return (bccd_dir() / "ImageSets" / "Main" / f"{name}.txt").read_text().split()


def bccd_split(name: str) -> list[str]:
    """Image ids of BCCD's own VOC split (train | val | test; test is the held-out split); val and
    test without the images that copy one a model fits on (BCCD train, TXL-PBC train and val as
    the models saw them: training.overlap)."""
    return list(_bccd_split(str(data_root()), name))


@functools.lru_cache(maxsize=8)
def _bccd_split(root: str, name: str) -> tuple[str, ...]:
    if name not in ("val", "test"):
        return tuple(_voc_ids(name))
    from training.overlap import held_out_parts

    parts = {s: _voc_ids(s) for s in ("train", "val", "test")}
    fitted = [*_txl_raw("train"), *_txl_raw("val")] if txl_dir().is_dir() else []
    return tuple(held_out_parts(parts, bccd_image_path, fitted)[name])


def bccd_boxes(image_id: str) -> list[BoxAnnotation]:
    root = ET.parse(bccd_dir() / "Annotations" / f"{image_id}.xml").getroot()
    out = []
    for obj in root.iter("object"):
        kind = _VOC_KIND.get(obj.findtext("name", "").strip())
        bb = obj.find("bndbox")
        if kind is None or bb is None:
            continue
        x0, y0, x1, y1 = (float(bb.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 > x0 and y1 > y0:
            out.append(BoxAnnotation(kind, x0, y0, x1, y1))
    return out


def bccd_image_path(image_id: str) -> Path:
    return bccd_dir() / "JPEGImages" / f"{image_id}.jpg"


def bccd_microns_per_pixel() -> float:
    """One scale for the whole set, from whole (not edge-cut) red-cell boxes of the TRAIN split."""
    diam = []
    for image_id in bccd_split("train"):
        for b in bccd_boxes(image_id):
            if b.kind == "rbc" and b.x0 > 2 and b.y0 > 2 and b.x1 < 637 and b.y1 < 477:
                diam.append(((b.x1 - b.x0) + (b.y1 - b.y0)) / 2.0)
    mpp = scale_from_rbc_diameters(np.array(diam))
    assert mpp is not None
    return mpp


def seeded_split(items: list[str], fractions: tuple[float, float, float], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Deterministic train/val/test split of sorted `items`."""
    ordered = sorted(items)
    random.Random(seed).shuffle(ordered)
    n = len(ordered)
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    return {
        "train": ordered[:n_train],
        "val": ordered[n_train : n_train + n_val],
        "test": ordered[n_train + n_val :],
    }


def splits_record() -> dict[str, object]:
    """What a model manifest says about its splits (`training_data.splits`): the seed and how each
    set is split, so a reader can rebuild every held-out list (its hashes are in `split_hashes`)."""
    return {
        "seed": SPLIT_SEED,
        "seeded": "training.data.seeded_split with the seed: PBC stratified 80/10/10 per class, Chula RBC-12 "
                  "80/10/10 by image, erythrocytesIDB1 train/ 85/15; training.labs: chula_wbc_rpi 70/15/15 by "
                  "blocks of consecutive frames of each slide (seed and slide)",
        "fixed": "BCCD VOC train/val/test, TXL-PBC's own train/val/test, erythrocytesIDB1 test/",
        "held_out": "the val and test parts less the images that copy one a model fitted on (training.overlap)",
    }


def split_record(entry: dict) -> str:
    """One `split_hashes` value from a prepared split's metadata: its hash, else the rendered
    fields' seeds, else its sources' image counts (TXL-PBC's own split lists them per source)."""
    if entry.get("hash"):
        return str(entry["hash"])
    if "seeds" in entry:
        return f"seeds {entry['seeds'][0]}..{entry['seeds'][1]}"
    if "n" in entry:
        return f"n={entry['n']}"
    counts = {k: v for k, v in entry.items() if isinstance(v, int) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "not recorded"


def split_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def bccd_wbc_types() -> dict[str, str]:
    """BCCD's per-image WBC subtype (wbc_labels.csv), for images with exactly one category."""
    out = {}
    with open(data_root() / "bccd" / "BCCD" / "wbc_labels.csv", newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 3 and row[1].strip().isdigit() and row[2].strip() and "," not in row[2]:
                out[f"BloodImage_{int(row[1]):05d}"] = row[2].strip().lower()
    return out


#: TXL-PBC's YOLO class ids.
TXL_KIND = {0: "wbc", 1: "rbc", 2: "platelet"}


def txl_dir() -> Path:
    return data_root() / "txl_pbc" / "TXL_PBC"


def _txl_raw(split: str) -> list[Path]:
    return sorted((txl_dir() / "images" / split).iterdir())


def txl_images(split: str) -> list[Path]:
    """TXL-PBC images of its own split (train | val | test; test is held out), sorted by name,
    without the BCCD fields TXL-PBC gathered (no other lab's), val and test without copies of
    its train images (training.overlap)."""
    return list(_txl_images(str(data_root()), split))


@functools.lru_cache(maxsize=8)
def _txl_images(root: str, split: str) -> tuple[Path, ...]:
    from training.overlap import copies, held_out_parts

    parts = {s: [str(p) for p in _txl_raw(s)] for s in ("train", "val", "test")}
    kept = [Path(p) for p in held_out_parts(parts, Path)[split]]
    bccd = [bccd_image_path(i) for s in ("train", "val", "test") for i in _voc_ids(s)] if bccd_dir().is_dir() else []
    of_bccd = copies(kept, bccd)
    return tuple(p for p in kept if p not in of_bccd)


def stored_size(image: Path) -> tuple[int, int] | None:
    """(width, height) a stored image's YOLO boxes are scaled to: a half-size grey decode (a quarter
    of the work) doubled, so within a pixel of an odd side; None where the file does not decode."""
    import cv2

    half = cv2.imread(str(image), cv2.IMREAD_REDUCED_GRAYSCALE_2)
    return None if half is None else (half.shape[1] * 2, half.shape[0] * 2)


def txl_boxes(image: Path, split: str, width: int, height: int) -> list[BoxAnnotation]:
    """An image's annotated boxes in its pixels (YOLO labels are relative to the image size)."""
    lab = txl_dir() / "labels" / split / (image.stem + ".txt")
    out = []
    for line in (lab.read_text().splitlines() if lab.exists() else []):
        v = line.split()
        if len(v) == 5:
            c, cx, cy, bw, bh = int(v[0]), *map(float, v[1:])
            out.append(BoxAnnotation(TXL_KIND[c], (cx - bw / 2) * width, (cy - bh / 2) * height,
                                     (cx + bw / 2) * width, (cy + bh / 2) * height))
    return out
