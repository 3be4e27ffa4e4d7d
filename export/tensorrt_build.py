"""ONNX -> TensorRT engine (FP16 / INT8) per model, keyed by TensorRT version + ONNX hash.

NOT RUN anywhere in this project: TensorRT cannot be installed on the development machines, and
the GPU machines used have none either. Written against the TensorRT 10 Python API; the pure parts
(engine naming, profiles, calibration batches, the printed trtexec command) are unit-tested, and
the calibrator's CUDA calls go through `engines.cuda_api`, which ran on a GPU (bench.device_check).
Build engines once, on the Jetson, before the service starts (`smearscope build-engines`), as
frigate's trt-model-prepare does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smearscope.engines.base import EngineError
from smearscope.engines.cuda_api import CudaApi, cuda_api
from smearscope.engines.manifest import ManifestError, ModelManifest, load_manifest
from smearscope.engines.preprocess import to_model_input
from smearscope.engines.trt_cache import (
    TENSORRT_MISSING,
    Capability,
    build_record,
    calibration_cache_path,
    engine_path,
    profile_shapes,
    record_path,
    remove_leftovers,
    timing_cache_path,
    whole_problem,
)
from smearscope.files import write_atomically

logger = logging.getLogger(__name__)
MANIFESTS = ("seg.json", "rbc_head.json", "wbc_head.json")
WORKSPACE_BYTES = 1 << 30
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def trtexec_command(manifest: ModelManifest, onnx_path: Path, out: Path, precision: str,
                    calib_cache: Path | None = None) -> str:
    """The equivalent `trtexec` command line, printed for engineers who build by hand."""
    (name, (mn, opt, mx)), = profile_shapes(manifest).items()
    shape = lambda s: "x".join(str(d) for d in s)
    parts = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={out}",
        f"--minShapes={name}:{shape(mn)}", f"--optShapes={name}:{shape(opt)}", f"--maxShapes={name}:{shape(mx)}",
        f"--memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M",
    ]
    if precision in ("fp16", "int8"):
        parts.append("--fp16")
    if precision == "int8":
        parts.append("--int8")
        if calib_cache:
            parts.append(f"--calib={calib_cache}")
    return " ".join(parts)


def calibration_batches(folder: Path, manifest: ModelManifest, batch_size: int, limit: int = 512) -> Iterator[np.ndarray]:
    """Preprocessed float32 batches from a folder of canonical-scale tiles/crops (PNG/JPEG).

    Images of another size are resized to the model input; at most `limit` images are used.
    """
    import cv2

    from smearscope.device.ingest import IngestError, IngestLimits, load_image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    size = manifest.input_size
    buf = []
    limits = IngestLimits(min_side=1)  # crops may be smaller than a field's smallest side
    for p in files:
        try:
            img = load_image(p, limits=limits).pixels
        except IngestError as exc:
            logger.warning("calibration: skipping %s: %s", p, exc)
            continue
        if img.shape[:2] != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        buf.append(img)
        if len(buf) == batch_size:
            yield to_model_input(np.stack(buf), manifest.preprocessing)
            buf = []
    if buf:
        yield to_model_input(np.stack(buf), manifest.preprocessing)


def _make_calibrator(trt, batches: Iterator[np.ndarray], batch_size: int, cache: Path, cuda: CudaApi):
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = batches
            self.device: int | None = None
            self.stream = cuda.stream()

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            try:
                b = next(self.batches)
            except StopIteration:
                return None
            if b.shape[0] < batch_size:  # pad the last batch
                b = np.concatenate([b, np.repeat(b[-1:], batch_size - b.shape[0], 0)])
            b = np.ascontiguousarray(b, dtype=np.float32)
            if self.device is None:
                self.device = cuda.alloc(b.nbytes)
            cuda.htod_async(self.device, b, self.stream)
            cuda.synchronize(self.stream)  # TensorRT reads the buffer as soon as this returns
            return [self.device]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data) -> None:
            _write_whole(cache, bytes(data))

        def release(self) -> None:
            if self.device is not None:
                cuda.free(self.device)
                self.device = None
            cuda.destroy_stream(self.stream)

    return EntropyCalibrator()


def _write_whole(path: Path, data: bytes) -> None:
    """Under `path` only once all of `data` is on disk: a write cut short (disk full, power lost)
    leaves no file there that the next build would take for a built engine. Readable by all (as
    before: the station's user may not be the one who built), writable by the builder."""
    write_atomically(path, data, mode=0o644)


def build_engine(manifest_path: Path, cache_dir: Path, precision: str = "fp16", calibration_dir: Path | None = None,
                 cuda: CudaApi | None = None, lanes: int = 2) -> Path:
    """Build (or find) the engine of one model for `lanes` execution contexts: one identical
    optimisation profile each (TensorRT 10: contexts in concurrent use on a dynamic-shape engine
    may not share a profile), for the GPU of `cuda` (its compute capability names the engine;
    INT8 calibrates through it), with the timing cache beside the engines."""
    import tensorrt as trt

    if cuda is None:
        raise RuntimeError("build_engine needs a CUDA API (pycuda or cuda-python): the engine is named by the "
                           "GPU's compute capability")
    with cuda.current():
        capability = cuda.compute_capability()
    manifest = load_manifest(manifest_path)
    onnx_path = manifest.model_path(manifest_path)
    out = engine_path(cache_dir, manifest, trt.__version__, capability, precision, lanes)
    calib_cache = calibration_cache_path(cache_dir, manifest, trt.__version__, lanes)
    logger.info("equivalent for one lane: %s", trtexec_command(manifest, onnx_path, engine_path(
        cache_dir, manifest, trt.__version__, capability, precision, 1), precision, calib_cache))
    if out.exists():
        if (problem := whole_problem(out, capability)) is None:
            logger.info("engine %s already built", out.name)
            return out
        logger.warning("engine %s: %s; building it again", out.name, problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"ONNX parse failed for {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    timings = timing_cache_path(cache_dir, trt.__version__, capability)
    timing_cache = _attach_timing_cache(config, timings, trt.__version__)
    profiles = []
    for _ in range(lanes):  # identical; profile i serves lane i of engines.tensorrt_engine
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile_shapes(manifest).items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        profiles.append(profile)
    if precision in ("fp16", "int8") and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp16":  # built, and named, as asked: the station loads it by that name
        logger.warning("%s: this GPU has no fast FP16; the engine named fp16 runs in FP32", out.name)
    if precision == "int8":
        if calibration_dir is None and not calib_cache.exists():
            raise RuntimeError("INT8 needs --calibration (a folder of canonical tiles/crops) or a saved cache")
        config.set_flag(trt.BuilderFlag.INT8)
        bs = manifest.batch.opt
        batches = calibration_batches(calibration_dir, manifest, bs) if calibration_dir else iter(())
        calibrator = _make_calibrator(trt, batches, bs, calib_cache, cuda)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profiles[0])
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if precision == "int8":
            calibrator.release()
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {out.name}")
    data = bytes(serialized)
    _write_whole(record_path(out), build_record(data, trt.__version__, capability).encode())  # first: an
    _write_whole(out, data)  # engine never lacks its own
    logger.info("built %s (%d bytes)", out, out.stat().st_size)
    if timing_cache is not None:
        _save_timing_cache(timing_cache, timings)
    return out


def _attach_timing_cache(config, path: Path, version: str):
    """The timing cache saved at `path` (an empty one where none is) attached to the builder
    config, so layers timed by an earlier build are not timed again; None where TensorRT attaches
    none. A file it cannot read (corrupt, cut short) is left out with a WARNING: the build then
    times every layer and saves a new cache over it."""
    try:
        saved = path.read_bytes()
    except FileNotFoundError:
        saved = b""
    except OSError as exc:
        logger.warning("timing cache %s cannot be read (%s); building without it", path, exc)
        saved = b""
    if saved:
        cache, why = _timing_cache(config, saved)
        if cache is not None:
            logger.info("timing cache %s (%d bytes) reused", path.name, len(saved))
            return cache
        logger.warning("timing cache %s (%d bytes) is not one TensorRT %s can use (%s); building without it, "
                       "and saving a new one", path, len(saved), version, why)
    cache, why = _timing_cache(config, b"")
    if cache is None:
        logger.warning("TensorRT attached no empty timing cache (%s); building without one", why)
    return cache


def _timing_cache(config, serialized: bytes):
    """IBuilderConfig.create_timing_cache + set_timing_cache (no header mismatch accepted): the
    cache, or None and why TensorRT refused the bytes: unreadable (None, or it raises), or whole
    but measured on a GPU of other properties (set_timing_cache answers False)."""
    try:
        cache = config.create_timing_cache(serialized)
        if cache is None:
            return None, "corrupt or cut short"
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            return None, ("measured on a GPU whose properties differ from this one's, e.g. another board of "
                          "the same compute capability")
    except (RuntimeError, TypeError, ValueError) as exc:
        return None, f"corrupt or cut short: {exc}"
    return cache, ""


def _save_timing_cache(cache, path: Path) -> None:
    """The cache the build filled in, for the next build; a failed write costs only time."""
    try:
        _write_whole(path, bytes(cache.serialize()))
    except OSError as exc:
        logger.warning("timing cache %s could not be saved (%s); the next build times every layer again", path, exc)



def _calibration_problem(models_dir: Path, cache_dir: Path, precision: str, calibration_dir: Path | None,
                         version: str, capability: Capability, lanes: int) -> str | None:
    """Why an INT8 build cannot calibrate every model it would build (one line), or None: each
    needs images in CALIBRATION/<model> or the calibration cache a former build saved, unless its
    engine is already built whole."""
    if precision != "int8":
        return None
    if calibration_dir is not None and not calibration_dir.is_dir():
        return f"--calibration {calibration_dir} is not a folder"
    lacking = []
    for name in MANIFESTS:
        manifest = load_manifest(models_dir / name)
        out = engine_path(cache_dir, manifest, version, capability, precision, lanes)
        if ((out.exists() and whole_problem(out, capability) is None)
                or calibration_cache_path(cache_dir, manifest, version, lanes).exists()):
            continue
        sub = calibration_dir / Path(name).stem if calibration_dir is not None else None
        if sub is None or not (sub.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in sub.iterdir())):
            lacking.append(Path(name).stem)
    if not lacking:
        return None
    where = (f"no PNG/JPEG images in {', '.join(str(calibration_dir / m) for m in lacking)}"
             if calibration_dir is not None else f"none given, and no saved calibration cache in {cache_dir}")
    return (f"int8 needs --calibration DIR, a folder of canonical tiles/crops with one subfolder per model "
            f"({', '.join(Path(n).stem for n in MANIFESTS)}), or a saved calibration cache: {where}")


