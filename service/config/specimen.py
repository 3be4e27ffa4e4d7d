"""`[specimen]`: when a specimen run (one slide) starts and when it is complete."""

from __future__ import annotations

import logging

from pydantic import Field

from smearscope.service.config.base import StationBaseModel

logger = logging.getLogger(__name__)

#: The largest white-cell target a run takes (the config's, or cmd/start_run's).
MAX_TARGET_WBC = 1000


class SpecimenConfig(StationBaseModel):
    """When a specimen run (one slide) starts and when it is complete."""

    target_wbc_count: int = Field(
        default=100,
        title="Target WBC count",
        description="White cells to classify before the differential is reported (100 or 200 "
        "are usual).",
        ge=1,
        le=MAX_TARGET_WBC,
    )
    idle_timeout_s: float = Field(
        default=300.0,
        title="Idle timeout (s)",
        description="A run with no accepted frame for this long is closed and reported as "
        "incomplete; a run a crashed process left open is taken back at a start within it.",
        gt=0.0,
    )
    auto_start: bool = Field(
        default=True,
        title="Start runs automatically",
        description="The first accepted field without an open run starts one; when false, "
        "runs start only by the start_run command and fields outside a run stand alone (in no "
        "specimen report; counted in status as fields_outside_runs).",
    )
    max_fields_per_run: int = Field(
        default=1000,
        title="Fields per run at most",
        description="A run that reaches this many fields without its target ends (end reason "
        "field_limit, reported as incomplete). An open run holds every cell of its fields in memory "
        "(about 1.5 kB each: 1000 fields of 400 cells, about 0.6 GB), so this bounds it.",
        ge=1,
        le=100_000,
    )
    calibration_check_fields: int = Field(
        default=3,
        title="Fields that check the calibration",
        description="The first this many fields of each run whose scale is calibrated are also "
        "analysed as an uncalibrated station would (a scale search: a few detector passes); where "
        "their red cells point to a scale 1.8 times or more off the calibration the report is "
        "flagged calibration_suspect (a changed objective, camera resolution or station). 0: never.",
        ge=0,
        le=1000,
    )
    calibration_watch_fields: int = Field(
        default=18,
        title="Checked fields the calibration watch needs",
        description="The calibration checks (calibration_check_fields) of every run, its first 3 at most, "
        "are kept across runs until the calibration changes; once at least this many measurable ones (the last 48 at most) from "
        "at least calibration_watch_runs runs have a median own estimate / calibrated scale below 0.85 or "
        "above 1.32 (a calibration about 1.4 to 1.5 times off, which no single field tells), the station "
        "warns once and flags calibrated reports calibration_drift_suspected. 0: no watch.",
        ge=0,
        le=48,
    )
    calibration_watch_runs: int = Field(
        default=4,
        title="Runs the calibration watch needs",
        description="The checks calibration_watch_fields counts come from at least this many runs "
        "(specimens), so that no one patient's red cells decide.",
        ge=1,
        le=48,
    )
