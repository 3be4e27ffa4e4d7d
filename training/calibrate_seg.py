"""Calibrate the detector's scores on BCCD's validation split (Platt scaling per class).

    python -m training.calibrate_seg --manifest models/seg.json

Raw YOLO scores are not probabilities (a model trained briefly from scratch is under-confident),
so "drop detections below 0.5" would mean little. This fits p = sigmoid(a * logit(score) + b) per
class so that a calibrated score estimates the chance that a detection matches an annotated
cell (IoU >= 0.5), on the validation split only, and writes [a, b] into the manifest. BCCD leaves
some red cells unannotated, so the calibration errs on the conservative side for red cells.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from device.frame import Frame
from service.metrics import greedy_matches
from service.pipeline import Analyzer, AnalyzerOptions
from service.roi import RoiFilter
from training.data import bccd_boxes, bccd_image_path, bccd_microns_per_pixel, bccd_split

logger = logging.getLogger(__name__)


#: Calibration must keep the detector's ranking: a slope below this is a degenerate fit (a class
#: with almost no unmatched detections on validation) and is held at it.
MIN_SLOPE = 0.25
#: Weight of the Gaussian prior that pulls (a, b) toward the identity (1, 0); it matters only
#: when a class has few detections or few misses.
PRIOR_WEIGHT = 1.0


def fit_platt(scores: np.ndarray, hits: np.ndarray, iters: int = 200) -> tuple[float, float]:
    """Logistic regression of hits on logit(score) by Newton's method, with a prior toward the
    identity and a slope of at least MIN_SLOPE, so the calibrated score is increasing in the raw one."""
    s = np.clip(np.asarray(scores, float), 1e-6, 1 - 1e-6)
    x = np.log(s / (1 - s))
    y = np.asarray(hits, float)

    def newton(a: float, b: float, fix_a: bool) -> tuple[float, float]:
        for _ in range(iters):
            p = 1 / (1 + np.exp(-(a * x + b)))
            w = p * (1 - p)
            g = np.array([np.sum((p - y) * x) + PRIOR_WEIGHT * (a - 1), np.sum(p - y) + PRIOR_WEIGHT * b])
            h = np.array([[np.sum(w * x * x) + PRIOR_WEIGHT, np.sum(w * x)], [np.sum(w * x), np.sum(w) + PRIOR_WEIGHT]])
            step = np.array([0.0, g[1] / h[1, 1]]) if fix_a else np.linalg.solve(h, g)
            a, b = a - step[0], b - step[1]
            if np.abs(step).max() < 1e-8:
                break
        return float(a), float(b)

    a, b = newton(1.0, 0.0, fix_a=False)
    if a < MIN_SLOPE:
        a, b = newton(MIN_SLOPE, b, fix_a=True)
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=Path("models/seg.json"))
    ap.add_argument("--tta", default=None,
                    help="test-time views to calibrate for, e.g. identity,hflip,vflip (default: keep the manifest's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    manifest = json.loads(args.manifest.read_text())
    if args.tta:
        manifest["tta"] = args.tta.split(",")
    manifest["score_calibration"] = {}
    args.manifest.write_text(json.dumps(manifest, indent=2) + "\n")  # fit on raw scores
    analyzer = Analyzer.from_models_dir(args.manifest.parent, warmup=False,
                                        options=AnalyzerOptions(detector_conf=0.05, roi=RoiFilter(min_confidence=0.0)))
    mpp = bccd_microns_per_pixel()
    per_class: dict[str, tuple[list, list]] = {}
    for image_id in bccd_split("val"):
        img = cv2.imread(str(bccd_image_path(image_id)))
        rep = analyzer.analyze(Frame(img, image_id, "bccd", microns_per_pixel=mpp)).report
        truth = bccd_boxes(image_id)
        for kind in ("rbc", "wbc", "platelet"):
            preds = [c for c in rep.cells if c.kind == kind]
            s, h = greedy_matches(np.array([c.bbox for c in preds]), np.array([c.score for c in preds]),
                                  np.array([[b.x0, b.y0, b.x1, b.y1] for b in truth if b.kind == kind]), 0.5)
            sc, hit = per_class.setdefault(kind, ([], []))
            sc.extend(s.tolist())
            hit.extend(h.astype(float).tolist())
    cal = {}
    for kind, (sc, hit) in per_class.items():
        a, b = fit_platt(np.array(sc), np.array(hit))
        cal[kind] = [round(a, 4), round(b, 4)]
        logger.info("%s: %d detections, %.0f%% matched; Platt a=%.3f b=%.3f", kind, len(sc), 100 * np.mean(hit), a, b)
    manifest["score_calibration"] = cal
    manifest.setdefault("metrics", {})["score_calibration_fit"] = (
        f"BCCD val split, IoU >= 0.5 matches, views {'+'.join(manifest.get('tta', ['identity']))}")
    args.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(cal))


if __name__ == "__main__":
    main()
