"""The lab table: the detector (and the stages before it) on held-out fields of every lab.

    python -m training.lab_table [--models models] [--split val|test|val+test]
                                 [--scale estimated|given|both|pooled|specimen]
                                 [--labs bccd,rpi] [--stain auto|none|macenko|vahadane] [--json out.json]
                                 [--views identity,hflip] [--views-where everywhere|unsure] [--unsure-band 0.2,0.8]

A lab is one microscope, camera and stain (`training.labs`). Each row is one lab's held-out
images, analysed by the same `Analyzer` the station runs, scored in the form that lab's labels
have:

- boxes (BCCD, the three TXL-PBC sources): mAP50 of the counted cells (calibrated score >= 0.5)
  and of every detection (the model level), recall and precision of the counted cells per kind;
- PBC crops: the centre cell found, and found as the right kind (platelet / white cell);
- Chula RBC-12 (centres of some red cells): the share of labelled centres inside a counted red
  cell, and the red-cell count against the labelled count (share of fields within 15 %; Chula
  marks only some red cells in many fields, so the count is also set against the classical
  segmenter's count, `training.classical_cells`);
- rpi (typed white-cell boxes): white cells found (a counted white cell with IoU >= 0.5), extra
  white cells per field (the annotators sometimes leave a second one unboxed), counted white cells
  over labelled ones (a cell counted twice is no extra but shows here).

Scale: `estimated` runs as an uncalibrated station does (the analyzer measures the scale);
`given` passes the lab's known scale (a calibrated station); `pooled` analyses every field again
at the median of the fields' own estimates (a station that would learn one scale from its fields:
on rpi val, 30 fields, 0.471 against 0.529 per field and 0.676 given, so stations do not pool);
`specimen` runs as an uncalibrated station does over a specimen (service.analysis.specimen_scale):
the fields in capture order, each given the scale its specimen's earlier fields agree on, which
replaces its own estimate only when that is far off (a specimen: one rpi slide; one source of
each other lab, its one microscope and camera). The estimate's error against the known scale is
reported. Models are chosen by their **worst** lab on `--split val`.

Stain: `auto` (default) gives each model frames normalized as its manifest says, as the station
does; `none`, `macenko` or `vahadane` forces that one for every model (`AnalyzerOptions.stain_method`),
so rows with and without normalization come from two runs of the same command. The Vahadane
reference was fitted on lamp-corrected fields: pair it with `--illumination flatfield`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.device.frame import Frame
from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions, input_bbox
from smearscope.service.analysis.platelet_rescue import PlateletRescue
from smearscope.service.analysis.roi import RoiFilter
from smearscope.service.analysis.scale import resample_factor
from smearscope.service.analysis.specimen_scale import SpecimenScale
from smearscope.service.analysis.stain import available_methods
from training.data import (
    BoxAnnotation,
    bccd_boxes,
    bccd_image_path,
    bccd_microns_per_pixel,
    bccd_split,
    data_root,
    require_data_root,
    stored_size,
    txl_boxes,
)
from training.head_data import (
    CHULA_MICRONS_PER_PIXEL,
    PBC_CLASSES,
    PBC_MICRONS_PER_PIXEL,
    chula_points,
    chula_splits,
    pbc_splits,
)
from training.labs import (
    DETECTOR_LABS,
    RPI_MICRONS_PER_PIXEL,
    rpi_boxes,
    rpi_dir,
    rpi_splits,
    slide_frame,
    txl_images_by_source,
)
from training.metrics import detection_confusion, detection_map50

logger = logging.getLogger(__name__)
KINDS = ("rbc", "wbc", "platelet")
ALL_CONF = 0.001
#: PBC crops per split in the table (seeded sample, all eight classes): enough for a rate.
PBC_SAMPLE = 200


@dataclass(frozen=True)
class LabImage:
    lab: str
    path: Path
    known_mpp: float | None  # the lab's scale when known (None: per-image, from its boxes)
    boxes: tuple[BoxAnnotation, ...] = ()
    extra: object = None  # lab-specific truth: PBC class, Chula centres, rpi typed boxes


def _txl_mpp(boxes, w: int, h: int) -> float | None:
    from smearscope.service.analysis.scale import scale_from_rbc_diameters

    d = [(b.x1 - b.x0 + b.y1 - b.y0) / 2 for b in boxes
         if b.kind == "rbc" and b.x0 > 2 and b.y0 > 2 and b.x1 < w - 2 and b.y1 < h - 2]
    return scale_from_rbc_diameters(np.array(d))


def lab_images(lab: str, split: str) -> list[LabImage]:
    if split == "val+test":  # both held-out parts (longer specimen runs); never for choosing
        return lab_images(lab, "val") + lab_images(lab, "test")
    if lab == "bccd":
        mpp = bccd_microns_per_pixel()
        return [LabImage(lab, bccd_image_path(i), mpp, tuple(bccd_boxes(i))) for i in bccd_split(split)]
    if lab.startswith("txl_"):
        out = []
        for p in txl_images_by_source(split)[lab]:
            w, h = stored_size(p)
            boxes = txl_boxes(p, split, w, h)
            out.append(LabImage(lab, p, _txl_mpp(boxes, w, h), tuple(boxes)))
        # Too few whole red cells to measure an image: its source's median scale (one camera).
        known = [im.known_mpp for im in out if im.known_mpp is not None]
        median = float(np.median(known)) if known else None
        return [im if im.known_mpp is not None else LabImage(lab, im.path, median, im.boxes) for im in out]
    if lab == "pbc":
        items = list(pbc_splits()[split])
        random.Random(20261202).shuffle(items)
        root = data_root() / "pbc"
        return [LabImage(lab, root / rel, PBC_MICRONS_PER_PIXEL, extra=PBC_CLASSES[ci]) for rel, ci in items[:PBC_SAMPLE]]
    if lab == "chula":
        root = data_root() / "chula_rbc12" / "Dataset"
        return [LabImage(lab, root / f"{i}.jpg", CHULA_MICRONS_PER_PIXEL, extra=i) for i in chula_splits()[split]]
    if lab == "rpi":
        out = []
        for stem in rpi_splits()[split]:
            p = rpi_dir() / "images" / f"{stem}.jpg"
            typed = rpi_boxes(stem, *stored_size(p))
            out.append(LabImage(lab, p, RPI_MICRONS_PER_PIXEL, tuple(t.box for t in typed), extra=typed))
        return out
    raise ValueError(f"unknown lab {lab!r}; known: {', '.join(DETECTOR_LABS)}")


def _box(b: BoxAnnotation) -> list[float]:
    return [b.x0, b.y0, b.x1, b.y1]


#: Set by --greyscale: every image is converted to grey first (a monochrome camera or export).
GREYSCALE = False


def analyse(analyzer: Analyzer, img: LabImage, mode: str, specimen_scale: float | None = None) -> dict:
    pixels = cv2.imread(str(img.path))
    if GREYSCALE:
        pixels = cv2.cvtColor(cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    mpp = img.known_mpp if mode == "given" else None
    res = analyzer.analyze(Frame(pixels, img.path.name, img.lab, microns_per_pixel=mpp), specimen_scale=specimen_scale)
    rep = res.report
    h, w = pixels.shape[:2]
    # A nucleated red cell is the detector's white cell re-typed by the WBC head: scored as found.
    counted = [("wbc" if c.kind == "nrbc" else c.kind, c.bbox, c.score) for c in rep.cells]
    below = [(d.kind.value, input_bbox(d.box, res.input_to_canonical, w, h), d.score) for d in res.candidates
             if d.score >= ALL_CONF]
    return {"counted": counted, "every": counted + below, "mpp": rep.scale.microns_per_pixel,
            "scale_method": rep.scale.method, "scale": rep.scale,
            "flags": [f.code for f in rep.flags], "ms": rep.timing_ms.get("total_ms", 0.0),
            "detect_ms": rep.timing_ms.get("detect_ms", 0.0), "w": w, "h": h, "labels": [(c.kind, c.label) for c in rep.cells]}


def score_boxed(images: list[LabImage], outs: list[dict]) -> dict:
    per = [{"pred": o["counted"], "truth": [(b.kind, _box(b)) for b in im.boxes]} for im, o in zip(images, outs)]
    every = [{"pred": o["every"], "truth": p["truth"]} for o, p in zip(outs, per)]
    m = detection_map50(per, KINDS)
    conf = detection_confusion(per, KINDS)
    return {"counted_map50": m["mAP50"], "counted_ap50": {k: m[k] for k in KINDS},
            "every_map50": detection_map50(every, KINDS)["mAP50"],
            "recall": {k: conf["per_class"][k]["recall"] for k in KINDS if conf["per_class"][k]["n_truth"]},
            "labelled": {k: conf["per_class"][k]["n_truth"] for k in KINDS},
            "precision": {k: conf["per_class"][k]["precision"] for k in KINDS if conf["per_class"][k]["n_pred"]},
            "recall_all": _pooled_recall(conf)}


def _pooled_recall(conf: dict) -> float:
    cm = np.array(conf["matrix"])
    k = len(KINDS)
    return float(np.trace(cm[:k, :k]) / max(cm[:k, :].sum(), 1))


def score_pbc(images: list[LabImage], outs: list[dict]) -> dict:
    found = kind_ok = 0
    for im, o in zip(images, outs):
        cx, cy = o["w"] / 2, o["h"] / 2
        hit = [c for c in o["counted"] if c[1][0] <= cx <= c[1][2] and c[1][1] <= cy <= c[1][3]]
        if hit:
            found += 1
            want = "platelet" if im.extra == "platelet" else "wbc"
            kind_ok += any(c[0] == want for c in hit)
    n = max(len(images), 1)
    return {"centre_found": found / n, "centre_found_right_kind": kind_ok / n}


def score_chula(images: list[LabImage], outs: list[dict], analyzer_free_counts: list[int]) -> dict:
    inside, total, within, within_cls = 0, 0, 0, 0
    ratios = []
    for im, o, ref in zip(images, outs, analyzer_free_counts):
        pts = chula_points(im.extra)
        rbcs = [c[1] for c in o["counted"] if c[0] == "rbc"]
        for x, y, _ in pts:
            total += 1
            inside += any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in rbcs)
        if pts:
            ratios.append(len(rbcs) / len(pts))
            within += abs(len(rbcs) - len(pts)) <= 0.15 * len(pts)
        if ref:
            within_cls += abs(len(rbcs) - ref) <= 0.15 * ref
    n = max(len(images), 1)
    return {"centres_in_counted_rbc": inside / max(total, 1), "fields_count_within_15pct_of_labelled": within / n,
            "median_count_over_labelled": float(np.median(ratios)) if ratios else None,
            "fields_count_within_15pct_of_classical": within_cls / n}


def classical_rbc_count(img: LabImage) -> int:
    from smearscope.service.analysis.illumination import correct_illumination
    from smearscope.service.analysis.scale import resample_to_canonical
    from training.classical_cells import segment

    pixels = cv2.imread(str(img.path))
    canon = resample_to_canonical(correct_illumination(pixels).pixels, img.known_mpp)
    f = resample_factor(img.known_mpp)
    seeds = [(x * f, y * f) for x, y, _ in chula_points(img.extra)]
    return sum(r.kind == "rbc" for r in segment(canon, seeds))


def score_rpi(images: list[LabImage], outs: list[dict]) -> dict:
    found = total = extra = centre = counted = 0
    for im, o in zip(images, outs):
        wbcs = np.array([c[1] for c in o["counted"] if c[0] == "wbc"], float).reshape(-1, 4)
        truth = np.array([_box(b) for b in im.boxes], float).reshape(-1, 4)
        total += len(truth)
        counted += len(wbcs)
        if len(wbcs) and len(truth):
            iou = box_iou(truth, wbcs)
            found += int((iou.max(1) >= 0.5).sum())
            cx, cy = (truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2
            centre += int(sum(((wbcs[:, 0] <= x) & (x <= wbcs[:, 2]) & (wbcs[:, 1] <= y) & (y <= wbcs[:, 3])).any()
                              for x, y in zip(cx, cy)))
            extra += int((iou.max(0) < 0.3).sum())
        else:
            extra += len(wbcs)
    n = max(len(images), 1)
    return {"wbc_found": found / max(total, 1), "wbc_centre_hit": centre / max(total, 1), "extra_wbc_per_field": extra / n,
            "wbc_counted_over_labelled": counted / max(total, 1),
            "rbc_per_field": float(np.mean([sum(c[0] == "rbc" for c in o["counted"]) for o in outs]))}


def scored_images(lab: str, split: str, mode: str, limit: int | None = None) -> list[LabImage]:
    """The lab's images of `split` (the first `limit`) that a run at `mode` scores: at the given
    scale only those whose scale is known."""
    images = lab_images(lab, split)
    if limit:
        images = images[:limit]
    return [im for im in images if im.known_mpp is not None] if mode == "given" else images


def run_lab(analyzer: Analyzer, lab: str, split: str, mode: str, limit: int | None = None) -> dict:
    images = scored_images(lab, split, mode, limit)
    if mode == "specimen":
        outs = _as_specimens(analyzer, images, desc=f"{lab} {split} {mode}")
    else:
        outs = [analyse(analyzer, im, "estimated" if mode == "pooled" else mode)
                for im in tqdm(images, desc=f"{lab} {split} {mode}", mininterval=10)]
    pooled = pooled_over_known = None
    if mode == "pooled":  # every field again at the median of the fields' own estimates
        pooled = float(np.median([o["mpp"] for o in outs])) if outs else None
        known = [im.known_mpp for im in images if im.known_mpp]
        pooled_over_known = pooled / float(np.median(known)) if known and pooled else None
        images = [dataclasses.replace(im, known_mpp=pooled) for im in images]
        outs = [analyse(analyzer, im, "given") for im in tqdm(images, desc=f"{lab} {split} at {pooled:.4f}", mininterval=10)]
    row: dict = {"lab": lab, "split": split, "scale": mode, "n": len(images), "pooled_mpp": pooled,
                 "pooled_over_known": pooled_over_known,
                 "median_ms": float(np.median([o["ms"] for o in outs])) if outs else None,
                 "median_detect_ms": float(np.median([o["detect_ms"] for o in outs])) if outs else None,
                 "no_cells_fields": sum("no_cells_found" in o["flags"] for o in outs)}
    errs = [o["mpp"] / im.known_mpp - 1 for im, o in zip(images, outs) if im.known_mpp]
    if errs and mode in ("estimated", "specimen"):
        row["scale_error_median_abs"] = float(np.median(np.abs(errs)))
        row["scale_within_15pct"] = float(np.mean(np.abs(errs) <= 0.15))
    if lab == "bccd" or lab.startswith("txl_"):
        row.update(score_boxed(images, outs))
    elif lab == "pbc":
        row.update(score_pbc(images, outs))
    elif lab == "chula":
        row.update(score_chula(images, outs, [classical_rbc_count(im) for im in images]))
    elif lab == "rpi":
        row.update(score_rpi(images, outs))
    row["rbc_label_shares"] = rbc_label_shares(outs)
    return row


def rbc_label_shares(outs: list[dict]) -> dict[str, float]:
    """The share of the lab's counted red cells typed each morphology (a lab of mostly normal-looking
    red cells that reads many target or spherocyte cells shows its look misread as morphology)."""
    labels = [label for o in outs for kind, label in o["labels"] if kind == "rbc"]
    names, counts = np.unique(np.array(labels, dtype=str), return_counts=True)
    return {str(k): round(float(v) / len(labels), 4) for k, v in zip(names, counts)} if labels else {}


def specimen_of(img: LabImage) -> str:
    """The specimen a lab image belongs to: its slide (rpi), else its lab (one microscope and camera)."""
    return slide_frame(img.path.stem)[0] if img.lab == "rpi" else img.lab


def _as_specimens(analyzer: Analyzer, images: list[LabImage], desc: str) -> list[dict]:
    """Each image at an estimated scale, in capture order within its specimen, given the scale
    the specimen's earlier fields agree on (as service.station.specimen keeps it)."""
    order = sorted(range(len(images)), key=lambda i: (specimen_of(images[i]), slide_frame(images[i].path.stem)[1],
                                                      images[i].path.name))
    scales: dict[str, SpecimenScale] = {}
    outs: list[dict] = [{}] * len(images)
    for i in tqdm(order, desc=desc, mininterval=10):
        pool = scales.setdefault(specimen_of(images[i]), SpecimenScale())
        o = outs[i] = analyse(analyzer, images[i], "estimated", specimen_scale=pool.scale())
        pool.add_report(o["scale"])
    return outs


