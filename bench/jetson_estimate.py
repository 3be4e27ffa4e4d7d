"""Jetson on paper: expected per-field time on an Orin Nano 8GB / Orin NX 16GB, estimated from the
engines' FLOPs and a bench_pipeline run on x86. An estimate, not a measurement: no Jetson ran.

    .venv/bin/python -m bench.jetson_estimate [--results bench/results/bench_pipeline-....txt]

GPU side: FLOPs per tile / crop from the ONNX graphs (bench.flops: Conv, ConvTranspose, MatMul,
Gemm at batch 1), times the tiles and crops of each field, over an assumed sustained FP16 rate.
Tiles: the analyzer's grid (256 px, 15 % overlap) over the bench's field at the canonical scale,
times the detector's views. Crops: the field's counted cells, each one RBC-head crop (the rendered
fields hold almost only red cells); the default's gated extra head views scale that work by the
bench's head-engine ms default / one-view. CPU side: the bench's total minus its engine stages,
scaled by a per-core factor (the stages run one after another; extra cores pipeline fields).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.bench_pipeline import SIZES
from bench.flops import model_flops
from smearscope.service.analysis.pipeline import AnalyzerOptions
from smearscope.service.analysis.tiling import tile_grid

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parents[1] / "models"
FIELDS = ("640x480", "1280x960", "1920x1080")
#: Sustained fraction of the FP16 dense tensor peak (low, high). Low: a published YOLOv8n 640
#: batch-1 TensorRT FP16 run on an Orin Nano 8GB (4.43 ms GPU time at 1020 MHz: 8.7 GFLOP /
#: 4.43 ms = 12 % of 16.7 TFLOPS); high: batched 256 px tiles keeping the tensor cores busier.
UTILISATION = (0.12, 0.30)
#: How much slower one Cortex-A78AE core at 1.5 GHz is than one core of the bench's x86 machine
#: (AMD EPYC Zen 4 vCPU, 2.6 GHz): an assumption (clock, narrower vectors: NEON against AVX-512).
A78_1500_SLOWDOWN = (2.0, 3.0)


@dataclass(frozen=True)
class Jetson:
    name: str
    tensor_cores: int
    gpu_mhz: float
    cpu_cores: int
    cpu_ghz: float

    @property
    def fp16_peak(self) -> float:
        """Dense FP16 tensor FLOP/s: 512 per tensor core per clock (Ampere, as in NVIDIA's
        published sparse INT8 TOPS / 4: Orin Nano 8GB 40 TOPS, Orin NX 16GB GPU 60 of 100)."""
        return self.tensor_cores * self.gpu_mhz * 1e6 * 512

    def gpu_ms(self, flops: float) -> tuple[float, float]:
        return tuple(flops / (self.fp16_peak * u) * 1e3 for u in reversed(UTILISATION))

    def cpu_ms(self, x86_ms: float) -> tuple[float, float]:
        return tuple(x86_ms * f * 1.5 / self.cpu_ghz for f in A78_1500_SLOWDOWN)


JETSONS = (Jetson("Orin Nano 8GB", 32, 625, 6, 1.5), Jetson("Orin NX 16GB", 32, 918, 8, 2.0))


ENGINE_OR_TOTAL = ("detector engine", "head engines", "total")


@dataclass
class Run:
    """One bench configuration of one field size: views, cells, stage ms."""

    field: str
    config: str
    views: str
    cells: int
    stages: dict[str, float]

    @property
    def detector_views(self) -> int:
        """The detector's views ("3", or "3g": the others only where the first is unsure)."""
        return int(self.views.split("/")[0].rstrip("g"))

    @property
    def detector_gated(self) -> bool:
        return self.views.split("/")[0].endswith("g")

    @property
    def cpu_side_ms(self) -> float:
        """The stages that are not an engine, summed (each a median over the fields: total minus
        the engines' medians can come out below zero when the engines' times spread)."""
        return sum(v for k, v in self.stages.items() if k not in ENGINE_OR_TOTAL)

    def largest_cpu_stages(self, n: int = 4) -> str:
        cpu = {k: v for k, v in self.stages.items() if k not in ENGINE_OR_TOTAL}
        return ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])[:n])


def latest_results(folder: Path = RESULTS) -> Path:
    """The newest results by the date in the name, then by name (several runs share a date)."""
    files = sorted(folder.glob("bench_pipeline-*.txt"),
                   key=lambda p: ((re.findall(r"\d{4}-\d{2}-\d{2}", p.name) or [""])[-1], p.name))
    if not files:
        raise FileNotFoundError(f"no bench_pipeline-*.txt in {folder}")
    return files[-1]


def parse_bench(text: str) -> list[Run]:
    """Rows of the per-field table (SAHI rows left out) and, column by column in the same order,
    the stage table ("where the time goes")."""
    row = re.compile(r"^(\d+x\d+)\s+(.+?)\s+(\d+g?/\d+g?/\d+g?)\s+(\d+)\s+\d+\s+\d+\s+[\d.]+x")
    runs = []
    lines = text.splitlines()
    for line in lines:
        m = row.match(line)
        if m and not m.group(2).startswith("SAHI"):
            runs.append(Run(m.group(1), m.group(2), m.group(3), int(m.group(4)), {}))
    start = next(i for i, s in enumerate(lines) if s.startswith("where the time goes"))
    for line in lines[start + 2:]:
        if not line.strip():
            break
        name, values = line[:18].strip(), [float(v) for v in line[18:].split()]
        if len(values) != len(runs):
            raise ValueError(f"stage row {name!r}: {len(values)} columns for {len(runs)} runs")
        for run, v in zip(runs, values):
            run.stages[name] = v
    return runs


