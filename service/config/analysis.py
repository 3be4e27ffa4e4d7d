"""`[analysis]`: how each accepted frame is analysed (scale, tiling, filters, views, engine)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from smearscope.device.config_fields import SCALE_RANGE_UM, ConfigPath
from smearscope.engines.manifest import TestTimeView
from smearscope.service.config.base import StationBaseModel

logger = logging.getLogger(__name__)


class WbcOpenSetConfig(StationBaseModel):
    """The station's own open-set thresholds for the WBC head (`smearscope calibrate-atypical`)."""

    thresholds: dict[Literal["mahalanobis", "energy"], float] = Field(
        title="Thresholds",
        description="Per open-set test of the WBC head's manifest, the station's threshold: a white cell "
        "scoring above it is unidentified and atypical (sent to review). Fitted on the station's own normal "
        "specimens; each must be at or below the model's own threshold (a station may tighten, never loosen).",
        min_length=1,
    )
    model_sha256: str = Field(
        title="WBC head they were fitted for",
        description="sha256 of the WBC head (its manifest's) the thresholds were fitted with: another model's "
        "scores are on another scale, so the station refuses to start with a different head.",
        pattern=r"^[0-9a-f]{64}$",
    )
    fitted: str = Field(
        default="",
        title="How they were fitted",
        description="Free text written by calibrate-atypical: when, on how many white cells, the review budget.",
    )
    station_means_sha256: str | None = Field(
        default=None,
        title="Station means they were fitted with",
        description="sha256 of the wbc_station_means file in place when the thresholds were fitted (written by "
        "calibrate-atypical); the station refuses to start when the means in the config are other ones (the "
        "scores move with the means). Unset: fitted without station means.",
        pattern=r"^[0-9a-f]{64}$",
    )