def headline(row: dict) -> float:
    """One number per lab for choosing models (higher is better): the lab's main detection figure."""
    if "counted_map50" in row:
        return row["counted_map50"]
    if "centre_found_right_kind" in row:
        return row["centre_found_right_kind"]
    if "centres_in_counted_rbc" in row:
        return row["centres_in_counted_rbc"]
    return row.get("wbc_found", 0.0)


#: A kind with fewer labelled cells than this in a lab moves its mAP50 by a large step per cell.
THIN_KIND = 10


def thin_kinds(row: dict) -> dict[str, int]:
    """Kinds of a boxed lab whose AP (a third of its mAP50) rests on fewer than THIN_KIND cells."""
    return {k: n for k, n in row.get("labelled", {}).items() if 0 < n < THIN_KIND}


def headline_without_thin(row: dict) -> float:
    """`headline`, with a boxed lab's mAP50 averaged over its kinds of THIN_KIND or more labelled
    cells only (a second view for choosing models, where one cell of a thin kind decides the first)."""
    aps, thin = row.get("counted_ap50"), thin_kinds(row)
    if not aps or not thin:
        return headline(row)
    kept = [ap for k, ap in aps.items() if k not in thin and row.get("labelled", {}).get(k, 0) > 0]
    return float(np.mean(kept)) if kept else headline(row)


