"""Every white cell the analyzer counts on a lab's held-out fields, matched to the annotations.

    PYTHONPATH=. python -m training.wbc_extras [--split val] [--scale given|estimated]
                                               [--labs bccd,txl_575,txl_416,txl_360,rpi] [--limit N]
                                               [--json cells.json] [--crops DIR]

The analyzer is built and run as `training.lab_table` builds and runs it (the committed models,
the same options), on the labs whose white cells are boxed. A counted white cell (kind wbc, or
nrbc: the lab table scores a nucleated red cell as a found white cell) is *true* when the lab
table's pairing (`training.metrics.detection_confusion`: every counted cell against every
annotation, IoU >= 0.5, highest first, each once) pairs it with an annotated white cell; on the
Raspberry Pi station (white cells boxed, nothing else) a cell paired with none is an *extra* when
no annotated white cell overlaps it by IoU 0.3 (the lab table's `extra WBC/field`).

Each cell carries what the pipeline's records hold: detector score, mask equivalent-area
diameter and box sides (um), the WBC head's label, top probability, own closed-set class,
open-set scores and atypical mark, whether it was re-counted from a red-cell detection or typed
as nucleated, whether it touches the field edge; and the mask's stain read on the canonical
frame against the field's glass (mean grey, darkest tenth, share of nucleus-dark pixels, blue over
red). `--crops DIR` writes each false cell's crop (outside the repository: crops of the datasets
are not kept in it). The summary prints each feature's range for true and false cells per lab, and
how many false cells a bound on it removes at no true cell lost on any lab.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions, input_bbox
from smearscope.service.analysis.records import CellKind
from smearscope.service.analysis.scale import CANONICAL_UM_PER_PX
from training.lab_table import LabImage, scored_images
from training.metrics import pair_by_iou

logger = logging.getLogger(__name__)
BOXED_WBC_LABS = ("bccd", "txl_575", "txl_416", "txl_360", "rpi")
#: Below this share of the field's glass brightness a pixel reads as nucleus-dark.
NUCLEUS_DARK = 0.55


def _stain(canonical: np.ndarray, det, glass: float) -> dict:
    """The mask's darkness and hue on the canonical frame, relative to the field's glass."""
    mask = det.mask
    if mask is None:
        return {}
    x0, y0 = math.floor(det.box.x0), math.floor(det.box.y0)  # the mask's origin (merge.mask_window)
    mx, my = max(0, -x0), max(0, -y0)  # a box reaching past the frame's top or left
    x0, y0 = max(0, x0), max(0, y0)
    region = canonical[y0:y0 + mask.shape[0] - my, x0:x0 + mask.shape[1] - mx]
    m = mask[my:my + region.shape[0], mx:mx + region.shape[1]].astype(bool)
    px = region[m].astype(np.float32)
    if not len(px):
        return {}
    grey = px.mean(axis=1) / glass
    return {"mean_grey": float(grey.mean()), "p10_grey": float(np.percentile(grey, 10)),
            "dark_share": float((grey < NUCLEUS_DARK).mean()),
            "blue_over_red": float(px[:, 0].mean() / max(px[:, 2].mean(), 1.0))}


def collect(analyzer: Analyzer, img: LabImage, mode: str, crops: Path | None = None) -> tuple[list[dict], int]:
    """The counted white cells of one field, each with its features and truth; and the field's annotated white cells."""
    pixels = cv2.imread(str(img.path))
    h, w = pixels.shape[:2]
    mpp = img.known_mpp if mode == "given" else None
    res = analyzer.analyze(Frame(pixels, img.path.name, img.lab, microns_per_pixel=mpp))
    f = res.input_to_canonical
    canonical = cv2.resize(pixels, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    glass = float(np.percentile(canonical.mean(axis=2), 95))
    boxes = [input_bbox(c.detection.box, f, w, h) for c in res.cells]
    truth = np.array([[b.x0, b.y0, b.x1, b.y1] for b in img.boxes], float).reshape(-1, 4)
    truth_kind = [b.kind for b in img.boxes]
    pairs = pair_by_iou(np.array(boxes, float).reshape(-1, 4), truth)
    wbc_truth = truth[[k == "wbc" for k in truth_kind]] if len(truth) else truth
    counted_wbc = [i for i, c in enumerate(res.cells) if c.detection.kind in (CellKind.WBC, CellKind.NRBC)]
    wbc_boxes = np.array([boxes[i] for i in counted_wbc], float).reshape(-1, 4)
    out = []
    for j, i in enumerate(counted_wbc):
        c = res.cells[i]
        d = c.detection
        iou_wbc = float(box_iou(wbc_boxes[j:j + 1], wbc_truth).max()) if len(wbc_truth) else 0.0
        iou_other = [float(box_iou(wbc_boxes[j:j + 1], wbc_boxes[k:k + 1])[0, 0]) for k in range(len(wbc_boxes)) if k != j]
        paired = truth_kind[pairs[i]] if i in pairs else None
        row = {"lab": img.lab, "image": img.path.name, "bbox": boxes[i], "kind": d.kind.value,
               "true": paired == "wbc", "paired_with": paired, "iou_annotated_wbc": iou_wbc,
               "extra": img.lab == "rpi" and iou_wbc < 0.3,
               "score": d.score, "diameter_um": c.diameter_um,
               "box_w_um": d.box.width * CANONICAL_UM_PER_PX, "box_h_um": d.box.height * CANONICAL_UM_PER_PX,
               "label": c.label, "label_score": c.label_score, "atypical": c.atypical,
               "closed_set_label": c.head_features.closed_set_label if c.head_features else None,
               "open_set_scores": list(c.open_set_scores),
               "detected_as": c.detected_as.value if c.detected_as else None,
               "touches_edge": c.touches_frame_edge, "max_iou_other_wbc": max(iou_other, default=0.0),
               "mpp": res.report.scale.microns_per_pixel, **_stain(canonical, d, glass)}
        out.append(row)
        if crops is not None and not row["true"]:
            x0, y0, x1, y1 = (int(v) for v in boxes[i])
            pad = max(x1 - x0, y1 - y0)
            crop = pixels[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad].copy()
            cv2.rectangle(crop, (x0 - max(0, x0 - pad), y0 - max(0, y0 - pad)),
                          (x1 - max(0, x0 - pad), y1 - max(0, y0 - pad)), (0, 255, 0), 1)
            crops.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(crops / f"{img.lab}_{img.path.stem}_{j}_{c.label}_{c.diameter_um:.1f}um.png"), crop)
    return out, len(wbc_truth)


