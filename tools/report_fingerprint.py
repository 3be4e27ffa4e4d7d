"""Fingerprint the analyzer's reports on the BCCD test split, to show a change alters no report.

    python -m tools.report_fingerprint [--out build/fingerprint.json] [--compare OTHER.json]

Every held-out test image (65 of the 72: `training.overlap`) is analysed as `smearscope analyze --detections` analyses it, without the calibration check (the station's
options, candidates down to 0.001) at BCCD's known scale, and again with the scale unknown
(estimation and refinement). Then the bench's rendered fields (`bench.bench_pipeline`: 3 seeds each
of 1280x960 and 1920x1080 at 0.1 um/px and one 4000x3000; many tiles, so the cross-tile merge
and the views' fusion count too), at their known scale. Per image it keeps the counts, the scale, the flags, each
counted cell (kind, label, bbox, scores) and each candidate (kind, bbox, score); timings and ids
are left out. `--compare` exits 1 when the two files differ and names the first images that do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from smearscope.device.frame import Frame
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions
from smearscope.service.ingest import load_image
from training.data import bccd_image_path, bccd_microns_per_pixel, bccd_split

logger = logging.getLogger(__name__)

#: Rendered fields: (width, height, um/px, seeds), the bench's multi-tile sizes and seeds.
RENDERED = ((1280, 960, 0.1, (100, 101, 102)), (1920, 1080, 0.1, (100, 101, 102)), (4000, 3000, 0.1, (100,)))

#: The `--detections` floor evaluate uses: candidates below the counting threshold are kept too.
CANDIDATE_FLOOR = 0.001


def fingerprint(result) -> dict:
    rep = result.report
    return {
        "counts": rep.counts.model_dump(mode="json"),
        "scale": [rep.scale.microns_per_pixel, rep.scale.method],
        "flags": sorted(f.code for f in rep.flags),
        "cells": [[c.kind, c.label, c.bbox, c.score, c.label_score] for c in rep.cells],
        "candidates": [[d.kind.value, [round(v, 2) for v in d.box.as_list()], round(d.score, 4)]
                       for d in result.candidates],
    }


def run(models: Path) -> dict:
    defaults = AnalyzerOptions()
    options = dataclasses.replace(defaults, detector_conf=CANDIDATE_FLOOR)
    analyzer = Analyzer.from_models_dir(models, options=options, warmup=False)
    mpp = bccd_microns_per_pixel()
    out: dict = {}
    try:
        for image_id in bccd_split("test"):
            path = bccd_image_path(image_id)
            pixels = load_image(str(path)).pixels
            out[image_id] = fingerprint(analyzer.analyze(Frame(pixels, path.name, "fingerprint", microns_per_pixel=mpp)))
            out[f"{image_id}@unknown-scale"] = fingerprint(analyzer.analyze(Frame(pixels, path.name, "fingerprint")))
            logger.info("%s done", image_id)
        for width, height, mpp_r, seeds in RENDERED:
            for seed in seeds:
                f = render_field(seed, width=width, height=height, microns_per_pixel=mpp_r)
                out[f"rendered-{width}x{height}-{seed}"] = fingerprint(analyzer.analyze(f.frame))
                logger.info("rendered %dx%d seed %d done", width, height, seed)
    finally:
        analyzer.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--out", type=Path, default=Path("build/fingerprint.json"))
    ap.add_argument("--compare", type=Path, default=None, help="a fingerprint file to compare with")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.models)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    logger.info("%d fingerprints written to %s", len(result), args.out)
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    differ = sorted(k for k in set(before) | set(result) if before.get(k) != result.get(k))
    if differ:
        logger.error("%d of %d images differ from %s, e.g. %s", len(differ), len(result), args.compare, differ[:5])
        return 1
    logger.info("identical to %s (%d images)", args.compare, len(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
