"""The TensorRT backend's CUDA side on a real GPU, with `bench.trt_standin` in place of TensorRT.

    python -m bench.device_check --cuda cuda-python [--json OUT.json] [--fields 3] [--quick]

Run by `bench/device_check.sh` on a GPU machine (no TensorRT there). For each model it
loads `engines.tensorrt_engine.TensorRtEngine` with the stand-in (the ONNX network executed as
PyTorch CUDA kernels on the stream the engine passes to execute_async_v3) and checks, against
ONNX Runtime on the CPU:

  parity       outputs for batch sizes 1, 3, opt, max and 2*max+3 (split and padded by
               engines.batching), within atol 5e-3 + rtol 1e-3
  late results every output still right when the network's results land ~10 ms after the call
               returns (a GPU busy-wait enqueued first), and a control: the same engine with its
               stream synchronisation removed must then read wrong outputs (shows the check bites)
  threads      4 threads x 8 batches on one engine with 2 lanes (streams), each checked
  memory       device memory back to where it was after close(), and again after a reload
  pipeline     Analyzer reports on rendered fields, TensorRT backend against ONNX Runtime: the
               (kind, label) tallies may differ by 2 cells or 2 %, whichever is more (cells on a
               threshold can flip between FP32 kernels)
  timing       ms per batch, stand-in on the GPU against ONNX Runtime on this machine's CPUs
               (NOT TensorRT timings: the stand-in is PyTorch, unfused, FP32)

Prints a table, writes JSON, exits 1 if any check failed. Not part of the test suite (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench import trt_standin
from smearscope.engines.batching import run_batched
from smearscope.engines.onnxruntime_engine import OnnxRuntimeEngine
from smearscope.engines.tensorrt_engine import TensorRtEngine

MODELS = Path(__file__).resolve().parents[1] / "models"
NAMES = ("rbc_head", "wbc_head", "seg")
ATOL, RTOL = 5e-3, 1e-3
SLEEP_CYCLES = 20_000_000  # about 10 ms at the H200's 1.98 GHz

logger = logging.getLogger("device_check")


def _inputs(engine, n: int, seed: int) -> np.ndarray:
    shape = engine.manifest.inputs[0].shape[1:]
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _diff(a: dict, b: dict) -> tuple[float, bool]:
    worst, ok = 0.0, True
    for k, expected in b.items():
        if a[k].shape != expected.shape:
            return float("inf"), False
        worst = max(worst, float(np.abs(a[k] - expected).max()))
        ok &= bool(np.allclose(a[k], expected, atol=ATOL, rtol=RTOL))
    return worst, ok


class Check:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, section: str, name: str, ok: bool, detail: str, **extra) -> None:
        row = {"section": section, "name": name, "ok": bool(ok), "detail": detail, **extra}
        self.rows.append(row)
        logger.info("%-9s %-28s %-4s %s", section, name, "ok" if ok else "FAIL", detail)

    def guard(self, section: str, name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # a crash is a failed check, reported, and the others still run
            self.record(section, name, False, f"{type(exc).__name__}: {exc}")
            logger.exception("%s %s crashed", section, name)


def _free_mem() -> int:
    """Free device memory once PyTorch (the stand-in's executor) has returned what it caches."""
    import gc

    import torch

    gc.collect()
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # cuBLAS keeps a workspace per stream
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def _capability() -> tuple[int, int]:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return int(major), int(minor)


def check_model(chk: Check, name: str, cuda: str, cache: Path, quick: bool) -> None:
    mp = MODELS / f"{name}.json"
    ref = OnnxRuntimeEngine(mp).load()
    sm = _capability()  # the engines are looked up under this GPU's compute capability
    trt_standin.write_engine(mp, cache / "plain", executor="torch", capability=sm)
    trt_standin.write_engine(mp, cache / "late", executor="torch", sleep_cycles=SLEEP_CYCLES, capability=sm)
    prof = ref.manifest.batch

    def parity():
        eng = TensorRtEngine(mp, cache_dir=cache / "plain", cuda=cuda, lanes=2).load()
        worst, all_ok, sizes = 0.0, True, [1, 3, prof.opt, prof.max, 2 * prof.max + 3]
        for n in sizes:
            x = _inputs(ref, n, seed=n)
            d, ok = _diff(run_batched(eng, x), run_batched(ref, x))
            worst, all_ok = max(worst, d), all_ok and ok
        eng.close()
        chk.record("parity", name, all_ok, f"batches {sizes}: max |diff| {worst:.2e}", max_abs_diff=worst)

    def late_and_control():
        eng = TensorRtEngine(mp, cache_dir=cache / "late", cuda=cuda, lanes=1).load()
        xs = [_inputs(ref, prof.opt, seed=100 + i) for i in range(4 if quick else 8)]
        refs = [ref.run(x) for x in xs]
        bad = sum(not _diff(eng.run(x), r)[1] for x, r in zip(xs, refs))
        chk.record("late", name, bad == 0, f"{len(xs) - bad}/{len(xs)} batches right with results ~10 ms late")
        real_sync = eng.cuda.synchronize
        eng.cuda.synchronize = lambda stream: None  # the control: an engine that forgot to wait
        try:
            wrong = sum(not _diff(eng.run(x), r)[1] for x, r in zip(xs, refs))
        finally:
            eng.cuda.synchronize = real_sync
        eng.close()
        chk.record("late", f"{name} control (no sync)", wrong > 0,
                   f"{wrong}/{len(xs)} batches wrong without the stream synchronisation (must be > 0)")

    def threads():
        eng = TensorRtEngine(mp, cache_dir=cache / "late", cuda=cuda, lanes=2).load()
        n_threads, per = (2, 3) if quick else (4, 8)
        work = {t: [_inputs(ref, 1 + (t + i) % prof.opt, seed=1000 * t + i) for i in range(per)] for t in range(n_threads)}
        refs = {t: [ref.run(x) for x in xs] for t, xs in work.items()}
        bad: list[int] = []

        def worker(t):
            for x, r in zip(work[t], refs[t]):
                if not _diff(eng.run(x), r)[1]:
                    bad.append(t)
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        eng.close()
        chk.record("threads", name, not bad, f"{n_threads} threads x {per} batches, 2 lanes: {len(bad)} wrong "
                   f"({dt:.2f} s)")

    def memory():
        before = _free_mem()
        eng = TensorRtEngine(mp, cache_dir=cache / "plain", cuda=cuda, lanes=2).load()
        bound = sum(b.host.nbytes for lane in eng._all_lanes for b in lane.bindings.values())
        eng.run(_inputs(ref, prof.max, seed=7))
        held = before - _free_mem()
        eng.close()
        after = _free_mem()
        eng.load()  # reload after close
        x = _inputs(ref, 2, seed=8)
        reload_ok = _diff(eng.run(x), ref.run(x))[1]
        eng.close()
        leak = before - after
        chk.record("memory", name, abs(leak) < 2 << 20 and held >= bound and reload_ok,
                   f"buffers {bound / 2**20:.1f} MiB (2 lanes); {held / 2**20:.1f} MiB held while loaded; "
                   f"{leak / 2**20:+.1f} MiB not returned after close; reload {'right' if reload_ok else 'WRONG'}",
                   bound_mib=bound / 2**20, held_mib=held / 2**20, leak_mib=leak / 2**20)

    def timing():
        eng = TensorRtEngine(mp, cache_dir=cache / "plain", cuda=cuda, lanes=2).load()
        rows = {}
        for n in sorted({prof.opt, prof.max}):
            x = _inputs(ref, n, seed=3)
            for label, e in (("gpu", eng), ("cpu", ref)):
                e.run(x)
                reps = 5 if label == "cpu" else 20
                t0 = time.perf_counter()
                for _ in range(reps):
                    e.run(x)
                rows[f"{label}_b{n}_ms"] = (time.perf_counter() - t0) / reps * 1e3
        eng.close()
        chk.record("timing", name, True, ", ".join(f"{k} {v:.1f}" for k, v in rows.items()), **rows)

    chk.guard("parity", name, parity)
    chk.guard("late", name, late_and_control)
    chk.guard("threads", name, threads)
    chk.guard("memory", name, memory)
    if not quick:
        chk.guard("timing", name, timing)


def check_pipeline(chk: Check, cuda: str, cache: Path, n_fields: int) -> None:
    from smearscope.device.synthetic import render_field
    from smearscope.service.analysis.pipeline import Analyzer

    def run():
        for name in NAMES:
            trt_standin.write_engine(MODELS / f"{name}.json", cache / "plain", executor="torch",
                                     capability=_capability())
        a_gpu = Analyzer.from_models_dir(MODELS, backend="tensorrt", cache_dir=cache / "plain", cuda=cuda)
        a_cpu = Analyzer.from_models_dir(MODELS)
        for seed in range(n_fields):
            field = render_field(500 + seed, width=1280, height=960, microns_per_pixel=0.1)
            t0 = time.perf_counter()
            g = a_gpu.analyze(field.frame).report
            t1 = time.perf_counter()
            c = a_cpu.analyze(field.frame).report
            t2 = time.perf_counter()
            same_counts = g.counts == c.counts
            labels_g = Counter((x.kind, x.label) for x in g.cells)
            labels_c = Counter((x.kind, x.label) for x in c.cells)
            differ = sum(((labels_g - labels_c) + (labels_c - labels_g)).values())
            n = len(c.cells)
            chk.record("pipeline", f"field seed {500 + seed}", differ <= max(2, n // 50),
                       f"{n} cells; counts {'equal' if same_counts else 'differ'}; (kind, label) tallies differ by "
                       f"{differ}; {1e3 * (t1 - t0):.0f} ms tensorrt-standin, {1e3 * (t2 - t1):.0f} ms onnxruntime",
                       cells=n, differing=differ)
        a_gpu.close()
        a_cpu.close()

    chk.guard("pipeline", "rendered fields", run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", default="cuda-python", choices=["cuda-python", "pycuda"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer batches, no timing, one field")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    import torch

    env = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
           "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda_api": args.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    logger.info("environment: %s", env)
    chk = Check()
    with tempfile.TemporaryDirectory() as tmp, trt_standin.installed():
        cache = Path(tmp)
        for name in NAMES:
            check_model(chk, name, args.cuda, cache, args.quick)
        check_pipeline(chk, args.cuda, cache, 1 if args.quick else args.fields)
    failed = [r for r in chk.rows if not r["ok"]]
    print(f"\n{'section':<9} {'check':<30} {'':<5} detail")
    for r in chk.rows:
        print(f"{r['section']:<9} {r['name']:<30} {'ok' if r['ok'] else 'FAIL':<5} {r['detail']}")
    print(f"\n{len(chk.rows) - len(failed)}/{len(chk.rows)} checks passed ({args.cuda}, {env['gpu']})")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": chk.rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
