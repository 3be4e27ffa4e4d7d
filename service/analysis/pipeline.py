"""The only module that knows the order of the stages.

frame -> scale -> stain -> tiles -> detections -> merge -> ROI filter -> crops -> classes
      -> aggregates -> report
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from smearscope.device.frame import Frame
from smearscope.engines.base import Engine
from smearscope.engines.coalesce import CoalescingEngine
from smearscope.engines.registry import create_engine
from smearscope.service.analysis import stain as stain_stage
from smearscope.service.analysis.aggregate import AggregateThresholds, aggregate, sizes_in_doubt
from smearscope.service.analysis.calibration_check import CalibrationCheck, against_own_scale
from smearscope.service.analysis.classify import CropClassifier
from smearscope.service.analysis.crops import crop_cell
from smearscope.service.analysis.detect_views import ViewSettings, detect_views
from smearscope.service.analysis.field_flags import scale_and_lamp_flags
from smearscope.service.analysis.illumination import (
    Illumination,
    estimate_illumination,
    in_lit_field,
)
from smearscope.service.analysis.kind_twins import (
    CROSS_KIND_MIN_IOU,
    WHITE_PIECE_MIN_IOU,
    drop_kind_twins,
)
from smearscope.service.analysis.morphology import SIZE_BASED, shape_label, shape_probs
from smearscope.service.analysis.nucleated import accepts, dense_interiors
from smearscope.service.analysis.platelet_rescue import PlateletRescue, rescue_platelets
from smearscope.service.analysis.prepare import CanonicalField, Preparation
from smearscope.service.analysis.rbc_focus import MAX_EDGE_WIDTH_UM, measure_rbc_focus
from smearscope.service.analysis.records import (
    KIND_FROM_HEAD_LABEL,
    CellCrop,
    CellDetection,
    CellKind,
    ClassifiedCell,
)
from smearscope.service.analysis.recount_twins import TWIN_MIN_IOU, drop_recounted_twins
from smearscope.service.analysis.report import (
    CellRecord,
    Flag,
    IlluminationInfo,
    ImageInfo,
    ModelInfo,
    RbcFocusInfo,
    Report,
    ScaleInfo,
    SourceInfo,
    StainInfo,
    StationMeansInfo,
    software_version,
)
from smearscope.service.analysis.roi import RoiFilter, route
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    ScaleEstimate,
    first_scale_guess,
    resample_factor,
)
from smearscope.service.analysis.scale_search import (
    Attempt,
    ScaleOutcome,
    find_scale,
    measurable_red_cells,
    whole_red_cells,
)
from smearscope.service.analysis.segment import Segmenter
from smearscope.service.analysis.size_gate import MAX_LYMPHOCYTE_DIAMETER_UM, gate_lymphocyte_size
from smearscope.service.analysis.specimen_scale import replaces
from smearscope.service.analysis.station_means import load_feature_space, load_station_means
from smearscope.service.analysis.view_windows import WINDOW_MARGIN_PX
from smearscope.service.analysis.yolo_decode import YoloSegmenter

logger = logging.getLogger(__name__)

MODEL_FILES = {"segmentation": "seg.json", "rbc_head": "rbc_head.json", "wbc_head": "wbc_head.json"}
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
#: Scale assumed when nothing else is known (a 100x oil objective on a typical camera).
FALLBACK_UM_PER_PX = 0.1
#: Red cells this confident take part in measuring the scale (sizes, not counts, matter here).
SCALE_MIN_SCORE = 0.3
#: White cells this confident count against a searched scale (scale_search.plausible).
SCALE_WBC_MIN_SCORE = 0.5


@dataclass(frozen=True)
class AnalyzerOptions:
    tile_size: int = 256
    tile_overlap: float = 0.15
    #: "auto": each model gets frames normalized the way its training images were (manifest
    #: preprocessing.stain); "macenko" / "vahadane" / "none" force one variant for every model (experiments).
    stain_method: str = "auto"
    #: "auto": as the manifest's preprocessing.illumination; "flatfield" / "none" force it for every model.
    illumination: str = "auto"
    roi: RoiFilter = field(default_factory=RoiFilter)
    detector_conf: float = 0.25
    #: Test-time views of the detector; None = the manifest's (the views its scores are calibrated for).
    detector_views: tuple[str, ...] | None = None
    #: "unsure": the views after the first run only on tiles placed around the cells the first view
    #: was unsure of or cut (service.analysis.tta); "everywhere": every view on the whole frame.
    detector_views_where: Literal["everywhere", "unsure"] = "unsure"
    #: With "unsure": the first view's calibrated scores in [low, high) are unsure.
    detector_unsure_band: tuple[float, float] = (0.2, 0.8)
    #: With "unsure": the kinds whose unsure or cut cells call for the extra views.
    detector_unsure_kinds: tuple[str, ...] = ("rbc", "wbc", "platelet")
    #: With "unsure": the extra views run on small windows around the unsure cells, packed into
    #: tiles (service.analysis.view_windows), where that needs fewer detector inputs than whole tiles.
    detector_view_windows: bool = True
    #: Context (canonical px) kept around an unsure cell in its window.
    detector_window_margin: int = WINDOW_MARGIN_PX
    #: Red-cell detections with a nucleus' density are typed by the WBC head too (service.analysis.nucleated).
    nucleated_recheck: bool = True
    #: Faint platelet detections markedly bluer than the field's red cells are counted by this rule
    #: (service.analysis.platelet_rescue, e.g. PlateletRescue()); None (default): off, its test
    #: figures did not hold up (models/README.md, "Faint platelets confirmed by colour").
    platelet_rescue: PlateletRescue | None = None
    #: A white cell typed lymphocyte wider than this (um) is unidentified and atypical (service.analysis.size_gate); None: off.
    max_lymphocyte_diameter_um: float | None = MAX_LYMPHOCYTE_DIAMETER_UM
    #: A red cell re-counted as a white cell over a detected white cell by this IoU is that cell (service.analysis.recount_twins); None: off.
    recounted_twin_min_iou: float | None = TWIN_MIN_IOU
    #: One object counted as two kinds, or as overlapping white cells, is counted once (service.analysis.kind_twins); None: off.
    kind_twin_min_iou: float | None = CROSS_KIND_MIN_IOU
    white_piece_min_iou: float | None = WHITE_PIECE_MIN_IOU
    #: Red cells whose edge is wider than this (um, service.analysis.rbc_focus) are too blurred to
    #: judge their shape: the field's morphology is not graded (flag rbc_morphology_out_of_focus); None: off.
    rbc_max_edge_width_um: float | None = MAX_EDGE_WIDTH_UM
    wbc_min_confidence: float = 0.5
    rbc_min_confidence: float = 0.3
    #: The station's own, tighter thresholds for the WBC head's open-set tests ((method, threshold)
    #: pairs, e.g. (("mahalanobis", 300.0),)): fitted on its normal specimens by `smearscope
    #: calibrate-atypical`; empty: the manifest's. Looser than the manifest's is refused.
    wbc_open_set_thresholds: tuple[tuple[str, float], ...] = ()
    #: The station's own white-cell class means (`smearscope adapt-wbc`, service.analysis.station_means):
    #: white cells are typed by the nearest of them; None: by the head as trained.
    wbc_station_means: Path | None = None
    #: Keep each white cell's features and the head's own class in its record (adapt-wbc fits on them).
    keep_wbc_features: bool = False
    #: Test-time views of each crop per head; None = the manifest's (the views its temperature is fitted for).
    rbc_views: tuple[str, ...] | None = None
    wbc_views: tuple[str, ...] | None = None
    scale_refine_tolerance: float = 0.05
    thresholds: AggregateThresholds = field(default_factory=AggregateThresholds)

    def __post_init__(self) -> None:
        if self.detector_views_where not in ("everywhere", "unsure"):
            raise ValueError(f"detector_views_where must be 'everywhere' or 'unsure', got {self.detector_views_where!r}")
        low, high = self.detector_unsure_band
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"detector_unsure_band must be (low, high) with 0 <= low < high <= 1, got {self.detector_unsure_band}")


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
    #: The calibration check's verdict where the field was checked (station: calibration_watch).
    calibration_check: CalibrationCheck | None = None


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
        self._prep = {
            "segmentation": self._preparation(getattr(segmenter, "engine", None)),
            "rbc_head": self._preparation(rbc_head.engine if rbc_head else None),
            "wbc_head": self._preparation(wbc_head.engine if wbc_head else None),
        }
        # Each stain stage runs only when some model consumes its output.
        stains = sorted({p.stain for p in self._prep.values()} - {"none"})
        self.normalizers = {m: stain_stage.create_normalizer(m) for m in stains}
        self.stain_method = "+".join(stains) or "none"

    @classmethod
    def from_models_dir(cls, models_dir: Path = DEFAULT_MODELS_DIR, backend: str = "onnxruntime",
                        options: AnalyzerOptions = AnalyzerOptions(), station_id: str | None = None,
                        warmup: bool = True, **engine_options) -> Analyzer:
        engines = {role: create_engine(backend, Path(models_dir) / f, **engine_options) for role, f in MODEL_FILES.items()}
        station_open_set = dict(options.wbc_open_set_thresholds)
        station = None
        try:
            if options.wbc_station_means is not None:
                wbc = engines["wbc_head"].manifest
                space = load_feature_space(wbc, Path(models_dir))
                station = (space, load_station_means(options.wbc_station_means, wbc, space))
            for e in engines.values():
                e.load()
                if warmup:
                    e.warmup()
            heads = (CropClassifier(engines["rbc_head"], options.rbc_min_confidence, views=options.rbc_views),
                     CropClassifier(engines["wbc_head"], options.wbc_min_confidence, views=options.wbc_views,
                                    open_set_thresholds=station_open_set, station=station,
                                    keep_features=options.keep_wbc_features))
        except BaseException:
            for e in engines.values():
                e.close()
            raise
        models = {role: ModelInfo(name=e.manifest.name, sha256=e.manifest.sha256, backend=e.backend_name,
                                  manifest_sha256=e.manifest.runtime_sha256(), classes=list(e.manifest.classes))
                  for role, e in engines.items()}
        if station_open_set:
            models["wbc_head"] = models["wbc_head"].model_copy(update={"open_set_thresholds": station_open_set})
        if station is not None:
            sm = station[1]
            models["wbc_head"] = models["wbc_head"].model_copy(update={"station_means": StationMeansInfo(
                sha256=sm.file_sha256, cells=dict(sm.cells), leave_one_out_accuracy=round(sm.loo_accuracy, 4),
                head_accuracy=round(sm.head_accuracy, 4), fitted=sm.fitted, open_set_thresholds=dict(sm.thresholds))})
        analyzer = cls(
            YoloSegmenter(engines["segmentation"], conf_threshold=options.detector_conf, views=options.detector_views,
                          platelet_conf_threshold=None if options.platelet_rescue is None
                          else min(options.detector_conf, options.platelet_rescue.min_score)),
            *heads, options, models, station_id,
        )
        analyzer._engines = list(engines.values())
        return analyzer

    def batch_across_fields(self, peers: Callable[[], int], max_delay_s: float) -> None:
        """Let analyses on other threads share engine batches with this one's (engines.coalesce):
        a station analysing several fields at once calls this once, with how many OTHER fields
        are being analysed at a given moment. Results do not change."""
        for holder in (self.segmenter, self.rbc_head, self.wbc_head):
            engine = getattr(holder, "engine", None)
            if engine is not None and not isinstance(engine, CoalescingEngine):
                holder.engine = CoalescingEngine(engine, max_delay_s, peers)

    def _preparation(self, engine: Engine | None) -> Preparation:
        """Which frame a model gets: forced by options, else as its training images were."""
        pre = engine.manifest.preprocessing if engine is not None else None
        o = self.options
        return Preparation(
            illumination=o.illumination if o.illumination != "auto" else (pre.illumination if pre else "none"),
            stain=o.stain_method if o.stain_method != "auto" else (pre.stain if pre else "none"))

    def _model_engines(self) -> list[Engine]:
        found = [getattr(self.segmenter, "engine", None)]
        found += [h.engine for h in (self.rbc_head, self.wbc_head) if h is not None]
        return [e for e in found if e is not None]

    def close(self) -> None:
        for e in self._engines:
            e.close()

    # -- stages -------------------------------------------------------------------------------
    def _detect(self, canonical: np.ndarray, views: tuple[str, ...] | None = None) -> list[CellDetection]:
        """The frame's cells in the detector's views (the manifest's unless given), merged and fused
        (service.analysis.detect_views)."""
        o = self.options
        return detect_views(self.segmenter, canonical, self.segmenter.views if views is None else views,
                            ViewSettings(o.tile_size, o.tile_overlap, o.detector_views_where, o.detector_unsure_band,
                                         o.detector_unsure_kinds, o.detector_view_windows, o.detector_window_margin))

    def _detect_at(self, frame: Frame, mpp: float, illumination: Illumination, timing: dict[str, float],
                   quick: bool = False) -> Attempt:
        """Resample to canonical assuming `mpp`, prepare, detect; also the whole, confident RBCs.

        A quick pass (a scale guess or search: only red cells, and the white cells that tell a
        scale is not blood, are counted) runs the detector's first view alone."""
        field_ = CanonicalField(frame.pixels, mpp, illumination, self.normalizers, timing)
        seg_frame = field_.pixels(self._prep["segmentation"])
        t = time.perf_counter()
        dets = self._detect(seg_frame, self.segmenter.views[:1] if quick else None)
        timing["detect_ms"] = timing.get("detect_ms", 0.0) + (time.perf_counter() - t) * 1000
        h, w = field_.shape[:2]
        return Attempt(mpp, whole_red_cells(dets, w, h, SCALE_MIN_SCORE), (field_, dets), quick,
                       measured=measurable_red_cells(dets, w, h, SCALE_MIN_SCORE),
                       n_wbc=sum(d.kind is CellKind.WBC and d.score >= SCALE_WBC_MIN_SCORE for d in dets))

    def _scale_and_detect(self, frame: Frame, timing: dict[str, float], specimen_scale: float | None = None,
                          check_calibration: bool = False) -> tuple[ScaleOutcome, Illumination, float | None,
                                                                    CalibrationCheck | None]:
        """Measure the lamp, find the scale (given, or from the red cells) and detect at it; where
        the field's own estimate gives way to its specimen's scale (service.analysis.specimen_scale),
        detect again at that one. Also returns the field's own estimate when it was replaced, and
        with `check_calibration` a given scale's check against the field's own estimate
        (service.analysis.calibration_check)."""
        t = time.perf_counter()
        illumination = estimate_illumination(frame.pixels)
        timing["illumination_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        guess = lambda: first_scale_guess(frame.pixels, illumination) or ScaleEstimate(FALLBACK_UM_PER_PX, "default")
        first = ScaleEstimate(frame.microns_per_pixel, "given") if frame.microns_per_pixel else guess()
        timing["scale_ms"] = (time.perf_counter() - t) * 1000
        h, w = frame.pixels.shape[:2]
        detect_at = lambda mpp, quick: self._detect_at(frame, mpp, illumination, timing, quick)
        outcome = find_scale(detect_at, first, h * w, self.options.scale_refine_tolerance)
        own = outcome.estimate
        if first.method == "given":
            if not check_calibration:
                return outcome, illumination, None, None
            t = time.perf_counter()  # the check's passes are timed apart
            check = against_own_scale(frame.pixels, illumination, outcome, guess(), lambda mpp, quick: self._detect_at(
                frame, mpp, illumination, {}, quick), self.options.scale_refine_tolerance)
            timing["calibration_check_ms"] = (time.perf_counter() - t) * 1000
            return outcome, illumination, None, check
        if not replaces(own.microns_per_pixel, own.method, specimen_scale):
            return outcome, illumination, None, None
        assert specimen_scale is not None
        at = detect_at(specimen_scale, False)
        return (ScaleOutcome(ScaleEstimate(specimen_scale, "specimen", len(at.whole_rbc)), at, uncertain=False),
                illumination, None if own.method == "default" else own.microns_per_pixel, None)

    def calibration_check(self, frame: Frame) -> CalibrationCheck | None:
        """The calibration check alone (the detector's passes, no heads, no report); None for a
        frame without a given scale."""
        return self._scale_and_detect(frame, {}, None, True)[3] if frame.microns_per_pixel else None

    def analyze(self, frame: Frame, run_id: str | None = None, specimen_scale: float | None = None,
                check_calibration: bool = False) -> FieldResult:
        """One field. `specimen_scale`: the scale (um/px of the input) the field's specimen agrees
        on so far (service.analysis.specimen_scale); used only when the frame's scale is not
        given and the field's own estimate is far from it. `check_calibration`: a given scale is
        checked against the field's own estimate (flag `calibration_suspect`; a scale search's
        cost: a station does it on a run's first fields)."""
        timing: dict[str, float] = {}
        t_all = time.perf_counter()
        outcome, illumination, own_scale, check = self._scale_and_detect(frame, timing, specimen_scale,
                                                                         check_calibration)
        if check is not None:
            own_scale = check.own_mpp
        est = outcome.estimate
        field_, dets = outcome.attempt.payload
        t = time.perf_counter()
        rule = self.options.platelet_rescue
        if rule is not None:  # the colour is read on the lamp-corrected frame, whatever the models take
            dets = rescue_platelets(dets, field_.pixels(LAMP_CORRECTED) if illumination.applied else None,
                                    self.options.roi, self.options.detector_conf, rule)
        kept = self.options.roi.apply(dets)
        if illumination.applied:  # none in a field stop's dark surround or dim edge
            kept = [d for d, lit in zip(kept, in_lit_field(field_.pixels(LAMP_CORRECTED), [d.box for d in kept])) if lit]
        candidates = tuple(self.options.roi.below_confidence(dets))
        rbc_spec = self.rbc_head.crop_spec if self.rbc_head else None
        wbc_spec = self.wbc_head.crop_spec if self.wbc_head else None
        rbc_frame = field_.pixels(self._prep["rbc_head"])
        wbc_frame = field_.pixels(self._prep["wbc_head"])
        routed = route(rbc_frame, wbc_frame, kept, rbc_spec or _NO_CROP, wbc_spec or _NO_CROP)
        # Red-cell detections with a nucleus' density are typed by the WBC head too (stage 7b).
        lamp_corrected = illumination.applied and self._prep["wbc_head"].illumination == "flatfield"
        recheck = (dense_interiors(wbc_frame, routed.rbc)
                   if self.wbc_head and self.options.nucleated_recheck and lamp_corrected else [])
        second = [CellCrop(routed.rbc[i].detection, crop_cell(wbc_frame, routed.rbc[i].detection.box.center, wbc_spec))
                  for i in recheck]
        timing["roi_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        rbc_res = self.rbc_head.classify(routed.rbc) if self.rbc_head else []
        wbc_res = self.wbc_head.classify(routed.wbc + second) if self.wbc_head else []
        timing["classify_ms"] = (time.perf_counter() - t) * 1000
        # red-cell index -> (its crop as a white cell, the WBC head's result), where the head's type stands
        nucleated = {i: (c, r) for i, c, r in zip(recheck, second, wbc_res[len(routed.wbc):])
                     if accepts(r, c.detection, self.options.max_lymphocyte_diameter_um)}
        # (crop, head result, the kind a re-counted red-cell detection takes unless the label says otherwise)
        results = [*((c, r, None) for i, (c, r) in enumerate(zip(routed.rbc, rbc_res)) if i not in nucleated),
                   *((c, r, None) for c, r in zip(routed.wbc, wbc_res)),
                   *((c, r, CellKind.WBC) for c, r in nucleated.values())]
        cells = []
        shape = field_.shape
        calibrated = est.method == "given"
        rbc_classes = self.rbc_head.classes if self.rbc_head else []
        for crop, res, recounted_as in results:
            kind = KIND_FROM_HEAD_LABEL.get(res.label, recounted_as)
            if kind is None:
                label, unassessed = res.label, None
                sized = calibrated and not _touches_frame(crop.detection, shape)  # a whole cell's micrometres
                if crop.detection.kind is CellKind.RBC and not sized and res.label in SIZE_BASED and res.probs:
                    # size calls rest on micrometres this field only estimated, or of a cell the frame cuts: keep the shape
                    label, unassessed = shape_label(rbc_classes, np.array(res.probs)), res.label
                score = shape_probs(rbc_classes, np.array(res.probs))[label] if unassessed else res.score
                cells.append(_classified(crop.detection, label, score, shape, atypical=res.atypical,
                                         size_calibrated=calibrated, unassessed_label=unassessed,
                                         open_set_scores=res.open_set_scores, head_features=res.head_features))
            else:  # the head knows this is not the kind it serves: count it where it belongs
                det = dataclasses.replace(crop.detection, kind=kind)
                label = res.label if kind in (CellKind.NRBC, CellKind.WBC) else None
                cells.append(_classified(det, label, res.score if label else None, shape,
                                         detected_as=crop.detection.kind, size_calibrated=calibrated,
                                         open_set_scores=res.open_set_scores, head_features=res.head_features))
        if not self.rbc_head:
            cells += [_classified(c.detection, None, None, shape, size_calibrated=calibrated)
                      for i, c in enumerate(routed.rbc) if i not in nucleated]
        if not self.wbc_head:
            cells += [_classified(c.detection, None, None, shape, size_calibrated=calibrated) for c in routed.wbc]
        cells += [_classified(d, None, None, shape, size_calibrated=calibrated) for d in routed.platelets]
        cells = drop_kind_twins(drop_recounted_twins(cells, self.options.recounted_twin_min_iou),
                                self.options.kind_twin_min_iou, self.options.white_piece_min_iou)
        cells = gate_lymphocyte_size(cells, self.options.max_lymphocyte_diameter_um)
        t = time.perf_counter()
        focus, bound = measure_rbc_focus(field_.pixels(LAMP_CORRECTED), kept), self.options.rbc_max_edge_width_um
        blurred = bound is not None and focus.out_of_focus(bound)
        if blurred:  # counted, their shape not judged
            cells = [dataclasses.replace(c, shape_judged=False) if c.detection.kind is CellKind.RBC else c for c in cells]
        timing["rbc_focus_ms"] = (time.perf_counter() - t) * 1000
        agg = aggregate(cells, self.options.thresholds, self.models)
        flags = list(agg.flags) + ([focus.flag(bound)] if bound is not None and blurred else [])
        skipped = [f"{m}: {r.reason}" for m, r in field_.stain_results.items() if not r.applied]
        if skipped:
            flags.append(Flag(code="stain_normalization_skipped", severity="info",
                              message=f"stain normalization not applied ({'; '.join(skipped)})"))
        flags += scale_and_lamp_flags(est, outcome, illumination, own_scale)
        suspect = check.flag() if check is not None else None
        flags += [suspect] if suspect is not None else []
        factor = resample_factor(est.microns_per_pixel)
        h, w = frame.pixels.shape[:2]
        records = [
            CellRecord(kind=c.detection.kind.value, bbox=input_bbox(c.detection.box, factor, w, h),
                       score=round(c.detection.score, 4), label=c.label,
                       label_score=None if c.label_score is None else round(c.label_score, 4),
                       diameter_um=round(c.diameter_um, 3), area_um2=round(c.area_um2, 3), atypical=c.atypical,
                       unassessed_label=c.unassessed_label)
            for c in cells
        ]
        timing["total_ms"] = (time.perf_counter() - t_all) * 1000
        report = Report(
            report_id=str(uuid.uuid4()), kind="field", created_at=time.time(), station_id=self.station_id, run_id=run_id,
            software_version=software_version(),
            source=SourceInfo(frame_id=frame.frame_id, source=frame.source, captured_at=frame.captured_at,
                              image=ImageInfo(width=w, height=h)),
            scale=ScaleInfo(microns_per_pixel=round(est.microns_per_pixel, 5), method=est.method,
                            canonical_microns_per_pixel=CANONICAL_UM_PER_PX, uncertain=outcome.uncertain,
                            rbc_count=est.rbc_count,
                            field_estimate_microns_per_pixel=None if own_scale is None else round(own_scale, 5)),
            illumination=IlluminationInfo(applied=illumination.applied, white_bgr=list(illumination.white_bgr),
                                          uniformity=illumination.uniformity, greyscale=illumination.greyscale,
                                          reason=illumination.reason),
            stain=StainInfo(method=self.stain_method,
                            applied=bool(field_.stain_results) and all(r.applied for r in field_.stain_results.values()),
                            reason="; ".join(skipped) or None),
            rbc_focus=RbcFocusInfo(edge_width_um=focus.edge_width_um, cells=focus.cells, max_edge_width_um=bound,
                                   judged=not blurred),
            models=self.models, counts=agg.counts, wbc_differential=agg.wbc_differential,
            rbc_morphology=sizes_in_doubt(agg.rbc_morphology, flags), rbc_size=agg.rbc_size,
            nrbc_per_100_wbc=agg.nrbc_per_100_wbc, ratios=agg.ratios, flags=flags, review=agg.review,
            cells=records, timing_ms={k: round(v, 1) for k, v in timing.items()},
        )
        return FieldResult(report, tuple(cells), factor, candidates, check)


class _NoCrop:
    extent_px = 1
    input_size = 1


_NO_CROP = _NoCrop()  # type: ignore[assignment]
#: The frame with its lamp divided out and nothing else (service.analysis.prepare caches it).
LAMP_CORRECTED = Preparation("flatfield", "none")


def _touches_frame(d: CellDetection, shape: tuple[int, ...], margin: float = 2.0) -> bool:
    h, w = shape[:2]
    b = d.box
    return b.x0 <= margin or b.y0 <= margin or b.x1 >= w - margin or b.y1 >= h - margin


def input_bbox(box, factor: float, width: int, height: int) -> list[float]:
    """Canonical box -> INPUT image pixels, clipped to the image (resampling rounds its size)."""
    s = 1.0 / factor  # the arithmetic of box.scaled(s), without making a Box
    return [round(min(max(box.x0 * s, 0.0), width), 2), round(min(max(box.y0 * s, 0.0), height), 2),
            round(min(max(box.x1 * s, 0.0), width), 2), round(min(max(box.y1 * s, 0.0), height), 2)]


def _classified(d: CellDetection, label: str | None, score: float | None, shape,
                detected_as: CellKind | None = None, **extra) -> ClassifiedCell:
    area_um2 = d.mask_area_px * CANONICAL_UM_PER_PX**2
    # label_score as its record shows it (4 decimals): the flags' rules read what a restored run reads
    return ClassifiedCell(detection=d, label=label, label_score=None if score is None else round(score, 4),
                          diameter_um=d.diameter_px * CANONICAL_UM_PER_PX, area_um2=area_um2,
                          touches_frame_edge=_touches_frame(d, shape), detected_as=detected_as, **extra)

