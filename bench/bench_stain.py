"""Benchmark: stain normalization on a 2048x2048 frame against torchstain's numpy Macenko.

    .venv/bin/python -m bench.bench_stain [--repeats 5] [--fields 4]

Prints, from one run on this machine: the load it ran under, the time per frame of each way of
normalizing (median of interleaved repeats) and its speed-up over torchstain, then how far the
fast application lies from the exact (float64) transform on real fields of every lab. Not a
test: no timing is asserted anywhere.

Rows: torchstain fits the frame's stains and applies them (numpy Macenko normalize); ours
"per field" does the same (fit the field on a subsample, apply with OpenCV); "per specimen"
applies a transform fitted once on another field of the slide; "exact" is the float64 apply.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.illumination import correct_illumination
from smearscope.service.analysis.stain import MacenkoNormalizer
from smearscope.service.analysis.stain_transform import StainTransform
from smearscope.service.analysis.stain_vahadane import VahadaneNormalizer

DATA = Path(os.environ.get("SMEARSCOPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


def _frame(seed: int, size: int, n_wbc: int | None = None) -> np.ndarray:
    field = render_field(seed, width=size, height=size, microns_per_pixel=0.1, n_wbc=n_wbc)
    return correct_illumination(field.frame.pixels).pixels


def bench_speed(repeats: int, size: int) -> None:
    import torchstain  # the bench extra's yardstick, never a runtime dependency

    reference = _frame(1, 1024, n_wbc=8)  # Macenko's fit needs plenty of purple
    frame, other_field = _frame(2, size), _frame(3, size)
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(reference[:, :, ::-1].copy(), Io=240, alpha=1, beta=0.15)
    macenko, vahadane = MacenkoNormalizer(), VahadaneNormalizer.default()
    macenko.fit(reference)
    mac_t, vah_t = macenko.transform_for(other_field).transform, vahadane.transform_for(other_field).transform
    assert mac_t is not None and vah_t is not None
    rgb = frame[:, :, ::-1].copy()
    cases: dict[str, Callable[[], object]] = {
        "torchstain Macenko (numpy), per field": lambda: ts.normalize(rgb, Io=240, alpha=1, beta=0.15, stains=False),
        "Macenko per field (fit + apply)": lambda: macenko.normalize(frame),
        "Macenko per specimen (apply)": lambda: mac_t.apply(frame),
        "Vahadane per field (fit + apply)": lambda: vahadane.normalize(frame),
        "Vahadane per specimen (apply)": lambda: vah_t.apply(frame),
        "Macenko exact apply (float64)": lambda: mac_t.apply_exact(frame),
        "Vahadane exact apply (float64)": lambda: vah_t.apply_exact(frame),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so a burst of load falls on every row alike
        for name, run in cases.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["torchstain Macenko (numpy), per field"])
    print(f"\n{size}x{size} frame, median of {repeats} (ms); speed-up = torchstain / row")
    print(f"{'':<42}{'ms':>9}{'min ms':>9}{'speed-up':>10}")
    for name, ts_ in times.items():
        med = statistics.median(ts_)
        print(f"{name:<42}{1000 * med:>9.1f}{1000 * min(ts_):>9.1f}{base / med:>9.1f}x")


def _real_fields(per_lab: int) -> dict[str, list[Path]]:
    """A few fields of each lab (sorted, evenly spaced), wherever the datasets are."""
    sources = {
        "bccd": sorted((DATA / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg")),
        "txl_pbc": sorted((DATA / "txl_pbc" / "TXL_PBC" / "images" / "train").glob("*.jpg")),
        "chula": sorted((DATA / "chula_rbc12" / "Dataset").glob("*.jpg")),
        "rpi": sorted((DATA / "chula_wbc_rpi" / "train" / "images").glob("*.jpg")),
    }
    return {lab: [paths[k] for k in np.linspace(0, len(paths) - 1, per_lab).astype(int)]
            for lab, paths in sources.items() if paths}


def bench_accuracy(per_lab: int) -> None:
    fields = _real_fields(per_lab)
    if not fields:
        print(f"\nno real fields under {DATA}: accuracy on real fields skipped")
        return
    print(f"\nfast apply vs exact transform on real fields ({per_lab} per lab, illumination-corrected;"
          " |difference| in grey levels over all pixels and channels)")
    print(f"{'lab':<10}{'method':<10}{'fields':>7}{'applied':>8}{'p99.9':>7}{'max':>5}{'share > 0':>11}")
    normalizers = {"macenko": MacenkoNormalizer.default(), "vahadane": VahadaneNormalizer.default()}
    worst = 0
    for lab, paths in fields.items():
        frames = [correct_illumination(cv2.imread(str(p), cv2.IMREAD_COLOR)).pixels for p in paths]
        for method, normalizer in normalizers.items():
            diffs = []
            for frame in frames:
                transform: StainTransform | None = normalizer.transform_for(frame).transform
                if transform is not None:
                    diffs.append(np.abs(transform.apply(frame).astype(np.int16) - transform.apply_exact(frame)).ravel())
            if not diffs:
                print(f"{lab:<10}{method:<10}{len(frames):>7}{0:>8}")
                continue
            d = np.concatenate(diffs)
            worst = max(worst, int(d.max()))
            print(f"{lab:<10}{method:<10}{len(frames):>7}{len(diffs):>8}{np.percentile(d, 99.9):>7.0f}"
                  f"{d.max():>5}{(d > 0).mean():>11.2e}")
    print(f"largest difference anywhere: {worst} grey level(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fields", type=int, default=4, help="real fields per lab for the accuracy table")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}; "
          f"OpenCV {cv2.__version__} with {cv2.getNumThreads()} threads; numpy {np.__version__}")
    print(f"before: {_load()}")
    bench_speed(args.repeats, args.size)
    print(f"after:  {_load()}")
    bench_accuracy(args.fields)


if __name__ == "__main__":
    main()
