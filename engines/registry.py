"""Lazy backend registry: a key maps to "module:Class", imported only when chosen."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from smearscope.engines.base import Engine, EngineError

BACKENDS: dict[str, str] = {
    "onnxruntime": "smearscope.engines.onnxruntime_engine:OnnxRuntimeEngine",
    "tensorrt": "smearscope.engines.tensorrt_engine:TensorRtEngine",
}


def engine_class(backend: str) -> type[Engine]:
    try:
        target = BACKENDS[backend]
    except KeyError:
        raise EngineError(f"unknown engine backend {backend!r}; known: {sorted(BACKENDS)}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine backend {backend!r} is not installed here: {exc}") from exc
    return getattr(module, cls_name)


def create_engine(backend: str, manifest_path: Path, **options: Any) -> Engine:
    return engine_class(backend)(Path(manifest_path), **options)
