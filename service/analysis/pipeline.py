"""The only module that knows the order of the stages.

frame -> scale -> stain -> tiles -> detections -> merge -> ROI filter -> crops -> classes
      -> aggregates -> report
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smearscope.device.frame import Frame
from smearscope.engines.base import Engine
from smearscope.engines.registry import create_engine
from smearscope.service.analysis import stain as stain_stage
from smearscope.service.analysis.aggregate import AggregateThresholds, aggregate
from smearscope.service.analysis.classify import CropClassifier
from smearscope.service.analysis.merge import merge_detections
from smearscope.service.analysis.records import CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.report import (
    CellRecord,
    Flag,
    ImageInfo,
    ModelInfo,
    Report,
    ScaleInfo,
    SourceInfo,
    StainInfo,
)
from smearscope.service.analysis.roi import RoiFilter, route
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    ScaleEstimate,
    estimate_scale_classical,
    resample_factor,
    resample_to_canonical,
    scale_from_rbc_diameters,
)
from smearscope.service.analysis.segment import Segmenter
from smearscope.service.analysis.tiling import make_tiles
from smearscope.service.analysis.tta import fuse_views, unview, view_frame
from smearscope.service.analysis.yolo_decode import YoloSegmenter

logger = logging.getLogger(__name__)

MODEL_FILES = {"segmentation": "seg.json", "rbc_head": "rbc_head.json", "wbc_head": "wbc_head.json"}
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
#: Scale assumed when nothing else is known (a 100x oil objective on a typical camera).
FALLBACK_UM_PER_PX = 0.1
#: Factor between the scale guesses tried when the first guess finds too few red cells.
SCALE_SEARCH_STEP = 1.4
#: Detection passes at most that refine an unknown scale from the whole red cells (see _scale_and_detect).
SCALE_REFINE_ROUNDS = 3
MIN_RBC_FOR_SCALE = 5
#: Red cells this confident take part in measuring the scale (sizes, not counts, matter here).
SCALE_MIN_SCORE = 0.3


#: Head classes that are not the kind the head serves. A "platelet" from the WBC head (PBC's
#: platelet class: a giant platelet or a platelet clump the detector took for a WBC) is counted as
#: a platelet, never as a WBC (clumps raising the WBC count is a classic analyzer error), and
#: flagged for review. A "platelet" from the RBC head (a platelet or small clump the detector took
#: for a red cell) would be counted as a platelet, not a red cell (the committed RBC head has no
#: such class: one was tried and not adopted, see models/README.md).
KIND_FROM_HEAD_LABEL = {"platelet": CellKind.PLATELET}


@dataclass(frozen=True)
class AnalyzerOptions:
    tile_size: int = 256
    tile_overlap: float = 0.15
    #: "auto": each model gets frames normalized the way its training images were (manifest
    #: preprocessing.stain); "macenko" / "none" force one variant for every model (experiments).
    stain_method: str = "auto"
    roi: RoiFilter = field(default_factory=RoiFilter)
    detector_conf: float = 0.25
    #: Test-time views of the detector; None = the manifest's (the views its scores are calibrated for).
    detector_views: tuple[str, ...] | None = None
    wbc_min_confidence: float = 0.5
    rbc_min_confidence: float = 0.3
    #: Test-time views of each crop per head; None = the manifest's (the views its temperature is fitted for).
    rbc_views: tuple[str, ...] | None = None
    wbc_views: tuple[str, ...] | None = None
    scale_refine_tolerance: float = 0.05
    thresholds: AggregateThresholds = field(default_factory=AggregateThresholds)


@dataclass(frozen=True)
class FieldResult:
    """Everything one analysed field produced: the report plus internals for overlays/specimens."""

    report: Report
    cells: tuple[ClassifiedCell, ...]
    input_to_canonical: float
    #: Plausible cells below the ROI filter's confidence (down to `AnalyzerOptions.detector_conf`),
    #: in canonical coordinates: not counted, not classified, never in the report. For review and
    #: for ranking metrics (`smearscope analyze --detections`).
    candidates: tuple[CellDetection, ...] = ()


class Analyzer:
    def __init__(self, segmenter: Segmenter, rbc_head: CropClassifier | None, wbc_head: CropClassifier | None,
                 options: AnalyzerOptions = AnalyzerOptions(), models: dict[str, ModelInfo] | None = None,
                 station_id: str | None = None) -> None:
        self.segmenter = segmenter
        self.rbc_head = rbc_head
        self.wbc_head = wbc_head
        self.options = options
        self.models = models or {}
        self.station_id = station_id
        self._engines: list[Engine] = []
        wanted = {self._variant(e) for e in self._model_engines()} or {"none"}
        # The stain stage runs only when some model consumes its output.
        self.stain_method = "macenko" if "macenko" in wanted else "none"
        self.normalizer = stain_stage.create_normalizer(self.stain_method)

    @classmethod
    def from_models_dir(cls, models_dir: Path = DEFAULT_MODELS_DIR, backend: str = "onnxruntime",
                        options: AnalyzerOptions = AnalyzerOptions(), station_id: str | None = None,
                        warmup: bool = True, **engine_options) -> Analyzer:
        engines = {role: create_engine(backend, Path(models_dir) / f, **engine_options) for role, f in MODEL_FILES.items()}
        for e in engines.values():
            e.load()
            if warmup:
                e.warmup()
        analyzer = cls(
            YoloSegmenter(engines["segmentation"], conf_threshold=options.detector_conf, views=options.detector_views),
            CropClassifier(engines["rbc_head"], options.rbc_min_confidence, views=options.rbc_views),
            CropClassifier(engines["wbc_head"], options.wbc_min_confidence, views=options.wbc_views),
            options,
            {role: ModelInfo(name=e.manifest.name, sha256=e.manifest.sha256, backend=e.backend_name) for role, e in engines.items()},
            station_id,
        )
        analyzer._engines = list(engines.values())
        return analyzer

    def _variant(self, engine: Engine | None) -> str:
        """Which frame a model gets: forced by options, else as its training images were."""
        if self.options.stain_method != "auto":
            return self.options.stain_method
        return engine.manifest.preprocessing.stain if engine is not None else "none"

    def _model_engines(self) -> list[Engine]:
        found = [getattr(self.segmenter, "engine", None)]
        found += [h.engine for h in (self.rbc_head, self.wbc_head) if h is not None]
        return [e for e in found if e is not None]

    def close(self) -> None:
        for e in self._engines:
            e.close()

    # -- stages -------------------------------------------------------------------------------
    def _detect(self, canonical: np.ndarray) -> list[CellDetection]:
        o = self.options
        h, w = canonical.shape[:2]
        views = self.segmenter.views
        # Raw scores (every detection above the detector's fixed floor) through the merge and the
        # fusion of the views (service.analysis.tta; one view fuses to itself); the calibrated threshold
        # comes last, so it changes nothing above it. All views' tiles go to the engine in one
        # batch run; tile indices are kept apart per view so the merge never joins two views' tiles.
        per_view_tiles = [make_tiles(view_frame(canonical, v), o.tile_size, o.tile_overlap) for v in views]
        stride = max(len(t) for t in per_view_tiles)
        tiles = [dataclasses.replace(t, index=k * stride + t.index) for k, ts in enumerate(per_view_tiles) for t in ts]
        raw = self.segmenter.detect(tiles, w, h, calibrate=False)
        per_view = [[unview(d, v, w, h) for d in merge_detections([d for d in raw if d.tile_index // stride == k])]
                    for k, v in enumerate(views)]
        return self.segmenter.finish(fuse_views(per_view))

    def _detect_at(self, frame: Frame, mpp: float, timing: dict[str, float]):
        """Resample to canonical assuming `mpp`, normalize, detect; also the whole, confident RBCs."""
        t = time.perf_counter()
        canonical = resample_to_canonical(frame.pixels, mpp)
        normalized = self.normalizer.normalize(canonical)
        timing["stain_ms"] = timing.get("stain_ms", 0.0) + (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        seg_frame = normalized.pixels if self._variant(getattr(self.segmenter, "engine", None)) == "macenko" else canonical
        dets = self._detect(seg_frame)
        timing["detect_ms"] = timing.get("detect_ms", 0.0) + (time.perf_counter() - t) * 1000
        whole = [d for d in dets if d.kind is CellKind.RBC and d.score >= SCALE_MIN_SCORE
                 and not _touches_frame(d, canonical.shape)]
        return mpp, canonical, normalized, whole, dets

    def _scale_and_detect(self, frame: Frame, timing: dict[str, float]):
        """Resample to canonical and detect; when the scale is unknown, refine it from RBC size."""
        t = time.perf_counter()
        if frame.microns_per_pixel:
            est = ScaleEstimate(frame.microns_per_pixel, "given")
        else:
            est = estimate_scale_classical(frame.pixels) or ScaleEstimate(FALLBACK_UM_PER_PX, "default")
        timing["scale_ms"] = (time.perf_counter() - t) * 1000
        # Unknown scale: the classical guess can be off by a third on pale or crowded fields, and
        # the detector only knows cells near the canonical size, so up to three guesses are
        # tried; the one whose detection pass finds the most whole red cells is then refined.
        guesses = [est.microns_per_pixel]
        if est.method != "given":
            guesses += [est.microns_per_pixel * SCALE_SEARCH_STEP, est.microns_per_pixel / SCALE_SEARCH_STEP]
        best = None
        for mpp in guesses:
            attempt = self._detect_at(frame, mpp, timing)
            if best is None or len(attempt[3]) > len(best[3]):
                best = attempt
            if est.method == "given" or len(attempt[3]) >= MIN_RBC_FOR_SCALE:
                break
        mpp, canonical, normalized, whole_rbc, dets = best
        if est.method == "given":
            return est, canonical, normalized, dets
        # Refine from the whole red cells' box size (the definition the datasets' scales were
        # measured with; mask outlines are coarse). A detector sees cells far from the canonical
        # size as nearer to it than they are, so one step under-corrects a large error: repeat
        # (at most SCALE_REFINE_ROUNDS detection passes) until the implied scale agrees.
        method = est.method
        for _ in range(SCALE_REFINE_ROUNDS):
            diam_canon = [(d.box.width + d.box.height) / 2.0 for d in whole_rbc]
            implied = scale_from_rbc_diameters(np.array(diam_canon))  # um per CANONICAL px if cells were normal
            if implied is None:
                break
            true_mpp = mpp * implied / CANONICAL_UM_PER_PX
            if abs(true_mpp / mpp - 1.0) <= self.options.scale_refine_tolerance:
                return ScaleEstimate(mpp, "rbc_size_detection", len(whole_rbc)), canonical, normalized, dets
            logger.info("scale refined from %.4f to %.4f um/px by %d red cells", mpp, true_mpp, len(whole_rbc))
            mpp, canonical, normalized, whole_rbc, dets = self._detect_at(frame, true_mpp, timing)
            method = "rbc_size_detection"
        return ScaleEstimate(mpp, method, len(whole_rbc) if method == "rbc_size_detection" else 0), canonical, normalized, dets

    def analyze(self, frame: Frame, run_id: str | None = None) -> FieldResult:
        timing: dict[str, float] = {}
        t_all = time.perf_counter()
        est, canonical, normalized, dets = self._scale_and_detect(frame, timing)
        t = time.perf_counter()
        kept = self.options.roi.apply(dets)
        candidates = tuple(self.options.roi.below_confidence(dets))
        rbc_spec = self.rbc_head.crop_spec if self.rbc_head else None
        wbc_spec = self.wbc_head.crop_spec if self.wbc_head else None
        frames = {"none": canonical, "macenko": normalized.pixels}
        rbc_frame = frames[self._variant(self.rbc_head.engine if self.rbc_head else None)]
        wbc_frame = frames[self._variant(self.wbc_head.engine if self.wbc_head else None)]
        routed = route(rbc_frame, wbc_frame, kept, rbc_spec or _NO_CROP, wbc_spec or _NO_CROP)
        timing["roi_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        rbc_res = self.rbc_head.classify(routed.rbc) if self.rbc_head else []
        wbc_res = self.wbc_head.classify(routed.wbc) if self.wbc_head else []
        timing["classify_ms"] = (time.perf_counter() - t) * 1000
        cells = []
        shape = canonical.shape
        for crop, res in [*zip(routed.rbc, rbc_res), *zip(routed.wbc, wbc_res)]:
            kind = KIND_FROM_HEAD_LABEL.get(res.label)
            if kind is None:
                cells.append(_classified(crop.detection, res.label, res.score, shape))
            else:  # the head knows this is not the kind it serves: count it where it belongs
                det = dataclasses.replace(crop.detection, kind=kind)
                cells.append(_classified(det, None, None, shape, detected_as=crop.detection.kind))
        if not self.rbc_head:
            cells += [_classified(c.detection, None, None, shape) for c in routed.rbc]
        if not self.wbc_head:
            cells += [_classified(c.detection, None, None, shape) for c in routed.wbc]
        cells += [_classified(d, None, None, shape) for d in routed.platelets]
        agg = aggregate(cells, self.options.thresholds)
        flags = list(agg.flags)
        if not normalized.applied and self.stain_method != "none":
            flags.append(Flag(code="stain_normalization_skipped", severity="info",
                              message=f"stain normalization not applied: {normalized.reason}"))
        if est.method == "default":
            flags.append(Flag(code="scale_unknown", severity="warning",
                              message=f"scale could not be measured; assumed {est.microns_per_pixel} um/px"))
        factor = resample_factor(est.microns_per_pixel)
        h, w = frame.pixels.shape[:2]
        records = [
            CellRecord(kind=c.detection.kind.value, bbox=input_bbox(c.detection.box, factor, w, h),
                       score=round(c.detection.score, 4), label=c.label,
                       label_score=None if c.label_score is None else round(c.label_score, 4),
                       diameter_um=round(c.diameter_um, 3), area_um2=round(c.area_um2, 3))
            for c in cells
        ]
        timing["total_ms"] = (time.perf_counter() - t_all) * 1000
        report = Report(
            report_id=str(uuid.uuid4()), kind="field", created_at=time.time(), station_id=self.station_id, run_id=run_id,
            source=SourceInfo(frame_id=frame.frame_id, source=frame.source, captured_at=frame.captured_at,
                              image=ImageInfo(width=w, height=h)),
            scale=ScaleInfo(microns_per_pixel=round(est.microns_per_pixel, 5), method=est.method,
                            canonical_microns_per_pixel=CANONICAL_UM_PER_PX),
            stain=StainInfo(method=self.stain_method, applied=normalized.applied, reason=normalized.reason),
            models=self.models, counts=agg.counts, wbc_differential=agg.wbc_differential,
            rbc_morphology=agg.rbc_morphology, rbc_size=agg.rbc_size, ratios=agg.ratios, flags=flags,
            cells=records, timing_ms={k: round(v, 1) for k, v in timing.items()},
        )
        return FieldResult(report, tuple(cells), factor, candidates)


class _NoCrop:
    extent_px = 1
    input_size = 1


_NO_CROP = _NoCrop()  # type: ignore[assignment]


def _touches_frame(d: CellDetection, shape: tuple[int, ...], margin: float = 2.0) -> bool:
    h, w = shape[:2]
    b = d.box
    return b.x0 <= margin or b.y0 <= margin or b.x1 >= w - margin or b.y1 >= h - margin


def input_bbox(box, factor: float, width: int, height: int) -> list[float]:
    """Canonical box -> INPUT image pixels, clipped to the image (resampling rounds its size)."""
    b = box.scaled(1.0 / factor)
    return [round(min(max(b.x0, 0.0), width), 2), round(min(max(b.y0, 0.0), height), 2),
            round(min(max(b.x1, 0.0), width), 2), round(min(max(b.y1, 0.0), height), 2)]


def _classified(d: CellDetection, label: str | None, score: float | None, shape,
                detected_as: CellKind | None = None) -> ClassifiedCell:
    area_px = d.mask_area_px
    area_um2 = area_px * CANONICAL_UM_PER_PX**2
    return ClassifiedCell(detection=d, label=label, label_score=score,
                          diameter_um=2.0 * float(np.sqrt(area_um2 / np.pi)), area_um2=area_um2,
                          touches_frame_edge=_touches_frame(d, shape), detected_as=detected_as)

