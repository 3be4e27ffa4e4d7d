"""The station's one configuration root, loaded from TOML with environment overrides.

`load_config(path)` reads the TOML file, applies `SMEARSCOPE__SECTION__FIELD=value` environment
overrides (double underscore between levels, case-insensitive, e.g.
`SMEARSCOPE__QUALITY__MIN_FOCUS=80`, `SMEARSCOPE__SOURCE__KIND=simulated`; values are parsed by
the field's type, and a value starting with '[' or '{' is read as a TOML array or inline table)
and validates the result into a frozen `StationConfig`. Nothing here touches files other than the
config file itself: validators are pure, so `smearscope validate-config FILE` has no side effects.
Secrets never live here: the MQTT password is a systemd credential named by
`mqtt.password_credential`.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from device.quality import QualityGateConfig
from device.source_config import SOURCE_KINDS, SourceConfig
from engines.manifest import TestTimeView
from service.mqtt_config import MqttConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport
    import tomli as tomllib

logger = logging.getLogger(__name__)

ENV_PREFIX = "SMEARSCOPE__"
#: Exit status of an invalid configuration (sysexits EX_CONFIG); the unit does not restart on it.
EXIT_CONFIG = 78


class StationBaseModel(BaseModel):
    """Strict base: unknown keys are errors and a loaded config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class AnalysisConfig(StationBaseModel):
    """How each accepted frame is analyzed."""

    microns_per_pixel: float | None = Field(
        default=None,
        title="Scale override (um/px)",
        description="Overrides the source's scale for every frame; unset uses the source's "
        "value, or estimates it from red-cell size when the source has none.",
        gt=0.0,
        le=10.0,
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
        default=0.5,
        title="Minimum confidence",
        description="Detections below this score are discarded.",
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
    stain_normalization: Literal["auto", "macenko", "none"] = Field(
        default="auto",
        title="Stain normalization",
        description="'auto': each model gets frames normalized as its training images were (its "
        "manifest says); 'macenko' / 'none' force one variant for every model (experiments only: "
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
        description="Execution contexts per model, each with its own CUDA stream and buffers, so "
        "that batches from two threads overlap on the GPU; engine_backend 'tensorrt' only.",
    )
    cuda_api: Literal["auto", "pycuda", "cuda-python"] = Field(
        default="auto",
        title="CUDA binding",
        description="How the TensorRT backend allocates buffers and streams: pycuda or NVIDIA's "
        "cuda-python; 'auto' takes pycuda where installed. engine_backend 'tensorrt' only.",
    )
    models_dir: Path = Field(
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


class SpecimenConfig(StationBaseModel):
    """When a specimen run (one slide) starts and when it is complete."""

    target_wbc_count: int = Field(
        default=100,
        title="Target WBC count",
        description="White cells to classify before the differential is reported (100 or 200 "
        "are usual).",
        ge=1,
        le=1000,
    )
    idle_timeout_s: float = Field(
        default=300.0,
        title="Idle timeout (s)",
        description="A run with no accepted frame for this long is closed and reported as "
        "incomplete.",
        gt=0.0,
    )
    auto_start: bool = Field(
        default=True,
        title="Start runs automatically",
        description="The first accepted field without an open run starts one; when false, "
        "runs start only by the start_run command and fields outside a run stand alone.",
    )


class WatchdogConfig(StationBaseModel):
    """The progress-based systemd watchdog."""

    stall_timeout_s: float = Field(
        default=120.0,
        title="Stall timeout (s)",
        description="A unit of work (one frame's analysis, one publish) running longer than this "
        "stops the watchdog pings, so systemd restarts the service.",
        ge=5.0,
    )


class StationConfig(StationBaseModel):
    """Everything one smearscope station needs to run."""

    station_id: str = Field(
        title="Station id",
        description="Unique name of this station; used in MQTT topics and reports.",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", title="Log level", description="Threshold of the journal log."
    )
    source: SourceConfig = Field(
        title="Frame source",
        description="Where frames come from; `kind` selects camera, folder, replay or simulated.",
    )
    quality: QualityGateConfig = Field(
        default_factory=QualityGateConfig,
        title="Quality gate",
        description="Which frames are sharp, exposed, stained and new enough to analyze.",
    )
    analysis: AnalysisConfig = Field(
        default_factory=AnalysisConfig,
        title="Analysis",
        description="Tiling, detection filters, stain normalization and the inference engine.",
    )
    specimen: SpecimenConfig = Field(
        default_factory=SpecimenConfig,
        title="Specimen run",
        description="When a slide's run starts and when it is complete.",
    )
    mqtt: MqttConfig = Field(
        default_factory=MqttConfig,
        title="MQTT",
        description="Broker, security and delivery of reports and telemetry.",
    )
    watchdog: WatchdogConfig = Field(
        default_factory=WatchdogConfig,
        title="Watchdog",
        description="Stall detection behind systemd's WatchdogSec.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _simulated_scale_not_overridden(self) -> StationConfig:
        src, override = self.source, self.analysis.microns_per_pixel
        if src.kind == "simulated" and override is not None and override != src.microns_per_pixel:
            raise ValueError(
                "analysis.microns_per_pixel contradicts the simulated source's rendered scale "
                f"({src.microns_per_pixel}); remove the override or set source.microns_per_pixel"
            )
        return self

    @property
    def microns_per_pixel(self) -> float | None:
        """Scale to use for frames: the analysis override, else the source's, else None."""
        if self.analysis.microns_per_pixel is not None:
            return self.analysis.microns_per_pixel
        return self.source.microns_per_pixel


class ConfigError(Exception):
    """The configuration could not be loaded; `errors` lists (field.path, reason) pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in errors))


def _parse_env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in ("[", "{"):
        try:
            return tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            return raw  # let validation report it against the field
    return raw


def apply_env_overrides(
    data: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """A copy of `data` with SMEARSCOPE__A__B=value applied; also which variable set each path."""
    merged: dict[str, Any] = copy.deepcopy(dict(data))
    applied: dict[tuple[str, ...], str] = {}
    errors: list[tuple[str, str]] = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if not all(path):
            errors.append((name, "empty level in variable name (use SMEARSCOPE__SECTION__FIELD)"))
            continue
        node = merged
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append((name, f"{'.'.join(path[: depth + 1])} is a value, not a section"))
                break
            node = child
        else:
            node[path[-1]] = _parse_env_value(environ[name])
            applied[path] = name
    if errors:
        raise ConfigError(errors)
    return merged, applied


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    # Discriminated unions put the chosen tag in the path; users wrote `source.x`, not
    # `source.folder.x`.
    if len(parts) >= 2 and parts[0] == "source" and parts[1] in SOURCE_KINDS:
        del parts[1]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (("." if text else "") + str(part))
    return text or "(root)"


def _validation_errors(
    exc: ValidationError, applied: Mapping[tuple[str, ...], str]
) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _format_loc(tuple(err["loc"]))
        msg = str(err["msg"]).removeprefix("Value error, ")
        for path, variable in applied.items():
            if loc == ".".join(path) or loc.startswith(".".join(path) + "."):
                msg += f" (set by {variable})"
                break
        out.append((loc, msg))
    return out


def parse_config(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> StationConfig:
    """Validate an already-parsed TOML document plus environment overrides."""
    merged, applied = apply_env_overrides(data, os.environ if environ is None else environ)
    try:
        return StationConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_validation_errors(exc, applied)) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> StationConfig:
    """Read, override and validate the station config; raises ConfigError with every problem."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc.strerror or exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"TOML syntax error: {exc}")]) from None
    return parse_config(data, environ)


def print_config_errors(exc: ConfigError, source: str | Path) -> None:
    """On stderr: each problem as `field.path: reason`, then how many, naming the config."""
    for loc, msg in exc.errors:
        print(f"{loc}: {msg}", file=sys.stderr)
    print(f"{source}: {len(exc.errors)} error(s)", file=sys.stderr)


def validate_config_main(path: str | Path, environ: Mapping[str, str] | None = None) -> int:
    """`smearscope validate-config FILE`: print each problem as `field.path: reason`.

    Returns 0 when valid, EXIT_CONFIG (78) otherwise.
    """
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        print_config_errors(exc, path)
        return EXIT_CONFIG
    print(f"{path}: OK (station {config.station_id}, source {config.source.kind})")
    return 0
