"""Where TensorRT engines live: build artifacts keyed by TensorRT version, ONNX hash, precision,
lanes (one optimisation profile per lane) and the profile's maximum batch.

Pure functions (no TensorRT import) shared by the builder (`export.tensorrt_build`) and the
runtime (`engines.tensorrt_engine`), so both always agree on the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

from smearscope.engines.manifest import ModelManifest

PRECISIONS = ("fp32", "fp16", "int8")


def engine_filename(manifest: ModelManifest, trt_version: str, precision: str, lanes: int) -> str:
    """The engine file of a model. `lanes`: its identical optimisation profiles, one per execution
    context (TensorRT 10: each context in concurrent use on a dynamic-shape engine needs its own)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    ver = re.sub(r"[^0-9.]", "", trt_version) or "unknown"
    return f"{manifest.name}-{manifest.sha256[:12]}-trt{ver}-{precision}-l{lanes}-b{manifest.batch.max}.engine"


def engine_path(cache_dir: Path, manifest: ModelManifest, trt_version: str, precision: str, lanes: int) -> Path:
    return Path(cache_dir) / engine_filename(manifest, trt_version, precision, lanes)


def profile_shapes(manifest: ModelManifest) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) input shapes per input tensor for the optimisation profile."""
    b = manifest.batch
    out = {}
    for t in manifest.inputs:
        rest = tuple(t.shape[1:])
        if any(d < 0 for d in rest):
            raise ValueError(f"{manifest.name}: only the batch axis may be dynamic, got {t.shape}")
        out[t.name] = ((b.min, *rest), (b.opt, *rest), (b.max, *rest))
    return out
