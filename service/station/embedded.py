"""The built-in station used by `smearscope run` without `--config`: a try-it-now demo.

The synthetic microscope as the source, the models from the repository's `models/` directory,
MQTT to localhost:1883 without credentials (if no broker answers, reports wait in the outbox), and
the outbox under a writable state directory: `$STATE_DIRECTORY` (set by systemd's
`StateDirectory=`), else `./var/`. `SMEARSCOPE__...` environment overrides apply as they do to a
config file, e.g. `SMEARSCOPE__MQTT__PORT=1884` or `SMEARSCOPE__ANALYSIS__MODELS_DIR=/tmp/models`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR
from smearscope.service.config import StationConfig, parse_config

logger = logging.getLogger(__name__)

EMBEDDED_STATION_ID = "embedded-sim"


def state_directory(environ: Mapping[str, str] | None = None) -> Path:
    """First entry of $STATE_DIRECTORY (systemd may list several, colon-separated), else ./var."""
    env = os.environ if environ is None else environ
    listed = [p for p in env.get("STATE_DIRECTORY", "").split(":") if p]
    return Path(listed[0]) if listed else Path.cwd() / "var"


def embedded_document(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The embedded station as the dict a TOML file would hold (before environment overrides)."""
    state = state_directory(environ)
    return {
        "station_id": EMBEDDED_STATION_ID,
        "source": {"kind": "simulated", "fields": None, "fps": 1.0, "seed": 0},
        "analysis": {"models_dir": str(DEFAULT_MODELS_DIR)},
        "mqtt": {
            "host": "localhost",
            "port": 1883,
            "outbox": {"path": str(state / "outbox.sqlite3")},
        },
    }


def embedded_config(environ: Mapping[str, str] | None = None) -> StationConfig:
    """The embedded station config, validated like a file (raises ConfigError)."""
    return parse_config(embedded_document(environ), environ)
