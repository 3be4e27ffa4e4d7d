"""The frozen `Frame` record: the one thing `device/` hands to the rest of the system."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One captured field of view.

    `pixels` is an HxWx3 uint8 BGR array (OpenCV order). `microns_per_pixel` is None when the
    source does not know its scale; the pipeline then estimates it from red-cell size.
    `input_key` names the input's content (a watched folder's file: its hash) where analysing it
    twice would count its cells twice: a station that stored its report once skips it.
    """

    pixels: np.ndarray
    frame_id: str
    source: str
    captured_at: float = field(default_factory=time.time)
    microns_per_pixel: float | None = None
    input_key: str | None = None

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(
                f"Frame pixels must be HxWx3 uint8, got {self.pixels.shape} {self.pixels.dtype}"
            )
        self.pixels.setflags(write=False)
