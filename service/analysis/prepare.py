"""Stages 2-3: a field at the canonical scale, prepared the way each model was trained.

Each model's manifest says what its training images went through (`preprocessing.illumination`:
none | flatfield, then `preprocessing.stain`: none | macenko | vahadane). The analyzer measures the
field's lamp once (`illumination.estimate_illumination`, on the input frame) and, per assumed
scale, resamples the frame to the canonical scale and builds only the variants some model
consumes, each once per field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from smearscope.service.analysis.illumination import Illumination, apply_illumination
from smearscope.service.analysis.scale import resample_to_canonical
from smearscope.service.analysis.stain import StainNormalizer, StainResult


@dataclass(frozen=True)
class Preparation:
    """What a model's frames go through before it sees them."""

    illumination: str = "none"  # none | flatfield
    stain: str = "none"  # none | macenko | vahadane


class CanonicalField:
    """One frame resampled to the canonical scale under one assumed scale, with lazy variants."""

    def __init__(self, pixels: np.ndarray, mpp: float, illumination: Illumination,
                 normalizers: dict[str, StainNormalizer], timing: dict[str, float]) -> None:
        t = time.perf_counter()
        self.raw = resample_to_canonical(pixels, mpp)
        timing["resample_ms"] = timing.get("resample_ms", 0.0) + (time.perf_counter() - t) * 1000
        self.mpp = mpp
        self._illumination = illumination
        self._normalizers = normalizers
        self._timing = timing
        self._cache: dict[Preparation, np.ndarray] = {}
        #: Stain results of the variants built so far (for the report: applied, or why not).
        self.stain_results: dict[str, StainResult] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    def pixels(self, prep: Preparation) -> np.ndarray:
        got = self._cache.get(prep)
        if got is not None:
            return got
        t = time.perf_counter()
        base = self.raw
        if prep.illumination == "flatfield":
            base = self._cache.get(Preparation("flatfield", "none"))
            if base is None:
                base = apply_illumination(self.raw, self._illumination)
                self._cache[Preparation("flatfield", "none")] = base
        self._timing["illumination_ms"] = self._timing.get("illumination_ms", 0.0) + (time.perf_counter() - t) * 1000
        out = base
        if prep.stain != "none":
            t = time.perf_counter()
            res = self._normalizers[prep.stain].normalize(base)
            self.stain_results[prep.stain] = res
            out = res.pixels
            self._timing["stain_ms"] = self._timing.get("stain_ms", 0.0) + (time.perf_counter() - t) * 1000
        self._cache[prep] = out
        return out
