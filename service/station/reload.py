"""What a config reload changes: the sections applied live and those that need a restart.

The daemon re-reads its file on SIGHUP or the `reload` command and applies the live sections on
its own thread (service.station.daemon); this module only compares two configurations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from smearscope.engines.manifest import sha256_file
from smearscope.service.config import ConfigError, StationConfig

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


def compare(running: StationConfig, new: StationConfig, analyzer: Any = None) -> ConfigChange:
    """The changed sections; `analysis` also where the station means file the config names is no
    longer the one the running `analyzer` loaded (refitted in place by adapt-wbc --out)."""
    old_dump, new_dump = running.model_dump(), new.model_dump()
    changed = [k for k in new_dump if new_dump[k] != old_dump[k]]
    if "analysis" not in changed and _means_file_changed(new, analyzer):
        changed.append("analysis")
    return ConfigChange(tuple(k for k in changed if k in LIVE_SECTIONS),
                        tuple(k for k in changed if k not in LIVE_SECTIONS))


def _means_file_changed(new: StationConfig, analyzer: Any) -> bool:
    """Whether `[analysis] wbc_station_means` names a file other than the one the analyzer loaded
    (its sha256, as the reports name it); False for an analyzer that does not say."""
    models = getattr(analyzer, "models", None)
    info = models.get("wbc_head") if isinstance(models, dict) else None
    if new.analysis.wbc_station_means is None or info is None:
        return False
    loaded = info.station_means.sha256 if info.station_means is not None else None
    try:
        return sha256_file(new.analysis.wbc_station_means) != loaded
    except OSError:
        return True  # gone or unreadable: a restart would refuse it; say it needs one


def invalid_config_answer(exc: Exception) -> dict[str, Any]:
    """The reload's answer when the config file could not be read again or is invalid: nothing changed."""
    problems = exc.errors if isinstance(exc, ConfigError) else [(type(exc).__name__, str(exc))]
    return {"ok": False, "error": "invalid_config", "message": "invalid config; nothing changed",
            "problems": [f"{loc}: {msg}" for loc, msg in problems]}
