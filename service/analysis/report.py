"""Stage 10: the report, a pydantic model with a schema version and a committed JSON Schema.

`schemas/report.schema.json` is generated from this model (`smearscope schema --write`); a test
fails when the two differ, so consumers can rely on the file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ImageInfo(_Strict):
    width: int = Field(description="input image width in pixels")
    height: int = Field(description="input image height in pixels")


class SourceInfo(_Strict):
    frame_id: str
    source: str
    captured_at: float = Field(description="capture time, seconds since the epoch")
    image: ImageInfo


class ScaleInfo(_Strict):
    microns_per_pixel: float = Field(description="scale of the INPUT image")
    method: Literal["given", "rbc_size_classical", "rbc_size_detection", "default"]
    canonical_microns_per_pixel: float


class StainInfo(_Strict):
    method: str
    applied: bool
    reason: str | None = None


class ModelInfo(_Strict):
    name: str
    sha256: str
    backend: str


class CellRecord(_Strict):
    kind: Literal["rbc", "wbc", "platelet"]
    bbox: list[float] = Field(description="[x0, y0, x1, y1] in the INPUT image's pixels", min_length=4, max_length=4)
    score: float = Field(description="detector confidence")
    label: str | None = Field(description="head class, 'unidentified' below its threshold, null for platelets")
    label_score: float | None
    diameter_um: float = Field(description="equivalent-circle diameter from the mask area")
    area_um2: float
    field_id: str | None = Field(None, description="frame the cell came from (specimen reports)")


class ClassShare(_Strict):
    label: str
    count: int
    percent: float
    ci95_low: float | None = Field(None, description="Wilson 95% interval, percent")
    ci95_high: float | None = None


class SizeStats(_Strict):
    n: int
    mean_diameter_um: float | None
    sd_um: float | None
    cv_percent: float | None
    median_diameter_um: float | None


class Counts(_Strict):
    rbc: int
    wbc: int
    platelet: int


class Flag(_Strict):
    code: str
    severity: Literal["info", "warning", "critical"]
    message: str


class Report(_Strict):
    schema_version: Literal["1.0"] = SCHEMA_VERSION
    report_id: str
    kind: Literal["field", "specimen"]
    created_at: float
    station_id: str | None = None
    run_id: str | None = Field(None, description="specimen run this field/report belongs to")
    fields_analyzed: int = 1
    source: SourceInfo | None = Field(None, description="the analysed frame (field reports)")
    scale: ScaleInfo | None = None
    stain: StainInfo | None = None
    models: dict[str, ModelInfo] = {}
    counts: Counts
    wbc_differential: list[ClassShare]
    rbc_morphology: list[ClassShare]
    rbc_size: SizeStats
    ratios: dict[str, float | None]
    flags: list[Flag]
    cells: list[CellRecord]
    timing_ms: dict[str, float] = {}


def report_json_schema() -> dict:
    return Report.model_json_schema()
