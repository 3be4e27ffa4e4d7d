"""Measure a point-labelled set's scale with the analyzer's own ruler.

    python -m training.measure_scale [--models models] [--images 150] [--at 0.23]
    python -m training.measure_scale --set pbc [--at 0.19]

The analyzer's size convention comes from BCCD: a normal red cell's box, mean of width and height,
is 7.5 um (`training.data.bccd_microns_per_pixel`), and at run time an unknown scale is estimated
from the detector's red-cell boxes the same way. Chula RBC-12 gives cell centres, not boxes, and
its nominal 0.23 um/px makes its cells about 25 % larger than BCCD's by that ruler, so a head
trained on it calls a BCCD-sized normal cell small (microcyte, spherocyte, schistocyte).

This measures Chula with the same ruler: the committed detector runs on Chula TRAIN images at the
nominal scale (`--at`; repeat at the result until it settles), and the boxes that hold exactly
one labelled point, of class "normal", and do not touch the image edge, give diameters in Chula
pixels; `scale_from_rbc_diameters` turns them into um/px (median of the middle half = 7.5 um).
The result is `head_data.CHULA_MICRONS_PER_PIXEL`.

`--set pbc` measures PBC the same way on PBC TRAIN crops (a seeded sample). PBC has no red-cell
labels, so every confident red-cell box away from the edge counts; the crops centre on a white
cell and hold a few red cells each. Nothing uses the result yet: `head_data.PBC_MICRONS_PER_PIXEL`
is still the datasets README's nominal 0.19 (see docs/RESULTS.md, "The RBC head's ruler").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.service.analysis.scale import scale_from_rbc_diameters
from training import head_data as hd

NOMINAL_CHULA_UM_PER_PX = 0.23  # datasets README


Box = tuple[float, float, float, float]


def whole_boxes(boxes: list[Box], width: int, height: int, edge: float = 2.0) -> list[Box]:
    """The boxes that do not touch the image edge (a cut cell's box is too small)."""
    return [b for b in boxes if b[0] > edge and b[1] > edge and b[2] < width - edge and b[3] < height - edge]


def diameter(box: Box) -> float:
    return ((box[2] - box[0]) + (box[3] - box[1])) / 2.0


def normal_cell_diameters(boxes: list[Box], points: list[tuple[float, float, str]],
                          width: int, height: int, edge: float = 2.0) -> list[float]:
    """(w + h) / 2 of each box that holds exactly one labelled point, a 'normal' one, away from the edge."""
    out = []
    for b in whole_boxes(boxes, width, height, edge):
        inside = [c for x, y, c in points if b[0] <= x <= b[2] and b[1] <= y <= b[3]]
        if inside == ["normal"]:
            out.append(diameter(b))
    return out


#: Train images each set is measured on by default (the Chula constant was set from these).
CHULA_IMAGES = 150
PBC_IMAGES = 200


def _measure(models: Path, images: list[tuple[str, Path]], source: str, at_um_per_px: float, min_score: float,
             diameters_of) -> tuple[float, int]:
    """Run the analyzer on each image told `at_um_per_px`; `diameters_of(boxes, image_id, width, height)`
    picks the confident red-cell boxes that count and returns their diameters in image pixels."""
    from smearscope.service.analysis.pipeline import Analyzer

    analyzer = Analyzer.from_models_dir(models, warmup=False)
    diam: list[float] = []
    for image_id, path in tqdm(images, desc=f"{source} train"):
        img = cv2.imread(str(path))
        if img is None:
            continue
        rep = analyzer.analyze(Frame(img, image_id, source, microns_per_pixel=at_um_per_px)).report
        boxes = [tuple(c.bbox) for c in rep.cells if c.kind == "rbc" and c.score >= min_score]
        diam += diameters_of(boxes, image_id, img.shape[1], img.shape[0])
    mpp = scale_from_rbc_diameters(np.array(diam))
    if mpp is None:
        raise SystemExit(f"{source}: too few red cells to measure a scale")
    return mpp, len(diam)


def measure_chula(models: Path, n_images: int = CHULA_IMAGES, at_um_per_px: float = NOMINAL_CHULA_UM_PER_PX,
                  min_score: float = 0.5) -> tuple[float, int]:
    """Chula's scale from the boxes holding one labelled 'normal' point (first `n_images` of train)."""
    root = hd.data_root() / "chula_rbc12" / "Dataset"
    images = [(i, root / f"{i}.jpg") for i in hd.chula_splits()["train"][:n_images]]
    return _measure(models, images, "chula", at_um_per_px, min_score,
                    lambda boxes, i, w, h: normal_cell_diameters(boxes, hd.chula_points(i), w, h))


def measure_pbc(models: Path, n_images: int = PBC_IMAGES, at_um_per_px: float = hd.PBC_MICRONS_PER_PIXEL,
                min_score: float = 0.5, seed: int = 0) -> tuple[float, int]:
    """PBC's scale from every whole red-cell box (no red-cell labels) in a seeded sample of train."""
    root = hd.data_root() / "pbc"
    train = hd.pbc_splits()["train"]
    pick = np.random.default_rng(seed).choice(len(train), min(n_images, len(train)), replace=False)
    images = [(train[int(i)][0], root / train[int(i)][0]) for i in pick]
    return _measure(models, images, "pbc", at_um_per_px, min_score,
                    lambda boxes, i, w, h: [diameter(b) for b in whole_boxes(boxes, w, h)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--set", choices=("chula", "pbc"), default="chula")
    ap.add_argument("--images", type=int, default=None, help=f"train images to measure (Chula {CHULA_IMAGES}, PBC {PBC_IMAGES})")
    ap.add_argument("--at", type=float, default=None,
                    help="scale the detector is told while measuring (default: the set's nominal scale; "
                         "repeat at the result until it settles)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.set == "chula":
        at = NOMINAL_CHULA_UM_PER_PX if args.at is None else args.at
        mpp, n = measure_chula(args.models, args.images or CHULA_IMAGES, at)
        print(f"Chula RBC-12: {mpp:.4f} um/px from {n} normal red cells (detector told {at}); "
              f"head_data.CHULA_MICRONS_PER_PIXEL = {hd.CHULA_MICRONS_PER_PIXEL}")
    else:
        at = hd.PBC_MICRONS_PER_PIXEL if args.at is None else args.at
        mpp, n = measure_pbc(args.models, args.images or PBC_IMAGES, at)
        print(f"PBC: {mpp:.4f} um/px from {n} whole red cells (detector told {at}); "
              f"head_data.PBC_MICRONS_PER_PIXEL = {hd.PBC_MICRONS_PER_PIXEL}")


if __name__ == "__main__":
    main()
