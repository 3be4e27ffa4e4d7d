"""Where TensorRT engines live: build artifacts keyed by TensorRT version, ONNX hash, precision,
lanes (one optimisation profile per lane) and the profile's batch sizes (min, opt, max), each with
a build record beside it (its size and sha256) that tells a whole engine from a cut-short one; and
the one `smearscope build-engines` command that builds what the station loads.

Pure functions (no TensorRT import) shared by the builder (`export.tensorrt_build`) and the
runtime (`engines.tensorrt_engine`), so both always agree on the file name.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
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
    return _name(manifest, ver, precision, lanes)


def _name(manifest: ModelManifest, ver: str, precision: str, lanes: int) -> str:
    b = manifest.batch  # the whole profile: an engine built for another min/opt is another engine
    return f"{manifest.name}-{manifest.sha256[:12]}-trt{ver}-{precision}-l{lanes}-b{b.min}-{b.opt}-{b.max}.engine"


def engine_glob(manifest: ModelManifest, precision: str, lanes: int) -> str:
    """The engine's file name for any TensorRT version (a glob pattern), where none can be imported."""
    engine_filename(manifest, "", precision, lanes)  # the same checks
    return _name(manifest, "*", precision, lanes)


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


#: What the DIR of an int8 build command stands for.
INT8_DIR_NOTE = ("(DIR: a folder of canonical tiles/crops, one subfolder per model named as its ONNX file "
                 "without .onnx; not needed for a model whose calibration cache a former build saved)")


def build_command(models_dir: Path, cache_dir: Path, precision: str, lanes: int) -> str:
    """The command that builds the engines the station loads from `models_dir` into `cache_dir`:
    the one text of the station's start failure and of `smearscope doctor`."""
    words = ["smearscope", "build-engines", "--models", shlex.quote(str(models_dir))]
    if Path(cache_dir) != Path(models_dir) / "engines":
        words += ["--cache", shlex.quote(str(cache_dir))]
    words += ["--precision", precision, "--lanes", str(lanes)]
    if precision == "int8":  # the station config names no calibration images: DIR is the operator's
        words += ["--calibration", "DIR", INT8_DIR_NOTE]
    return " ".join(words)


def missing_engine(path: Path, command: str) -> str:
    return f"no TensorRT engine at {path}; build it first: {command}"


def record_path(engine: Path) -> Path:
    """The build record beside an engine: its size and sha256, written before the engine itself."""
    return engine.with_name(engine.name + ".json")


def build_record(data: bytes) -> str:
    return json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def whole_problem(engine: Path) -> str | None:
    """Why the engine file is not the one its build wrote (cut short, changed, unreadable), or None
    when it is. An engine without a build record (copied alone) is taken as it is: None."""
    data = engine.read_bytes()  # OSError: unreadable
    try:
        record = json.loads(record_path(engine).read_text())
        size, digest = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its build record {record_path(engine).name} cannot be read ({exc})"
    if len(data) != size:
        return f"{len(data)} bytes where its build wrote {size}: cut short or changed"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its sha256 differs from the one its build wrote: changed since"
    return None
