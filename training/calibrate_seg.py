"""Calibrate the detector's scores on validation splits (Platt scaling per class).

    python -m training.calibrate_seg --manifest models/seg.json [--sets bccd,txl] [--tta VIEWS]

Raw YOLO scores are not probabilities (a model trained briefly from scratch is under-confident),
so "drop detections below 0.5" would mean little. This fits p = sigmoid(a * logit(score) + b) per
class so that a calibrated score estimates the chance that a detection matches an annotated
cell (IoU >= 0.5), on validation splits only, and writes [a, b] into the manifest.

BCCD leaves many red cells unannotated, so a calibration fitted on BCCD alone says a real red
cell is a miss whenever its annotator skipped it: on TXL-PBC test (annotations complete) such a
calibration counted 47 % of the annotated red cells at precision 0.998. TXL-PBC val (173 images,
other labs, scale estimated as at run time) is pooled in by default (`--sets bccd,txl`).

The detector runs alone (no heads), calibrated in memory; the manifest is written once, at the
end. Its run-time scale search reads calibrated red-cell scores, so TXL-PBC's scales are
estimated with the calibration in hand, the fit repeated with the scales the new one finds, until
at most 2 % of images move by 1 % or more (`--max-rounds`, default 3).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.engines.registry import create_engine
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.roi import RoiFilter
from smearscope.service.analysis.yolo_decode import YoloSegmenter
from training.data import (
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    txl_boxes,
    txl_images,
)
from training.metrics import greedy_matches

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


#: Validation sets the calibration can be fitted on (never a test split).
SETS = ("bccd", "txl")
#: The TXL-PBC scales have settled when at most this share of images moved by 1 % or more.
SETTLED_SHARE = 0.02


def bccd_val_frames():
    """BCCD val at its measured scale, with its annotated boxes."""
    mpp = bccd_microns_per_pixel()
    for image_id in bccd_split("val"):
        yield Frame(cv2.imread(str(bccd_image_path(image_id))), image_id, "bccd", microns_per_pixel=mpp), bccd_boxes(image_id)


def txl_val_frames(scale_of: dict[str, float]):
    """TXL-PBC val at the scale the analyzer estimates for each image (it runs without one)."""
    for path in txl_images("val"):
        img = cv2.imread(str(path))
        if img is None or path.name not in scale_of:
            continue
        h, w = img.shape[:2]
        yield Frame(img, path.name, "txl", microns_per_pixel=scale_of[path.name]), txl_boxes(path, "val", w, h)


def collect(analyzer: Analyzer, frames, per_class: dict[str, tuple[list, list]], set_name: str) -> None:
    """Every detection's raw score and whether it matches an annotated cell (IoU >= 0.5)."""
    for frame, truth in tqdm(list(frames), desc=f"{set_name} val"):
        rep = analyzer.analyze(frame).report
        for kind in ("rbc", "wbc", "platelet"):
            preds = [c for c in rep.cells if c.kind == kind]
            s, h = greedy_matches(np.array([c.bbox for c in preds]), np.array([c.score for c in preds]),
                                  np.array([[b.x0, b.y0, b.x1, b.y1] for b in truth if b.kind == kind]), 0.5)
            sc, hit = per_class.setdefault(kind, ([], []))
            sc.extend(s.tolist())
            hit.extend(h.astype(float).tolist())
            logger.debug("%s %s: %d detections, %d matched", frame.frame_id, kind, len(s), int(h.sum()))


def txl_scales(analyzer: Analyzer, calibration: dict) -> dict[str, float]:
    """Each TXL-PBC val image's scale as the analyzer estimates it with `calibration` (the scale
    search reads calibrated red-cell scores, so the scales depend on it)."""
    analyzer.segmenter.calibration = {k: tuple(v) for k, v in calibration.items()}
    out = {}
    for path in tqdm(txl_images("val"), desc="TXL-PBC val scales"):
        img = cv2.imread(str(path))
        if img is not None:
            out[path.name] = analyzer.analyze(Frame(img, path.name, "txl")).report.scale.microns_per_pixel
    return out


def txl_box_scales() -> dict[str, float]:
    """Each TXL-PBC val image's scale from its own whole annotated red cells (its source's median when
    it has too few)."""
    from training.lab_table import lab_images
    from training.labs import TXL_SOURCES

    return {im.path.name: im.known_mpp for src in TXL_SOURCES for im in lab_images(src, "val")
            if im.known_mpp is not None}


