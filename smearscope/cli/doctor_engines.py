"""Doctor's TensorRT engine check: for each model the station loads, the engine file it would load
(the same key: TensorRT version, the GPU's compute capability, the ONNX model's sha256, precision,
lanes, batch profile) exists
and is whole (readable, the size and sha256 its build recorded); else the `smearscope build-engines`
command that builds it, the text the station's start failure gives (`engines.trt_cache`)."""

from __future__ import annotations

import importlib
from pathlib import Path

Check = tuple[str, str, str]  # (OK | INFO | WARN | FAIL, what, detail)


def engine_checks(analysis) -> list[Check]:
    if analysis.engine_backend != "tensorrt":
        return [("INFO", "engines", f"engine_backend {analysis.engine_backend}: TensorRT engines are not used")]
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.engines.trt_cache import (
        LEFTOVER_AGE_S,
        build_command,
        engine_glob,
        engine_path,
        leftover_files,
        missing_engine,
    )
    from smearscope.service.analysis.pipeline import MODEL_FILES

    try:
        version: str | None = str(importlib.import_module("tensorrt").__version__)
    except ImportError:
        version = None
    capability, why = _capability(analysis.cuda_api)
    no_gpu = f"the GPU's compute capability cannot be read here ({why})"
    models, precision, lanes = analysis.models_dir, analysis.tensorrt_precision, analysis.tensorrt_lanes
    cache = models / "engines"  # where the station's TensorRtEngine looks
    command = build_command(models, cache, precision, lanes)
    checks: list[Check] = []
    if capability is None:  # the station's start reads it the same way, and stops there
        checks.append(("FAIL", "engines", ("the station cannot load TensorRT engines: the GPU's compute capability "
                                           f"cannot be read through analysis.cuda_api {analysis.cuda_api!r} ({why})")))
    for role, name in MODEL_FILES.items():
        try:
            manifest = load_manifest(models / name, verify_hash=True)
        except (ManifestError, OSError, ValueError):
            continue  # the model check says why
        if version is not None and capability is not None:
            path = engine_path(cache, manifest, version, capability, precision, lanes)
            found = [path] if path.exists() else []
        else:
            path = cache / engine_glob(manifest, precision, lanes, version, capability)
            found = sorted(cache.glob(path.name))
        if not found:
            others = sorted(p.name for p in cache.glob(f"{manifest.name}-*.engine"))
            stale = (f" (the folder holds {', '.join(others)}: built for another TensorRT version, GPU compute "
                     "capability, ONNX model, precision, lanes or batch profile)") if others else ""
            unknown = "" if version is not None else "; TensorRT cannot be imported here, so any version would do"
            unknown += "" if capability is not None else f"; {no_gpu}, so any compute capability would do"
            checks.append(("FAIL", f"engine {role}", missing_engine(path, command) + stale + unknown))
            continue
        checks += [_whole(role, p, command, version, capability, no_gpu) for p in found]
    if leftovers := leftover_files(cache):
        checks.append(("WARN", "engine leftovers", (
            f"{len(leftovers)} temporary file(s) of killed builds in {cache}, "
            f"{sum(size for _, size in leftovers)} bytes, untouched for {LEFTOVER_AGE_S / 3600:g} h or more; "
            f"the next build removes them: {command}")))
    return checks


def _capability(api_name: str) -> tuple[tuple[int, int] | None, str]:
    """The GPU's compute capability through the station's CUDA API, or None and why not."""
    from smearscope.engines.base import EngineError
    from smearscope.engines.cuda_api import cuda_api

    try:
        api = cuda_api(api_name)
        with api.current():
            return api.compute_capability(), ""
    except EngineError as exc:
        return None, str(exc)


def _whole(role: str, path: Path, command: str, version: str | None, capability: tuple[int, int] | None,
           no_gpu: str) -> Check:
    from smearscope.engines.trt_cache import record_path, whole_problem

    try:
        problem = whole_problem(path, capability)
    except OSError as exc:
        return ("FAIL", f"engine {role}", f"{path} cannot be read by this user ({exc.strerror or exc})")
    if problem is not None:
        return ("FAIL", f"engine {role}", f"{path}: {problem}; rebuild it: {command}")
    size = f"{path.stat().st_size} bytes"
    if version is None:
        return ("WARN", f"engine {role}", (f"{path} ({size}): TensorRT cannot be imported here, so whether it was "
                                           "built by the installed TensorRT version cannot be checked"))
    if capability is None:
        return ("WARN", f"engine {role}", (f"{path} ({size}): {no_gpu}, so whether it was built for this GPU "
                                           "cannot be checked"))
    if not record_path(path).exists():
        return ("WARN", f"engine {role}", (f"{path} ({size}): no build record {record_path(path).name} beside it, "
                                           f"so whether it is whole cannot be checked; to be sure delete it and run: "
                                           f"{command}"))
    return ("OK", f"engine {role}", f"{path} ({size}, whole: the size and sha256 its build recorded)")