def format_table(rows: list[dict]) -> str:
    lines = ["| lab | scale | n | headline | counted mAP50 | every mAP50 | recall rbc / wbc / plt | labelled rbc / wbc / plt | other | scale err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = r.get("recall", {})
        other = ""
        if "centre_found" in r:
            other = f"found {r['centre_found']:.3f}, right kind {r['centre_found_right_kind']:.3f}"
        if "centres_in_counted_rbc" in r:
            other = (f"centres in RBC {r['centres_in_counted_rbc']:.3f}; count ±15% of labelled "
                     f"{r['fields_count_within_15pct_of_labelled']:.2f}, of classical {r['fields_count_within_15pct_of_classical']:.2f}")
        if "wbc_found" in r:
            other = f"WBC found {r['wbc_found']:.3f} (centre {r['wbc_centre_hit']:.3f}); extra WBC/field {r['extra_wbc_per_field']:.2f}; counted/labelled {r['wbc_counted_over_labelled']:.2f}"
        fmt = lambda v: "—" if v is None else f"{v:.3f}"
        lines.append(
            f"| {r['lab']} | {r['scale']} | {r['n']} | {headline(r):.3f} | {fmt(r.get('counted_map50'))} | {fmt(r.get('every_map50'))} | "
            f"{' / '.join(fmt(rec.get(k)) for k in KINDS) if rec else '—'} | "
            f"{' / '.join(str(r['labelled'][k]) for k in KINDS) if 'labelled' in r else '—'} | {other} | "
            f"{fmt(r.get('scale_error_median_abs'))} |")
    shown = ("normal", "target", "spherocyte", "stomatocyte")
    lines.append("\nred cells counted, share typed " + " / ".join(shown) + ":")
    lines += [f"  {r['lab']} ({r['scale']}): " + " / ".join(f"{r['rbc_label_shares'].get(k, 0.0):.3f}" for k in shown)
              for r in rows if r.get("rbc_label_shares")]
    worst = min(rows, key=headline) if rows else None
    if worst:
        lines.append(f"\nworst lab: {worst['lab']} ({worst['scale']} scale) {headline(worst):.3f}")
        thin = thin_kinds(worst)
        if thin:
            lines.append("  its mAP50 averages kinds with few labelled cells (" +
                         ", ".join(f"{k}: {n}" for k, n in thin.items()) +
                         "): one cell found or missed moves it by a large step; compare those kinds' cells, not the headline")
            firm = min(rows, key=headline_without_thin)
            lines.append(f"  without kinds of fewer than {THIN_KIND} labelled cells, the worst lab: {firm['lab']} "
                         f"({firm['scale']} scale) {headline_without_thin(firm):.3f}")
    return "\n".join(lines)


def rescue_rule(spec: str) -> PlateletRescue:
    """`--platelet-rescue CONTRAST,FROM`; empty: the station's rule."""
    if not spec:
        return PlateletRescue()
    contrast, start = (float(v) for v in spec.split(","))
    return PlateletRescue(min_score=start, min_contrast=contrast)


def count_from(spec: str) -> RoiFilter:
    """`rbc=0.3,platelet=0.35` -> the RoiFilter counting those kinds from those scores."""
    names = {"rbc": "red_cell_min_confidence", "platelet": "platelet_min_confidence", "cells": "min_confidence"}
    kw = {}
    for item in spec.split(","):
        kind, _, value = item.partition("=")
        if kind not in names:
            raise SystemExit(f"--count-from: unknown kind {kind!r} (one of {', '.join(names)})")
        kw[names[kind]] = float(value)
    return RoiFilter(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--split", choices=("val", "test", "val+test"), default="val",
                    help="val+test: both held-out parts together, e.g. for --scale specimen, whose runs need "
                         "several fields of a slide (never for choosing a model)")
    ap.add_argument("--scale", choices=("estimated", "given", "both", "pooled", "specimen"), default="both",
                    help="pooled: each field's own estimate first, then every field again at their median "
                         "(a station that learns one scale from its fields); specimen: in capture order, each "
                         "field given the scale its specimen's earlier fields agree on (a station's specimen run)")
    ap.add_argument("--labs", default=",".join(DETECTOR_LABS))
    ap.add_argument("--limit", type=int, default=None, help="first N images per lab (quick looks)")
    ap.add_argument("--views", default=None, help="detector views, e.g. identity (default: the manifest's)")
    ap.add_argument("--views-where", choices=("everywhere", "unsure"), default="unsure",
                    help="where the detector's views after the first run (AnalyzerOptions.detector_views_where)")
    ap.add_argument("--stain", choices=("auto", *available_methods()), default="auto",
                    help="stain normalization for every model (default: each manifest's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--greyscale", action="store_true", help="convert every image to greyscale first")
    ap.add_argument("--illumination", choices=("auto", "flatfield", "none"), default="auto",
                    help="force the lamp correction on or off for every model (with/without rows)")
    ap.add_argument("--unsure-band", default=None,
                    help="LOW,HIGH: the first view's calibrated scores the extra views look again at "
                         "(AnalyzerOptions.detector_unsure_band; default its own)")
    ap.add_argument("--unsure-kinds", default=None,
                    help="KIND,...: the kinds whose unsure or cut cells call for the extra views "
                         "(AnalyzerOptions.detector_unsure_kinds; default every kind)")
    ap.add_argument("--count-from", default=None,
                    help="KIND=SCORE,...: counting thresholds per kind (rbc, platelet, or cells: every kind; "
                    "RoiFilter), e.g. rbc=0.3")
    ap.add_argument("--no-view-windows", action="store_true",
                    help="extra detector views on whole tiles, not packed windows (AnalyzerOptions.detector_view_windows)")
    ap.add_argument("--window-margin", type=int, default=None,
                    help="context around an unsure cell in its window (AnalyzerOptions.detector_window_margin)")
    ap.add_argument("--no-nucleated-recheck", action="store_true",
                    help="every red-cell detection stays a red cell (AnalyzerOptions.nucleated_recheck off)")
    ap.add_argument("--count-twins", action="store_true",
                    help="a red-cell detection re-counted as a white cell on top of a detected white cell is "
                         "counted too (AnalyzerOptions.recounted_twin_min_iou None; service.analysis.recount_twins)")
    ap.add_argument("--count-kind-twins", action="store_true",
                    help="a platelet on a cell's outline, or a white cell in overlapping pieces, is counted twice "
                         "(AnalyzerOptions.kind_twin_min_iou and white_piece_min_iou None; service.analysis.kind_twins)")
    ap.add_argument("--platelet-rescue", nargs="?", const="", default=None, metavar="CONTRAST,FROM",
                    help="faint platelets confirmed by colour (service.analysis.platelet_rescue, a station option): "
                         "the rule as the station config turns it on, or this contrast (grey levels) and the "
                         "detector score it looks from, e.g. 40,0.05")
    args = ap.parse_args()
    require_data_root()
    global GREYSCALE
    GREYSCALE = args.greyscale
    logging.basicConfig(level=logging.WARNING)
    options = AnalyzerOptions(detector_views=tuple(args.views.split(",")) if args.views else None,
                              detector_views_where=args.views_where,
                              illumination=args.illumination, stain_method=args.stain,
                              nucleated_recheck=not args.no_nucleated_recheck,
                              **({"recounted_twin_min_iou": None} if args.count_twins else {}),
                              **({"kind_twin_min_iou": None, "white_piece_min_iou": None} if args.count_kind_twins else {}),
                              platelet_rescue=None if args.platelet_rescue is None else rescue_rule(args.platelet_rescue),
                              detector_view_windows=not args.no_view_windows,
                              **({"detector_window_margin": args.window_margin} if args.window_margin is not None else {}),
                              **({"detector_unsure_band": tuple(float(v) for v in args.unsure_band.split(","))}
                                 if args.unsure_band else {}),
                              **({"detector_unsure_kinds": tuple(args.unsure_kinds.split(","))} if args.unsure_kinds else {}),
                              **({"roi": count_from(args.count_from)} if args.count_from else {}))
    analyzer = Analyzer.from_models_dir(args.models, options=options)
    if args.stain != "auto" and analyzer.stain_method != args.stain:
        analyzer.close()
        raise SystemExit(f"the analyzer ran stain {analyzer.stain_method!r} when {args.stain!r} was forced")
    modes = ("estimated", "given") if args.scale == "both" else (args.scale,)
    rows = []
    try:
        for lab in args.labs.split(","):
            for mode in modes:
                rows.append({**run_lab(analyzer, lab, args.split, mode, args.limit), "stain": analyzer.stain_method,
                             "detector_views": "+".join(analyzer.segmenter.views), "views_where": args.views_where,
                             "view_windows": options.detector_view_windows, "window_margin": options.detector_window_margin})
                logger.warning("%s", json.dumps(rows[-1]))
    finally:
        analyzer.close()
    print(f"stain normalization: {analyzer.stain_method} (--stain {args.stain}); detector views "
          f"{'+'.join(analyzer.segmenter.views)}, the ones after the first {args.views_where}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
