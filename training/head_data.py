"""Crop datasets for the two classifier heads, built with the analyzer's own crop function.

WBC head: PBC single-cell crops (8 folders), seeded stratified 80/10/10 split.
RBC head: Chula RBC-12 cell centres (split by IMAGE, 80/10/10) plus erythrocytesIDB1 sickle
crops (its own `train/` and `test/` folders; `test/` is held out).
Every crop goes through `service.analysis.scale.resample_to_canonical` and `service.analysis.crops.crop_cell`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.crops import RBC_CROP, WBC_CROP, CropSpec, crop_cell
from smearscope.service.analysis.scale import (
    NORMAL_RBC_DIAMETER_UM,
    resample_to_canonical,
    scale_from_rbc_diameters,
)
from training.data import (
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    bccd_wbc_types,
    data_root,
    seeded_split,
    split_hash,
)
from training.metrics import classification_report

logger = logging.getLogger(__name__)

PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
PBC_MICRONS_PER_PIXEL = 0.19  # 360x363 crops at ~0.1 um/px resized to 192x192 (datasets README)

CHULA_CLASSES = (
    "normal", "macrocyte", "microcyte", "spherocyte", "target", "stomatocyte", "ovalocyte",
    "teardrop", "burr", "schistocyte", "uncategorised", "hypochromia", "elliptocyte",
)
#: Chula RBC-12 in the analyzer's ruler (a normal red cell's box = 7.5 um, as for BCCD), measured by
#: `python -m training.measure_scale` with the BCCD+PBC detector (0.1749 from 789 normal cells,
#: repeated at its own result until it settled). The datasets README's nominal 0.23 made Chula's
#: normal cells 9.5 um by that ruler, and a head trained at 0.23 called BCCD's normal cells small
#: (schistocyte, microcyte, spherocyte). The multi-lab detector reads Chula at 0.1956 (1291 cells,
#: settled at --at 0.196) but BCCD's red cells, whose scale comes from the annotated boxes
#: (data.bccd_microns_per_pixel), only about 5 % off: heads retrained with Chula at 0.196 called
#: 12-17 % of BCCD val red cells schistocyte. The head and this constant stay at 0.175 until both
#: labs are measured with one ruler (tests/test_realdata_chula_scale.py, a strict xfail, says so).
CHULA_MICRONS_PER_PIXEL = 0.175
#: The RBC head's classes: Chula's morphologies without "uncategorised", plus sickle (IDB1
#: falciforme) and other_poikilocyte (IDB1 "outras": deformed cells that are neither round nor
#: sickle; without them every elongated cell of a sickle-cell smear looked like a sickle cell).
RBC_CLASSES = tuple(c for c in CHULA_CLASSES if c != "uncategorised") + ("sickle", "other_poikilocyte")
IDB1_LABEL = {"falciforme": "sickle", "circular": "normal", "outras": "other_poikilocyte"}


@dataclass
class CropSet:
    images: np.ndarray  # N x S x S x 3 uint8 BGR
    labels: np.ndarray  # N int64
    groups: list[str]  # source image of each crop (for audits)

    def extend(self, other: CropSet, idx: np.ndarray | None = None) -> None:
        """Append `other` (or its rows `idx`), keeping images, labels and groups in step."""
        if idx is None:
            idx = np.arange(len(other.labels))
        self.images = np.concatenate([self.images, other.images[idx]])
        self.labels = np.concatenate([self.labels, other.labels[idx]])
        self.groups = self.groups + [other.groups[i] for i in idx]


def _stack(crops: list[np.ndarray], labels: list[int], groups: list[str], size: int) -> CropSet:
    if not crops:
        return CropSet(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), [])
    return CropSet(np.stack(crops), np.array(labels, np.int64), groups)


def pbc_splits() -> dict[str, list[tuple[str, int]]]:
    """PBC's seeded split per class; val and test without copies of train images (training.overlap)."""
    return {k: list(v) for k, v in _pbc_splits(str(data_root())).items()}


