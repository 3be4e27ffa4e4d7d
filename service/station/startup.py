"""Starting a station: the error that stops it, and the production analyzer factory.

`StartupError` names the config field at fault (exit 78: restarting cannot help) or none (an
operational failure, exit 1). `build_analyzer` loads and warms the engines from
`analysis.models_dir`; tests hand the daemon another `AnalyzerFactory`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from smearscope.device.frame import Frame
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.config import EXIT_CONFIG, StationConfig

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1


class AnalyzerLike(Protocol):
    def analyze(self, frame: Frame, run_id: str | None = None, specimen_scale: float | None = None,
                check_calibration: bool = False) -> FieldResult: ...


AnalyzerFactory = Callable[[StationConfig], AnalyzerLike]


class StartupError(Exception):
    """The daemon cannot start; `field` names the config field at fault (exit 78) or is None."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if self.field else EXIT_FAILURE


def station_open_set(analysis) -> tuple[tuple[str, float], ...]:
    """`[analysis.wbc_open_set]` as (method, threshold) pairs, empty when unset; StartupError when it
    was fitted for another WBC head than the one in `analysis.models_dir`. Whether each threshold
    fits the head (a test it has, not looser) is `classify.station_thresholds`' to say."""
    section = analysis.wbc_open_set
    if section is None:
        return ()
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES

    try:
        head_sha = load_manifest(analysis.models_dir / MODEL_FILES["wbc_head"]).sha256
    except ManifestError as exc:
        raise StartupError("analysis.models_dir", str(exc)) from exc
    if head_sha != section.model_sha256:
        raise StartupError("analysis.wbc_open_set", f"fitted for WBC head {section.model_sha256[:12]}, but "
                           f"{analysis.models_dir} holds {head_sha[:12]}: run smearscope calibrate-atypical again "
                           "with this head, or remove the section")
    means_sha = None
    if analysis.wbc_station_means is not None:
        from smearscope.engines.manifest import sha256_file

        try:
            means_sha = sha256_file(analysis.wbc_station_means)
        except OSError as exc:
            raise StartupError("analysis.wbc_station_means", f"{analysis.wbc_station_means}: {exc}") from exc
    if means_sha != section.station_means_sha256:
        had = (f"with station means {section.station_means_sha256[:12]}" if section.station_means_sha256
               else "without station means")
        now = f"the config's wbc_station_means is {means_sha[:12]}" if means_sha else "the config has none"
        raise StartupError("analysis.wbc_open_set", f"fitted {had}, but {now}: the open-set scores move with the "
                           "means; run smearscope calibrate-atypical again, or remove the section")
    return tuple(section.thresholds.items())


def wbc_head_and_means(analysis):
    """The WBC head's manifest in `analysis.models_dir` and the station means the config names
    (None when it names none); None when the manifest cannot be read (the model checks say why).
    StationMeansError for a means file this head, in the configured views, cannot use."""
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES
    from smearscope.service.analysis.station_means import (
        check_means_views,
        load_feature_space,
        load_station_means,
    )
    from smearscope.service.analysis.tta import check_views

    try:
        head = load_manifest(analysis.models_dir / MODEL_FILES["wbc_head"], verify_hash=False)
    except (ManifestError, OSError, ValueError):
        return None
    if analysis.wbc_station_means is None:
        return head, None
    means = load_station_means(analysis.wbc_station_means, head, load_feature_space(head, analysis.models_dir))
    # in the views the analyzer will run the head in, as it checks them at start
    check_means_views(means, check_views(head.tta if analysis.wbc_head_views is None else analysis.wbc_head_views))
    return head, means


def open_set_verdict(analysis) -> tuple[bool, str] | None:
    """Whether the WBC head's open-set thresholds the station would run with fit, and what they
    are or why not: the station's section (fitted for this head and these station means, never
    looser) or the model's, widened by the station means where the config names them (what
    `smearscope doctor` and `validate-config` say). None when the head or the means cannot be read
    (their own checks say why)."""
    from smearscope.service.analysis.classify import (
        OpenSetThresholdError,
        station_thresholds,
        with_station_means,
    )
    from smearscope.service.analysis.station_means import StationMeansError

    try:
        loaded = wbc_head_and_means(analysis)
    except StationMeansError:
        return None
    if loaded is None:
        return None
    head, means = loaded
    tests, whose = list(head.open_set), "the model's"
    if means is not None:
        tests, whose = with_station_means(tests, means.thresholds), "the model's with the station means"
    model = {t.method: t.threshold for t in tests}
    section = analysis.wbc_open_set
    if section is None:
        text = ", ".join(f"{m} {v:g}" for m, v in model.items()) or "none"
        return True, (f"{whose} thresholds ({text}); a station can tighten them on its own normal specimens: "
                      "smearscope calibrate-atypical")
    try:
        station_thresholds(head.name, tests, dict(station_open_set(analysis)))
    except StartupError as exc:
        return False, exc.reason
    except OpenSetThresholdError as exc:
        return False, str(exc)
    text = ", ".join(f"{m} {v:g} ({whose} {model[m]:g})" for m, v in section.thresholds.items())
    return True, f"the station's thresholds {text}; {section.fitted or 'fitted: not recorded'}"


