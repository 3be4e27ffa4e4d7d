"""A station's own white-cell class means, measured through the product on a lab the head never saw.

    python -m training.station_adapt --lab rpi --models build/station_eval/no_rpi [--shots 10] [--draws 5]

`training.fewshot_station` measured on crops what a few typed cells per class could buy; this
measures what `smearscope adapt-wbc` and `[analysis] wbc_station_means` deliver, end to end: MODELS
holds a WBC head trained without the lab (`train_wbc --exclude-lab LAB`, exported with
`training.export_head --run-open-set` so its class means and precision never saw the lab, then
`python -m smearscope.export.feature_space`) beside the committed detector and RBC head. Per draw
(seeded), k white cells per class are taken from the lab's train split among those the station
finds, as a technician would mark them on its overlay (a CSV of image, cell centre, type), `smearscope adapt-wbc` fits the station's means on
them, and the lab's test fields are analysed by the station's analyzer with and without the means
at the lab's known scale. Per test cell (rpi: its typed box; PBC: the crop's centre cell; found
when a counted cell covers its centre, whatever its kind):

- typed right as reported (`unidentified`, sent to review, counts as not typed right),
- sent to review,
- closed set: typed right by the nearest class mean alone (no confidence gate, no open-set test),
  the head's own closed-set class without the means.

Mean and spread over the draws; the fields the means were fitted on are never test fields.

`--typed-from review`: the typed cells are drawn only among those the head as trained sent to
review (unidentified or atypical, or typed `ig` / `erythroblast`): what a technician types on the
dashboard when the station's gallery shows the review cells alone (`[review] white_cells =
"review"`), against every white cell (`"all"`, the default here).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from smearscope.cli.adapt import cell_at
from smearscope.device.frame import Frame
from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions
from smearscope.service.analysis.review_counts import ATYPICAL_LABELS
from smearscope.service.analysis.station_means import load_feature_space, load_station_means
from training.data import stored_size
from training.head_data import PBC_CLASSES, PBC_MICRONS_PER_PIXEL, pbc_splits
from training.labs import RPI_MICRONS_PER_PIXEL, data_root, rpi_boxes, rpi_dir, rpi_splits

logger = logging.getLogger(__name__)

#: PBC test crops analysed per draw (seeded sample; the whole test split is 1709).
PBC_TEST_SAMPLE = 400
#: PBC train crops per class a draw's typed cells are taken from.
PBC_POOL_PER_CLASS = 40


@dataclass(frozen=True)
class Truth:
    image: Path
    x: float
    y: float
    type: str


def lab_cells(lab: str, split: str, only: str | None = None) -> tuple[list[Truth], float]:
    """Every typed white cell of a lab's split (its centre in the stored image; `only`: of that
    type, every one of them), and the lab's scale."""
    if lab == "rpi":
        out = []
        for stem in rpi_splits()[split]:
            p = rpi_dir() / "images" / f"{stem}.jpg"
            for t in rpi_boxes(stem, *stored_size(p)):
                if only is not None and t.cls != only:
                    continue
                b = t.box
                out.append(Truth(p, (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, t.cls))
        return out, RPI_MICRONS_PER_PIXEL
    if lab == "pbc":
        root = data_root() / "pbc"
        items = list(pbc_splits()[split])
        if only is not None:
            items = [(rel, ci) for rel, ci in items if PBC_CLASSES[ci] == only]
        elif split != "train":
            random.Random(20261205).shuffle(items)
            items = items[:PBC_TEST_SAMPLE]
        else:  # a technician's pool: PBC_POOL_PER_CLASS seeded crops of each class
            rng = random.Random(20261206)
            items = [x for ci in range(len(PBC_CLASSES))
                     for x in rng.sample([y for y in items if y[1] == ci],
                                         min(PBC_POOL_PER_CLASS, sum(y[1] == ci for y in items)))]
        out = []
        for rel, ci in items:
            out.append(Truth(root / rel, 0.0, 0.0, PBC_CLASSES[ci]))  # centre filled in when read
        return out, PBC_MICRONS_PER_PIXEL
    raise ValueError(f"unknown lab {lab!r} (rpi, pbc)")


def _centre(t: Truth) -> Truth:
    if t.x or t.y:
        return t
    w, h = stored_size(t.image)
    return Truth(t.image, w / 2, h / 2, t.type)  # the centre of the full-size image


def draw(pool: list[Truth], shots: int, seed: int) -> list[Truth]:
    """`shots` cells per class present in the pool (all of a class with fewer)."""
    rng = random.Random(seed)
    out = []
    for cls in sorted({t.type for t in pool}):
        of = [t for t in pool if t.type == cls]
        out += rng.sample(of, min(shots, len(of)))
    return [_centre(t) for t in out]


def analyse(models: Path, cells: list[Truth], mpp: float, station: Path | None, desc: str) -> list[dict]:
    """Per truth cell, in order: found, the reported label, the closed-set class (station means'
    nearest or the head's own)."""
    analyzer = Analyzer.from_models_dir(models, options=AnalyzerOptions(keep_wbc_features=True, wbc_station_means=station),
                                        warmup=False)
    by_image: dict[Path, list[tuple[int, Truth]]] = {}
    for n, t in enumerate(cells):
        by_image.setdefault(t.image, []).append((n, t))
    manifest = analyzer.wbc_head.engine.manifest
    space = load_feature_space(manifest, models)
    means = load_station_means(station, manifest, space) if station else None
    out: list[dict] = [{}] * len(cells)
    try:
        for image, truths in tqdm(by_image.items(), desc=desc, mininterval=5):
            pixels = cv2.imread(str(image))
            res = analyzer.analyze(Frame(pixels, image.name, str(image), microns_per_pixel=mpp))
            for n, t in truths:
                t = _centre(t)
                i = cell_at(res.cells, t.x, t.y, res.input_to_canonical, pixels.shape, typed_only=False)
                if i is None:
                    out[n] = {"type": t.type, "found": False}
                    continue
                c = res.cells[i]
                closed = None
                if c.head_features is not None:
                    feats = np.array(c.head_features.features, np.float64)[None]
                    closed = (space.classes[int(means.logits(space, feats)[0].argmax())] if means
                              else c.head_features.closed_set_label)
                # typed: the WBC head typed it (a red cell, or a white cell it re-counted as a platelet, is not)
                out[n] = {"type": t.type, "found": True, "typed": c.head_features is not None,
                          "label": c.label, "closed": closed,
                          "to_review": c.label == UNIDENTIFIED or c.label in ATYPICAL_LABELS or c.atypical}
    finally:
        analyzer.close()
    return out


def score(rows: list[dict]) -> dict:
    found = [r for r in rows if r["found"]]
    n = max(len(found), 1)
    right = sum(r["label"] == r["type"] for r in found)
    review = sum(r["label"] == UNIDENTIFIED for r in found)
    kept = len(found) - review
    # a cell of a type the head never saw (--held-out-class) is right only in review
    known = sum(r["label"] not in (UNIDENTIFIED, None) for r in found)
    return {"cells": len(rows), "found": len(found), "typed_right": right / n, "review": review / n,
            "right_of_typed": right / max(kept, 1), "closed_set": sum(r["closed"] == r["type"] for r in found) / n,
            "typed_as_known": known / n}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", choices=("rpi", "pbc"), required=True)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--typed-from", choices=("all", "review"), default="all",
                    help="draw the typed cells among every white cell the station finds, or only among those the "
                         "head as trained sent to review (a gallery of review cells alone)")
    ap.add_argument("--held-out-class", default=None,
                    help="MODELS' head was trained without this class (train_wbc --exclude-class): it is not typed "
                         "by the technician, and every test cell of it is scored apart (typed as known: the price "
                         "of station means for a cell type no model knows, such as a blast)")
    args = ap.parse_args()
    pool, mpp = lab_cells(args.lab, "train")
    test, _ = lab_cells(args.lab, "test")
    novel: list[Truth] = []
    if args.held_out_class:
        pool = [t for t in pool if t.type != args.held_out_class]
        test = [t for t in test if t.type != args.held_out_class]
        novel = lab_cells(args.lab, "test", only=args.held_out_class)[0]
    # A technician types white cells the station found (marks on its overlay): draw among those.
    found = analyse(args.models, pool, mpp, None, f"{args.lab} train, cells the station finds")
    pool = [t for t, r in zip(pool, found) if r["found"] and r["typed"]
            and (args.typed_from == "all" or r["to_review"])]
    logger.info("typed cells drawn from %d white cells (%s)", len(pool), args.typed_from)
    base = score(analyse(args.models, test, mpp, None, f"{args.lab} test, head as trained"))
    if novel:
        base["novel_typed_as_known"] = score(analyse(args.models, novel, mpp, None, "held-out class"))["typed_as_known"]
    print(f"{args.lab} head as trained: {json.dumps({k: round(v, 3) for k, v in base.items()})}", flush=True)
    draws = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in range(args.draws):
            marks = draw(pool, args.shots, seed=1000 + d)
            labels = Path(tmp) / f"labels{d}.csv"
            with open(labels, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image", "x", "y", "type"])
                w.writerows([str(t.image), round(t.x, 1), round(t.y, 1), t.type] for t in marks)
            station = Path(tmp) / f"station{d}.json"
            fit = subprocess.run([sys.executable, "-m", "smearscope", "adapt-wbc", "--labels", str(labels),
                                  "--out", str(station), "--models", str(args.models), "--microns-per-pixel", str(mpp),
                                  "--min-cells", str(min(args.shots, 10)), "--json"], capture_output=True, text=True,
                                 check=False)
            line = json.loads(fit.stdout.strip().splitlines()[-1]) if fit.stdout.strip() else {"stderr": fit.stderr[-500:]}
            if fit.returncode != 0:
                print(f"draw {d}: adapt-wbc refused: {json.dumps(line)}", flush=True)
                draws.append({"refused": line.get("error", {}).get("code"), **base})
                continue
            s = score(analyse(args.models, test, mpp, station, f"{args.lab} test, station means {d}"))
            if novel:
                s["novel_typed_as_known"] = score(analyse(args.models, novel, mpp, station, "held-out class"))["typed_as_known"]
            s.update({"matched": line["matched"], "loo": line["leave_one_out_accuracy"], "head_loo": line["head_accuracy"]})
            print(f"draw {d}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()})}", flush=True)
            draws.append(s)
    keys = ("typed_right", "review", "right_of_typed", "closed_set") + (("novel_typed_as_known",) if novel else ())
    summary = {k: (round(float(np.mean([x[k] for x in draws])), 3), round(float(np.std([x[k] for x in draws])), 3))
               for k in keys}
    print(f"{args.lab}, {args.shots} cells per class, {args.draws} draws, mean (sd): {json.dumps(summary)}")
    print(f"{args.lab}, head as trained: {json.dumps({k: round(base[k], 3) for k in keys})}")
    if args.json:
        args.json.write_text(json.dumps({"lab": args.lab, "shots": args.shots, "typed_from": args.typed_from,
                                         "base": base, "draws": draws,
                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
