"""Where one field's time goes, and the bare-engine floor under it (for bench.bench_pipeline).

`Probe` wraps, for the length of one `analyze` call, the analyzer's stage functions (by name, in
the modules that call them) and its engines' `run` and `run_parts`: wall time per stage, exclusive of the stages
nested in it, and every batch each engine was given. `floor_ms` replays exactly those batches
through the same engines: the time the models alone need for that field, without any pre- or
post-processing. A stage the code no longer has is listed in `Probe.missing`, never an error, so
the bench keeps working while stages move; its time then lands in "other".
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from typing_extensions import Self

logger = logging.getLogger(__name__)

PIPELINE = "smearscope.service.analysis.pipeline"
DETECT = "smearscope.service.analysis.detect_views"
PREPARE = "smearscope.service.analysis.prepare"
DECODE = "smearscope.service.analysis.yolo_decode"
CLASSIFY = "smearscope.service.analysis.classify"
ROI = "smearscope.service.analysis.roi"

#: (stage, module, attribute): module-level names as the calling module sees them, or
#: "module:Class" for methods. Order is the order of the breakdown table.
STAGE_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("illumination", PIPELINE, "estimate_illumination"),
    ("illumination", PREPARE, "apply_illumination"),
    ("scale estimate", PIPELINE, "first_scale_guess"),
    ("scale estimate", PIPELINE, "whole_red_cells"),
    ("scale estimate", PIPELINE, "measurable_red_cells"),
    ("resample", PREPARE, "resample_to_canonical"),
    ("tile", DETECT, "view_tiles"),
    ("tile", DETECT, "StainedArea"),
    ("tile", DETECT, "view_tile_at"),
    ("tile", DETECT, "plan_windows"),
    ("tile", DETECT, "packed_tiles"),
    ("preprocess tiles", DECODE, "to_model_input"),
    ("decode masks", DECODE, "decode_batch"),
    ("detector glue", f"{DECODE}:YoloSegmenter", "detect"),
    ("detector glue", f"{DECODE}:YoloSegmenter", "_tile_detections"),
    ("merge tiles", DETECT, "merge_detections"),
    ("merge tiles", DETECT, "unpack"),
    ("fuse views", DETECT, "unview"),
    ("fuse views", DETECT, "fuse_views"),
    ("roi filter", f"{ROI}:RoiFilter", "apply"),
    ("roi filter", f"{ROI}:RoiFilter", "below_confidence"),
    ("crop", PIPELINE, "route"),
    ("nucleated recheck", PIPELINE, "dense_interiors"),
    ("preprocess crops", CLASSIFY, "to_model_input"),
    ("classify glue", f"{CLASSIFY}:CropClassifier", "classify"),
    ("aggregate", PIPELINE, "aggregate"),
)
ENGINE_STAGES = {"segmentation": "detector engine", "classification": "head engines"}
STAGE_ORDER = ("illumination", "scale estimate", "resample", "normalize", "tile", "preprocess tiles", "detector engine",
               "decode masks", "detector glue", "merge tiles", "fuse views", "roi filter", "crop",
               "nucleated recheck", "preprocess crops", "head engines", "classify glue", "aggregate", "other")


class Probe:
    """Stage times and engine batches of the `analyze` calls made inside `with Probe(analyzer):`."""

    def __init__(self, analyzer: Any) -> None:
        self.analyzer = analyzer
        self.stage_ms: dict[str, float] = defaultdict(float)
        self.batches: list[tuple[Any, Any]] = []
        self.missing: list[str] = []
        self._stack: list[float] = []
        self._undo: list[Callable[[], None]] = []

    # -- wrapping -------------------------------------------------------------------------
    def _timed(self, stage: str, fn: Callable) -> Callable:
        probe = self

        def account(elapsed: float) -> None:
            nested = probe._stack.pop()
            probe.stage_ms[stage] += (elapsed - nested) * 1000
            if probe._stack:
                probe._stack[-1] += elapsed

        def timed_iter(it: Iterator) -> Iterator:
            while True:
                probe._stack.append(0.0)
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    account(time.perf_counter() - t)
                    return
                account(time.perf_counter() - t)
                yield item

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            probe._stack.append(0.0)
            t = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                account(time.perf_counter() - t)
            return timed_iter(out) if inspect.isgenerator(out) else out

        return timed

    def _patch(self, owner: Any, attr: str, wrapper: Callable, label: str) -> None:
        if not hasattr(owner, attr):
            self.missing.append(label)
            return
        had_own = attr in vars(owner)
        original = vars(owner)[attr] if had_own else None
        setattr(owner, attr, wrapper)
        self._undo.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))

    def __enter__(self) -> Self:
        for stage, target, attr in STAGE_TARGETS:
            module_name, _, cls_name = target.partition(":")
            owner = importlib.import_module(module_name)
            if cls_name:
                owner = getattr(owner, cls_name, None)
            if owner is None or not hasattr(owner, attr):
                self.missing.append(f"{target}.{attr}")
                continue
            self._patch(owner, attr, self._timed(stage, getattr(owner, attr)), f"{target}.{attr}")
        for name, normalizer in getattr(self.analyzer, "normalizers", {}).items():
            self._patch(normalizer, "normalize", self._timed("normalize", normalizer.normalize), f"normalizer {name}")
        for engine in self._engines():
            run, run_parts = self._recording(engine)
            self._patch(engine, "run", run, f"{engine.manifest.name}.run")
            if run_parts is not None:
                self._patch(engine, "run_parts", run_parts, f"{engine.manifest.name}.run_parts")
        return self

    def _recording(self, engine: Any) -> Callable:
        timed_run = self._timed(ENGINE_STAGES.get(engine.manifest.task, "head engines"), engine.run)

        original_parts = getattr(engine, "run_parts", None)
        timed_parts = (None if original_parts is None
                       else self._timed(ENGINE_STAGES.get(engine.manifest.task, "head engines"), original_parts))

        def run(batch):
            self.batches.append((engine, batch))
            return timed_run(batch)

        def run_parts(batch, on_part):
            # the probed stages the caller runs on a part while the others run (decode_batch,
            # _tile_detections) are nested here and subtracted; its unprobed glue counts as engine
            self.batches.append((engine, batch))
            return timed_parts(batch, on_part)

        return run, (run_parts if timed_parts is not None else None)

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _engines(self) -> list[Any]:
        a = self.analyzer
        found = [getattr(a.segmenter, "engine", None)]
        found += [getattr(h, "engine", None) for h in (a.rbc_head, a.wbc_head) if h is not None]
        unique: dict[int, Any] = {}
        for e in found:
            if e is not None:
                unique.setdefault(id(e), e)
        return list(unique.values())

    # -- results --------------------------------------------------------------------------
    def breakdown(self, total_ms: float) -> dict[str, float]:
        """Exclusive ms per stage; "other" is what no stage accounts for (report, records, glue)."""
        out = {k: self.stage_ms.get(k, 0.0) for k in STAGE_ORDER if k != "other"}
        out["other"] = max(0.0, total_ms - sum(out.values()))
        return out


def floor_ms(batches: list[tuple[Any, Any]]) -> float:
    """The engines alone: every recorded batch through the same engine, nothing else."""
    t = time.perf_counter()
    for engine, batch in batches:
        engine.run(batch)
    return (time.perf_counter() - t) * 1000


def probe_field(analyzer: Any, frame: Any, runs: int = 1) -> tuple[float, dict[str, float], float, int]:
    """(total ms, stage breakdown, floor ms, cells) of one field, each run followed by its floor.

    With `runs` > 1 the field is analyzed that many times: total and floor are the fastest of
    their runs (as `timeit` does: the minimum is the run least disturbed by the rest of the
    machine), and each stage's time is its median over the runs (a single run's breakdown, the
    first one's especially, swings with what else the machine does). Every run is probed: the
    probe adds a few microseconds per stage call.
    """
    totals, floors, breakdowns = [], [], []
    cells = 0
    for _ in range(max(1, runs)):
        with Probe(analyzer) as probe:
            t = time.perf_counter()
            report = analyzer.analyze(frame).report
            total = (time.perf_counter() - t) * 1000
        for name in probe.missing:
            logger.debug("probe: %s not found", name)
        totals.append(total)
        breakdowns.append(probe.breakdown(total))
        floors.append(floor_ms(probe.batches))
        cells = len(report.cells)
    breakdown = {k: float(np.median([b[k] for b in breakdowns])) for k in breakdowns[0]}
    return min(totals), breakdown, min(floors), cells
