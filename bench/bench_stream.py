"""Benchmark: the station daemon under a continuous stream of fields, one or several at a time.

    .venv/bin/python -m bench.bench_stream [--fields 24] [--size 1280x960] [--concurrent 1,2]

The real daemon (service.station.daemon: capture, analysis, outbox writer threads) with the
committed models, its outbox on a temporary disk and no broker, replays pre-rendered fields as
fast as it takes them (`source.fps = 0`: the frames queue is never empty). Per
`analysis.concurrent_fields` it prints fields per second and the latency of a field from capture
to its report handed to the outbox writer (median and 90th percentile; under saturation this
includes the wait in the frames queue). Then the same at a paced rate, 80 % of the one-at-a-time
throughput, where latency is the analysis itself. Not a test; compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2

from bench.bench_pipeline import SIZES, load, machine
from smearscope.device.synthetic import render_field
from smearscope.service.config import parse_config
from smearscope.service.station.daemon import StationDaemon
from smearscope.service.station.embedded import embedded_document

REPO = Path(__file__).resolve().parents[1]


def run_stream(recording: Path, state: Path, n_fields: int, mpp: float, concurrent: int, fps: float,
               sessions: int = 0) -> dict:
    doc = embedded_document({})
    doc["source"] = {"kind": "replay", "path": str(recording), "fps": fps}
    doc["analysis"] = {**doc.get("analysis", {}), "models_dir": str(REPO / "models"), "microns_per_pixel": mpp,
                       "concurrent_fields": concurrent, "onnxruntime_sessions": sessions}
    doc["mqtt"] = {**doc.get("mqtt", {}), "port": 1, "outbox": {"path": str(state / f"outbox-{concurrent}-{fps}.db")}}
    daemon = StationDaemon(parse_config(doc, {}), max_fields=n_fields, environ={})
    emitted: dict[str, float] = {}
    captured: dict[str, float] = {}
    original_finish = daemon.workers._finish

    def finish(work, result, error):
        frame = work.frame
        captured[frame.frame_id] = frame.captured_at
        answer = original_finish(work, result, error)
        emitted[frame.frame_id] = time.time()
        return answer

    daemon.workers._finish = finish  # type: ignore[method-assign]
    code = daemon.run()
    if code != 0 or len(emitted) != n_fields:
        raise RuntimeError(f"stream run failed (exit {code}, {len(emitted)} of {n_fields} fields)")
    lat = sorted(emitted[k] - captured[k] for k in emitted)
    # Throughput over the steady part: the first field (engine warm-up of the pool) left out.
    ends = sorted(emitted.values())
    return {"fps": (len(ends) - 1) / (ends[-1] - ends[0]), "p50": statistics.median(lat),
            "p90": lat[int(0.9 * (len(lat) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=24)
    ap.add_argument("--size", default="1280x960", choices=list(SIZES))
    ap.add_argument("--concurrent", default="1,2")
    ap.add_argument("--onnxruntime-sessions", type=int, default=0,
                    help="analysis.onnxruntime_sessions (0: the default, one per thread; 1: batches never split)")
    args = ap.parse_args()
    w, h, mpp = SIZES[args.size]
    print(f"machine: {machine()}")
    print(f"start: {time.strftime('%Y-%m-%d %H:%M')}, {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        recording, state = Path(tmp) / "recording", Path(tmp) / "state"
        recording.mkdir()
        state.mkdir()
        for k in range(args.fields):
            cv2.imwrite(str(recording / f"field{k:03d}.png"), render_field(900 + k, width=w, height=h,
                                                                          microns_per_pixel=mpp).frame.pixels)
        print(f"\n{args.fields} fields of {args.size} at {mpp} um/px, default views, reports into the outbox, "
              f"analysis.onnxruntime_sessions = {args.onnxruntime_sessions}")
        print(f"{'stream':<22}{'fields at once':>15}{'fields/s':>10}{'latency p50 s':>15}{'p90 s':>8}")
        base = None
        for concurrent in (int(c) for c in args.concurrent.split(",")):
            r = run_stream(recording, state, args.fields, mpp, concurrent, 0.0, args.onnxruntime_sessions)
            base = base or r["fps"]
            print(f"{'saturated':<22}{concurrent:>15}{r['fps']:>10.2f}{r['p50']:>15.2f}{r['p90']:>8.2f}", flush=True)
        paced = 0.8 * (base or 1.0)
        for concurrent in (int(c) for c in args.concurrent.split(",")):
            r = run_stream(recording, state, args.fields, mpp, concurrent, paced, args.onnxruntime_sessions)
            print(f"{f'paced {paced:.2f}/s':<22}{concurrent:>15}{r['fps']:>10.2f}{r['p50']:>15.2f}{r['p90']:>8.2f}",
                  flush=True)
    print(f"\nend: {time.strftime('%Y-%m-%d %H:%M')}, {load()}")


if __name__ == "__main__":
    main()
