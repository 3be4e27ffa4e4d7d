"""Sweep the counting threshold of one kind (platelets) on the lab table's labs with boxes.

    python -m training.count_threshold [--kind platelet] [--split val] [--limit 30] [--scale given|estimated]

Each image of BCCD and the three TXL-PBC sources runs once through the committed models
(`training.lab_table.analyse`, the threshold of the station config in force); the detections of
`--kind` it set aside below that threshold (calibrated scores from the detector's 0.25 up) are
then counted from each lower threshold in turn, and per lab the counted mAP50 and the kind's
recall, precision and F1 are printed, with the mean F1 over the labs (what chose
`analysis.platelet_min_confidence`, models/README.md). Run it with the kind's threshold at the
cells' (`--from 0.5` sets the analyzer's platelet threshold for the run).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from tqdm import tqdm

from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.roi import RoiFilter
from training.lab_table import KINDS, _box, analyse, lab_images
from training.metrics import detection_confusion, detection_map50

LABS = ("bccd", "txl_575", "txl_416", "txl_360")


def sweep(data: dict[str, list], kind: str, thresholds: list[float]) -> list[dict]:
    rows = []
    for t in thresholds:
        per_lab = {}
        for lab, items in data.items():
            per = []
            for im, o in items:
                below = o["every"][len(o["counted"]):]
                extra = [p for p in below if p[0] == kind and p[2] >= t]
                per.append({"pred": list(o["counted"]) + extra, "truth": [(b.kind, _box(b)) for b in im.boxes]})
            c = detection_confusion(per, KINDS)["per_class"][kind]
            p, r = c["precision"], c["recall"]
            per_lab[lab] = {"map50": detection_map50(per, KINDS)["mAP50"], "recall": r, "precision": p,
                            "f1": 2 * p * r / (p + r) if p + r else 0.0}
        rows.append({"threshold": t, "labs": per_lab, "mean_f1": float(np.mean([v["f1"] for v in per_lab.values()]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="platelet", choices=KINDS)
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--scale", default="given", choices=("given", "estimated"))
    ap.add_argument("--from", dest="start", type=float, default=0.5,
                    help="the threshold the run counts the kind from (the sweep goes down from it to 0.25)")
    ap.add_argument("--models", default="models")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    roi = RoiFilter(platelet_min_confidence=args.start) if args.kind == "platelet" else RoiFilter(min_confidence=args.start)
    analyzer = Analyzer.from_models_dir(args.models, options=AnalyzerOptions(roi=roi))
    try:
        data = {lab: [(im, analyse(analyzer, im, args.scale))
                      for im in tqdm(lab_images(lab, args.split)[: args.limit], desc=f"{lab} {args.split}", mininterval=10)]
                for lab in LABS}
    finally:
        analyzer.close()
    thresholds = [round(t, 2) for t in np.arange(args.start, 0.2499, -0.05)]
    print(f"{args.kind}, {args.split} (first {args.limit} per lab), {args.scale} scale: counted mAP50 and "
          f"{args.kind} recall / precision / F1 per lab")
    for r in sweep(data, args.kind, thresholds):
        cells = " | ".join(f"{lab} {v['map50']:.4f} ({v['recall']:.2f} / {v['precision']:.2f} / {v['f1']:.3f})"
                           for lab, v in r["labs"].items())
        print(f"from {r['threshold']:.2f}: mean F1 {r['mean_f1']:.3f} | {cells}")


if __name__ == "__main__":
    main()
