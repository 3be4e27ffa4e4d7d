"""One object counted as two cells: pairs of counted cells on the same outline, measured against the annotations.

    PYTHONPATH=. python -m training.cross_kind_twins [--split val] [--scale given|estimated] [--count-kind-twins]
                                                     [--labs bccd,txl_575,txl_416,txl_360,rpi] [--limit N]
                                                     [--json fields.json] [--from-json fields.json ...]

The detector merges its tiles and fuses its views per kind, so one object can come out as two
counted cells of different kinds (white + red, white + platelet, red + platelet), or as two white
cells no stage joins. The analyzer is built and run as `training.lab_table` builds and runs it
(the committed models, its defaults, the recount-twins stage on) on the labs whose cells are boxed
(BCCD and the three TXL-PBC sources: every kind; the Raspberry Pi station: white cells only;
its red cells and platelets pair with nothing).

For every pair of counted cells of different kinds, and every pair of counted white cells, the
box IoU; against it, the same for pairs of annotated cells (distinct real cells). Each counted
cell is paired with the annotations as the lab table pairs them (`training.metrics.
detection_confusion`: IoU >= 0.5, highest first, each once, kind-blind); a pair's members are then
paired with an annotation of their own kind, of another kind, or with none. The rules of
`service.analysis.kind_twins` are simulated at each `--rule-iou` on the counted cells (run with
`--count-kind-twins`, the stage off): a platelet overlapping a cell of another kind by that IoU or
more gives way; of two white cells overlapping by that IoU or more the lower-scoring one; and, a
rule not adopted, of a red and a white cell the lower-scoring one. Per lab and kind: true cells (paired with
their own kind) and false ones before and after. A rule is clean when it loses no true cell of any
kind on any lab.

`--json` keeps every field's counted cells and annotations; `--from-json` reads such files again
(one per scale) instead of running the analyzer.
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
from smearscope.service.analysis.boxes import box_iou
from smearscope.service.analysis.kind_twins import CROSS_KIND_MIN_IOU, WHITE_PIECE_MIN_IOU
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from training.lab_table import scored_images
from training.metrics import pair_by_iou
from training.wbc_extras import BOXED_WBC_LABS, add_field_args

logger = logging.getLogger(__name__)
KINDS = ("rbc", "wbc", "platelet")
BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)


def collect(analyzer: Analyzer, img, mode: str) -> dict:
    """One field's counted cells (kind as the lab table scores it: nrbc is a white cell) and annotations."""
    pixels = cv2.imread(str(img.path))
    mpp = img.known_mpp if mode == "given" else None
    res = analyzer.analyze(Frame(pixels, img.path.name, img.lab, microns_per_pixel=mpp))
    cells = [{"kind": "wbc" if r.kind == "nrbc" else r.kind, "bbox": list(r.bbox), "score": c.detection.score,
              "detected_as": (c.detected_as or c.detection.kind).value, "label": r.label}
             for r, c in zip(res.report.cells, res.cells)]
    truth = [{"kind": b.kind, "bbox": [b.x0, b.y0, b.x1, b.y1]} for b in img.boxes]
    return {"lab": img.lab, "image": img.path.name, "scale": mode, "mpp": res.report.scale.microns_per_pixel,
            "cells": cells, "truth": truth}


def _boxes(items: list[dict]) -> np.ndarray:
    return np.array([it["bbox"] for it in items], float).reshape(-1, 4)


def status(field: dict, cells: list[dict] | None = None) -> list[str | None]:
    """Each counted cell's pairing: the annotated kind it pairs with, or None."""
    cells = field["cells"] if cells is None else cells
    pairs = pair_by_iou(_boxes(cells), _boxes(field["truth"]))
    return [field["truth"][pairs[i]]["kind"] if i in pairs else None for i in range(len(cells))]


