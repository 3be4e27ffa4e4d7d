"""What every configuration model shares: a path is never an empty string.

Pydantic reads "" as `Path(".")`, the process's working directory: `directory = ""` in a station
config would scatter overlays, or an outbox, wherever the daemon was started. Every path of the
station's configuration (its sources here, the service's sections) is a `ConfigPath`; `device/`
is the lowest layer, so it lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator

logger = logging.getLogger(__name__)


def _not_empty(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path: name a file or folder, or leave the key out")
    return value


#: The frame scales (um/px) the analysis accepts, from a config or a command: 100x oil objectives
#: give about 0.05-0.2, a 10x objective about 1; outside this a red cell is under 4 or over 800
#: pixels across.
SCALE_RANGE_UM = (0.01, 2.0)

#: A configured file or folder: a Path that an empty or blank string is not.
ConfigPath = Annotated[Path, BeforeValidator(_not_empty)]