@functools.lru_cache(maxsize=2)
def _pbc_splits(root_name: str) -> dict[str, tuple[tuple[str, int], ...]]:
    from training.overlap import held_out_parts

    root = Path(root_name) / "pbc"
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for ci, cls in enumerate(PBC_CLASSES):
        files = [str(p.relative_to(root)) for p in sorted((root / cls).glob("*.jpg"))]
        for split, ids in held_out_parts(seeded_split(files, (0.8, 0.1, 0.1)), lambda rel: root / rel).items():
            out[split] += [(f, ci) for f in ids]
    return {k: tuple(v) for k, v in out.items()}


def pbc_crops(split: str) -> CropSet:
    root = data_root() / "pbc"
    crops, labels, groups = [], [], []
    for rel, ci in tqdm(pbc_splits()[split], desc=f"pbc {split}"):
        img = cv2.imread(str(root / rel))
        if img is None:
            continue
        canon = resample_to_canonical(img, PBC_MICRONS_PER_PIXEL)
        h, w = canon.shape[:2]
        crops.append(crop_cell(canon, (w / 2.0, h / 2.0), WBC_CROP))
        labels.append(ci)
        groups.append(rel)
    return _stack(crops, labels, groups, WBC_CROP.input_size)


def bccd_wbc_crops(split: str) -> CropSet:
    """WBC crops from BCCD (another lab, camera and stain than PBC), labelled from wbc_labels.csv.

    Only images with exactly one annotated WBC and one subtype label are used, so the label
    belongs to that cell. BCCD's own VOC split decides train / val / test (test stays held out).
    """
    types = bccd_wbc_types()
    mpp = bccd_microns_per_pixel()
    crops, labels, groups = [], [], []
    for image_id in bccd_split(split):
        cls = types.get(image_id)
        wbcs = [b for b in bccd_boxes(image_id) if b.kind == "wbc"]
        if cls not in PBC_CLASSES or len(wbcs) != 1:
            continue
        img = cv2.imread(str(bccd_image_path(image_id)))
        if img is None:
            continue
        canon = resample_to_canonical(img, mpp)
        f = canon.shape[1] / img.shape[1]
        b = wbcs[0]
        crops.append(crop_cell(canon, ((b.x0 + b.x1) / 2.0 * f, (b.y0 + b.y1) / 2.0 * f), WBC_CROP))
        labels.append(PBC_CLASSES.index(cls))
        groups.append(f"bccd/{image_id}")
    return _stack(crops, labels, groups, WBC_CROP.input_size)


def chula_splits() -> dict[str, list[str]]:
    """Chula RBC-12's seeded split by image; val and test without copies of train images (some
    are byte-identical with their own label files: training.overlap)."""
    return {k: list(v) for k, v in _chula_splits(str(data_root())).items()}


@functools.lru_cache(maxsize=2)
def _chula_splits(root_name: str) -> dict[str, tuple[str, ...]]:
    from training.overlap import held_out_parts

    folder = Path(root_name) / "chula_rbc12" / "Dataset"
    ids = [p.stem for p in folder.glob("*.jpg")]
    parts = held_out_parts(seeded_split(ids, (0.8, 0.1, 0.1)), lambda i: folder / f"{i}.jpg")
    return {k: tuple(v) for k, v in parts.items()}


def chula_points(image_id: str) -> list[tuple[float, float, str]]:
    """Chula's labelled cell centres (x, y in its own pixels) and class names; unknown codes dropped."""
    lab = data_root() / "chula_rbc12" / "Label" / f"{image_id}.txt"
    out = []
    for line in lab.read_text().split("\n") if lab.exists() else []:
        parts = line.split()
        if len(parts) >= 3 and 0 <= int(parts[2]) < len(CHULA_CLASSES):
            out.append((float(parts[0]), float(parts[1]), CHULA_CLASSES[int(parts[2])]))
    return out


def chula_crops(split: str, spec: CropSpec = RBC_CROP) -> CropSet:
    root = data_root() / "chula_rbc12"
    crops, labels, groups = [], [], []
    f = CHULA_MICRONS_PER_PIXEL
    for image_id in tqdm(chula_splits()[split], desc=f"chula {split}"):
        img = cv2.imread(str(root / "Dataset" / f"{image_id}.jpg"))
        points = chula_points(image_id)
        if img is None or not points:
            continue
        canon = resample_to_canonical(img, f)
        factor = f / 0.2
        for x, y, name in points:
            if name not in RBC_CLASSES:
                continue
            crops.append(crop_cell(canon, (x * factor, y * factor), spec))
            labels.append(RBC_CLASSES.index(name))
            groups.append(f"chula/{image_id}")
    return _stack(crops, labels, groups, spec.input_size)


