"""The CPU work beside the engines, measured without them: each field is analysed once for real
while every engine call's outputs are recorded, then again and again with the engines answering
from that recording (the same batches, in the same order, at no cost). Not a test.

    .venv/bin/python -m bench.replay [--runs 15] [--size 1920x1080]

Per configuration (one view per model; the manifests' views) it prints the process CPU time of
an analysis (the minimum of `--runs`, the median over the bench's three fields of that size),
which a machine shared with other work disturbs far less than wall time, and bench.probe's stage
breakdown (wall ms, median over every run). The engine stages read near zero: what is left is the
analysis' own work. Run it in two checkouts one after the other to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.bench_pipeline import ONE, SIZES
from bench.probe import STAGE_ORDER, Probe
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import Analyzer, AnalyzerOptions


def _engines(analyzer: Analyzer) -> list:
    return [analyzer.segmenter.engine, analyzer.rbc_head.engine, analyzer.wbc_head.engine]


def record(analyzer: Analyzer, frame) -> list[dict]:
    """Every engine call's outputs of one real analysis of `frame`, in call order."""
    tape: list[dict] = []
    for engine in _engines(analyzer):
        run = engine.run

        def recording_run(batch, run=run):
            out = run(batch)
            tape.append(out)
            return out

        def recording_parts(batch, on_part, run=run):
            out = run(batch)
            tape.append(out)
            on_part(0, len(batch), out)
            return out

        engine.run, engine.run_parts = recording_run, recording_parts
    try:
        analyzer.analyze(frame)
    finally:
        for engine in _engines(analyzer):
            del engine.run, engine.run_parts
    return tape


def replaying(analyzer: Analyzer, tape: list[dict]) -> None:
    """The engines answer from `tape` (until `stop_replaying`)."""
    outputs = iter(tape)

    def parts(batch, on_part):
        out = next(outputs)
        on_part(0, len(batch), out)
        return out

    for engine in _engines(analyzer):
        engine.run, engine.run_parts = (lambda batch: next(outputs)), parts


def stop_replaying(analyzer: Analyzer) -> None:
    for engine in _engines(analyzer):
        del engine.run, engine.run_parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", default="1920x1080", choices=list(SIZES))
    args = ap.parse_args()
    w, h, mpp = SIZES[args.size]
    fields = [render_field(100 + r, width=w, height=h, microns_per_pixel=mpp).frame for r in range(3)]
    configs = {"one-view": AnalyzerOptions(detector_views=ONE, rbc_views=ONE, wbc_views=ONE), "default": AnalyzerOptions()}
    for name, options in configs.items():
        analyzer = Analyzer.from_models_dir(options=options)
        try:
            tapes = [record(analyzer, f) for f in fields]
            cpu, stages = [], []
            for frame, tape in zip(fields, tapes):
                runs = []
                for _ in range(args.runs):
                    replaying(analyzer, tape)
                    with Probe(analyzer) as probe:
                        t, c = time.perf_counter(), time.process_time()
                        analyzer.analyze(frame)
                        c, t = time.process_time() - c, time.perf_counter() - t
                    stop_replaying(analyzer)
                    runs.append(c * 1000)
                    stages.append(probe.breakdown(t * 1000))
                cpu.append(min(runs))
        finally:
            analyzer.close()
        print(f"{args.size} {name}: CPU ms beside the engines {statistics.median(cpu):.1f} "
              f"(min of {args.runs} runs; per field {', '.join(f'{c:.1f}' for c in cpu)})")
        medians = {k: statistics.median(s[k] for s in stages) for k in STAGE_ORDER}
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items() if v >= 0.05))


if __name__ == "__main__":
    main()
