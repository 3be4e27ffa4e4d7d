"""How sharp each lab's red cells are, next to what the RBC head types them (the red-cell focus bound).

    PYTHONPATH=. python -m training.rbc_focus [--split val] [--labs bccd,txl_575,...] [--limit N]
                                              [--blur-um 1.0 --blur-labs bccd,chula --blur-limit N]
                                              [--bound 1.6] [--json out.json]

Each field is analysed at its lab's known scale (`training.lab_table.lab_images`) by the committed
models with the red-cell focus judgement off, and the report's `rbc_focus.edge_width_um`
(service.analysis.rbc_focus) is printed per lab with the share of the field's red cells typed
normal and target. `--blur-um` analyses the fields of `--blur-labs` again after a Gaussian blur of
that SD in micrometres (in input pixels: SD / the lab's um/px): a stand-in for red cells out of
focus. `--bound` says how many of each lab's fields lie above it (for choosing on validation, and
measuring once on test).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions
from training.lab_table import lab_images
from training.labs import DETECTOR_LABS

logger = logging.getLogger(__name__)


def field_row(analyzer: Analyzer, pixels: np.ndarray, name: str, lab: str, mpp: float) -> dict:
    r = analyzer.analyze(Frame(pixels, name, lab, microns_per_pixel=mpp)).report
    labels = [c.label for c in r.cells if c.kind == "rbc"]
    n = len(labels)
    share = lambda k: (sum(lbl == k for lbl in labels) / n) if n else None
    focus = r.rbc_focus
    return {"lab": lab, "field": name, "edge_width_um": focus.edge_width_um if focus else None,
            "cells": focus.cells if focus else 0, "rbc": n, "normal": share("normal"), "target": share("target"),
            "ms": r.timing_ms.get("rbc_focus_ms")}


def summary(rows: list[dict], bound: float | None) -> None:
    print(f"{'lab':<14}{'fields':>7}{'judged':>7}  edge width um: min / p5 / median / p95 / max"
          f"{'  normal':>9}{'target':>8}" + (f"  above {bound:g}" if bound is not None else ""))
    for lab in dict.fromkeys(r["lab"] for r in rows):
        rs = [r for r in rows if r["lab"] == lab]
        w = np.array([r["edge_width_um"] for r in rs if r["edge_width_um"] is not None])
        rbc = sum(r["rbc"] for r in rs)
        normal = sum((r["normal"] or 0) * r["rbc"] for r in rs) / rbc if rbc else float("nan")
        target = sum((r["target"] or 0) * r["rbc"] for r in rs) / rbc if rbc else float("nan")
        q = np.percentile(w, [0, 5, 50, 95, 100]) if w.size else [float("nan")] * 5
        above = f"  {int((w > bound).sum())} of {len(rs)}" if bound is not None else ""
        print(f"{lab:<14}{len(rs):>7}{w.size:>7}  " + " / ".join(f"{x:.2f}" for x in q)
              + f"{normal:>9.2f}{target:>8.2f}{above}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val")
    ap.add_argument("--labs", default=",".join(DETECTOR_LABS))
    ap.add_argument("--limit", type=int, default=None, help="first N fields per lab")
    ap.add_argument("--blur-um", type=float, default=None)
    ap.add_argument("--blur-labs", default="bccd,chula")
    ap.add_argument("--blur-limit", type=int, default=None)
    ap.add_argument("--bound", type=float, default=None)
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    analyzer = Analyzer.from_models_dir(args.models, options=AnalyzerOptions(rbc_max_edge_width_um=None),
                                        warmup=False)
    rows = []
    for lab in args.labs.split(","):
        for img in lab_images(lab, args.split)[:args.limit]:
            pixels = cv2.imread(str(img.path))
            rows.append(field_row(analyzer, pixels, img.path.name, lab, img.known_mpp))
    if args.blur_um:
        for lab in args.blur_labs.split(","):
            for img in lab_images(lab, args.split)[:args.blur_limit]:
                sd = args.blur_um / img.known_mpp
                pixels = cv2.GaussianBlur(cv2.imread(str(img.path)), (0, 0), sd)
                rows.append(field_row(analyzer, pixels, img.path.name, f"{lab}+blur{args.blur_um:g}", img.known_mpp))
    summary(rows, args.bound)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
