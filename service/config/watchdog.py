"""`[watchdog]`: the progress-based systemd watchdog."""

from __future__ import annotations

import logging

from pydantic import Field

from smearscope.service.config.base import StationBaseModel

logger = logging.getLogger(__name__)


class WatchdogConfig(StationBaseModel):
    """The progress-based systemd watchdog."""

    stall_timeout_s: float = Field(
        default=120.0,
        title="Stall timeout (s)",
        description="A unit of work (one frame's analysis, one publish) running longer than this "
        "stops the watchdog pings, so systemd restarts the service.",
        ge=5.0,
    )
