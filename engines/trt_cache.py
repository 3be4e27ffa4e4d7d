"""Where TensorRT engines live: build artifacts keyed by TensorRT version, the GPU's compute
capability (an engine serialised on one architecture does not deserialise on another), ONNX hash,
precision, lanes (one optimisation profile per lane) and the profile's batch sizes (min, opt, max),
each with a build record beside it (its size, sha256, TensorRT version and compute capability) that
tells a whole engine from a cut-short one; the builder's timing cache beside them, keyed by
TensorRT version and compute capability; and the one `smearscope build-engines` command that
builds what the station loads.

Pure functions (no TensorRT import) shared by the builder (`export.tensorrt_build`) and the
runtime (`engines.tensorrt_engine`), so both always agree on the file name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import stat
import time
from pathlib import Path

from smearscope.engines.manifest import ModelManifest

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")

#: What to do when `import tensorrt` fails. On a Jetson TensorRT is JetPack's, never pip's (PyPI's
#: `tensorrt` is NVIDIA's server build, and `pip install .[jetson]` fails there): naming the extra
#: alone sends an engineer to the one command that does not work.
TENSORRT_MISSING = ("on a Jetson TensorRT comes with JetPack, not from pip: sudo apt install python3-libnvinfer, "
                    "seen by a venv made with --system-site-packages (systemd/install-jetson.sh does both; "
                    "docs/STATION.md, section 1); elsewhere, engine_backend 'onnxruntime'")


Capability = tuple[int, int]  # (major, minor): (8, 7) on a Jetson Orin


def sm_tag(capability: Capability) -> str:
    """The compute capability as it appears in file names: (8, 7) -> "sm87"."""
    major, minor = (int(v) for v in capability)
    if major < 1 or minor < 0:
        raise ValueError(f"not a compute capability: {capability!r}")
    return f"sm{major}{minor}"


def _ver(trt_version: str) -> str:
    return re.sub(r"[^0-9.]", "", trt_version) or "unknown"


def engine_filename(manifest: ModelManifest, trt_version: str, capability: Capability, precision: str,
                    lanes: int) -> str:
    """The engine file of a model, for the GPU of `capability`. `lanes`: its identical optimisation
    profiles, one per execution context (TensorRT 10: each context in concurrent use on a
    dynamic-shape engine needs its own)."""
    _check(precision, lanes)
    return _name(manifest, _ver(trt_version), sm_tag(capability), precision, lanes)


def _check(precision: str, lanes: int) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")


def _name(manifest: ModelManifest, ver: str, sm: str | None, precision: str, lanes: int,
          suffix: str = ".engine") -> str:
    b = manifest.batch  # the whole profile: an engine built for another min/opt is another engine
    gpu = "" if sm is None else f"-{sm}"
    return (f"{manifest.name}-{manifest.sha256[:12]}-trt{ver}{gpu}-{precision}-l{lanes}"
            f"-b{b.min}-{b.opt}-{b.max}{suffix}")


def engine_glob(manifest: ModelManifest, precision: str, lanes: int, trt_version: str | None = None,
                capability: Capability | None = None) -> str:
    """The engine's file name (a glob pattern) for any TensorRT version or compute capability where
    either cannot be read here (None)."""
    _check(precision, lanes)
    return _name(manifest, "*" if trt_version is None else _ver(trt_version),
                 "sm*" if capability is None else sm_tag(capability), precision, lanes)


def engine_path(cache_dir: Path, manifest: ModelManifest, trt_version: str, capability: Capability,
                precision: str, lanes: int) -> Path:
    return Path(cache_dir) / engine_filename(manifest, trt_version, capability, precision, lanes)


def calibration_cache_path(cache_dir: Path, manifest: ModelManifest, trt_version: str, lanes: int) -> Path:
    """The INT8 calibration cache beside a model's engines: the network's tensor ranges, which an
    IInt8EntropyCalibrator2 measures before layer fusion, so they hold for any GPU (TensorRT's
    developer guide: the cache is portable between devices). Not keyed by compute capability, so
    the caches saved before engines were keep their name and are found."""
    _check("int8", lanes)
    return Path(cache_dir) / _name(manifest, _ver(trt_version), None, "int8", lanes, ".calib")


def timing_cache_path(cache_dir: Path, trt_version: str, capability: Capability) -> Path:
    """The builder's timing cache beside the engines: its layer timings are valid only for the
    TensorRT version and GPU that measured them, so another version or capability has its own."""
    return Path(cache_dir) / f"timing-trt{_ver(trt_version)}-{sm_tag(capability)}.cache"


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


def build_record(data: bytes, trt_version: str, capability: Capability) -> str:
    return json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "tensorrt": trt_version, "compute_capability": f"{capability[0]}.{capability[1]}"})


def whole_problem(engine: Path, capability: Capability | None = None) -> str | None:
    """Why the engine file is not the one its build wrote (cut short, changed, unreadable, built
    for a GPU of another compute capability than `capability`), or None when it is. An engine
    without a build record (copied alone) is taken as it is: None."""
    data = engine.read_bytes()  # OSError: unreadable
    try:
        record = json.loads(record_path(engine).read_text())
        size, digest = int(record["bytes"]), str(record["sha256"])
        built_for = record.get("compute_capability")  # records before it was keyed lack it
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its build record {record_path(engine).name} cannot be read ({exc})"
    if capability is not None and built_for is not None and built_for != f"{capability[0]}.{capability[1]}":
        return (f"built for a GPU of compute capability {built_for}, this one is "
                f"{capability[0]}.{capability[1]}: TensorRT engines do not move between them")
    if len(data) != size:
        return f"{len(data)} bytes where its build wrote {size}: cut short or changed"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its sha256 differs from the one its build wrote: changed since"
    return None


#: How old (seconds since its last write) a temporary file of `smearscope.files.write_atomically`
#: in the engines folder must be before a build removes it as left by a killed build (SIGKILL, power
#: lost): a build's own lives only while its bytes are written and synced (seconds), so an hour never
#: takes the file of a build running beside it.
LEFTOVER_AGE_S = 3600.0
#: write_atomically's temporary file (mkstemp's prefix `.<name>.` and suffix `.tmp`, its 8 random characters).
_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def leftover_files(cache_dir: Path, now: float | None = None) -> list[tuple[Path, int]]:
    """The temporary files in `cache_dir` a killed build left (write_atomically's pattern, not written
    to for LEFTOVER_AGE_S or more), each with its size in bytes; none where the folder cannot be listed."""
    now = time.time() if now is None else now
    found = []
    try:
        entries = sorted(cache_dir.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not _LEFTOVER.fullmatch(entry.name):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= LEFTOVER_AGE_S:
            found.append((entry, st.st_size))
    return found


def remove_leftovers(cache_dir: Path) -> int:
    """Remove the temporary files a killed build left in `cache_dir` (`leftover_files`), each logged
    at INFO with its size; the bytes freed."""
    freed = 0
    for path, size in leftover_files(cache_dir):
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("cannot remove %s, left by a killed build (%d bytes): %s", path, size, exc)
            continue
        freed += size
        logger.info("removed %s (%d bytes), a temporary file left by a killed build", path, size)
    return freed