def models_problem(models_dir: Path, verify: bool = False, setting: str = "analysis.models_dir") -> str | None:
    """What the models folder lacks for a station to start (None: nothing); with `verify`, as the
    engines load them too: each manifest read and its model file's sha256 checked. `setting`: what
    named the folder (a command's --models), for the fix to say which to change."""
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES

    install = f"smearscope install-models {models_dir}"
    missing = [f for f in MODEL_FILES.values() if not (models_dir / f).is_file()]
    if missing:
        return (f"{models_dir} has no {', '.join(missing)}; install the models that come with smearscope there "
                f"({install}) or point {setting} at a folder that has them")
    for name in MODEL_FILES.values() if verify else ():
        try:
            load_manifest(models_dir / name, verify_hash=True)
        except ManifestError as exc:
            return f"{exc}; install them again: {install}"
    return None


def build_analyzer(config: StationConfig, keep_wbc_features: bool = False) -> AnalyzerLike:
    """The production analyzer: engines from `analysis.models_dir`, loaded and warmed up
    (`keep_wbc_features`: white cells' features kept in their records, for smearscope adapt-wbc)."""
    from smearscope.engines.base import EngineError
    from smearscope.engines.manifest import ManifestError
    from smearscope.service.analysis.aggregate import AggregateThresholds
    from smearscope.service.analysis.classify import OpenSetThresholdError
    from smearscope.service.analysis.kind_twins import CROSS_KIND_MIN_IOU, WHITE_PIECE_MIN_IOU
    from smearscope.service.analysis.pipeline import MODEL_FILES, Analyzer, AnalyzerOptions
    from smearscope.service.analysis.platelet_rescue import PlateletRescue
    from smearscope.service.analysis.recount_twins import TWIN_MIN_IOU
    from smearscope.service.analysis.roi import RoiFilter
    from smearscope.service.analysis.station_means import StationMeansError, means_scale_problem

    a = config.analysis
    if (problem := models_problem(a.models_dir)) is not None:
        raise StartupError("analysis.models_dir", problem)
    open_set = station_open_set(a)
    if not keep_wbc_features and config.review.enabled and config.review.typing:
        # technicians type white cells in the gallery: their features are kept where the head has them
        from smearscope.engines.manifest import load_manifest

        try:
            keep_wbc_features = load_manifest(a.models_dir / MODEL_FILES["wbc_head"]).feature_space is not None
        except (ManifestError, OSError):
            pass  # the engines' own loading below reports it
    options = AnalyzerOptions(
        tile_size=a.tile_size, tile_overlap=a.tile_overlap, stain_method=a.stain_normalization,
        detector_views=None if a.detector_views is None else tuple(a.detector_views),
        detector_views_where=a.detector_views_where, detector_unsure_band=tuple(a.detector_unsure_band),
        detector_view_windows=a.detector_view_windows,
        nucleated_recheck=a.nucleated_recheck, platelet_rescue=PlateletRescue() if a.platelet_rescue else None,
        max_lymphocyte_diameter_um=a.max_lymphocyte_diameter_um,
        rbc_max_edge_width_um=None if math.isinf(a.rbc_max_edge_width_um) else a.rbc_max_edge_width_um,
        recounted_twin_min_iou=TWIN_MIN_IOU if a.count_recounted_twins_once else None,
        kind_twin_min_iou=CROSS_KIND_MIN_IOU if a.count_kind_twins_once else None,
        white_piece_min_iou=WHITE_PIECE_MIN_IOU if a.count_kind_twins_once else None,
        rbc_views=None if a.rbc_head_views is None else tuple(a.rbc_head_views),
        wbc_views=None if a.wbc_head_views is None else tuple(a.wbc_head_views),
        wbc_open_set_thresholds=open_set, wbc_station_means=a.wbc_station_means, keep_wbc_features=keep_wbc_features,
        roi=RoiFilter(min_confidence=a.min_confidence, min_area_um2=a.min_area_um2,
                      max_aspect=a.max_aspect_ratio, platelet_min_confidence=a.platelet_min_confidence,
                      red_cell_min_confidence=a.red_cell_min_confidence),
        thresholds=AggregateThresholds(**config.flags.model_dump()),
    )
    engine_options: dict = {"intra_op_threads": a.onnxruntime_threads, "spin": a.onnxruntime_spin,
                            "sessions": a.onnxruntime_sessions}
    if a.engine_backend == "tensorrt":
        engine_options = {"precision": a.tensorrt_precision, "lanes": a.tensorrt_lanes, "cuda": a.cuda_api}
    try:
        analyzer = Analyzer.from_models_dir(a.models_dir, backend=a.engine_backend, options=options,
                                            station_id=config.station_id, **engine_options)
    except OpenSetThresholdError as exc:
        raise StartupError("analysis.wbc_open_set", str(exc)) from exc
    except StationMeansError as exc:
        raise StartupError("analysis.wbc_station_means", f"{exc.code}: {exc.message}") from exc
    except (EngineError, ManifestError) as exc:
        raise StartupError("analysis.models_dir", str(exc)) from exc
    station = analyzer.wbc_head.station if analyzer.wbc_head is not None else None
    if station is not None and (problem := means_scale_problem(station[1], config.microns_per_pixel)):
        logger.warning("analysis.wbc_station_means: %s", problem)  # used, as doctor says: flagged, not refused
    return analyzer
