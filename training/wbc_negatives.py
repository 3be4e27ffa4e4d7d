"""Red cells as negatives for the WBC head: what the nucleated-cell recheck sends it that is no white cell.

The analyzer's recheck (`service.analysis.nucleated`) crops red-cell detections whose interior
absorbs red light 1.8 times the field's median red cell and asks the WBC head; a red cell without
central pallor (dense, uniformly stained) is what it most often sends. A head that types such a
crop a lymphocyte at high confidence re-counts a red cell as a white cell. These contexts are
annotated red cells of BCCD and the three TXL-PBC sources (each split as the detector's), stored
like `training.wbc_data`'s white cells (raw look, canonical scale, `CONTEXT_UM` wide), so a
training step draws them through the same looks and the analyzer's crop. All the dense ones are
kept (interior red-channel optical density `DENSE_RATIO` times the field's median red cell or more,
measured inside the box's inscribed ellipse of the lamp-corrected field), and one in
`KEEP_ONE_IN` of the others. A red box whose centre lies within half a white cell's size of an
annotated white cell's box is left out (its crop would show much of a white cell), and so is one denser than `MAX_RATIO` times the field's median:
on TXL-PBC val those were white cells boxed as red cells.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.illumination import TARGET_WHITE, correct_illumination
from smearscope.service.analysis.nucleated import RBC_SIZED_NUCLEATED
from smearscope.service.analysis.scale import (
    resample_factor,
    resample_to_canonical,
    scale_from_rbc_diameters,
)
from training.data import (
    BoxAnnotation,
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    split_hash,
    stored_size,
    txl_boxes,
    txl_images,
)
from training.metrics import softmax
from training.wbc_data import CONTEXT_UM, _context, context_px

logger = logging.getLogger(__name__)

#: A red cell this many times as dense (red light) as the field's median red cell is always kept.
DENSE_RATIO = 1.3
KEEP_ONE_IN = 4
MAX_RATIO = 2.4
#: The white point the lamp correction brings glass to, + 1 (as service.analysis.nucleated reads densities).
_WHITE = TARGET_WHITE + 1.0


def _whole(b: BoxAnnotation, w: int, h: int) -> bool:
    return b.x0 > 2 and b.y0 > 2 and b.x1 < w - 2 and b.y1 < h - 2


def _near(red: BoxAnnotation, white: BoxAnnotation) -> bool:
    """The red box's centre within the white box grown by half its width and height on every side."""
    cx, cy = (red.x0 + red.x1) / 2, (red.y0 + red.y1) / 2
    gw, gh = (white.x1 - white.x0) / 2, (white.y1 - white.y0) / 2
    return white.x0 - gw <= cx <= white.x1 + gw and white.y0 - gh <= cy <= white.y1 + gh


def interior_ratios(image_bgr: np.ndarray, mpp: float, boxes: list[BoxAnnotation]) -> np.ndarray:
    """Each red box's median red-channel optical density inside its inscribed ellipse (lamp-corrected,
    canonical scale), over the median of the field's boxes."""
    canon = correct_illumination(resample_to_canonical(image_bgr, mpp)).pixels
    f = resample_factor(mpp)
    red = canon[:, :, 2]
    dens = []
    for b in boxes:
        cx, cy = (b.x0 + b.x1) / 2 * f, (b.y0 + b.y1) / 2 * f
        ax, ay = max(1.0, (b.x1 - b.x0) / 2 * f * 0.8), max(1.0, (b.y1 - b.y0) / 2 * f * 0.8)
        x0, x1 = max(0, int(cx - ax)), min(red.shape[1], int(cx + ax) + 1)
        y0, y1 = max(0, int(cy - ay)), min(red.shape[0], int(cy + ay) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        v = red[y0:y1, x0:x1][inside]
        dens.append(-np.log(min(float(np.median(v)) + 1.0, _WHITE) / _WHITE) if v.size else np.nan)
    d = np.array(dens, float)
    ref = np.nanmedian(d) if np.isfinite(d).any() else np.nan
    return d / ref if ref and ref > 0 else np.full(len(d), np.nan)


def _image_negatives(img: np.ndarray, boxes: list[BoxAnnotation], mpp: float | None, rng: np.random.Generator,
                     name: str) -> list[tuple[np.ndarray, float, str]]:
    h, w = img.shape[:2]
    whites = [b for b in boxes if b.kind == "wbc"]
    reds = [b for b in boxes if b.kind == "rbc" and _whole(b, w, h)
            and not any(_near(b, x) for x in whites)]
    if mpp is None:
        mpp = scale_from_rbc_diameters(np.array([((b.x1 - b.x0) + (b.y1 - b.y0)) / 2 for b in reds]))
    if mpp is None or len(reds) < 5:
        return []
    ratio = interior_ratios(img, mpp, reds)
    out = []
    for b, r in zip(reds, ratio):
        if not np.isfinite(r) or r > MAX_RATIO:
            continue
        if r >= DENSE_RATIO or rng.random() < 1.0 / KEEP_ONE_IN:
            out.append((_context(img, mpp, ((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2)), float(r), name))
    return out


def red_cell_contexts(split: str, cache_dir: Path = Path("build/wbc_contexts")) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(contexts N x C x C x 3 uint8, interior density ratios, source names) of a split's red-cell
    negatives (module doc), cached under build/."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    bccd = bccd_split(split)
    txl = txl_images(split)
    f = cache_dir / f"red_{split}_{context_px()}_{split_hash(bccd + [str(p) for p in txl])}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return z["images"], z["ratios"], list(z["names"])
    rng = np.random.default_rng(7)
    items: list[tuple[np.ndarray, float, str]] = []
    mpp = bccd_microns_per_pixel()
    for image_id in tqdm(bccd, desc=f"bccd red cells {split}", mininterval=5):
        img = cv2.imread(str(bccd_image_path(image_id)))
        if img is not None:
            items += _image_negatives(img, bccd_boxes(image_id), mpp, rng, f"bccd/{image_id}")
    for p in tqdm(txl, desc=f"txl red cells {split}", mininterval=5):
        img, size = cv2.imread(str(p)), stored_size(p)
        if img is not None and size is not None:
            items += _image_negatives(img, txl_boxes(p, split, *size), None, rng, f"txl/{p.stem}")
    c = context_px()
    images = np.stack([i[0] for i in items]) if items else np.zeros((0, c, c, 3), np.uint8)
    ratios = np.array([i[1] for i in items], float)
    names = [i[2] for i in items]
    np.savez(f, images=images, ratios=ratios, names=np.array(names))
    logger.info("%s: %d red-cell negatives (%d dense) of %.1f um contexts", split, len(names),
                int((ratios >= DENSE_RATIO).sum()), CONTEXT_UM)
    return images, ratios, names


def red_as_nucleated(logits: np.ndarray, classes, temperature: float = 1.0, min_conf: float = 0.5,
                     typed: np.ndarray | None = None) -> float:
    """Share of red-cell crops a head types lymphocyte or erythroblast at `min_conf` or more (the
    recheck's red-cell-sized nucleated types; `typed` False where the open-set test already refused)."""
    if not len(logits):
        return 0.0
    probs = softmax(logits / temperature)
    nucleated = np.isin(probs.argmax(1), [classes.index(c) for c in RBC_SIZED_NUCLEATED])
    hit = nucleated & (probs.max(1) >= min_conf) & (typed if typed is not None else True)
    return round(float(hit.mean()), 4)
