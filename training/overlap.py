"""Held-out images that were not held out: copies across splits and across datasets.

Checked 2026-12-06 by thumbnail correlation (24x24 grey, mean removed, >= `SAME`), byte
identity and, for the Raspberry Pi station, template matching of its labelled cells:

- TXL-PBC's 416x416 source holds BCCD fields (the resized BCCD copies TXL-PBC also gathered):
  about 70 of its images, five of them BCCD test fields in TXL-PBC's train part, which the
  detector trained on. A TXL-PBC image that is a BCCD field is no other lab: it is left out of
  TXL-PBC altogether.
- Chula RBC-12 holds byte-identical images (each with its own label file) and one near-copy in
  different parts of its seeded split; PBC one byte-identical pair (train / test).
- The Raspberry Pi station's scan comes back to fields it passed: blocks of consecutive frames
  dealt to different parts still show the same white cell (20 of the 55 labelled test cells
  matched a train frame of their slide at 0.9 or more).

The seeded splits stay as they are (the committed models were trained on their train parts). A
held-out image that copies one a model fitted on (any train part of the datasets the models use,
and a val part for test: validation chose and calibrated them) is left out of its held-out part,
so every held-out figure is on images no model saw. Thumbnails are cached under build/overlap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

#: Thumbnail side and the correlation from which two images are one field.
THUMB = 24
SAME = 0.97
#: A held-out Raspberry Pi cell matching a train frame of its slide this well is the same cell.
SAME_CELL = 0.9
CACHE = Path(__file__).resolve().parents[1] / "build" / "overlap"


def _key(paths: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # unreadable: it matches nothing, and its absence is part of the key
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def _write_atomically(path: Path, write) -> None:
    """`write(tmp)` then a rename: another process never reads half a cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def thumbnails(paths: Sequence[Path]) -> np.ndarray:
    """Unit-norm, mean-free grey thumbnails (n x THUMB*THUMB float32), cached by the files' names,
    sizes and times. An unreadable image gets a zero row (it matches nothing)."""
    paths = list(paths)
    cache = CACHE / f"thumbs-{_key(paths, str(THUMB))}.npy"
    if cache.exists():
        return np.load(cache)
    out = np.zeros((len(paths), THUMB * THUMB), np.float32)
    for i, p in enumerate(tqdm(paths, desc="thumbnails", unit="image", leave=False, disable=len(paths) < 200)):
        im = cv2.imread(str(p), cv2.IMREAD_REDUCED_GRAYSCALE_4)  # decoded at a quarter: a thumbnail's worth
        if im is None:
            continue
        t = cv2.resize(im, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        t -= t.mean()
        n = float(np.linalg.norm(t))
        out[i] = t / n if n > 0 else t
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save adds no suffix to it
            np.save(f, out, allow_pickle=False)
    _write_atomically(cache, save)
    return out


def copies(candidates: Sequence[Path], pool: Iterable[Path], same: float = SAME) -> set[Path]:
    """The candidates that are a copy of an image in `pool` (thumbnail correlation >= `same`; a
    candidate is never its own copy)."""
    candidates = list(candidates)
    own = set(candidates)
    pool = [p for p in pool if p not in own]
    if not candidates or not pool:
        return set()
    a, b = thumbnails(candidates), thumbnails(pool)
    hit = np.zeros(len(candidates), bool)
    for lo in range(0, len(pool), 4096):  # a bounded block of the correlation matrix at a time
        hit |= (a @ b[lo:lo + 4096].T >= same).any(axis=1)
    return {p for p, h in zip(candidates, hit) if h}


def held_out_parts(parts: dict[str, list[str]], path_of, fitted: Iterable[Path] = ()) -> dict[str, list[str]]:
    """A seeded split with its val and test parts cleared of copies: val of train's (and of
    `fitted`, images of other datasets the models fit on), test of train's, val's and `fitted`'s."""
    train = [path_of(i) for i in parts["train"]]
    fitted = list(fitted)
    out = {"train": list(parts["train"])}
    val = [path_of(i) for i in parts.get("val", [])]
    bad_val = copies(val, [*train, *fitted])
    out["val"] = [i for i, p in zip(parts.get("val", []), val) if p not in bad_val]
    test = [path_of(i) for i in parts.get("test", [])]
    bad_test = copies(test, [*train, *val, *fitted])
    out["test"] = [i for i, p in zip(parts.get("test", []), test) if p not in bad_test]
    dropped = {k: len(parts.get(k, [])) - len(out[k]) for k in ("val", "test")}
    if any(dropped.values()):
        logger.info("held-out images that copy fitted ones, left out: %s", dropped)
    return out


def rpi_revisited(parts: dict[str, list[str]], image_of, cells_of, slide_of) -> set[str]:
    """Held-out Raspberry Pi frames (val, test) with a labelled cell that a train frame of the same
    slide shows too (template match >= `SAME_CELL` at half resolution); cached by the split."""
    held = [s for k in ("val", "test") for s in parts.get(k, [])]
    # keyed by the partition itself and by each frame's image and labelled cells
    stems = sorted({*parts["train"], *held})
    boxes = {s: cells_of(s, 2, 2) for s in stems}  # in a 2x2 frame: only the labels' own numbers matter here
    partition = json.dumps({k: sorted(v) for k, v in parts.items()}, sort_keys=True) + json.dumps(boxes, sort_keys=True)
    cache = CACHE / f"rpi-{_key([image_of(s) for s in stems], f'{SAME_CELL}{partition}')}.json"
    if cache.exists():
        return set(json.loads(cache.read_text()))
    train_by_slide: dict[str, list[str]] = {}
    for s in parts["train"]:
        train_by_slide.setdefault(slide_of(s), []).append(s)
    half: dict[str, np.ndarray] = {}

    def grey(stem: str) -> np.ndarray:
        if stem not in half:
            im = cv2.imread(str(image_of(stem)), cv2.IMREAD_GRAYSCALE)
            half[stem] = cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2), interpolation=cv2.INTER_AREA)
        return half[stem]

    revisited = set()
    for stem in tqdm(held, desc="rpi frames seen in train", unit="frame"):
        img = grey(stem)
        for x0, y0, x1, y1 in cells_of(stem, img.shape[1] * 2, img.shape[0] * 2):
            tpl = img[max(0, int(y0 / 2)):int(y1 / 2), max(0, int(x0 / 2)):int(x1 / 2)]
            if tpl.size == 0 or tpl.std() < 1:
                continue
            if any(cv2.matchTemplate(grey(o), tpl, cv2.TM_CCOEFF_NORMED).max() >= SAME_CELL
                   for o in train_by_slide.get(slide_of(stem), []) if grey(o).shape[0] >= tpl.shape[0]
                   and grey(o).shape[1] >= tpl.shape[1]):
                revisited.add(stem)
                break
    _write_atomically(cache, lambda tmp: tmp.write_text(json.dumps(sorted(revisited))))
    return revisited