def _cell_diameter(img: np.ndarray) -> float | None:
    sat = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[:, :, 1]
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    score = cv2.GaussianBlur(cv2.addWeighted(sat, 0.5, 255 - gray, 0.5, 0), (3, 3), 0)
    _, m = cv2.threshold(score, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    return 2.0 * float(np.sqrt(cv2.contourArea(cv2.convexHull(c)) / np.pi))


def idb1_microns_per_pixel() -> float:
    """One scale for erythrocytesIDB1: round ('circular') train cells are taken as 7.5 um."""
    root = data_root() / "erythrocytesidb1" / "train" / "circular"
    d = [_cell_diameter(cv2.imread(str(p))) for p in sorted(root.glob("*.jpg"))]
    mpp = scale_from_rbc_diameters(np.array([x for x in d if x]))
    return mpp if mpp is not None else NORMAL_RBC_DIAMETER_UM / 60.0


def idb1_crops(split: str, mpp: float, folders: tuple[str, ...] = ("falciforme", "circular", "outras"),
               spec: CropSpec = RBC_CROP) -> tuple[CropSet, np.ndarray]:
    """IDB1 crops; returns the set and a boolean 'is sickle' array (for the sickle-vs-not metric).

    Labels: falciforme -> sickle, circular -> normal, outras -> other_poikilocyte (IDB1_LABEL).
    """
    root = data_root() / "erythrocytesidb1" / split
    crops, labels, groups, sickle = [], [], [], []
    for folder in folders:
        for p in sorted((root / folder).glob("*.jpg")):
            img = cv2.imread(str(p))
            if img is None:
                continue
            canon = resample_to_canonical(img, mpp)
            h, w = canon.shape[:2]
            crops.append(crop_cell(canon, (w / 2.0, h / 2.0), spec))
            labels.append(RBC_CLASSES.index(IDB1_LABEL[folder]))
            groups.append(f"idb1/{split}/{folder}/{p.name}")
            sickle.append(folder == "falciforme")
    return _stack(crops, labels, groups, spec.input_size), np.array(sickle, bool)


def idb1_train_val_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """IDB1 ships train/ and test/ only: a seeded 15% of train/ is the validation split (never trained on)."""
    order = np.random.default_rng(0).permutation(n)
    cut = int(0.85 * n)
    return order[:cut], order[cut:]


def split_manifest() -> dict[str, str]:
    """Hashes of every held-out list, written into the model manifests."""
    from training.labs import rpi_splits

    pbc = pbc_splits()
    ch = chula_splits()
    out = {
        "pbc_test": split_hash([f for f, _ in pbc["test"]]),
        "pbc_val": split_hash([f for f, _ in pbc["val"]]),
        "chula_test": split_hash(ch["test"]),
        "chula_val": split_hash(ch["val"]),
        "bccd_test": split_hash(bccd_split("test")),
        "bccd_val": split_hash(bccd_split("val")),
    }
    try:
        rpi = rpi_splits()
        out |= {"rpi_test": split_hash(rpi["test"]), "rpi_val": split_hash(rpi["val"])}
    except FileNotFoundError:  # the station's set absent: its lists are not held out here
        pass
    return out


#: Synthetic renderer morphology -> RBC head class (the renderer's echinocyte is a burr cell).
SYNTHETIC_RBC_LABEL = {"normal": "normal", "target": "target", "spherocyte": "spherocyte", "ovalocyte": "ovalocyte",
                       "sickle": "sickle", "echinocyte": "burr"}


def synthetic_rbc_crops(n_fields: int, seed_base: int, spec: CropSpec = RBC_CROP) -> CropSet:
    """RBC crops from rendered fields (exact centres and morphologies), at the canonical scale.

    Cells cut by the frame edge are skipped; stain varies per field.
    """
    from smearscope.device.synthetic import StainParams, render_field

    crops, labels, groups = [], [], []
    for i in range(n_fields):
        seed = seed_base + i
        rng = np.random.default_rng(seed)
        field = render_field(seed, width=512, height=384, microns_per_pixel=0.2, stain=StainParams.sample(rng),
                             rbc_mix={"normal": 0.4, "target": 0.12, "spherocyte": 0.12, "ovalocyte": 0.12,
                                      "sickle": 0.12, "echinocyte": 0.12})
        img = np.asarray(field.frame.pixels)
        for c in field.cells:
            if c.kind != "rbc" or c.cut_by_frame_edge or c.morphology not in SYNTHETIC_RBC_LABEL:
                continue
            crops.append(crop_cell(img, c.center, spec))
            labels.append(RBC_CLASSES.index(SYNTHETIC_RBC_LABEL[c.morphology]))
            groups.append(f"synthetic/{seed}")
    return _stack(crops, labels, groups, spec.input_size)


def head_sets(head: str, crop: CropSpec) -> dict:
    """Train/val/test crop sets (and the extra held-out sets) for one head, cut with `crop`."""
    if head == "wbc":
        sets = {s: pbc_crops(s) for s in ("train", "val", "test")}
        # A second lab (BCCD: other camera, stain and scale), so the head does not learn one
        # lab's colours as the cell type. BCCD test images stay held out (evaluate.py).
        for name in ("train", "val"):
            sets[name].extend(bccd_wbc_crops(name))
        sets["bccd_test"] = bccd_wbc_crops("test")
        return sets
    sets = {s: chula_crops(s, crop) for s in ("train", "val", "test")}
    mpp = idb1_microns_per_pixel()
    # Sickle, round AND other deformed cells from IDB1: with sickle crops alone, "looks like IDB1"
    # or "elongated" would be a shortcut to "sickle". IDB1 train: 85% for training, the last 15%
    # (seeded) for validation.
    idb_train, _ = idb1_crops("train", mpp, spec=crop)
    for name, idx in zip(("train", "val"), idb1_train_val_split(len(idb_train.labels))):
        sets[name].extend(idb_train, idx)
    # Rendered fields (the demo's virtual microscope): seeds 30000+ train, 40000+ validation.
    for name, n, base in (("train", 40, 30_000), ("val", 6, 40_000)):
        sets[name].extend(synthetic_rbc_crops(n, base, crop))
    idb_test, is_sickle = idb1_crops("test", mpp, spec=crop)
    sets["idb1_test"] = idb_test
    sets["idb1_test_is_sickle"] = is_sickle
    sets["idb1_mpp"] = mpp
    return sets


def held_out_metrics(head: str, sets: dict, logits_of, temperature: float) -> dict:
    """Held-out figures of a head (`logits_of(images)` -> logits): its test split (per-class
    report, confusion matrix, ECE at `temperature`), and BCCD test crops (WBC) or IDB1 test
    sickle-vs-not accuracy (RBC)."""
    classes = PBC_CLASSES if head == "wbc" else RBC_CLASSES
    test = sets["test"]
    tl = logits_of(test.images)
    out = {"test": classification_report(test.labels, tl.argmax(1), classes, logits=tl / temperature)}
    if head == "wbc" and len(sets["bccd_test"].labels):
        bl = logits_of(sets["bccd_test"].images)
        out["bccd_test"] = classification_report(sets["bccd_test"].labels, bl.argmax(1), classes, logits=bl / temperature)
        logger.info("BCCD test crops (second lab, held out): accuracy %.3f", out["bccd_test"]["accuracy"])
    if head == "rbc":
        il = logits_of(sets["idb1_test"].images)
        pred_sickle = il.argmax(1) == classes.index("sickle")
        out["idb1_test_sickle_vs_not_accuracy"] = float((pred_sickle == sets["idb1_test_is_sickle"]).mean())
    return out


@contextmanager
def head_engine(manifest: Path, classes: Sequence[str]) -> Iterator:
    """The head's ONNX Runtime engine, loaded and closed again; SystemExit when its classes are
    not `classes` (a training tool measuring the wrong head)."""
    from smearscope.engines.registry import create_engine

    eng = create_engine("onnxruntime", manifest).load()
    try:
        if list(eng.manifest.classes) != list(classes):
            raise SystemExit(f"{manifest}: classes {eng.manifest.classes} are not {list(classes)}")
        yield eng
    finally:
        eng.close()