def tiles_per_view(field: str, seg: dict) -> int:
    w, h, mpp = SIZES[field]
    factor, tile = mpp / seg["canonical_um_per_px"], seg["input_size"]
    cw, ch = max(1, round(w * factor)), max(1, round(h * factor))
    return len(tile_grid(max(cw, tile), max(ch, tile), tile, AnalyzerOptions().tile_overlap))


def span(lo_hi: tuple[float, float]) -> str:
    digits = 1 if lo_hi[1] < 10 else 0
    return f"{lo_hi[0]:.{digits}f}-{lo_hi[1]:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--results", type=Path, default=None, help="default: the latest in bench/results")
    ap.add_argument("--fields", default=",".join(FIELDS))
    args = ap.parse_args(argv)
    results = args.results or latest_results()

    print("FLOPs per input (2 per multiply-accumulate; Conv, ConvTranspose, MatMul, Gemm; batch 1)")
    manifests, gflop = {}, {}
    for name in ("seg", "rbc_head", "wbc_head"):
        manifests[name] = json.loads((args.models / f"{name}.json").read_text())
        size = manifests[name]["input_size"]
        gflop[name] = model_flops(args.models / manifests[name]["file"], size)["total"] / 1e9
        what = "tile" if name == "seg" else "crop"
        print(f"  {name:<9} {size:>3}x{size:<3} {gflop[name]:7.3f} GFLOP per {what}")

    print("\nassumed (not measured): sustained FP16 = "
          f"{UTILISATION[0]:.0%}-{UTILISATION[1]:.0%} of the dense tensor peak; "
          f"an A78AE core at 1.5 GHz {A78_1500_SLOWDOWN[0]:g}-{A78_1500_SLOWDOWN[1]:g}x "
          "slower than the bench's x86 core, scaled by clock")
    for j in JETSONS:
        lo, hi = j.cpu_ms(1.0)
        print(f"  {j.name}: {j.tensor_cores} tensor cores at {j.gpu_mhz:g} MHz = "
              f"{j.fp16_peak / 1e12:.1f} TFLOPS FP16 dense peak; {j.cpu_cores} A78AE cores at "
              f"{j.cpu_ghz:g} GHz: CPU side x{lo:.2f}-{hi:.2f}")

    runs = parse_bench(results.read_text())
    shown = results.resolve()
    shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
    print(f"\nstage timings: {shown}")
    print(f"{'field':<10} {'config':<9} {'tiles':>5} {'crop runs':>9} {'GFLOP':>6} {'x86 CPU ms':>10}  "
          f"{'Jetson':<14} {'GPU ms':>8} {'CPU ms':>9} {'field ms':>9}  dominates")
    for field in args.fields.split(","):
        by_config = {r.config: r for r in runs if r.field == field}
        one = by_config.get("one-view")
        for config in ("one-view", "default"):
            r = by_config.get(config)
            if r is None or one is None:
                continue
            # gated views ran on some tiles only: the bench's detector-engine ms over one-view's
            views = (r.stages["detector engine"] / one.stages["detector engine"] if r.detector_gated
                     else r.detector_views)
            tiles = tiles_per_view(field, manifests["seg"]) * views
            head_work = r.stages["head engines"] / one.stages["head engines"]
            flops = (tiles * gflop["seg"] + r.cells * head_work * gflop["rbc_head"]) * 1e9
            for j in JETSONS:
                gpu, cpu = j.gpu_ms(flops), j.cpu_ms(r.cpu_side_ms)
                total = (gpu[0] + cpu[0], gpu[1] + cpu[1])
                dom = "CPU" if cpu[0] > gpu[1] else "GPU" if gpu[0] > cpu[1] else "either"
                print(f"{field:<10} {config:<9} {tiles:>5.0f} {r.cells * head_work:>9.0f} "
                      f"{flops / 1e9:>6.1f} {r.cpu_side_ms:>10.1f}  {j.name:<14} {span(gpu):>8} "
                      f"{span(cpu):>9} {span(total):>9}  {dom}")
    print("\ntiles: the grid x detector views (views where unsure: x the bench's detector-engine "
          "ms over one-view's); crop runs: cells x the head views they ran (bench's "
          "head-engine ms over one-view's);\nGPU ms: engine compute only (no launches, copies or "
          "TensorRT's own choices); CPU ms: everything else the bench\ntimed, one stage after "
          "another; field ms: the two in sequence (fields pipelined on the spare cores: the larger)")
    print("\nlargest CPU-side stages (x86 ms, from the same table)")
    for field in args.fields.split(","):
        for r in (r for r in runs if r.field == field and r.config in ("one-view", "default")):
            print(f"  {field:<10} {r.config:<9} {r.largest_cpu_stages()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