def overlapping_pairs(items: list[dict], min_iou: float = 1e-9) -> list[tuple[int, int, float]]:
    if len(items) < 2:
        return []
    iou = box_iou(_boxes(items), _boxes(items))
    i, j = np.nonzero(np.triu(iou, 1) >= min_iou)
    return [(int(a), int(b), float(iou[a, b])) for a, b in zip(i, j)]


def pair_name(a: str, b: str) -> str:
    return "+".join(sorted((a, b), key=KINDS.index))


def drop_twins(cells: list[dict], cross_iou: float | None, wbc_iou: float | None,
               score_red_white: bool = False) -> list[dict]:
    """The counted cells less one of each pair the rules name, as service.analysis.kind_twins drops
    them: a platelet gives way to a cell of another kind, of two white cells the lower score; a red
    and a white cell stay (`score_red_white`: the lower score gives way, a rule not adopted)."""
    dropped: set[int] = set()
    for a, b, iou in sorted(overlapping_pairs(cells), key=lambda p: -p[2]):
        if a in dropped or b in dropped:
            continue
        ka, kb = cells[a]["kind"], cells[b]["kind"]
        if (ka != kb and cross_iou is not None and iou >= cross_iou) or (
                ka == kb == "wbc" and wbc_iou is not None and iou >= wbc_iou):
            if ka != kb and "platelet" in (ka, kb):
                dropped.add(a if ka == "platelet" else b)
            elif ka != kb and not score_red_white:
                continue
            else:
                dropped.add(b if cells[a]["score"] >= cells[b]["score"] else a)
    return [c for i, c in enumerate(cells) if i not in dropped]


def tally(fields: list[dict], cross_iou: float | None = None, wbc_iou: float | None = None,
          score_red_white: bool = False) -> dict:
    """Per lab and kind: counted cells paired with their own annotated kind (true) and the rest (false)."""
    out: dict[str, dict[str, list[int]]] = {}
    for f in fields:
        cells = drop_twins(f["cells"], cross_iou, wbc_iou, score_red_white)
        per = out.setdefault(f["lab"], {k: [0, 0] for k in KINDS})
        for c, paired in zip(cells, status(f, cells)):
            per[c["kind"]][0 if paired == c["kind"] else 1] += 1
    return out


def histogram(values: list[float]) -> list[int]:
    return [int(v) for v in np.histogram(values, bins=BINS)[0]] if values else [0] * (len(BINS) - 1)


