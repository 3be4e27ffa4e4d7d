"""The engine interface every inference backend implements (ONNX Runtime, TensorRT).

An engine runs ONE model described by its manifest. `service/` talks only to this interface,
so nothing in the pipeline knows which backend runs.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smearscope.engines.manifest import ModelManifest, load_manifest

logger = logging.getLogger(__name__)

#: Called with (lo, hi, outputs of rows lo:hi) as a batch's rows become ready (`Engine.run_parts`).
PartCallback = Callable[[int, int, dict[str, np.ndarray]], None]


class EngineError(RuntimeError):
    """A model could not be loaded or run (missing backend, bad file, shape outside profile)."""


class Engine(abc.ABC):
    """Load once, warm up, then run batches of preprocessed float32 input."""

    backend_name = "abstract"
    #: TensorRT runs fastest at the profile optimum; ONNX Runtime gains nothing from padding.
    pads_to_opt = False

    def __init__(self, manifest_path: Path, verify_hash: bool = True) -> None:
        self.manifest_path = Path(manifest_path)
        self.manifest: ModelManifest = load_manifest(self.manifest_path, verify_hash=verify_hash)
        self._loaded = False

    @property
    def input_name(self) -> str:
        return self.manifest.inputs[0].name

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.manifest.outputs]

    def load(self) -> Engine:
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch whose size lies inside the manifest's batch profile."""
        return self._run(self._checked(batch))

    def run_parts(self, batch: np.ndarray, on_part: PartCallback) -> dict[str, np.ndarray]:
        """`run`, handing the batch's rows to `on_part(lo, hi, outputs of rows lo:hi)` on this
        thread as they are ready: consecutive ranges covering the batch, in order, before this
        returns the whole batch's outputs. A backend that runs a batch in parts
        (engines.onnxruntime_engine's split sessions) calls it for a part that is done while the
        others still run, so the caller's work on it overlaps theirs; the others call it once."""
        outs = self._run(self._checked(batch))
        on_part(0, len(batch), outs)
        return outs

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        """The batch, loaded and checked against the profile, as contiguous float32."""
        self.load()
        n = batch.shape[0]
        prof = self.manifest.batch
        if not prof.min <= n <= prof.max:
            raise EngineError(f"{self.manifest.name}: batch {n} outside profile [{prof.min}, {prof.max}]")
        expected = tuple(self.manifest.inputs[0].shape[1:])
        if tuple(batch.shape[1:]) != expected:
            raise EngineError(f"{self.manifest.name}: input shape {batch.shape[1:]} != {expected}")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def warmup(self, iterations: int = 2) -> float:
        """Run the optimal batch a few times so first-use graph building happens now; returns s."""
        self.load()
        shape = (self.manifest.batch.opt, *self.manifest.inputs[0].shape[1:])
        dummy = np.zeros(shape, np.float32)
        t0 = time.perf_counter()
        for _ in range(iterations):
            self.run(dummy)
        dt = time.perf_counter() - t0
        logger.info("%s (%s) warm in %.2f s", self.manifest.name, self.backend_name, dt)
        return dt

    def describe(self) -> dict:
        m = self.manifest
        return {
            "name": m.name,
            "backend": self.backend_name,
            "task": m.task,
            "sha256": m.sha256,
            "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs],
            "batch": m.batch.model_dump(),
            "classes": m.classes,
        }

    def close(self) -> None:
        """Release backend resources explicitly (never from __del__)."""
