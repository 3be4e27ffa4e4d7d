"""Prepare the YOLO segmentation training set at the canonical scale.

BCCD `train` -> train, BCCD `val` -> val; BCCD `test` (the split everyone reports on) is never
written here. Each field is resampled to CANONICAL_UM_PER_PX with the analyzer's own resampler,
placed top-left on a TILE x TILE canvas filled with the letterbox grey the analyzer pads with,
and labelled with pseudo-mask polygons (see `training.pseudo_masks`).

    python -m training.prep_seg --out build/seg
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.records import SEG_CLASSES
from smearscope.service.analysis.scale import resample_factor, resample_to_canonical
from smearscope.service.analysis.tiling import PAD_VALUE
from training.data import (
    bccd_boxes,
    bccd_dir,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    split_hash,
)
from training.pseudo_masks import mask_polygon, pseudo_mask

logger = logging.getLogger(__name__)
CLASS_INDEX = {k.value: i for i, k in enumerate(SEG_CLASSES)}


def write_field(image_bgr: np.ndarray, boxes, mpp: float, tile: int, stem: str, out: Path, split: str, wbc_hint=None) -> int:
    f = resample_factor(mpp)
    canon = resample_to_canonical(image_bgr, mpp)
    h, w = canon.shape[:2]
    canvas = np.full((max(tile, h), max(tile, w), 3), PAD_VALUE, np.uint8)
    canvas[:h, :w] = canon
    H, W = canvas.shape[:2]
    lines = []
    for b in boxes:
        x0, y0 = int(np.floor(b.x0 * f)), int(np.floor(b.y0 * f))
        x1, y1 = int(np.ceil(b.x1 * f)), int(np.ceil(b.y1 * f))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        hint = None
        if b.kind == "wbc" and wbc_hint is not None:
            hint = wbc_hint[y0:y1, x0:x1]
        m = pseudo_mask(canon, (x0, y0, x1, y1), hint)
        poly = mask_polygon(m)
        if len(poly) < 3:
            continue
        poly[:, 0] = (poly[:, 0] + x0) / W
        poly[:, 1] = (poly[:, 1] + y0) / H
        coords = " ".join(f"{v:.5f}" for v in poly.clip(0, 1).reshape(-1))
        lines.append(f"{CLASS_INDEX[b.kind]} {coords}")
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "images" / split / f"{stem}.png"), canvas)
    (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


def txl_fields(split: str):
    """TXL-PBC images with boxes; each image's scale from its own whole red-cell boxes.

    TXL-PBC mixes sources at different magnifications, so no single scale fits the set. Its test
    split is never written here (held out, and disjoint from BCCD/PBC: the duplicates were removed).
    """
    from smearscope.service.analysis.scale import scale_from_rbc_diameters
    from training.data import stored_size, txl_boxes, txl_dir, txl_images

    for img_path in txl_images(split):
        if not (txl_dir() / "labels" / split / (img_path.stem + ".txt")).exists():
            continue
        size = stored_size(img_path)
        if size is None:
            continue
        w, h = size
        boxes = txl_boxes(img_path, split, w, h)
        diam = [(b.x1 - b.x0 + b.y1 - b.y0) / 2 for b in boxes
                if b.kind == "rbc" and b.x0 > 2 and b.y0 > 2 and b.x1 < w - 2 and b.y1 < h - 2]
        yield img_path, boxes, scale_from_rbc_diameters(np.array(diam))


def pbc_fields(n_platelet: int, n_wbc_per_class: int, n_erythroblast: int, models_dir: Path, seed: int = 0):
    """PBC *train* images with pseudo-labels (`training.pbc_pseudo`), a seeded sample per class.

    Yields (path, image, boxes in input pixels); images whose centre cell could not be
    placed are skipped and counted by the caller.
    """
    import random

    from smearscope.device.frame import Frame
    from smearscope.service.analysis.pipeline import Analyzer
    from training.data import data_root
    from training.head_data import PBC_CLASSES, PBC_MICRONS_PER_PIXEL, pbc_splits
    from training.pbc_pseudo import pseudo_boxes

    items = list(pbc_splits()["train"])
    random.Random(seed).shuffle(items)
    chosen = []
    for ci, cls in enumerate(PBC_CLASSES):
        n = {"platelet": n_platelet, "erythroblast": n_erythroblast}.get(cls, n_wbc_per_class)
        chosen += [(rel, cls) for rel, c in items if c == ci][:n]
    analyzer = Analyzer.from_models_dir(models_dir, warmup=False)
    root = data_root() / "pbc"
    try:
        for rel, cls in tqdm(chosen, desc="pbc pseudo-labels"):
            img = cv2.imread(str(root / rel))
            if img is None:
                continue
            rep = analyzer.analyze(Frame(img, rel, "pbc", microns_per_pixel=PBC_MICRONS_PER_PIXEL)).report
            yield rel, img, pseudo_boxes(img, PBC_MICRONS_PER_PIXEL, cls, rep.cells)
    finally:
        analyzer.close()


def write_synthetic(seed: int, tile: int, out: Path, split: str) -> None:
    """A rendered field at the canonical scale with its exact instance masks as polygons."""
    from smearscope.device.synthetic import StainParams, render_field

    rng = np.random.default_rng(seed)
    field = render_field(seed, width=tile, height=tile, microns_per_pixel=0.2, stain=StainParams.sample(rng),
                         rbc_density=float(rng.uniform(0.15, 0.5)), n_wbc=int(rng.integers(0, 3)),
                         n_platelets=int(rng.integers(0, 6)), touching_fraction=float(rng.uniform(0.1, 0.5)))
    lines = []
    for c in field.cells:
        x0, y0, _, _ = c.bbox
        poly = mask_polygon(c.mask.astype(np.uint8))
        if len(poly) < 3:
            continue
        poly[:, 0] = (poly[:, 0] + x0) / tile
        poly[:, 1] = (poly[:, 1] + y0) / tile
        lines.append(f"{CLASS_INDEX[c.kind]} " + " ".join(f"{v:.5f}" for v in poly.clip(0, 1).reshape(-1)))
    stem = f"synthetic_{seed}"
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "images" / split / f"{stem}.png"), np.asarray(field.frame.pixels))
    (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/seg"))
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--synthetic", type=int, default=0, help="add N rendered fields (exact masks) to train")
    ap.add_argument("--synthetic-val", type=int, default=0, help="add N rendered fields to val")
    ap.add_argument("--txl", action="store_true", help="add TXL-PBC train (-> train) and val (-> val) images")
    ap.add_argument("--pbc-platelets", type=int, default=0,
                    help="add N PBC train platelet images with pseudo-labels (training.pbc_pseudo) to train")
    ap.add_argument("--pbc-wbc", type=int, default=0, help="add N PBC train images of each WBC class, pseudo-labelled")
    ap.add_argument("--pbc-erythroblasts", type=int, default=None,
                    help="erythroblast images instead of --pbc-wbc (their round nucleus looks like a giant platelet)")
    ap.add_argument("--pseudo-models", type=Path, default=Path("models"), help="models that make the PBC pseudo-labels")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    mpp = bccd_microns_per_pixel()
    logger.info("BCCD scale from train-split RBC boxes: %.4f um/px", mpp)
    meta = {"bccd_microns_per_pixel": mpp, "splits": {}}
    for split in ("train", "val"):
        ids = bccd_split(split)
        meta["splits"][f"bccd_{split}"] = {"n": len(ids), "hash": split_hash(ids)}
        for image_id in tqdm(ids, desc=f"bccd {split}"):
            img = cv2.imread(str(bccd_image_path(image_id)))
            hint = None
            mpath = bccd_dir() / "WBCMasks" / image_id.replace("BloodImage", "BloodImage_Mask") 
            mpath = mpath.with_suffix(".png")
            if mpath.exists():
                hm = cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE)
                if hm is not None and hm.shape == img.shape[:2]:
                    hint = resample_to_canonical(hm, mpp)
            write_field(img, bccd_boxes(image_id), mpp, args.tile, image_id, args.out, split, hint)
    if args.txl:
        for split in ("train", "val"):
            n = 0
            for img_path, boxes, mpp in tqdm(list(txl_fields(split)), desc=f"txl {split}"):
                img = cv2.imread(str(img_path))
                if img is not None and mpp is not None:
                    write_field(img, boxes, mpp, args.tile, f"txl_{img_path.stem}", args.out, split)
                    n += 1
            meta["splits"][f"txl_{split}"] = {"n": n}
    if args.pbc_platelets or args.pbc_wbc or args.pbc_erythroblasts:
        from training.head_data import PBC_MICRONS_PER_PIXEL

        used, skipped = [], 0
        for rel, img, boxes in pbc_fields(args.pbc_platelets, args.pbc_wbc,
                                          args.pbc_wbc if args.pbc_erythroblasts is None else args.pbc_erythroblasts,
                                          args.pseudo_models):
            if boxes is None:
                skipped += 1
                continue
            write_field(img, boxes, PBC_MICRONS_PER_PIXEL, args.tile,
                        "pbc_" + Path(rel).stem, args.out, "train")
            used.append(rel)
        logger.info("PBC pseudo-labelled: %d used, %d skipped (centre cell not placed)", len(used), skipped)
        meta["splits"]["pbc_train_pseudo"] = {"n": len(used), "skipped": skipped, "hash": split_hash(used),
                                              "models": str(args.pseudo_models)}
    for split, n, base in (("train", args.synthetic, 10_000), ("val", args.synthetic_val, 20_000)):
        for i in tqdm(range(n), desc=f"synthetic {split}"):
            write_synthetic(base + i, args.tile, args.out, split)
        meta["splits"][f"synthetic_{split}"] = {"n": n, "seeds": [base, base + n]}
    held = bccd_split("test")
    meta["splits"]["bccd_test_heldout"] = {"n": len(held), "hash": split_hash(held)}
    names = {i: k.value for i, k in enumerate(SEG_CLASSES)}
    (args.out / "data.yaml").write_text(
        f"path: {args.out.resolve()}\ntrain: images/train\nval: images/val\nnames: {json.dumps(names)}\n"
    )
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
