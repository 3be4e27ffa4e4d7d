"""One frame of a given size through the analyzer, in a fresh process: seconds and peak RSS.

    .venv/bin/python -m bench.scaling --mp 16 [--mpp 0.1] [--views default|one-view]

Prints one JSON line (bench.bench_pipeline runs it once per size). The frame is a rendered
1024x768 field repeated to the requested size, so building it costs only the frame itself; peak
RSS is the process's high-water mark (models, the frame and the analysis), "RSS before" the same
mark after the models are loaded, warmed up on a small field, and the frame is built.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

from smearscope.device.frame import Frame
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions


def peak_rss_mb() -> float:
    """This process's high-water RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over fork and exec, so a child of a large parent (the bench) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def frame_of(mp: float, mpp: float) -> Frame:
    """A 4:3 frame of about `mp` megapixels, tiled from one rendered field."""
    width = round(math.sqrt(mp * 1e6 * 4 / 3))
    height = round(width * 3 / 4)
    patch = render_field(7, width=1024, height=768, microns_per_pixel=mpp).frame.pixels
    reps = (math.ceil(height / patch.shape[0]), math.ceil(width / patch.shape[1]), 1)
    pixels = np.ascontiguousarray(np.tile(patch, reps)[:height, :width])
    return Frame(pixels, f"scaling-{mp}MP", "bench", microns_per_pixel=mpp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp", type=float, required=True)
    ap.add_argument("--mpp", type=float, default=0.1)
    ap.add_argument("--views", choices=("default", "one-view"), default="default")
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    args = ap.parse_args()
    one = ("identity",)
    options = AnalyzerOptions() if args.views == "default" else AnalyzerOptions(
        detector_views=one, rbc_views=one, wbc_views=one)
    analyzer = Analyzer.from_models_dir(args.models, options=options)
    analyzer.analyze(render_field(3, width=640, height=480, microns_per_pixel=args.mpp).frame)
    frame = frame_of(args.mp, args.mpp)
    before = peak_rss_mb()
    t = time.perf_counter()
    report = analyzer.analyze(frame).report
    seconds = time.perf_counter() - t
    h, w = frame.pixels.shape[:2]
    print(json.dumps({"mp": args.mp, "width": w, "height": h, "seconds": seconds, "cells": len(report.cells),
                      "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}))
    analyzer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
