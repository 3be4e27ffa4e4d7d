"""The scale's calibration record (ISO 15189 calibration records): the config dates the
micrometer calibration of `[source] microns_per_pixel`; the station's start and `doctor` say its
age, and warn when it is undated, due again, dated after today or overridden by `[analysis]`."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import pytest
from broker import free_port, wait_until
from test_daemon import daemon_of, running, write_station

from smearscope.service.config import ConfigError, parse_config
from smearscope.service.station.scale_record import scale_calibration_note, scale_checks

TODAY = datetime.date(2026, 12, 7)


def _config(tmp_path: Path, analysis: dict[str, Any] | None = None, **source: Any):
    return parse_config({"station_id": "s1", "analysis": analysis or {},
                         "source": {"kind": "folder", "path": str(tmp_path / "inbox"), **source}}, {})


def test_the_calibrations_age_is_said_and_an_old_undated_or_overridden_one_is_warned_of(tmp_path: Path) -> None:
    fresh = _config(tmp_path, microns_per_pixel=0.11, microns_per_pixel_calibrated_on="2026-11-07")
    assert scale_calibration_note(fresh, TODAY) == (
        logging.INFO, "0.11 um/px, calibrated on 2026-11-07 (30 days ago; due again in 335 days)")
    old = _config(tmp_path, microns_per_pixel=0.11, microns_per_pixel_calibrated_on=datetime.date(2025, 11, 6))
    level, text = scale_calibration_note(old, TODAY)
    assert level == logging.WARNING and text.startswith("0.11 um/px, calibrated on 2025-11-06, 396 days ago: due again "
                                                        "(every 365 days")
    # the lab's own interval
    longer = _config(tmp_path, microns_per_pixel=0.11, microns_per_pixel_calibrated_on="2025-11-06",
                     microns_per_pixel_recheck_days=400)
    assert scale_calibration_note(longer, TODAY)[0] == logging.INFO
    level, text = scale_calibration_note(_config(tmp_path, microns_per_pixel=0.11), TODAY)
    assert level == logging.WARNING and "has no calibration date on record" in text
    future = _config(tmp_path, microns_per_pixel=0.11, microns_per_pixel_calibrated_on="2027-01-01")
    level, text = scale_calibration_note(future, TODAY)
    assert level == logging.WARNING and "after today (2026-12-07)" in text
    overridden = _config(tmp_path, {"microns_per_pixel": 0.2}, microns_per_pixel=0.11,
                         microns_per_pixel_calibrated_on="2026-11-07")
    level, text = scale_calibration_note(overridden, TODAY)
    assert level == logging.WARNING and "[analysis] microns_per_pixel 0.2 um/px" in text
    level, text = scale_calibration_note(_config(tmp_path), TODAY)
    assert level == logging.INFO and "estimated from red-cell size" in text
    assert scale_calibration_note(parse_config({"station_id": "s1", "source": {"kind": "simulated"}}, {}), TODAY) is None
    # doctor's line: WARN where the start warns
    assert [c[:2] for c in scale_checks(_config(tmp_path, microns_per_pixel=0.11))] == [("WARN", "scale")]


def test_a_calibration_date_without_a_scale_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="microns_per_pixel is unset"):
        _config(tmp_path, microns_per_pixel_calibrated_on="2026-11-07")
    with pytest.raises(ConfigError, match="microns_per_pixel_recheck_days"):
        _config(tmp_path, microns_per_pixel=0.11, microns_per_pixel_recheck_days=0)


def test_a_station_started_with_a_calibration_due_again_says_so_in_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "inbox").mkdir()
    config = write_station(tmp_path, free_port(), credentials=False,
                           source={"kind": "folder", "path": str(tmp_path / "inbox"), "microns_per_pixel": 0.11,
                                   "microns_per_pixel_calibrated_on": datetime.date(2020, 1, 2)})
    with caplog.at_level(logging.INFO, logger="smearscope.service.station.daemon"), running(daemon_of(config)):
        assert wait_until(lambda: "scale: " in caplog.text, 60), caplog.text[-2000:]
    line = next(r for r in caplog.records if r.getMessage().startswith("scale: "))
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith("scale: 0.11 um/px, calibrated on 2020-01-02, ")
    assert "due again (every 365 days" in line.getMessage()
