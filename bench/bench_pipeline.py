"""Benchmark: seconds per field and per stage, and head latency per crop by batch size.

    .venv/bin/python -m bench.bench_pipeline [--models models] [--repeats 5] [--threads 0]

Prints tables; every ratio is measured in this one run on this machine. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from smearscope.device.synthetic import render_field
from smearscope.engines.registry import create_engine
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}"


def _views(analyzer: Analyzer) -> str:
    """How many test-time views the detector / RBC head / WBC head run, e.g. "3/4/2"."""
    return "/".join(str(len(m.views)) for m in (analyzer.segmenter, analyzer.rbc_head, analyzer.wbc_head))


def bench_fields(analyzers: dict[str, Analyzer], repeats: int) -> None:
    """Each case under each set of test-time views (the manifests', and one view for every model), same frames."""
    cases = [("synthetic 1280x960 @0.10 um/px", 0.10, 1280, 960), ("synthetic 640x480 @0.072 um/px", 0.072, 640, 480),
             ("synthetic 1920x1080 @0.10 um/px", 0.10, 1920, 1080)]
    print(f"\nper field (median of {repeats}; ms)")
    header = f"{'case':<34}{'views seg/rbc/wbc':<24}{'total':>8}{'detect':>8}{'classify':>9}{'stain':>7}{'cells':>7}"
    print(header)
    for name, mpp, w, h in cases:
        fields = [render_field(100 + r, width=w, height=h, microns_per_pixel=mpp) for r in range(repeats)]
        for views, analyzer in analyzers.items():
            rows = []
            for f in fields:
                rep = analyzer.analyze(f.frame).report
                rows.append((rep.timing_ms, len(rep.cells)))
            med = {k: statistics.median(t.get(k, 0.0) for t, _ in rows)
                   for k in ("total_ms", "detect_ms", "classify_ms", "stain_ms")}
            cells = statistics.median(n for _, n in rows)
            print(f"{name:<34}{views:<24}{med['total_ms']:>8.0f}{med['detect_ms']:>8.0f}{med['classify_ms']:>9.0f}"
                  f"{med['stain_ms']:>7.0f}{cells:>7.0f}")


def bench_heads(models: Path, repeats: int) -> None:
    print("\nhead latency (ONNX Runtime CPU; ms per crop in one view, median; a head runs each crop once per view)")
    print(f"{'model':<10}{'batch 1':>9}{'batch 32':>10}{'batch 128':>11}{'b128 vs b1':>12}")
    for name in ("rbc_head", "wbc_head", "seg"):
        eng = create_engine("onnxruntime", models / f"{name}.json").load()
        s = eng.manifest.input_size
        per = {}
        for b in (1, 32, 128):
            b = min(b, eng.manifest.batch.max)
            x = np.random.default_rng(0).random((b, 3, s, s), dtype=np.float32)
            eng.run(x)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                eng.run(x)
                ts.append((time.perf_counter() - t) * 1000 / b)
            per[b] = statistics.median(ts)
        bs = sorted(per)
        print(f"{name:<10}" + "".join(f"{per[b]:>9.2f}  " for b in bs)[:-2] + f"{per[bs[0]] / per[bs[-1]]:>10.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {_machine()}; load average {os.getloadavg()[0]:.2f}")
    analyzer = Analyzer.from_models_dir(args.models)
    analyzers = {_views(analyzer) + " (manifests)": analyzer}
    one = ("identity",)
    if _views(analyzer) != "1/1/1":
        analyzers["1/1/1 (identity)"] = Analyzer.from_models_dir(
            args.models, options=AnalyzerOptions(detector_views=one, rbc_views=one, wbc_views=one))
    bench_fields(analyzers, args.repeats)
    bench_heads(args.models, args.repeats)


if __name__ == "__main__":
    main()