class AnalysisConfig(StationBaseModel):
    """How each accepted frame is analyzed."""

    microns_per_pixel: float | None = Field(
        default=None,
        title="Scale override (um/px)",
        description="Overrides the source's scale for every frame (0.01 to 2); unset uses the source's "
        "value, or estimates it from red-cell size when the source has none.",
        ge=SCALE_RANGE_UM[0],
        le=SCALE_RANGE_UM[1],
        allow_inf_nan=False,
    )
    tile_size: int = Field(
        default=256,
        title="Tile size (px)",
        description="Side of the square tiles the canonical-scale frame is cut into "
        "(multiple of 32).",
        ge=64,
        le=2048,
    )
    tile_overlap: float = Field(
        default=0.15,
        title="Tile overlap",
        description="Fraction of a tile shared with its neighbour, so cells on a cut are seen "
        "whole.",
        ge=0.0,
        lt=0.5,
    )
    min_confidence: float = Field(
        default=0.35,
        title="Minimum confidence",
        description="White cells (and any kind without its own threshold) are counted from this "
        "calibrated score (chosen on validation by the worst lab's white cells found, "
        "models/README.md); detections below it are not counted.",
        ge=0.0,
        le=1.0,
    )
    platelet_min_confidence: float | None = Field(
        default=0.35,
        title="Platelet minimum confidence",
        description="Platelets are counted from this score (small and faint, the detector scores them "
        "lower than cells; chosen on validation, models/README.md); set it to min_confidence to "
        "count them like the white cells.",
        ge=0.0,
        le=1.0,
    )
    red_cell_min_confidence: float | None = Field(
        default=0.35,
        title="Red-cell minimum confidence",
        description="Red cells are counted from this score (chosen on validation, models/README.md: "
        "from 0.5 the fully annotated labs' red cells were under-counted by 10 to 20 %); set it to "
        "min_confidence to count them like the white cells.",
        ge=0.0,
        le=1.0,
    )
    min_area_um2: float = Field(
        default=2.0,
        title="Minimum area (um^2)",
        description="Detections smaller than this are discarded as debris.",
        ge=0.0,
    )
    max_aspect_ratio: float = Field(
        default=5.0,
        title="Maximum aspect ratio",
        description="Detections more elongated than this are discarded as artefacts.",
        ge=1.0,
    )
    detector_views: list[TestTimeView] | None = Field(
        default=None,
        title="Detector test-time views",
        description="Views of each frame the detector runs and fuses; unset uses the detector "
        "manifest's views, the ones its scores are calibrated for. ['identity'] detects about 3x "
        "faster on a throughput-bound device, but the scores then read higher than calibrated.",
        min_length=1,
    )
    detector_views_where: Literal["everywhere", "unsure"] = Field(
        default="unsure",
        title="Where the detector's extra views run",
        description="'unsure' (default): the first view runs everywhere and the others only on tiles "
        "placed around the cells the first view was unsure of (calibrated score within "
        "detector_unsure_band) or that a tile border cut; on the lab table every lab's figure stays "
        "within 0.005 of 'everywhere', where each view runs on the whole frame.",
    )
    detector_unsure_band: tuple[float, float] = Field(
        default=(0.2, 0.8),
        title="Unsure band of the detector's first view",
        description="With detector_views_where = 'unsure': the first view's calibrated scores in "
        "[low, high) send the tiles around that cell through the other views.",
    )
    detector_view_windows: bool = Field(
        default=True,
        title="Extra views on packed windows",
        description="With detector_views_where = 'unsure': the other views run on small windows "
        "around the unsure cells (48 px of context at 0.2 um/px), packed into the detector's tiles, "
        "where that needs fewer detector inputs than whole tiles around them; false: whole tiles "
        "(both measured on the validation lab table, models/README.md).",
    )
    nucleated_recheck: bool = Field(
        default=True,
        title="Second opinion on red cells with a nucleus",
        description="Red-cell detections whose interior absorbs at least 1.8x the field's median red "
        "cell's red light are typed by the WBC head too, and counted as the white cell (or nucleated red "
        "cell) it confidently types them as, where their size allows that type (granulocytes and "
        "monocytes from 8.8 um up): a pale camera's small lymphocytes look like red cells to the "
        "detector. Needs the lamp correction. Off: every red-cell detection stays a red cell.",
    )
    platelet_rescue: bool = Field(
        default=False,
        title="Faint platelets confirmed by their colour",
        description="A platelet detection the detector scored from 0.05 to under platelet_min_confidence "
        "that overlaps no counted cell, lies in no counted white cell and is at least 30 grey levels "
        "bluer (blue minus red) than the field's red cells on the lamp-corrected frame is counted, with "
        "the score 0.69 (such platelets' precision on validation; none when platelet_min_confidence is "
        "above it). Needs a field whose lamp can be measured. It raises platelet recall on validation "
        "(BCCD 0.80 to 0.89) at some precision; on test its mAP50 moved by -0.003 to +0.020 per lab, so "
        "it is off by default (models/README.md). Off: platelets are counted from the detector's score alone.",
    )
    max_lymphocyte_diameter_um: float | None = Field(
        default=15.0,
        title="Largest lymphocyte",
        description="A white cell typed lymphocyte wider than this (micrometres, from its outline) is "
        "reported unidentified and atypical, for review: the WBC head has no blast class and types "
        "blasts it never saw mostly as lymphocytes, which are smaller (no validation lymphocyte "
        "exceeded 14.8 um). inf turns the gate off.",
        gt=0,
    )
    rbc_max_edge_width_um: float = Field(
        default=1.4,
        title="Widest red-cell edge for morphology",
        description="A field whose whole red cells' edge (median; contrast against the glass over the steepest "
        "gradient across the outline, at the canonical 0.2 um/px; about 1 um in focus) is wider than this "
        "(micrometres) has red cells too blurred to judge their shape: its red-cell morphology rows are not "
        "assessable (no grade, count kept) with the warning rbc_morphology_out_of_focus, its red cells still "
        "counted; a specimen grades morphology on its other fields. The frame quality gate passes fields "
        "focused on the white cells. Chosen on validation (models/README.md); inf turns the judgement off "
        "(the edge width is still measured and reported).",
        gt=0,
    )
    count_recounted_twins_once: bool = Field(
        default=True,
        title="A re-counted red cell on a detected white cell is that white cell",
        description="The detector can give one object both as a white cell and as a red cell; the "
        "nucleated recheck then re-counts the red-cell twin as a white cell, and the white cell is "
        "counted and typed twice. On: such a re-counted red-cell detection whose box overlaps a white "
        "cell the detector found by IoU 0.5 or more is dropped (the detector's white cell stays). On the "
        "validation fields the twins overlapped by 0.92 to 0.97, distinct white cells by 0.05 at most "
        "(models/README.md). Off: both are counted.",
    )
    count_kind_twins_once: bool = Field(
        default=True,
        title="A platelet on a cell's outline, or a white cell in pieces, is counted once",
        description="The detector merges its detections per kind, so one object can be counted as a platelet "
        "on a cell's whole outline or as overlapping pieces of one white cell. On: a platelet whose box "
        "overlaps a red or white cell's by IoU 0.5 or more is dropped (the cell instead, where its detector "
        "score is under a quarter of the platelet's: only with thresholds far below the default); of two "
        "counted white cells overlapping "
        "by IoU 0.3 or more the lower detector score is dropped. On the validation fields distinct platelets "
        "and cells overlapped by 0.28 at most, distinct white cells by 0.17 (models/README.md). Off: both are "
        "counted.",
    )
    rbc_head_views: list[TestTimeView] | None = Field(
        default=None,
        title="RBC head test-time views",
        description="Views of each red-cell crop the RBC head classifies and averages; unset uses the "
        "head manifest's views, the ones its temperature is fitted for. ['identity'] classifies red "
        "cells faster (one run per crop instead of one per view), less accurately, with confidences "
        "off their calibration.",
        min_length=1,
    )
    wbc_head_views: list[TestTimeView] | None = Field(
        default=None,
        title="WBC head test-time views",
        description="As rbc_head_views, for the WBC head's crops.",
        min_length=1,
    )
    wbc_open_set: WbcOpenSetConfig | None = Field(
        default=None,
        title="Station open-set thresholds",
        description="The WBC head's open-set thresholds fitted on this station's normal specimens "
        "(`smearscope calibrate-atypical` prints the section); unset: the model's own, the largest "
        "any training lab needed.",
    )
    wbc_station_means: ConfigPath | None = Field(
        default=None,
        title="Station white-cell class means",
        description="File written by `smearscope adapt-wbc` from white cells this station's technician typed: "
        "the WBC head then types white cells by the nearest of the station's own class means in its "
        "feature space (a new lab's microscope, camera and stain move its cells away from the trained "
        "ones). Fitted for one WBC head: the station refuses to start with another. Unset: the head as "
        "trained.",
    )
    concurrent_fields: int = Field(
        default=1,
        ge=1,
        le=8,
        title="Fields analysed at once",
        description="With more than 1, the next field is resampled and detected while the previous "
        "one's cells are classified, and the fields' engine batches are joined (up to "
        "batch_delay_ms apart); reports still leave in capture order. Raises throughput where the "
        "engines run beside the CPU (a GPU) or leave cores idle; costs latency per field.",
    )
    batch_delay_ms: float = Field(
        default=4.0,
        ge=0.0,
        le=100.0,
        title="Engine batch delay across fields",
        description="With concurrent_fields > 1: how long an engine batch waits for another field's "
        "batch to join it (only while another field is being analysed).",
    )
    stain_normalization: Literal["auto", "macenko", "vahadane", "none"] = Field(
        default="auto",
        title="Stain normalization",
        description="'auto': each model gets frames normalized as its training images were (its "
        "manifest says); 'macenko' / 'vahadane' / 'none' force one variant for every model (experiments only: "
        "a model fed frames unlike its training images degrades badly).",
    )
    engine_backend: Literal["onnxruntime", "tensorrt"] = Field(
        default="onnxruntime",
        title="Inference engine",
        description="Runtime for the models; 'tensorrt' needs engines built for this device.",
    )
    tensorrt_precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp16",
        title="TensorRT precision",
        description="Which built engines to load (`smearscope build-engines --precision`); "
        "engine_backend 'tensorrt' only.",
    )
    tensorrt_lanes: int = Field(
        default=2,
        ge=1,
        le=8,
        title="TensorRT lanes per model",
        description="Execution contexts per model, each with its own CUDA stream, buffers and "
        "optimisation profile, so that batches from two threads overlap on the GPU; the engines must "
        "be built for it (`smearscope build-engines --lanes N`); engine_backend 'tensorrt' only.",
    )
    cuda_api: Literal["auto", "pycuda", "cuda-python"] = Field(
        default="auto",
        title="CUDA binding",
        description="How the TensorRT backend allocates buffers and streams: pycuda or NVIDIA's "
        "cuda-python; 'auto' takes pycuda where installed. engine_backend 'tensorrt' only.",
    )
    onnxruntime_threads: int = Field(
        default=0,
        ge=0,
        le=64,
        title="ONNX Runtime threads per model",
        description="Intra-op threads of each model's session; 0: one per core. "
        "engine_backend 'onnxruntime' only.",
    )
    onnxruntime_sessions: int = Field(
        default=0,
        ge=0,
        le=16,
        title="ONNX Runtime sessions per model",
        description="On the CPU, a batch of two or more inputs (tiles, crops) is split over this "
        "many single-threaded sessions of the model, run side by side; 0: one per thread the "
        "model would otherwise have (onnxruntime_threads, or one per logical CPU; at most 4); 1: "
        "never split. Outputs are the same either way; each session holds its own copy of the "
        "model. engine_backend 'onnxruntime' only.",
    )
    onnxruntime_spin: bool = Field(
        default=False,
        title="ONNX Runtime thread spinning",
        description="Let idle ONNX Runtime threads busy-wait for work. Off by default: the station's "
        "other threads (capture, MQTT) and the three models' pools share the cores, and spinning "
        "threads take them. engine_backend 'onnxruntime' only.",
    )
    models_dir: ConfigPath = Field(
        default=Path("/var/lib/smearscope/models"),
        title="Models directory",
        description="Directory holding the model artifacts and their manifests.",
    )

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("tile_size must be a multiple of 32 (the detector's stride)")
        return value

    @field_validator("detector_unsure_band")
    @classmethod
    def _band_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 <= low < high <= 1.0:
            raise ValueError("detector_unsure_band must be [low, high] with 0 <= low < high <= 1")
        return value
