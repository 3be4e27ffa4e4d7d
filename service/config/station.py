"""The station's one configuration root: every section, and the cross-section checks."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from smearscope.device.quality import QualityGateConfig
from smearscope.device.source_config import SourceConfig
from smearscope.service.config.analysis import AnalysisConfig
from smearscope.service.config.base import StationBaseModel
from smearscope.service.config.clinic import FhirConfig, ReviewConfig
from smearscope.service.config.commands import CommandsConfig
from smearscope.service.config.flags import FlagsConfig
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.config.specimen import SpecimenConfig
from smearscope.service.config.watchdog import WatchdogConfig

logger = logging.getLogger(__name__)


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
    flags: FlagsConfig = Field(
        default_factory=FlagsConfig,
        title="Report flags",
        description="How much evidence each flag needs (atypical white cells, sickle cells, schistocytes).",
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
    fhir: FhirConfig = Field(
        default_factory=FhirConfig,
        title="FHIR",
        description="The FHIR R4 Bundle published with each specimen report.",
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig,
        title="Review gallery",
        description="Crops of cells to review (get_review) and per-field overlays on disk.",
    )
    commands: CommandsConfig = Field(
        default_factory=CommandsConfig,
        title="Commands",
        description="What the MQTT commands may reach: the folders analyze_file may read.",
    )

    @field_validator("station_id", mode="before")
    @classmethod
    def _station_id_characters(cls, value: Any) -> Any:
        """Said in words, naming the characters refused: the id is a level of every topic the
        station publishes and subscribes to, where '/', '+' and '#' mean something else."""
        if isinstance(value, str) and value and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            refused = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9_-]", c)})
            raise ValueError(
                f"{value!r} may hold only letters A-Z and a-z, digits, '-' and '_' (it is a level of the station's "
                f"MQTT topics); refused: {' '.join(repr(c) for c in refused)}")
        return value

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

    @model_validator(mode="after")
    def _typed_cells_in_a_file_of_their_own(self) -> StationConfig:
        """The typed-cells file named as the outbox or the review gallery's file: the station would make its
        table inside that database (and doctor read it as a file of no typed cell yet)."""
        typed = self.review.typed_cells_path
        if typed is None:
            return self
        review = self.review.directory or Path(self.mqtt.outbox.path).parent / "review"
        for name, other in (("mqtt.outbox.path", self.mqtt.outbox.path),
                            ("the review gallery's file", review / "gallery.sqlite")):
            if os.path.realpath(typed) == os.path.realpath(other):
                raise ValueError(f"review.typed_cells_path {typed} is {name}: the typed cells need a file of "
                                 "their own (the default: typed_cells.sqlite3 beside the outbox)")
        return self

    @model_validator(mode="after")
    def _own_files_outside_the_watched_folder(self) -> StationConfig:
        """The folder source moves every file directly in its folder to done/ or rejected/: a file
        the station keeps or reads there (its outbox while it writes it) would be taken away."""
        if self.source.kind != "folder":
            return self
        inbox = os.path.realpath(self.source.path)
        tls = self.mqtt.tls
        files = {"mqtt.outbox.path": self.mqtt.outbox.path, "review.typed_cells_path": self.review.typed_cells_path,
                 "analysis.wbc_station_means": self.analysis.wbc_station_means,
                 "mqtt.tls.ca_file": tls and tls.ca_file, "mqtt.tls.certfile": tls and tls.certfile,
                 "mqtt.tls.keyfile": tls and tls.keyfile}
        inside = [name for name, path in files.items()
                  if path is not None and os.path.dirname(os.path.realpath(path)) == inbox]
        inside += [name for name, folder in (("analysis.models_dir", self.analysis.models_dir),
                                             ("review.directory", self.review.directory))
                   if folder is not None and os.path.realpath(folder) == inbox]  # gallery.sqlite, *.onnx
        if inside:
            raise ValueError(
                f"{', '.join(inside)} in the watched folder source.path {self.source.path}: the station moves every "
                "file there to done/ or rejected/ (its own too); keep them elsewhere (a subfolder is never scanned)")
        return self

    @property
    def microns_per_pixel(self) -> float | None:
        """Scale to use for frames: the analysis override, else the source's, else None."""
        if self.analysis.microns_per_pixel is not None:
            return self.analysis.microns_per_pixel
        return self.source.microns_per_pixel
