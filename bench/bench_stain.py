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
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from smearscope.device.synthetic import render_field
from smearscope.service.analysis.illumination import correct_illumination
from smearscope.service.analysis.stain import MacenkoNormalizer
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
    """Held-out fields of each lab (test splits; sorted, evenly spaced), where the data is."""
    from training.data import bccd_image_path, bccd_split, data_root
    from training.head_data import chula_splits
    from training.labs import rpi_dir, rpi_splits, txl_images_by_source

    if not (DATA / "bccd").is_dir():
        return {}
    sources = {"bccd": [bccd_image_path(i) for i in sorted(bccd_split("test"))]}
    sources.update({lab: sorted(p) for lab, p in txl_images_by_source("test").items()})
    chula = data_root() / "chula_rbc12" / "Dataset"
    sources["chula"] = [chula / f"{i}.jpg" for i in sorted(chula_splits()["test"], key=int)]
    sources["rpi"] = [rpi_dir() / "images" / f"{stem}.jpg" for stem in rpi_splits()["test"]]
    return {lab: [paths[k] for k in np.unique(np.linspace(0, len(paths) - 1, per_lab).astype(int))]
            for lab, paths in sources.items() if paths}


def bench_accuracy(per_lab: int) -> None:
    fields = _real_fields(per_lab)
    if not fields:
        print(f"\nno real fields under {DATA}: accuracy on real fields skipped")
        return
    print(f"\nfast apply vs exact transform on real fields ({per_lab} per lab, illumination-corrected;"
          " |difference| in grey levels over all pixels and channels)")
    print(f"{'lab':<10}{'method':<10}{'fields':>7}{'applied':>8}{'p99.9':>7}{'max':>5}{'share > 0':>11}"
          "  fallbacks")
    normalizers = {"macenko": MacenkoNormalizer.default(), "vahadane": VahadaneNormalizer.default()}
    worst = 0
    for lab, paths in fields.items():
        frames = [correct_illumination(cv2.imread(str(p), cv2.IMREAD_COLOR)).pixels for p in paths]
        for method, normalizer in normalizers.items():
            diffs, reasons = [], Counter()
            for frame in frames:
                fit = normalizer.transform_for(frame)
                reasons.update([fit.reason] if fit.reason else [])
                if fit.transform is not None:
                    diff = np.abs(fit.transform.apply(frame).astype(np.int16) - fit.transform.apply_exact(frame))
                    diffs.append(diff.ravel())
            why = ", ".join(f"{r} {k}" for r, k in sorted(reasons.items())) or "-"
            if not diffs:
                print(f"{lab:<10}{method:<10}{len(frames):>7}{0:>8}{'':>23}  {why}")
                continue
            d = np.concatenate(diffs)
            worst = max(worst, int(d.max()))
            print(f"{lab:<10}{method:<10}{len(frames):>7}{len(diffs):>8}{np.percentile(d, 99.9):>7.0f}"
                  f"{d.max():>5}{(d > 0).mean():>11.2e}  {why}")
    print(f"largest difference anywhere: {worst} grey level(s)")


def _lab_means(frame: np.ndarray, classes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lab = cv2.cvtColor(frame, cv2.COLOR_BGR2LAB).reshape(-1, 3).astype(np.float64)
    lab *= np.array([100.0 / 255.0, 1.0, 1.0])  # 8-bit L back to 0..100; a, b offset 128 cancels
    return {name: lab[mask].mean(axis=0) for name, mask in classes.items() if mask.any()}


def bench_lab_spread(per_lab: int) -> None:
    """How far apart the labs' colours are (CIELAB delta E between lab means), before and after.

    Pixels are classed on the field as it came (so the same pixels are compared in every row):
    stained (OD norm >= 0.15) and, of those, dark (at least twice the field's median OD: nuclei,
    platelets) or light (red cells). Normalization that works brings the labs together."""
    fields = _real_fields(per_lab)
    if len(fields) < 2:
        return
    normalizers = {"macenko": MacenkoNormalizer.default(), "vahadane": VahadaneNormalizer.default()}
    od_table = -np.log((np.arange(256) + 1.0) / 236.0)
    means: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
    applied = {m: 0 for m in normalizers}
    for lab, paths in fields.items():
        for path in paths:
            frame = correct_illumination(cv2.imread(str(path), cv2.IMREAD_COLOR)).pixels
            norm = np.linalg.norm(od_table[frame.reshape(-1, 3)], axis=1)
            stained = norm >= 0.15
            dark = stained & (norm >= 2.0 * np.median(norm[stained])) if stained.any() else stained
            classes = {"light": stained & ~dark, "dark": dark}
            variants = {"as stored": frame}
            for method, normalizer in normalizers.items():
                result = normalizer.normalize(frame)
                variants[method] = result.pixels
                applied[method] += int(result.applied)
            for variant, pixels in variants.items():
                for name, mean in _lab_means(pixels, classes).items():
                    means.setdefault(variant, {}).setdefault(name, {}).setdefault(lab, []).append(mean)
    n = sum(len(p) for p in fields.values())
    applied_text = ", ".join(f"{m} {applied[m]}/{n}" for m in normalizers)
    print(f"\nlab-to-lab colour spread ({per_lab} fields per lab: {', '.join(fields)}; CIELAB"
          f" delta E between lab means, largest pair / mean pair; applied: {applied_text})")
    print(f"{'':<11}{'red cells (light)':>20}{'nuclei, platelets (dark)':>27}")
    for variant, by_class in means.items():
        cells = []
        for name in ("light", "dark"):
            lab_means = [np.mean(v, axis=0) for v in by_class.get(name, {}).values()]
            pairs = [np.linalg.norm(a - b) for i, a in enumerate(lab_means) for b in lab_means[i + 1:]]
            cells.append(f"{max(pairs):.1f} / {np.mean(pairs):.1f}" if pairs else "-")
        print(f"{variant:<11}{cells[0]:>20}{cells[1]:>27}")


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
    bench_lab_spread(2 * args.fields)


if __name__ == "__main__":
    main()
