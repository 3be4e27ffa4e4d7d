"""White-cell crops from every lab that types white cells, for a head that works in any lab.

Labs: PBC (CellaVision crops, 8 classes), BCCD (one typed white cell per image), and rpi
(`chula_wbc_rpi`, a Raspberry Pi station, typed boxes). Each cell is stored as a *context*
window (raw look, canonical scale, CONTEXT_UM wide) around its centre. Training draws a random
lab's look (`training.look`), corrects the illumination as the analyzer does
(`service.illumination`), and cuts the head's crop with the analyzer's own `crop_cell`. A
context larger than the crop gives the illumination estimate some glass to see, as the whole
field does at run time.

Splits: PBC seeded stratified 80/10/10, BCCD its VOC split, rpi blocks of frames (training.labs);
held-out parts are never trained on. Crops are cached under build/ (never in the repository).
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.crops import WBC_CROP, CropSpec, crop_cell
from smearscope.service.analysis.illumination import correct_illumination
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    resample_factor,
    resample_to_canonical,
)
from training.data import (
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    bccd_wbc_types,
    data_root,
    split_hash,
)
from training.head_data import PBC_CLASSES, PBC_MICRONS_PER_PIXEL, pbc_splits
from training.labs import RPI_MICRONS_PER_PIXEL, rpi_boxes, rpi_dir, rpi_splits
from training.look import DEFAULT_LOOK, LookConfig, randomize_look

logger = logging.getLogger(__name__)

WBC_LABS = ("pbc", "bccd", "rpi")
CONTEXT_UM = 38.4  # 192 canonical pixels: the 25.6 um crop plus glass around it
#: rpi and BCCD type names -> the head's classes (PBC's folder names).
_NAME = {"neutrophil": "neutrophil", "eosinophil": "eosinophil", "basophil": "basophil",
         "lymphocyte": "lymphocyte", "monocyte": "monocyte"}


@dataclass
class ContextSet:
    """Raw-look context windows (N x C x C x 3 uint8), labels (index in PBC_CLASSES) and labs."""

    images: np.ndarray
    labels: np.ndarray
    labs: np.ndarray  # str
    groups: list[str]

    def subset(self, idx: np.ndarray) -> ContextSet:
        return ContextSet(self.images[idx], self.labels[idx], self.labs[idx], [self.groups[i] for i in idx])

    @staticmethod
    def concat(parts: list[ContextSet]) -> ContextSet:
        parts = [p for p in parts if len(p.labels)]
        return ContextSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                          np.concatenate([p.labs for p in parts]), functools.reduce(operator.iadd, (p.groups for p in parts), []))


def context_px() -> int:
    return round(CONTEXT_UM / CANONICAL_UM_PER_PX)


def _context(img: np.ndarray, mpp: float, centre_xy: tuple[float, float]) -> np.ndarray:
    canon = resample_to_canonical(img, mpp)
    f = resample_factor(mpp)
    return crop_cell(canon, (centre_xy[0] * f, centre_xy[1] * f), CropSpec(CONTEXT_UM, context_px()))


def _pack(items: list[tuple[np.ndarray, int, str, str]]) -> ContextSet:
    c = context_px()
    if not items:
        return ContextSet(np.zeros((0, c, c, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, "<U8"), [])
    return ContextSet(np.stack([i[0] for i in items]), np.array([i[1] for i in items], np.int64),
                      np.array([i[2] for i in items]), [i[3] for i in items])


def pbc_contexts(split: str) -> ContextSet:
    root = data_root() / "pbc"
    items = []
    for rel, ci in tqdm(pbc_splits()[split], desc=f"pbc {split}", mininterval=5):
        img = cv2.imread(str(root / rel))
        if img is not None:
            items.append((_context(img, PBC_MICRONS_PER_PIXEL, (img.shape[1] / 2, img.shape[0] / 2)), ci, "pbc", rel))
    return _pack(items)


def bccd_contexts(split: str) -> ContextSet:
    types = bccd_wbc_types()
    mpp = bccd_microns_per_pixel()
    items = []
    for image_id in bccd_split(split):
        cls = _NAME.get(types.get(image_id, ""))
        wbcs = [b for b in bccd_boxes(image_id) if b.kind == "wbc"]
        if cls is None or len(wbcs) != 1:
            continue
        img = cv2.imread(str(bccd_image_path(image_id)))
        if img is not None:
            b = wbcs[0]
            items.append((_context(img, mpp, ((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2)), PBC_CLASSES.index(cls), "bccd",
                          f"bccd/{image_id}"))
    return _pack(items)


def rpi_contexts(split: str, mpp: float = RPI_MICRONS_PER_PIXEL) -> ContextSet:
    items = []
    for stem in rpi_splits()[split]:
        img = cv2.imread(str(rpi_dir() / "images" / f"{stem}.jpg"))
        if img is None:
            continue
        for t in rpi_boxes(stem, img.shape[1], img.shape[0]):
            b = t.box
            items.append((_context(img, mpp, ((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2)), PBC_CLASSES.index(_NAME[t.cls]),
                          "rpi", f"rpi/{stem}"))
    return _pack(items)


def load_contexts(split: str, cache_dir: Path = Path("build/wbc_contexts")) -> ContextSet:
    """Every lab's contexts of a split (cached as .npz under build/)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # keyed by the split's members too: a split cleared of copies (training.overlap) is another set
    members = [rel for rel, _ in pbc_splits()[split]] + bccd_split(split) + rpi_splits()[split]
    f = cache_dir / f"{split}_{context_px()}_{split_hash(members)}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return ContextSet(z["images"], z["labels"], z["labs"], list(z["groups"]))
    s = ContextSet.concat([pbc_contexts(split), bccd_contexts(split), rpi_contexts(split)])
    np.savez(f, images=s.images, labels=s.labels, labs=s.labs, groups=np.array(s.groups))
    return s