def build_all(models_dir: Path, cache_dir: Path, precision: str = "fp16", calibration_dir: Path | None = None,
              cuda: str | CudaApi = "auto", lanes: int = 2) -> int:
    try:
        import tensorrt as trt
    except ImportError as exc:
        print(f"build-engines needs TensorRT 10, which is not importable ({exc}); {TENSORRT_MISSING}")
        return 1
    if int(trt.__version__.split(".")[0]) < 10:
        print(f"build-engines needs TensorRT 10 (JetPack 6.1 or later); found {trt.__version__}")
        return 1
    remove_leftovers(cache_dir)  # a killed build's temporary files, each up to an engine's size
    try:  # every model whole before any engine is built (minutes each on a Jetson)
        for name in MANIFESTS:
            load_manifest(models_dir / name, verify_hash=True)
    except ManifestError as exc:
        print(f"build-engines: {exc}; install the models: smearscope install-models {models_dir} "
              "(or --models a folder that has them)")
        return 2
    try:  # the GPU's compute capability names every engine; INT8 calibration copies batches through it
        api = cuda if isinstance(cuda, CudaApi) else cuda_api(cuda)
        with api.current():
            capability = api.compute_capability()
    except EngineError as exc:
        logger.error("no CUDA API (jetson extra): %s", exc)
        print(f"build-engines needs the jetson extra (pycuda or cuda-python, to read the GPU's compute "
              f"capability and for int8): {exc}")
        return 1
    if (problem := _calibration_problem(models_dir, cache_dir, precision, calibration_dir, trt.__version__,
                                        capability, lanes)):
        print(f"build-engines: {problem}", file=sys.stderr)
        return 2
    with api.current():
        for name in MANIFESTS:
            sub = calibration_dir / Path(name).stem if calibration_dir else None
            sub = sub if sub is not None and sub.is_dir() else None  # else its saved cache, or built
            path = build_engine(models_dir / name, cache_dir, precision, sub, cuda=api, lanes=lanes)
            print(path)
    return 0
