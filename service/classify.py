"""Stage 8: classify crops with a head engine, in batches, with calibrated confidence.

Softmax uses the manifest's calibration temperature; a cell whose top probability is below the
head's threshold becomes UNIDENTIFIED (sent for human review), never a guessed class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engines.base import Engine
from engines.batching import run_batched
from engines.preprocess import to_model_input
from service.crops import CropSpec
from service.metrics import softmax
from service.records import CellCrop

UNIDENTIFIED = "unidentified"


@dataclass(frozen=True)
class HeadResult:
    label: str
    score: float


class CropClassifier:
    def __init__(self, engine: Engine, min_confidence: float) -> None:
        self.engine = engine
        m = engine.manifest
        if m.crop is None:
            raise ValueError(f"{m.name}: classifier manifest lacks crop geometry")
        self.crop_spec = CropSpec(extent_um=m.crop.extent_um, input_size=m.crop.input_size)
        self.classes = list(m.classes)
        self.temperature = m.temperature
        self.min_confidence = min_confidence

    def classify(self, crops: Sequence[CellCrop]) -> list[HeadResult]:
        if not crops:
            return []
        batch = to_model_input(np.stack([c.pixels for c in crops]), self.engine.manifest.preprocessing)
        logits = run_batched(self.engine, batch)[self.engine.output_names[0]]
        probs = softmax(logits / self.temperature)
        idx = probs.argmax(1)
        out = []
        for i, k in enumerate(idx):
            p = float(probs[i, k])
            out.append(HeadResult(self.classes[k] if p >= self.min_confidence else UNIDENTIFIED, p))
        return out
