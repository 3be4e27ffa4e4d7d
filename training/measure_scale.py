"""Measure a point-labelled set's scale with the analyzer's own ruler.

    python -m training.measure_scale [--models models] [--images 150]

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
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from device.frame import Frame
from service.scale import scale_from_rbc_diameters
from training import head_data as hd

NOMINAL_CHULA_UM_PER_PX = 0.23  # datasets README


def normal_cell_diameters(boxes: list[tuple[float, float, float, float]], points: list[tuple[float, float, str]],
                          width: int, height: int, edge: float = 2.0) -> list[float]:
    """(w + h) / 2 of each box that holds exactly one labelled point, a 'normal' one, away from the edge."""
    out = []
    for x0, y0, x1, y1 in boxes:
        if x0 <= edge or y0 <= edge or x1 >= width - edge or y1 >= height - edge:
            continue
        inside = [c for x, y, c in points if x0 <= x <= x1 and y0 <= y <= y1]
        if inside == ["normal"]:
            out.append(((x1 - x0) + (y1 - y0)) / 2.0)
    return out


def measure_chula(models: Path, n_images: int, at_um_per_px: float = NOMINAL_CHULA_UM_PER_PX,
                  min_score: float = 0.5) -> tuple[float, int]:
    from service.pipeline import Analyzer

    analyzer = Analyzer.from_models_dir(models, warmup=False)
    root = hd.data_root() / "chula_rbc12" / "Dataset"
    diam: list[float] = []
    for image_id in tqdm(hd.chula_splits()["train"][:n_images], desc="Chula train"):
        img = cv2.imread(str(root / f"{image_id}.jpg"))
        if img is None:
            continue
        rep = analyzer.analyze(Frame(img, image_id, "chula", microns_per_pixel=at_um_per_px)).report
        boxes = [tuple(c.bbox) for c in rep.cells if c.kind == "rbc" and c.score >= min_score]
        diam += normal_cell_diameters(boxes, hd.chula_points(image_id), img.shape[1], img.shape[0])
    mpp = scale_from_rbc_diameters(np.array(diam))
    if mpp is None:
        raise SystemExit("too few normal cells matched to measure a scale")
    return mpp, len(diam)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--images", type=int, default=150, help="Chula train images to measure")
    ap.add_argument("--at", type=float, default=NOMINAL_CHULA_UM_PER_PX,
                    help="scale the detector is told while measuring (repeat at the result until it settles)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mpp, n = measure_chula(args.models, args.images, args.at)
    print(f"Chula RBC-12: {mpp:.4f} um/px from {n} normal red cells (detector told {args.at}); "
          f"head_data.CHULA_MICRONS_PER_PIXEL = {hd.CHULA_MICRONS_PER_PIXEL}")


if __name__ == "__main__":
    main()