def to_crops(contexts: np.ndarray, spec: CropSpec = WBC_CROP, rng: np.random.Generator | None = None,
             p_look: float = 0.8, jitter_um: float = 0.0, illumination: bool = True,
             look: LookConfig = DEFAULT_LOOK) -> np.ndarray:
    """Head crops from contexts: (random look), illumination correction, the analyzer's crop.

    With `rng` None no look is drawn (evaluation); `jitter_um` moves the crop centre as the
    detector's boxes would; `illumination` False leaves the frame as stored (for a head whose
    manifest says `illumination: none`).
    """
    c = contexts.shape[1]
    out = np.empty((len(contexts), spec.input_size, spec.input_size, 3), np.uint8)
    for i, ctx in enumerate(contexts):
        if rng is not None and rng.random() < p_look:
            ctx = randomize_look(ctx, rng, look)
        if illumination:
            ctx = correct_illumination(ctx).pixels
        cx = cy = c / 2.0
        if rng is not None and jitter_um > 0:
            d = rng.uniform(-jitter_um, jitter_um, size=2) / CANONICAL_UM_PER_PX
            cx, cy = cx + d[0], cy + d[1]
        out[i] = crop_cell(ctx, (cx, cy), spec)
    return out


#: Every crop's look also out of focus (`training.look.fresnel_defocus`).
OUT_OF_FOCUS = LookConfig(p_defocus=1.0)


def defocus_crops(contexts: np.ndarray, spec: CropSpec = WBC_CROP, seed: int = 11, illumination: bool = True,
                  look: LookConfig = OUT_OF_FOCUS) -> np.ndarray:
    """`contexts`' head crops, each through a random lab's look AND out of focus (fixed seed:
    the same crops for every head; `training.look.fresnel_defocus`; `illumination` as `to_crops`)."""
    return to_crops(contexts, spec, rng=np.random.default_rng(seed), p_look=1.0, look=look, illumination=illumination)