FEATURES = ("score", "diameter_um", "label_score", "mean_grey", "p10_grey", "dark_share", "blue_over_red")


def summary(cells: list[dict], truth_per_lab: dict[str, int]) -> str:
    """Per lab: true / false counted white cells; per feature, the false cells beyond the true
    cells' extreme over every lab (a bound that loses no true cell on any lab)."""
    labs = sorted({c["lab"] for c in cells})
    lines = ["| lab | annotated WBC | counted WBC | true | false | false on an annotated other kind | rpi extras |",
             "|---|---|---|---|---|---|---|"]
    for lab in labs:
        cs = [c for c in cells if c["lab"] == lab]
        lines.append(f"| {lab} | {truth_per_lab.get(lab, 0)} | {len(cs)} | {sum(c['true'] for c in cs)} | "
                     f"{sum(not c['true'] for c in cs)} | {sum(c['paired_with'] not in (None, 'wbc') for c in cs)} | "
                     f"{sum(c['extra'] for c in cs) if lab == 'rpi' else ''} |")
    true = [c for c in cells if c["true"]]
    false = [c for c in cells if not c["true"]]
    lines.append("\n| feature | true min / median / max | false min / median / max | false below true min | false above true max |")
    lines.append("|---|---|---|---|---|")
    for name in FEATURES:
        t = np.array([c[name] for c in true if c.get(name) is not None], float)
        fa = np.array([c[name] for c in false if c.get(name) is not None], float)
        if not len(t) or not len(fa):
            continue
        lines.append(f"| {name} | {t.min():.3f} / {np.median(t):.3f} / {t.max():.3f} | "
                     f"{fa.min():.3f} / {np.median(fa):.3f} / {fa.max():.3f} | "
                     f"{int((fa < t.min()).sum())} | {int((fa > t.max()).sum())} |")
    for name in ("touches_edge", "atypical"):
        lines.append(f"{name}: true {sum(bool(c[name]) for c in true)} of {len(true)}, "
                     f"false {sum(bool(c[name]) for c in false)} of {len(false)}")
    lines.append("labels of the false: " + json.dumps(dict(sorted(
        {lb: sum(c["label"] == lb for c in false) for lb in {c["label"] for c in false}}.items(), key=lambda kv: -kv[1]))))
    lines.append("labels of the true: " + json.dumps(dict(sorted(
        {lb: sum(c["label"] == lb for c in true) for lb in {c["label"] for c in true}}.items(), key=lambda kv: -kv[1]))))
    return "\n".join(lines)


def add_field_args(ap: argparse.ArgumentParser, json_help: str) -> None:
    """The arguments of the scripts that analyse the boxed labs' held-out fields (this one and
    training.cross_kind_twins): models, split, scale, labs, limit and where to write the fields."""
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--scale", choices=("given", "estimated"), default="given")
    ap.add_argument("--labs", default=",".join(BOXED_WBC_LABS))
    ap.add_argument("--limit", type=int, default=None, help="first N images per lab")
    ap.add_argument("--json", type=Path, default=None, help=json_help)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_args(ap, "write every counted white cell here")
    ap.add_argument("--crops", type=Path, default=None, help="write each false cell's crop here (outside the repository)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # As training.lab_table builds it (its defaults), keeping the WBC head's own class for the records.
    analyzer = Analyzer.from_models_dir(args.models, options=AnalyzerOptions(keep_wbc_features=True))
    cells: list[dict] = []
    truth: dict[str, int] = {}
    try:
        for lab in args.labs.split(","):
            images = scored_images(lab, args.split, args.scale, args.limit)
            for im in tqdm(images, desc=f"{lab} {args.split} {args.scale}", mininterval=10):
                rows, n = collect(analyzer, im, args.scale, args.crops)
                cells += rows
                truth[lab] = truth.get(lab, 0) + n
    finally:
        analyzer.close()
    print(summary(cells, truth))
    if args.json:
        args.json.write_text(json.dumps({"truth": truth, "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