def report(fields: list[dict], rule_ious: list[float], detail_from: float) -> str:
    scale = fields[0]["scale"] if fields else "?"
    labs = sorted({f["lab"] for f in fields}, key=lambda lab: (BOXED_WBC_LABS + (lab,)).index(lab))
    lines = [f"## {scale} scale: {len(fields)} fields", "",
             "IoU of overlapping pairs, bins " + " ".join(f"{b:.1f}" for b in BINS[:-1]) + " (upper bin to 1.0)", ""]
    details = []
    for lab in labs:
        fs = [f for f in fields if f["lab"] == lab]
        counted: dict[str, list[float]] = {}
        annotated: dict[str, list[float]] = {}
        for f in fs:
            st = status(f)
            for a, b, iou in overlapping_pairs(f["cells"]):
                ca, cb = f["cells"][a], f["cells"][b]
                if ca["kind"] == cb["kind"] != "wbc":
                    continue
                counted.setdefault(pair_name(ca["kind"], cb["kind"]), []).append(iou)
                if iou >= detail_from:
                    tb = _boxes(f["truth"])
                    best = {}
                    for k in KINDS:
                        sel = [t for t in f["truth"] if t["kind"] == k]
                        if sel:
                            best[k] = round(float(box_iou(_boxes([ca, cb]), _boxes(sel)).max()), 2)
                    details.append(
                        f"| {lab} | {f['image']} | {ca['kind']} ({ca['detected_as']}, {ca['label']}) {ca['score']:.2f} -> "
                        f"{st[a] or '-'} | {cb['kind']} ({cb['detected_as']}, {cb['label']}) {cb['score']:.2f} -> "
                        f"{st[b] or '-'} | {iou:.2f} | {json.dumps(best) if len(tb) else '-'} |")
            for a, b, iou in overlapping_pairs(f["truth"]):
                ta, tb_ = f["truth"][a], f["truth"][b]
                if ta["kind"] != tb_["kind"] or ta["kind"] == "wbc":
                    annotated.setdefault(pair_name(ta["kind"], tb_["kind"]), []).append(iou)
        for name in sorted(set(counted) | set(annotated)):
            lines.append(f"{lab} {name}: counted {histogram(counted.get(name, []))} max "
                         f"{max(counted.get(name, [0])):.2f}; annotated {histogram(annotated.get(name, []))} max "
                         f"{max(annotated.get(name, [0])):.2f}")
    lines += ["", (f"Pairs at IoU >= {detail_from} (kind (detected as, label) score -> annotated kind it pairs with; "
                   "best IoU of the two with an annotation of each kind):"), "",
              "| lab | field | cell A | cell B | IoU | best IoU per annotated kind |", "|---|---|---|---|---|---|"]
    lines += details
    lines += ["", "Rules (lower-scoring member dropped): per lab, true / false counted cells, rbc wbc platelet", ""]
    base = tally(fields)
    for label, cross, wbc, red_white in [("none", None, None, False)] + [
            (f"platelet on a cell IoU >= {t}", t, None, False) for t in rule_ious] + [
            (f"platelet on a cell, red+white lower score, IoU >= {t}", t, None, True) for t in rule_ious] + [
            (f"white+white IoU >= {t}", None, t, False) for t in rule_ious] + [
            (f"the stage's bounds (platelet {CROSS_KIND_MIN_IOU}, white {WHITE_PIECE_MIN_IOU})",
             CROSS_KIND_MIN_IOU, WHITE_PIECE_MIN_IOU, False)]:
        t = tally(fields, cross, wbc, red_white)
        lost = {lab: {k: base[lab][k][0] - t[lab][k][0] for k in KINDS if base[lab][k][0] != t[lab][k][0]} for lab in t}
        removed = {lab: {k: base[lab][k][1] - t[lab][k][1] for k in KINDS if base[lab][k][1] != t[lab][k][1]} for lab in t}
        lines.append(f"- {label}: " + "; ".join(
            f"{lab} " + " ".join(f"{t[lab][k][0]}/{t[lab][k][1]}" for k in KINDS) for lab in labs)
            + f"  | false removed {json.dumps({k: v for k, v in removed.items() if v})}"
            + f" true lost {json.dumps({k: v for k, v in lost.items() if v})}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_args(ap, "write every field's counted cells and annotations here")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None, help="read fields written by --json instead")
    ap.add_argument("--rule-iou", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.7])
    ap.add_argument("--count-kind-twins", action="store_true",
                    help="the analyzer without the kind-twins stage (AnalyzerOptions.kind_twin_min_iou and "
                         "white_piece_min_iou None; service.analysis.kind_twins)")
    ap.add_argument("--detail-from", type=float, default=0.3, help="list every pair overlapping this much")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.from_json:
        for path in args.from_json:
            print(report(json.loads(path.read_text()), args.rule_iou, args.detail_from), "\n")
        return
    analyzer = Analyzer.from_models_dir(args.models, options=AnalyzerOptions(
        **({"kind_twin_min_iou": None, "white_piece_min_iou": None} if args.count_kind_twins else {})))
    fields: list[dict] = []
    try:
        for lab in args.labs.split(","):
            images = scored_images(lab, args.split, args.scale, args.limit)
            fields += [collect(analyzer, im, args.scale)
                       for im in tqdm(images, desc=f"{lab} {args.split} {args.scale}", mininterval=10)]
    finally:
        analyzer.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fields))
    print(report(fields, args.rule_iou, args.detail_from))


if __name__ == "__main__":
    main()
