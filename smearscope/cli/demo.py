"""`smearscope demo`: analyze fields from the synthetic microscope and score them against truth.

Needs no camera, broker or dataset: the renderer knows where every cell is, so the demo prints
recall and precision per cell kind next to the report summary (the demo must not show nonsense).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscope.service.analysis.boxes import box_iou

logger = logging.getLogger(__name__)

KINDS = ("rbc", "wbc", "platelet")


@dataclass(frozen=True)
class KindScore:
    truth: int
    found: int
    matched: int

    @property
    def recall(self) -> float:
        return self.matched / self.truth if self.truth else float("nan")

    @property
    def precision(self) -> float:
        return self.matched / self.found if self.found else float("nan")


def score_cells(pred: Sequence[tuple[str, list[float]]], truth: Sequence[tuple[str, Sequence[float]]],
                iou_threshold: float = 0.5) -> dict[str, KindScore]:
    """One-to-one greedy matching by IoU within each kind."""
    out = {}
    for k in KINDS:
        p = np.array([b for kk, b in pred if kk == k], float).reshape(-1, 4)
        t = np.array([b for kk, b in truth if kk == k], float).reshape(-1, 4)
        matched = 0
        if len(p) and len(t):
            iou = box_iou(p, t)
            while True:
                i, j = np.unravel_index(np.argmax(iou), iou.shape)
                if iou[i, j] < iou_threshold:
                    break
                matched += 1
                iou[i, :] = -1
                iou[:, j] = -1
        out[k] = KindScore(len(t), len(p), matched)
    return out


def run_demo(fields: int = 3, seed: int = 1, models: Path | None = None, backend: str = "onnxruntime",
             microns_per_pixel: float = 0.1, width: int = 1280, height: int = 960) -> int:
    from smearscope.cli.summary import summarize
    from smearscope.device.synthetic import render_field
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, Analyzer

    analyzer = Analyzer.from_models_dir(models or DEFAULT_MODELS_DIR, backend=backend, station_id="demo")
    totals = {k: [0, 0, 0] for k in KINDS}
    for i in range(fields):
        f = render_field(seed + i, width=width, height=height, microns_per_pixel=microns_per_pixel)
        result = analyzer.analyze(f.frame)
        print(summarize(result.report))
        sc = score_cells([(c.kind, c.bbox) for c in result.report.cells], [(c.kind, c.bbox) for c in f.cells])
        for k, s in sc.items():
            totals[k][0] += s.truth
            totals[k][1] += s.found
            totals[k][2] += s.matched
    print()
    print(f"{'kind':<10}{'truth':>7}{'found':>7}{'matched':>9}{'recall':>8}{'precision':>11}")
    for k, (t, fnd, m) in totals.items():
        rec = f"{m / t:.3f}" if t else "-"
        prec = f"{m / fnd:.3f}" if fnd else "-"
        print(f"{k:<10}{t:>7}{fnd:>7}{m:>9}{rec:>8}{prec:>11}")
    print(f"({fields} synthetic fields {width}x{height} at {microns_per_pixel} um/px, seed {seed}; IoU >= 0.5)")
    analyzer.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import sys

    from smearscope.cli.analyze_io import models_option_problem
    from smearscope.engines.base import EngineError
    from smearscope.engines.manifest import ManifestError

    if (missing := models_option_problem(args.models)) is not None:
        print(f"smearscope demo: {missing}", file=sys.stderr)
        return 2
    try:
        return run_demo(fields=args.fields, seed=args.seed, models=args.models, backend=args.backend)
    except (EngineError, ManifestError, FileNotFoundError) as exc:  # the models, not the demo
        print(f"smearscope demo: cannot load the models in {args.models}: {exc}", file=sys.stderr)
        return 2
