"""Each source of smears as its own lab, with fixed, seeded splits: the lab table's ground.

A lab is one microscope + camera + stain protocol. The sets in `../shared/datasets` give these
labs (names are used in reports, manifests and the lab table):

| lab | source | split | labels |
|---|---|---|---|
| `bccd` | BCCD | its VOC train / val / test | boxes rbc/wbc/platelet (red cells incomplete) |
| `txl_575`, `txl_416`, `txl_360` | TXL-PBC's three sources, told apart by image size | TXL's own train / val / test | boxes, complete |
| `pbc` | PBC crops (CellaVision) | seeded stratified 80/10/10 | one class per crop (centre cell) |
| `chula` | Chula RBC-12 | seeded 80/10/10 by image | centres of some red cells per field |
| `rpi` | chula_wbc_rpi (Raspberry Pi station) | seeded 70/15/15 by blocks of consecutive frames of a slide | boxes of the white cell(s) of interest, typed |

`rpi` fields are frames of a scan of a few slides (file names: slide, frame number); consecutive
frames can overlap, so the split keeps blocks of `RPI_BLOCK` consecutive frames together.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from training.data import SPLIT_SEED, BoxAnnotation, data_root, txl_images

RPI_CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")
RPI_BLOCK = 5
#: rpi stored-image scale in the analyzer's ruler (a normal red cell = 7.5 um): isolated round
#: red cells measure about 54 px across (`training.classical_cells.rbc_diameter_px`, area-weighted
#: median over every third field: 56 px; per slide 49-64 px), not the ~25 px the source suggests.
RPI_MICRONS_PER_PIXEL = 0.135
TXL_SOURCES = ("txl_575", "txl_416", "txl_360")
DETECTOR_LABS = ("bccd", *TXL_SOURCES, "pbc", "chula", "rpi")


def txl_source(width: int, height: int) -> str:
    """Which TXL-PBC source an image comes from, by its size (the sources differ in camera)."""
    if max(width, height) >= 500:
        return "txl_575"
    if max(width, height) >= 400:
        return "txl_416"
    return "txl_360"


def txl_images_by_source(split: str) -> dict[str, list[Path]]:
    import cv2

    out: dict[str, list[Path]] = {s: [] for s in TXL_SOURCES}
    for p in txl_images(split):
        hw = cv2.imread(str(p), cv2.IMREAD_REDUCED_GRAYSCALE_4)
        if hw is None:
            continue
        out[txl_source(hw.shape[1] * 4, hw.shape[0] * 4)].append(p)
    return out


def rpi_dir() -> Path:
    return data_root() / "chula_wbc_rpi" / "train"


@dataclass(frozen=True)
class TypedBox:
    cls: str  # one of RPI_CLASSES
    box: BoxAnnotation


def rpi_boxes(stem: str, width: int, height: int) -> list[TypedBox]:
    """A field's typed white-cell boxes (YOLO labels) in its stored pixels."""
    lab = rpi_dir() / "labels" / f"{stem}.txt"
    out = []
    for line in lab.read_text().splitlines() if lab.exists() else []:
        v = line.split()
        if len(v) == 5 and 0 <= int(v[0]) < len(RPI_CLASSES):
            c, cx, cy, bw, bh = int(v[0]), *map(float, v[1:])
            out.append(TypedBox(RPI_CLASSES[c], BoxAnnotation("wbc", (cx - bw / 2) * width, (cy - bh / 2) * height,
                                                              (cx + bw / 2) * width, (cy + bh / 2) * height)))
    return out


def slide_frame(stem: str) -> tuple[str, int]:
    """An rpi field's slide and frame number, from its file stem (SLIDE_FRAME)."""
    m = re.match(r"(.+)_(\d+)$", stem)
    return (m.group(1), int(m.group(2))) if m else (stem, 0)


def rpi_splits(fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Stems of labelled rpi fields per split; blocks of consecutive frames stay together.

    Each slide's frames are sorted and cut into blocks of RPI_BLOCK; blocks are shuffled with the
    project's split seed and dealt to train / val / test per slide, so every slide (and so every
    white-cell type: the slides are one type each) is in every split.
    """
    if not (rpi_dir() / "images").is_dir():  # not an empty split: a wrong data path says so
        raise FileNotFoundError(f"chula_wbc_rpi not found: no {rpi_dir() / 'images'} (set SMEARSCOPE_DATA)")
    stems = sorted(p.stem for p in (rpi_dir() / "images").glob("*.jpg") if (rpi_dir() / "labels" / f"{p.stem}.txt").exists())
    by_slide: dict[str, list[tuple[int, str]]] = {}
    for s in stems:
        slide, frame = slide_frame(s)
        by_slide.setdefault(slide, []).append((frame, s))
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for slide in sorted(by_slide):
        frames = [s for _, s in sorted(by_slide[slide])]
        blocks = [frames[i:i + RPI_BLOCK] for i in range(0, len(frames), RPI_BLOCK)]
        random.Random(f"{SPLIT_SEED}-{slide}").shuffle(blocks)
        n = len(blocks)
        n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
        n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
        for i, b in enumerate(blocks):
            split = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
            out[split] += b
    # the scan comes back to fields it passed: a held-out frame showing a train frame's cell is left
    # out, and a test frame showing a val frame's (validation chose the models)
    from training.overlap import rpi_revisited

    def image(s: str) -> Path:
        return rpi_dir() / "images" / f"{s}.jpg"

    def slide(s: str) -> str:
        return slide_frame(s)[0]
    seen = rpi_revisited(out, image, _rpi_cell_boxes, slide)
    out = {k: sorted(s for s in v if k == "train" or s not in seen) for k, v in out.items()}
    seen = rpi_revisited({"train": out["val"], "val": [], "test": out["test"]}, image, _rpi_cell_boxes, slide)
    return {**out, "test": [s for s in out["test"] if s not in seen]}


def _rpi_cell_boxes(stem: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    return [(t.box.x0, t.box.y0, t.box.x1, t.box.y1) for t in rpi_boxes(stem, width, height)]
