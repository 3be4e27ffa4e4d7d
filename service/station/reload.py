"""What a config reload changes: the sections applied live and those that need a restart.

The daemon re-reads its file on SIGHUP or the `reload` command and applies the live sections on
its own thread (service.station.daemon); this module only compares two configurations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smearscope.service.config import StationConfig

logger = logging.getLogger(__name__)

#: Config sections a `reload` applies live; every other change needs a restart.
LIVE_SECTIONS = ("log_level", "quality", "specimen")


@dataclass(frozen=True)
class ConfigChange:
    """The sections that differ between the running and the re-read configuration."""

    applied: tuple[str, ...]
    requires_restart: tuple[str, ...]

    def merged(self, running: StationConfig, new: StationConfig) -> StationConfig:
        """The running configuration with the live sections taken from `new`."""
        return running.model_copy(update={k: getattr(new, k) for k in self.applied})


def compare(running: StationConfig, new: StationConfig) -> ConfigChange:
    old_dump, new_dump = running.model_dump(), new.model_dump()
    changed = [k for k in new_dump if new_dump[k] != old_dump[k]]
    return ConfigChange(tuple(k for k in changed if k in LIVE_SECTIONS),
                        tuple(k for k in changed if k not in LIVE_SECTIONS))
