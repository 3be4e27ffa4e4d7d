"""Prepare the multi-lab detector training set: every lab's fields, tiled at the canonical scale.

Each field is resampled to the canonical scale and cut into the analyzer's tile size; tiles are
stored **as the lab's camera saw them** (no illumination correction), because training applies
`training.look.randomize_look` and then `service.illumination.correct_illumination` to each tile
every time it is loaded (`training.train_seg --look`), which is what the analyzer does to a field.

Labels, per lab, in the form each lab has them (`training.labs`):
- BCCD, TXL-PBC (three sources): annotated boxes with pseudo-masks (`training.pseudo_masks`) on
  the corrected field. BCCD leaves many red cells unannotated: well-formed red cells that the
  classical segmenter (`training.classical_cells`) finds away from every annotated box are added.
- Chula RBC-12: the classical segmenter seeded by the lab's own centres labels every cell (the
  centres mark only some red cells); regions it cannot name are painted over with the field's
  background so they teach nothing. The share of centres inside a labelled red cell is logged.
- PBC: the existing pseudo-labels (`training.pbc_pseudo`) of a seeded sample of train crops.
- rpi (Raspberry Pi station): its typed white-cell boxes, plus red cells and platelets from a
  detector's own confident detections (`--rpi-models`, a model that never saw the rpi lab), with
  unlabelled white-cell-like regions painted over. Off unless `--rpi-models` is given.
- rendered fields (`device.synthetic`): exact masks.

Held-out images (BCCD test, TXL test, Chula/PBC/rpi val and test) are never written to train;
`--exclude-lab` leaves a lab out entirely (leave-one-lab-out runs). `meta.json` records counts and
split hashes.

    python -m training.prep_labs --out build/seg_labs
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.illumination import correct_illumination, estimate_background
from smearscope.service.analysis.records import SEG_CLASSES
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    resample_factor,
    resample_to_canonical,
)
from smearscope.service.analysis.tiling import PAD_VALUE
from training.classical_cells import segment
from training.data import (
    BoxAnnotation,
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    split_hash,
)
from training.labs import (
    DETECTOR_LABS,
    RPI_MICRONS_PER_PIXEL,
    TXL_SOURCES,
    rpi_boxes,
    rpi_dir,
    rpi_splits,
    txl_images_by_source,
)
from training.pseudo_masks import mask_polygon, pseudo_mask

logger = logging.getLogger(__name__)
CLASS_INDEX = {k.value: i for i, k in enumerate(SEG_CLASSES)}
TILE = 256
#: A cell cut by a tile edge is labelled when at least this share of it is inside the tile.
MIN_VISIBLE = 0.2


@dataclass
class Instance:
    kind: str
    x0: int
    y0: int
    mask: np.ndarray  # bool, box-sized, canonical pixels


@dataclass
class LabField:
    lab: str
    stem: str
    canon: np.ndarray  # raw look, canonical scale, BGR uint8
    instances: list[Instance] = field(default_factory=list)
    paint: list[Instance] = field(default_factory=list)  # regions to cover with background


def _box_instances(corrected: np.ndarray, boxes: list[BoxAnnotation], f: float) -> list[Instance]:
    h, w = corrected.shape[:2]
    out = []
    for b in boxes:
        x0, y0 = max(0, int(np.floor(b.x0 * f))), max(0, int(np.floor(b.y0 * f)))
        x1, y1 = min(w, int(np.ceil(b.x1 * f))), min(h, int(np.ceil(b.y1 * f)))
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        m = pseudo_mask(corrected, (x0, y0, x1, y1)).astype(bool)
        out.append(Instance(b.kind, x0, y0, m))
    return out


def _overlaps(inst: Instance, others: list[Instance], thr: float = 0.15) -> bool:
    ih, iw = inst.mask.shape
    for o in others:
        oh, ow = o.mask.shape
        ax0, ay0 = max(inst.x0, o.x0), max(inst.y0, o.y0)
        ax1, ay1 = min(inst.x0 + iw, o.x0 + ow), min(inst.y0 + ih, o.y0 + oh)
        if ax1 <= ax0 or ay1 <= ay0:
            continue
        a = inst.mask[ay0 - inst.y0:ay1 - inst.y0, ax0 - inst.x0:ax1 - inst.x0]
        b = o.mask[ay0 - o.y0:ay1 - o.y0, ax0 - o.x0:ax1 - o.x0]
        if (a & b).sum() > thr * min(inst.mask.sum(), o.mask.sum()):
            return True
    return False


def _touches(inst: Instance, others: list[Instance], margin: int = 3) -> bool:
    ih, iw = inst.mask.shape
    for o in others:
        oh, ow = o.mask.shape
        if (inst.x0 - margin < o.x0 + ow and o.x0 < inst.x0 + iw + margin
                and inst.y0 - margin < o.y0 + oh and o.y0 < inst.y0 + ih + margin):
            grown = cv2.dilate(inst.mask.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8))
            probe = Instance(inst.kind, inst.x0, inst.y0, grown.astype(bool))
            if _overlaps(probe, [o], 0.0):
                return True
    return False


def _well_formed(inst: Instance) -> bool:
    m = inst.mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return False
    c = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(c))
    return hull > 0 and cv2.contourArea(c) / hull >= 0.9


def boxed_field(lab: str, stem: str, img: np.ndarray, boxes: list[BoxAnnotation], mpp: float,
                add_unannotated_rbc: bool) -> LabField:
    f = resample_factor(mpp)
    canon = resample_to_canonical(img, mpp)
    corrected = correct_illumination(canon).pixels
    inst = _box_instances(corrected, boxes, f)
    lf = LabField(lab, stem, canon, inst)
    if add_unannotated_rbc:
        for r in segment(corrected):
            cand = Instance(r.kind, r.box[0], r.box[1], r.mask)
            if r.kind == "rbc" and _well_formed(cand) and not _overlaps(cand, inst, 0.05):
                lf.instances.append(cand)
    return lf


def chula_field(image_id: str) -> tuple[LabField, int, int] | None:
    from training.data import data_root
    from training.head_data import CHULA_MICRONS_PER_PIXEL, chula_points

    img = cv2.imread(str(data_root() / "chula_rbc12" / "Dataset" / f"{image_id}.jpg"))
    if img is None:
        return None
    f = resample_factor(CHULA_MICRONS_PER_PIXEL)
    canon = resample_to_canonical(img, CHULA_MICRONS_PER_PIXEL)
    corrected = correct_illumination(canon).pixels
    pts = [(x * f, y * f) for x, y, _ in chula_points(image_id)]
    regions = segment(corrected, pts)
    lf = LabField("chula", f"chula_{image_id}", canon)
    unsure = []
    for r in regions:
        inst = Instance(r.kind, r.box[0], r.box[1], r.mask)
        (unsure if r.kind == "unsure" else lf.instances).append(inst)
    # Paint over what could not be named only where it stands alone (debris, clumps): a fragment
    # inside or against a labelled cell is left as it is.
    lf.paint = [u for u in unsure if not _overlaps(u, lf.instances, 0.0) and not _touches(u, lf.instances)]
    hit = 0
    for x, y in pts:
        for i in lf.instances:
            if i.kind == "rbc" and 0 <= int(y) - i.y0 < i.mask.shape[0] and 0 <= int(x) - i.x0 < i.mask.shape[1] \
                    and i.mask[int(y) - i.y0, int(x) - i.x0]:
                hit += 1
                break
    return lf, hit, len(pts)


def _paint_background(canon: np.ndarray, paint: list[Instance]) -> np.ndarray:
    if not paint:
        return canon
    est = estimate_background(canon)
    if est is None:
        return canon
    h, w = canon.shape[:2]
    bg = cv2.resize(est[0], (w, h), interpolation=cv2.INTER_LINEAR)
    out = canon.copy()
    for p in paint:
        m = cv2.dilate(p.mask.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=1).astype(bool)
        ph, pw = m.shape
        sub = out[p.y0:p.y0 + ph, p.x0:p.x0 + pw]
        mm = m[: sub.shape[0], : sub.shape[1]]
        sub[mm] = np.clip(bg[p.y0:p.y0 + ph, p.x0:p.x0 + pw][: sub.shape[0], : sub.shape[1]][mm], 0, 255)
    return out


def tile_origins(size: int, tile: int, overlap: float = 0.2) -> list[int]:
    if size <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    xs = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(xs))


def write_tiles(lf: LabField, out: Path, split: str, max_tiles: int | None, rng: np.random.Generator,
                sizes: dict[str, list[int]]) -> int:
    canon = _paint_background(lf.canon, lf.paint)
    h, w = canon.shape[:2]
    origins = [(x, y) for y in tile_origins(h, TILE) for x in tile_origins(w, TILE)]
    if max_tiles is not None and len(origins) > max_tiles:
        origins = [origins[i] for i in sorted(rng.choice(len(origins), max_tiles, replace=False))]
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    written = 0
    for tx, ty in origins:
        crop = canon[ty:ty + TILE, tx:tx + TILE]
        ch, cw = crop.shape[:2]
        lines = []
        for inst in lf.instances:
            mh, mw = inst.mask.shape
            ax0, ay0 = max(inst.x0, tx), max(inst.y0, ty)
            ax1, ay1 = min(inst.x0 + mw, tx + cw), min(inst.y0 + mh, ty + ch)
            if ax1 - ax0 < 2 or ay1 - ay0 < 2:
                continue
            vis = inst.mask[ay0 - inst.y0:ay1 - inst.y0, ax0 - inst.x0:ax1 - inst.x0]
            total = inst.mask.sum()
            if total == 0 or vis.sum() < MIN_VISIBLE * total:
                continue
            poly = mask_polygon(vis.astype(np.uint8))
            if len(poly) < 3:
                continue
            poly[:, 0] = (poly[:, 0] + ax0 - tx) / TILE
            poly[:, 1] = (poly[:, 1] + ay0 - ty) / TILE
            lines.append(f"{CLASS_INDEX[inst.kind]} " + " ".join(f"{v:.5f}" for v in poly.clip(0, 1).reshape(-1)))
        canvas = np.full((TILE, TILE, 3), PAD_VALUE, np.uint8)
        canvas[:ch, :cw] = crop
        name = f"{lf.stem}_{tx}_{ty}"
        cv2.imwrite(str(out / "images" / split / f"{name}.png"), canvas)
        (out / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        if (ch, cw) != (TILE, TILE):
            sizes[f"{name}.png"] = [ch, cw]
        written += 1
    return written


def rpi_field(stem: str, analyzer, mpp: float) -> LabField | None:
    """rpi: typed WBC boxes + the analyzer's confident red cells and platelets; other WBC-like painted."""
    from smearscope.device.frame import Frame

    img = cv2.imread(str(rpi_dir() / "images" / f"{stem}.jpg"))
    if img is None:
        return None
    h0, w0 = img.shape[:2]
    boxes = [t.box for t in rpi_boxes(stem, w0, h0)]
    f = resample_factor(mpp)
    canon = resample_to_canonical(img, mpp)
    corrected = correct_illumination(canon).pixels
    lf = LabField("rpi", f"rpi_{stem}", canon, _box_instances(corrected, boxes, f))
    res = analyzer.analyze(Frame(img, stem, "rpi", microns_per_pixel=mpp))
    for c in res.cells:
        d = c.detection
        m = d.mask.astype(bool) if getattr(d, "mask", None) is not None else None
        b = d.box
        x0, y0 = int(b.x0), int(b.y0)  # the mask's origin (records.CellDetection)
        if m is None or m.sum() == 0:
            continue
        inst = Instance(d.kind.value, x0, y0, m)
        if _overlaps(inst, lf.instances, 0.1):
            continue
        if d.kind.value == "wbc" or d.kind.value not in CLASS_INDEX:
            # an untyped white cell the annotators left out, or a false one; or a red-cell detection
            # the WBC head re-typed as nucleated (nrbc): no detector class says what it is
            lf.paint.append(inst)
        elif d.score >= 0.5:
            lf.instances.append(inst)
    # The detector that labels rpi never saw it and misses many of its pale, haloed red cells: every
    # stained region no label covers is painted over, so a missed cell never teaches "background".
    from training.classical_cells import foreground, optical_density

    fg = cv2.dilate(foreground(optical_density(corrected)).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    covered = np.zeros(fg.shape, np.uint8)
    for i in lf.instances:
        h, w = i.mask.shape
        covered[i.y0:i.y0 + h, i.x0:i.x0 + w] |= i.mask[: covered.shape[0] - i.y0, : covered.shape[1] - i.x0].astype(np.uint8)
    covered = cv2.dilate(covered, np.ones((7, 7), np.uint8)).astype(bool)
    rest = fg & ~covered
    if rest.any():
        lf.paint.append(Instance("unsure", 0, 0, rest))
    return lf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/seg_labs"))
    ap.add_argument("--exclude-lab", action="append", default=[], choices=DETECTOR_LABS)
    ap.add_argument("--chula-tiles", type=int, default=2, help="tiles per Chula train field")
    ap.add_argument("--txl-tiles", type=int, default=3, help="tiles per TXL-PBC train field")
    ap.add_argument("--synthetic", type=int, default=150)
    ap.add_argument("--pbc-platelets", type=int, default=300)
    ap.add_argument("--pbc-wbc", type=int, default=40)
    ap.add_argument("--pbc-erythroblasts", type=int, default=150)
    ap.add_argument("--pseudo-models", type=Path, default=Path("models"), help="models for PBC pseudo-labels")
    ap.add_argument("--rpi-models", type=Path, default=None,
                    help="models (never trained on rpi) that label rpi red cells; rpi is left out without it")
    ap.add_argument("--rpi-mpp", type=float, default=RPI_MICRONS_PER_PIXEL, help="rpi stored-image scale (um/px)")
    ap.add_argument("--rpi-tiles", type=int, default=4)
    ap.add_argument("--only", choices=DETECTOR_LABS, default=None,
                    help="(re)write only this lab's tiles into an existing set (its meta.json is updated)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    rng = np.random.default_rng(20261202)
    out = args.out
    sizes: dict[str, list[int]] = {}
    meta: dict = {"canonical_um_per_px": CANONICAL_UM_PER_PX, "tile": TILE, "excluded_labs": args.exclude_lab,
                  "splits": {}}
    excl = set(args.exclude_lab)
    if args.only:
        excl = set(DETECTOR_LABS) - {args.only}
        for old in list((out / "images").glob(f"*/{args.only}_*.png")):
            old.unlink()
            old.parent.parent.parent.joinpath("labels", old.parent.name, old.stem + ".txt").unlink(missing_ok=True)
        prev = json.loads((out / "meta.json").read_text())
        sizes = {k: v for k, v in json.loads((out / "valid_sizes.json").read_text()).items()
                 if not k.startswith(f"{args.only}_")}
        meta["splits"] = prev["splits"]
        args.synthetic = 0

    if "bccd" not in excl:
        mpp = bccd_microns_per_pixel()
        for split in ("train", "val"):
            ids = bccd_split(split)
            n = 0
            for image_id in tqdm(ids, desc=f"bccd {split}"):
                img = cv2.imread(str(bccd_image_path(image_id)))
                lf = boxed_field("bccd", image_id, img, bccd_boxes(image_id), mpp, add_unannotated_rbc=split == "train")
                n += write_tiles(lf, out, split, None, rng, sizes)
            meta["splits"][f"bccd_{split}"] = {"fields": len(ids), "tiles": n, "hash": split_hash(ids)}

    from training.prep_seg import txl_fields

    for split in ("train", "val") if set(TXL_SOURCES) - excl else ():
        by_source = {p: s for s, ps in txl_images_by_source(split).items() for p in ps}
        counts: dict[str, int] = {}
        fields = list(txl_fields(split))
        # An image with too few whole red cells to measure gets its source's median scale.
        source_mpp = {src: float(np.median([m for p, _, m in fields if by_source.get(p) == src and m is not None]))
                      for src in set(by_source.values())}
        for img_path, boxes, mpp in tqdm(fields, desc=f"txl {split}"):
            src = by_source.get(img_path)
            if src is None or src in excl:
                continue
            mpp = mpp if mpp is not None else source_mpp[src]
            img = cv2.imread(str(img_path))
            lf = boxed_field(src, f"{src}_{img_path.stem}", img, boxes, mpp, add_unannotated_rbc=False)
            counts[src] = counts.get(src, 0) + write_tiles(lf, out, split, args.txl_tiles if split == "train" else 1,
                                                           rng, sizes)
        meta["splits"][f"txl_{split}"] = counts

    if "chula" not in excl:
        from training.head_data import chula_splits

        for split in ("train", "val"):
            ids = chula_splits()[split]
            hits = total = n = 0
            for image_id in tqdm(ids, desc=f"chula {split}"):
                got = chula_field(image_id)
                if got is None:
                    continue
                lf, h, t = got
                hits, total = hits + h, total + t
                n += write_tiles(lf, out, split, args.chula_tiles if split == "train" else 1, rng, sizes)
            logger.info("chula %s: %d of %d labelled centres inside a pseudo-labelled red cell (%.3f)",
                        split, hits, total, hits / max(total, 1))
            meta["splits"][f"chula_{split}"] = {"fields": len(ids), "tiles": n, "hash": split_hash(ids),
                                                "centres_in_rbc": hits, "centres": total}

    if "pbc" not in excl and (args.pbc_platelets or args.pbc_wbc or args.pbc_erythroblasts):
        from training.head_data import PBC_MICRONS_PER_PIXEL
        from training.prep_seg import pbc_fields

        used, n = [], 0
        for rel, img, boxes in pbc_fields(args.pbc_platelets, args.pbc_wbc, args.pbc_erythroblasts, args.pseudo_models):
            if boxes is None:
                continue
            lf = boxed_field("pbc", "pbc_" + Path(rel).stem, img, boxes, PBC_MICRONS_PER_PIXEL, add_unannotated_rbc=False)
            n += write_tiles(lf, out, "train", None, rng, sizes)
            used.append(rel)
        meta["splits"]["pbc_train_pseudo"] = {"fields": len(used), "tiles": n, "hash": split_hash(used)}

    if args.rpi_models is not None and "rpi" not in excl:
        from smearscope.service.analysis.pipeline import Analyzer

        analyzer = Analyzer.from_models_dir(args.rpi_models, warmup=False)
        try:
            for split in ("train", "val"):
                stems = rpi_splits()[split]
                n = 0
                for stem in tqdm(stems, desc=f"rpi {split}"):
                    lf = rpi_field(stem, analyzer, args.rpi_mpp)
                    if lf is not None:
                        n += write_tiles(lf, out, split, args.rpi_tiles if split == "train" else 2, rng, sizes)
                meta["splits"][f"rpi_{split}"] = {"fields": len(stems), "tiles": n, "hash": split_hash(stems),
                                                  "models": str(args.rpi_models)}
        finally:
            analyzer.close()

    if args.synthetic:
        from training.prep_seg import write_synthetic

        for i in tqdm(range(args.synthetic), desc="synthetic"):
            write_synthetic(10_000 + i, TILE, out, "train")
        meta["splits"]["synthetic_train"] = {"n": args.synthetic, "seeds": [10_000, 10_000 + args.synthetic]}

    meta["heldout"] = {"bccd_test": split_hash(bccd_split("test"))}
    names = {i: k.value for i, k in enumerate(SEG_CLASSES)}
    (out / "data.yaml").write_text(
        f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames: {json.dumps(names)}\n")
    (out / "valid_sizes.json").write_text(json.dumps(sizes))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("wrote %s: %s", out, json.dumps(meta["splits"]))


if __name__ == "__main__":
    main()