def fit(analyzer: Analyzer, sets: tuple[str, ...], scale_of: dict[str, float]) -> dict[str, list[float]]:
    """Platt (a, b) per class from every raw detection of the sets' val splits, pooled."""
    analyzer.segmenter.calibration = {}  # raw scores, every one above the detector's floor
    per_class: dict[str, tuple[list, list]] = {}
    if "bccd" in sets:
        collect(analyzer, bccd_val_frames(), per_class, "BCCD")
    if "txl" in sets:
        collect(analyzer, txl_val_frames(scale_of), per_class, "TXL-PBC")
    cal = {}
    for kind, (sc, hit) in per_class.items():
        a, b = fit_platt(np.array(sc), np.array(hit))
        cal[kind] = [round(a, 4), round(b, 4)]
        logger.info("%s: %d detections, %.0f%% matched; Platt a=%.3f b=%.3f", kind, len(sc), 100 * np.mean(hit), a, b)
    return cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=Path("models/seg.json"))
    ap.add_argument("--tta", default=None,
                    help="test-time views to calibrate for, e.g. identity,hflip,vflip (default: keep the manifest's)")
    ap.add_argument("--sets", default="bccd,txl",
                    help="validation sets to fit on, pooled: bccd (BCCD val), txl (TXL-PBC val, at the scale the "
                    "analyzer estimates per image with the calibration being fitted)")
    ap.add_argument("--txl-scale", choices=("estimated", "boxes"), default="estimated",
                    help="TXL-PBC val scales: as the analyzer estimates them (the run-time condition, several "
                    "detection passes per image and rounds), or measured from each image's annotated red-cell "
                    "boxes (one pass, a calibrated station's condition)")
    ap.add_argument("--max-rounds", type=int, default=3,
                    help="with txl: refit with the scales the new calibration finds until they settle")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    sets = tuple(args.sets.split(","))
    if not sets or set(sets) - set(SETS):
        raise SystemExit(f"--sets must name some of {SETS}, got {args.sets}")
    manifest = json.loads(args.manifest.read_text())
    views = tuple(args.tta.split(",")) if args.tta else tuple(manifest.get("tta", ["identity"]))
    # The detector alone, calibrated in memory (the manifest is written once, at the end): a
    # class's calibration is fitted on that class's detections, before any head re-types a cell.
    engine = create_engine("onnxruntime", args.manifest)
    engine.load()
    options = AnalyzerOptions(detector_conf=0.05, roi=RoiFilter.every_kind_from(0.0), detector_views=views)
    analyzer = Analyzer(YoloSegmenter(engine, conf_threshold=0.05, views=views), None, None, options)
    cal = manifest.get("score_calibration", {})
    scale_of: dict[str, float] = {}
    if "txl" in sets and args.txl_scale == "boxes":
        scale_of = txl_box_scales()
    for round_ in range(args.max_rounds if "txl" in sets and args.txl_scale == "estimated" else 1):
        if "txl" in sets and args.txl_scale == "estimated":
            scales = txl_scales(analyzer, cal)
            moved = [abs(scales[k] / scale_of[k] - 1) >= 0.01 for k in scales if k in scale_of]
            if moved:
                logger.info("round %d: %d of %d TXL-PBC val scales moved by 1%% or more", round_ + 1, sum(moved), len(moved))
                if sum(moved) <= SETTLED_SHARE * len(moved):
                    break
            scale_of = scales
        cal = fit(analyzer, sets, scale_of)
    engine.close()
    manifest["score_calibration"] = cal
    names = {"bccd": "BCCD val split", "txl": "TXL-PBC val split (scale estimated per image, as at run time)"
             if args.txl_scale == "estimated" else "TXL-PBC val split (scale from each image's red-cell boxes)"}
    manifest.setdefault("metrics", {})["score_calibration_fit"] = (
        f"{' + '.join(names[s] for s in sets)}, pooled, raw detections of each class before the heads, "
        f"IoU >= 0.5 matches, views {'+'.join(views)}")
    manifest["tta"] = list(views)
    args.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(cal))


if __name__ == "__main__":
    main()
