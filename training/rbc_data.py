"""Red-cell crops from every lab that types red cells, as raw-look context windows (no torch).

Chula RBC-12 centres (split by image), erythrocytesIDB1 (train 85/15, test held out), rendered
fields, and BCCD's annotated red cells (val/test, no morphology truth: a mostly normal-looking lab,
for the spherocyte share). Each cell is a CONTEXT_UM window at the canonical scale around its
centre, cached under build/; `training.wbc_data.to_crops` turns contexts into the head's crops
(random look, lamp correction, the analyzer's crop).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.crops import CropSpec, crop_cell
from smearscope.service.analysis.scale import resample_factor, resample_to_canonical
from training import head_data as hd
from training.data import (
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    data_root,
    split_hash,
)

CLASSES = hd.RBC_CLASSES
CROP = CropSpec(extent_um=11.2, input_size=56)
CONTEXT_UM = 22.4


def _ctx(canon: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    return crop_cell(canon, xy, CropSpec(CONTEXT_UM, round(CONTEXT_UM / 0.2)))


def build_sets(cache: Path | None = None) -> dict:
    # the cache is keyed by Chula's scale (contexts cut at another ruler are other crops) and by its
    # split (cleared of copies: training.overlap)
    members = [f"{k}/{i}" for k, ids in hd.chula_splits().items() for i in ids]
    cache = cache or Path(f"build/rbc_contexts_chula{hd.CHULA_MICRONS_PER_PIXEL:g}_{split_hash(members)}.npz")
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    out: dict[str, list] = {}

    def add(split: str, lab: str, ctx: np.ndarray, label: int) -> None:
        out.setdefault(f"{split}_images", []).append(ctx)
        out.setdefault(f"{split}_labels", []).append(label)
        out.setdefault(f"{split}_labs", []).append(lab)

    root = data_root() / "chula_rbc12" / "Dataset"
    f = resample_factor(hd.CHULA_MICRONS_PER_PIXEL)
    for split, ids in hd.chula_splits().items():
        for image_id in tqdm(ids, desc=f"chula {split}", mininterval=5):
            img = cv2.imread(str(root / f"{image_id}.jpg"))
            if img is None:
                continue
            canon = resample_to_canonical(img, hd.CHULA_MICRONS_PER_PIXEL)
            for x, y, name in hd.chula_points(image_id):
                if name in CLASSES:
                    add(split, "chula", _ctx(canon, (x * f, y * f)), CLASSES.index(name))
    mpp = hd.idb1_microns_per_pixel()
    for src, splits in (("train", ("train", "val")), ("test", ("test",))):
        items = []
        for folder, label in hd.IDB1_LABEL.items():
            for p in sorted((data_root() / "erythrocytesidb1" / src / folder).glob("*.jpg")):
                img = cv2.imread(str(p))
                if img is not None:
                    canon = resample_to_canonical(img, mpp)
                    items.append((_ctx(canon, (canon.shape[1] / 2, canon.shape[0] / 2)), CLASSES.index(label)))
        if src == "train":
            tr, va = hd.idb1_train_val_split(len(items))
            for split, idx in (("train", tr), ("val", va)):
                for i in idx:
                    add(split, "idb1", *items[i])
        else:
            for it in items:
                add("test", "idb1", *it)
    from smearscope.device.synthetic import StainParams, render_field

    for split, n, base in (("train", 40, 30_000), ("val", 6, 40_000)):
        for i in range(n):
            rng = np.random.default_rng(base + i)
            field = render_field(base + i, width=512, height=384, microns_per_pixel=0.2, stain=StainParams.sample(rng),
                                 rbc_mix={"normal": 0.4, "target": 0.12, "spherocyte": 0.12, "ovalocyte": 0.12,
                                          "sickle": 0.12, "echinocyte": 0.12})
            img = np.asarray(field.frame.pixels)
            for c in field.cells:
                if c.kind == "rbc" and not c.cut_by_frame_edge and c.morphology in hd.SYNTHETIC_RBC_LABEL:
                    add(split, "synthetic", _ctx(img, c.center), CLASSES.index(hd.SYNTHETIC_RBC_LABEL[c.morphology]))
    bmpp = bccd_microns_per_pixel()
    bf = resample_factor(bmpp)
    for split in ("val", "test"):
        for image_id in bccd_split(split):
            img = cv2.imread(str(bccd_image_path(image_id)))
            canon = resample_to_canonical(img, bmpp)
            for b in bccd_boxes(image_id):
                if b.kind == "rbc" and b.x0 > 2 and b.y0 > 2 and b.x1 < img.shape[1] - 2 and b.y1 < img.shape[0] - 2:
                    add(f"bccd_{split}", "bccd", _ctx(canon, ((b.x0 + b.x1) / 2 * bf, (b.y0 + b.y1) / 2 * bf)), -1)
    arrays = {k: np.stack(v) if k.endswith("images") else np.array(v) for k, v in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    f1s = []
    for c in sorted(set(y.tolist())):
        tp = int(((pred == c) & (y == c)).sum())
        pr, rc = tp / max(int((pred == c).sum()), 1), tp / max(int((y == c).sum()), 1)
        f1s.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    return float(np.mean(f1s))


def figures(probs: np.ndarray, sets: dict, split: str, bccd_probs: np.ndarray,
            looks_probs: np.ndarray | None = None, spherocyte_in_worst: bool = True) -> dict:
    """Chula macro-F1 and accuracy, IDB1 sickle-vs-not, the share of BCCD red cells typed
    spherocyte; `worst` is the lowest of them (with `spherocyte_in_worst`: 1 - that share).

    `looks_probs`: the same split's crops drawn through random lab looks (a fixed seed, see
    `looks_crops`), whose Chula macro-F1 stands in for another lab's camera and stain and joins
    `worst`. Without the spherocyte term, the share is left to the prior shift fitted after
    training (`training.prior_shift`), which is how the analyzer runs the head."""
    y, labs = sets[f"{split}_labels"], sets[f"{split}_labs"]
    pred = probs.argmax(1)
    m = labs == "chula"
    chula_f1 = _macro_f1(y[m], pred[m])
    mi = labs == "idb1"
    sickle = CLASSES.index("sickle")
    idb = float(((pred[mi] == sickle) == (y[mi] == sickle)).mean()) if mi.any() else 1.0
    sph = float((bccd_probs.argmax(1) == CLASSES.index("spherocyte")).mean()) if len(bccd_probs) else 0.0
    out = {"chula_macro_f1": round(chula_f1, 4), "chula_accuracy": round(float((pred[m] == y[m]).mean()), 4),
           "idb1_sickle_vs_not": round(idb, 4), "bccd_spherocyte_share": round(sph, 4),
           "bccd_label_shares": {CLASSES[k]: round(float(v), 4) for k, v in
                                 zip(*np.unique(bccd_probs.argmax(1), return_counts=True)) if v} if len(bccd_probs) else {}}
    if out["bccd_label_shares"]:
        n = len(bccd_probs)
        out["bccd_label_shares"] = {k: round(v / n, 4) for k, v in out["bccd_label_shares"].items()}
    terms = [out["chula_macro_f1"], idb] + ([1.0 - sph] if spherocyte_in_worst else [])
    if looks_probs is not None:
        out["chula_macro_f1_looks"] = round(_macro_f1(y[m], looks_probs.argmax(1)[m]), 4)
        terms.append(out["chula_macro_f1_looks"])
    out["worst"] = round(min(terms), 4)
    return out


def looks_crops(images: np.ndarray, seed: int = 7) -> np.ndarray:
    """`images`' head crops, each drawn through a random lab's look (fixed seed: the same set every
    time), then lamp-corrected and cut as the analyzer does."""
    from training.wbc_data import to_crops

    return to_crops(images, CROP, rng=np.random.default_rng(seed), p_look=1.0)


def defocus_look(p_defocus: float = 1.0):
    """Random lab looks with `p_defocus` of them also out of focus (`training.look.fresnel_defocus`)
    and films down to paler than the default's: the Raspberry Pi station's nearly transparent red
    cells, whose defocus rings the head otherwise reads as target cells."""
    from training.look import LookConfig

    return LookConfig(p_defocus=p_defocus, pale=(0.15, 0.9))


def defocus_crops(images: np.ndarray, seed: int = 11, illumination: bool = True) -> np.ndarray:
    """`images`' head crops, each through a random lab's look AND out of focus (fixed seed;
    `illumination` as `to_crops`)."""
    from training.wbc_data import defocus_crops as crops_out_of_focus

    return crops_out_of_focus(images, CROP, seed, illumination, defocus_look(1.0))


def with_defocus(fig: dict, logits: np.ndarray, sets: dict, split: str) -> dict:
    """`figures`' dict with the Chula macro-F1 of the split's defocused crops (`defocus_crops`'
    logits) added, and joining `worst`."""
    y, m = sets[f"{split}_labels"], sets[f"{split}_labs"] == "chula"
    f1 = round(_macro_f1(y[m], logits.argmax(1)[m]), 4)
    return {**fig, "chula_macro_f1_defocus": f1, "worst": round(min(fig["worst"], f1), 4)}
