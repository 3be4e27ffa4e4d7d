"""Benchmark: smearscope against its engine floor and against the usual libraries, per field size,
where the time goes, and how time and memory grow with the frame. Every ratio comes from this one
run on this machine; not a test.

    .venv/bin/python -m bench.bench_pipeline [--repeats 3] [--runs 3] [--sizes 640x480,...] [--no-sahi]
                                             [--scaling-mp 1,4,16,64] [--no-scaling]

Per field size, smearscope runs with the manifests' test-time views ("default") and with one view
per model ("one-view"); each run's "floor" is the same tiles and crops (the batches the engines
were given) through the same ONNX Runtime sessions, without any pre- or post-processing. Each
field runs `--runs` times per configuration (each run followed by its floor); total and floor are
the fastest of those runs, each stage's time its median over the runs (every run is probed).
Measurements are interleaved field by field (one-view, its floor, default, its floor, SAHI), so
load that comes and goes hits every column alike. "SAHI" is SAHI sliced prediction + Ultralytics
with the committed detector + a per-crop head loop (bench/sahi_baseline.py), run in the `bench`
extra's interpreter (`--bench-python`, default .venv-bench/bin/python) in a worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.probe import STAGE_ORDER, probe_field
from smearscope.device.synthetic import render_field
from smearscope.engines.registry import create_engine
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer, AnalyzerOptions

REPO = Path(__file__).resolve().parents[1]
#: (label, width, height, um/px): a BCCD-like 640x480 at 0.072, camera fields at 0.1 (100x oil).
SIZES = {"640x480": (640, 480, 0.072), "1280x960": (1280, 960, 0.10), "1920x1080": (1920, 1080, 0.10),
         "4000x3000": (4000, 3000, 0.10)}
ONE = ("identity",)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} logical CPUs, {model}"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def views_label(analyzer: Analyzer) -> str:
    """Views of the detector / RBC head / WBC head, e.g. "3/4g/2g" (g: a head's views after the
    first only for the crops its first view is unsure of, service.analysis.classify; the same for
    the detector's tiles with AnalyzerOptions.detector_views_where = "unsure")."""
    def head(h) -> str:
        gated = len(h.views) > 1 and getattr(h, "extra_views_below", None) is not None
        return f"{len(h.views)}{'g' if gated else ''}"
    det = len(analyzer.segmenter.views)
    det_gated = det > 1 and analyzer.options.detector_views_where == "unsure"
    return f"{det}{'g' if det_gated else ''}/{head(analyzer.rbc_head)}/{head(analyzer.wbc_head)}"


@dataclass
class Runs:
    total: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    views: str = ""

    def med(self, what: str) -> float:
        return statistics.median(getattr(self, what))

    def ratio(self, over: Runs | None = None) -> float:
        """Median over fields of total / floor, each pair measured back to back (load that drifts
        during the run cancels out); `over`: another configuration's floor of the same field."""
        floors = (over or self).floor
        return statistics.median(t / f for t, f in zip(self.total, floors))


class SahiWorker:
    """The usual libraries' pipeline in its own interpreter, one field per request."""

    def __init__(self, python: str, models: Path, variant: str) -> None:
        self.proc = subprocess.Popen([python, "-m", "bench.sahi_baseline", "--models", str(models),
                                      "--variant", variant], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("SAHI worker did not start (see its stderr above)")

    def run(self, path: Path, mpp: float) -> dict:
        self.proc.stdin.write(json.dumps({"path": str(path), "mpp": mpp}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("SAHI worker died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def bench_sizes(analyzers: dict[str, Analyzer], sizes: list[str], repeats: int, sahi: dict[str, SahiWorker],
                tmp: Path, runs_per_field: int = 1) -> dict[str, dict[str, Runs]]:
    results: dict[str, dict[str, Runs]] = {}
    for size in sizes:
        w, h, mpp = SIZES[size]
        fields = [render_field(100 + r, width=w, height=h, microns_per_pixel=mpp) for r in range(repeats)]
        runs = {name: Runs() for name in [*analyzers, *(f"SAHI {v}" for v in sahi)]}
        for k, f in enumerate(fields):
            path = tmp / f"field{k}.npy"
            np.save(path, f.frame.pixels)
            if k == 0:
                for worker in sahi.values():
                    worker.run(path, mpp)  # the first call builds its sessions
            for name, analyzer in analyzers.items():
                total, stages, floor, cells = probe_field(analyzer, f.frame, runs_per_field)
                r = runs[name]
                r.total.append(total)
                r.floor.append(floor)
                r.cells.append(cells)
                r.stages.append(stages)
            for variant, worker in sahi.items():
                out = min((worker.run(path, mpp) for _ in range(runs_per_field)), key=lambda o: o["ms"])
                runs[f"SAHI {variant}"].total.append(out["ms"])
                runs[f"SAHI {variant}"].cells.append(out["classified"])
        results[size] = runs
        print(f"  {size}: done ({load()})", flush=True)
    return results


def print_comparison(results: dict[str, dict[str, Runs]]) -> None:
    print("\nper field (ms: medians over the fields of each field's fastest run; ratios: medians of each field's "
          "ratio, its runs back to back;\nfloor = the same batches through the same engines, nothing else; SAHI: SAHI + Ultralytics + "
          "per-crop heads,\n cells = crops its head loop classified)")
    print(f"{'field':<11}{'config':<14}{'views':>8}{'cells':>7}{'total':>9}{'floor':>9}{'total/floor':>13}"
          f"{'default/1-view floor':>22}{'/ 1-view total':>16}")
    for size, runs in results.items():
        one = runs.get("one-view")
        for name, r in runs.items():
            if not r.total:
                continue
            if name.startswith("SAHI"):
                ratio = statistics.median(s / t for s, t in zip(r.total, one.total)) if one else float("nan")
                print(f"{size:<11}{name:<14}{'1/1/1':>8}{statistics.median(r.cells):>7.0f}{r.med('total'):>9.0f}"
                      f"{'':>9}{'':>13}{'':>22}{ratio:>15.2f}x")
                continue
            row = (f"{size:<11}{name:<14}{r.views:>8}{statistics.median(r.cells):>7.0f}{r.med('total'):>9.0f}"
                   f"{r.med('floor'):>9.0f}{r.ratio():>12.2f}x")
            row += f"{r.ratio(one):>21.2f}x" if name != "one-view" and one is not None else ""
            print(row)


def print_stages(results: dict[str, dict[str, Runs]]) -> None:
    print("\nwhere the time goes (median ms per stage; exclusive of nested stages)")
    cols = [(size, name) for size, runs in results.items() for name, r in runs.items() if r.stages]
    print(f"{'stage':<18}" + "".join(f"{(s + ' ' + n)[:15]:>16}" for s, n in cols))
    for stage in STAGE_ORDER:
        vals = [statistics.median(st[stage] for st in results[s][n].stages) for s, n in cols]
        print(f"{stage:<18}" + "".join(f"{v:>16.1f}" for v in vals))
    totals = [results[s][n].med("total") for s, n in cols]
    print(f"{'total':<18}" + "".join(f"{v:>16.1f}" for v in totals))


def print_scaling(mps: list[float], mpp: float, python: str, models: Path, views: str) -> None:
    print(f"\ntime and peak memory by frame size (one fresh process each; frames at {mpp} um/px, views {views})")
    print(f"{'MP':>6}{'pixels':>14}{'cells':>8}{'seconds':>10}{'s per MP':>10}{'peak RSS MB':>13}{'RSS before MB':>15}")
    for mp in mps:
        cmd = [python, "-m", "bench.scaling", "--mp", str(mp), "--mpp", str(mpp), "--views", views,
               "--models", str(models)]
        done = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mp:>6g}  failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mp:>6g}{r['width']:>8}x{r['height']:<5}{r['cells']:>8}{r['seconds']:>10.1f}"
              f"{r['seconds'] / mp:>10.2f}{r['peak_rss_mb']:>13.0f}{r['rss_before_mb']:>15.0f}", flush=True)


def bench_heads(models: Path, repeats: int) -> None:
    print("\nengine latency (ONNX Runtime CPU; ms per input, median; a head runs each crop once per view)")
    print(f"{'model':<10}{'batch 1':>9}{'batch 16':>10}{'batch 128':>11}")
    for name in ("rbc_head", "wbc_head", "seg"):
        eng = create_engine("onnxruntime", models / f"{name}.json").load()
        s = eng.manifest.input_size
        per = {}
        for b in (1, 16, 128):
            if b > eng.manifest.batch.max:
                continue
            x = np.random.default_rng(0).random((b, 3, s, s), dtype=np.float32)
            eng.run(x)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                eng.run(x)
                ts.append((time.perf_counter() - t) * 1000 / b)
            per[b] = statistics.median(ts)
        print(f"{name:<10}" + "".join(f"{per[b]:>10.2f}" if b in per else f"{'-':>10}" for b in (1, 16, 128)))
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--repeats", type=int, default=3, help="fields per size (different seeds)")
    ap.add_argument("--runs", type=int, default=3, help="runs per field and configuration (fastest kept)")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--no-sahi", action="store_true")
    ap.add_argument("--detector-views", default="",
                    help="more configurations: the default's heads with these detector views, e.g. "
                    "'identity,vflip' (several: separated by ;)")
    ap.add_argument("--bench-python", default=str(REPO / ".venv-bench" / "bin" / "python"),
                    help="interpreter with the bench extra (sahi, ultralytics) for the SAHI rows")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling-mp", default="1,4,16,64")
    ap.add_argument("--scaling-mpp", type=float, default=0.1)
    ap.add_argument("--scaling-views", choices=("default", "one-view"), default="default")
    args = ap.parse_args()
    started = time.time()
    print(f"machine: {machine()}")
    print(f"start: {time.strftime('%Y-%m-%d %H:%M')}, {load()}", flush=True)
    default = Analyzer.from_models_dir(args.models)
    one = Analyzer.from_models_dir(args.models, options=AnalyzerOptions(detector_views=ONE, rbc_views=ONE,
                                                                        wbc_views=ONE))
    analyzers = {"one-view": one, "default": default,
                 "views everywhere": Analyzer.from_models_dir(
                     args.models, options=AnalyzerOptions(detector_views_where="everywhere"))}
    for spec in filter(None, args.detector_views.split(";")):
        views = tuple(spec.split(","))
        analyzers[f"det {'+'.join(v[:2] for v in views)}"] = Analyzer.from_models_dir(
            args.models, options=AnalyzerOptions(detector_views=views))
    sahi: dict[str, SahiWorker] = {}
    if not args.no_sahi:
        if Path(args.bench_python).exists():
            sahi = {v: SahiWorker(args.bench_python, args.models, v) for v in ("defaults", "tuned")}
        else:
            print(f"SAHI rows skipped: {args.bench_python} missing (python -m venv .venv-bench && "
                  ".venv-bench/bin/pip install -e '.[bench]')")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = bench_sizes(analyzers, args.sizes.split(","), args.repeats, sahi, Path(tmp), args.runs)
    finally:
        for worker in sahi.values():
            worker.close()
    for runs in results.values():
        for name, analyzer in analyzers.items():
            runs[name].views = views_label(analyzer)
    print(f"after the fields: {load()}")
    print_comparison(results)
    print_stages(results)
    for a in analyzers.values():
        a.close()
    if not args.no_scaling:
        print_scaling([float(v) for v in args.scaling_mp.split(",")], args.scaling_mpp, sys.executable,
                      args.models, args.scaling_views)
    bench_heads(args.models, 5)
    print(f"\nend: {time.strftime('%Y-%m-%d %H:%M')} ({(time.time() - started) / 60:.1f} min), {load()}")


if __name__ == "__main__":
    main()
