"""ONNX Runtime backend: CPU here; CUDA / TensorRT execution providers when the build has them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from smearscope.engines.base import Engine, EngineError

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeEngine(Engine):
    backend_name = "onnxruntime"

    def __init__(self, manifest_path: Path, verify_hash: bool = True, providers: list[str] | None = None,
                 intra_op_threads: int = 0, spin: bool = False) -> None:
        """`intra_op_threads` 0: ONNX Runtime's default (one per core). `spin`: let idle pool
        threads busy-wait for the next operator (ONNX Runtime's default). Off here: the analyzer
        runs three sessions, each with its own pool, between stages of its own numpy work, and a
        station shares its cores with capture and MQTT; spinning threads take those cores. On
        this 2-core machine, with a training on the other core, one-view 640x480 fields took 37
        to 40 ms without spinning against 61 to 73 ms with it (1280x960: 253 to 267 against 369
        to 438), in alternating runs of the same script."""
        super().__init__(manifest_path, verify_hash)
        self._providers_wanted = providers
        self._threads = intra_op_threads
        self._spin = spin
        self._session = None

    def _load(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self._providers_wanted or [p for p in PREFERRED_PROVIDERS if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(f"ONNX Runtime here lacks providers {missing} (has {available})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            opts.intra_op_num_threads = self._threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if self._spin else "0")
        path = self.manifest.model_path(self.manifest_path)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load {path}: {exc}") from exc
        names = {i.name for i in self._session.get_inputs()}
        if self.input_name not in names:
            raise EngineError(f"{path}: input {self.input_name!r} not in model inputs {sorted(names)}")
        logger.info("loaded %s with %s", path.name, self._session.get_providers())

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session else []

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self._session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self._session = None
        self._loaded = False
