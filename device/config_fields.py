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

#: Scales (um/px) a camera on a blood-smear microscope gives: about 0.05-0.2 at 100x, about 1 at 10x.
PLAUSIBLE_SCALE_UM = (0.03, 1.2)


def scale_advice(value: float) -> str:
    """What to say after a scale outside SCALE_RANGE_UM: its unit, the reading it may have been
    meant as (72 for 0.072: nanometres; 13.9: pixels per micrometre) where a microscope gives such
    a scale, and what measures it."""
    low, high = PLAUSIBLE_SCALE_UM
    meant = [f"{value / 1000:.4g} if that is nanometres per pixel"] if low <= value / 1000 <= high else []
    meant += [f"{1 / value:.4g} if that is pixels per micrometre"] if value > 0 and low <= 1 / value <= high else []
    return (": the scale is in micrometres per pixel, about 0.05 to 0.2 through a 100x oil objective"
            + (f" ({'; '.join(meant)})" if meant else "")
            + "; smearscope calibrate-scale measures it from a stage micrometer")


#: A configured file or folder: a Path that an empty or blank string is not.
ConfigPath = Annotated[Path, BeforeValidator(_not_empty)]
