"""The station's scale calibration record: which scale it runs at, since when, and whether it is due.

A lab keeps its calibrations on record (ISO 15189: date, what was measured, by what); the config
holds the day `[source] microns_per_pixel` was measured (`microns_per_pixel_calibrated_on`), and
the station's start and `smearscope doctor` say its age here, with a warning when it is undated,
due again (`microns_per_pixel_recheck_days`) or replaced by `[analysis] microns_per_pixel`.
"""

from __future__ import annotations

import datetime
import logging

from smearscope.service.config import StationConfig

logger = logging.getLogger(__name__)


def scale_calibration_note(config: StationConfig, today: datetime.date | None = None) -> tuple[int, str] | None:
    """(logging level, what to say) of the scale the station runs at, on `today` (default: this
    machine's date); None for a simulated source, whose scale is the renderer's."""
    today = datetime.date.today() if today is None else today
    src = config.source
    if src.kind == "simulated":
        return None
    override = config.analysis.microns_per_pixel
    if override is not None and override != src.microns_per_pixel:
        return logging.WARNING, (f"the scale in use is [analysis] microns_per_pixel {override:g} um/px, which "
                                 "overrides the source's; its calibration is not on record in the config (the "
                                 "date in [source] dates the source's own scale): put the value in [source] "
                                 "microns_per_pixel with microns_per_pixel_calibrated_on")
    if src.microns_per_pixel is None:
        return logging.INFO, ("no calibrated scale: estimated from red-cell size in each run, so size-based "
                              "red-cell findings are not assessed (smearscope calibrate-scale)")
    scale = f"{src.microns_per_pixel:g} um/px"
    dated = src.microns_per_pixel_calibrated_on
    if dated is None:
        return logging.WARNING, (f"[source] microns_per_pixel {scale} has no calibration date on record: "
                                 "put the day it was measured in [source] microns_per_pixel_calibrated_on "
                                 "(smearscope calibrate-scale prints the line)")
    age = (today - dated).days
    if age < 0:
        return logging.WARNING, (f"{scale}, calibrated on {dated}, after today ({today}): the date or this "
                                 "machine's clock is wrong, so the calibration's age cannot be told")
    due = src.microns_per_pixel_recheck_days
    if age > due:
        return logging.WARNING, (f"{scale}, calibrated on {dated}, {age} days ago: due again (every {due} "
                                 "days, [source] microns_per_pixel_recheck_days): measure it with a stage "
                                 "micrometer (smearscope calibrate-scale)")
    return logging.INFO, f"{scale}, calibrated on {dated} ({age} days ago; due again in {due - age} days)"


def scale_checks(config: StationConfig) -> list[tuple[str, str, str]]:
    """`smearscope doctor`'s lines: OK with the calibration's age, WARN where the station's start warns."""
    note = scale_calibration_note(config, datetime.date.today())
    return [] if note is None else [("WARN" if note[0] >= logging.WARNING else "OK", "scale", note[1])]


def drift_checks(config: StationConfig, held: bool = False) -> list[tuple[str, str, str]]:
    """`smearscope doctor`'s calibration watch line (service.station.calibration_watch): what the
    station's calibration checks over its runs say of the calibration in use; none uncalibrated.
    `held`: a running station holds the outbox file (no other process can read it), its log says it."""
    from pathlib import Path

    from smearscope.service.station.calibration_watch import calibration_key, watch_checks

    if config.microns_per_pixel is None:
        return []
    spec = config.specimen
    if spec.calibration_watch_fields and spec.calibration_check_fields == 0:  # it would wait for ever
        return [("OK", "calibration watch", ("nothing to judge from: [specimen] calibration_check_fields is 0, "
                 "so no field checks the calibration (3 is the default)"))]
    if held and spec.calibration_watch_fields:
        return [("OK", "calibration watch", ("the running station holds its outbox file: its reading is read from its "
                 "telemetry, after the broker's lines (not with --no-wait: then its log says 'calibration drift "
                 "suspected' and its reports carry calibration_drift_suspected when its checks point away from the "
                 "calibration)"))]
    return watch_checks(Path(config.mqtt.outbox.path),
                        calibration_key(config.microns_per_pixel, config.source.microns_per_pixel_calibrated_on),
                        spec.calibration_watch_fields, spec.calibration_watch_runs)
