"""The TensorRT builder: pure parts, and what `build_engine` asks TensorRT for and writes, with a
recording stand-in for the builder (the build itself needs a Jetson: see README)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.trt_standin import ORIN, HostCudaApi
from smearscope.engines.manifest import BatchProfile, CropInfo, ModelManifest, TensorSpec
from smearscope.export.tensorrt_build import calibration_batches, trtexec_command


def _manifest(size=40):
    return ModelManifest(name="rbc_head", task="classification", file="rbc_head.onnx", sha256="ab" * 32, opset=17,
                         inputs=[TensorSpec(name="images", shape=[-1, 3, size, size])],
                         outputs=[TensorSpec(name="logits", shape=[-1, 13])], batch=BatchProfile(min=1, opt=32, max=128),
                         input_size=size, canonical_um_per_px=0.2, classes=[str(i) for i in range(13)],
                         crop=CropInfo(extent_um=11.2, input_size=size))


def test_trtexec_command_has_profile_and_precision(tmp_path):
    cmd = trtexec_command(_manifest(), Path("m.onnx"), Path("m.engine"), "int8", Path("m.calib"))
    assert "--minShapes=images:1x3x40x40" in cmd and "--optShapes=images:32x3x40x40" in cmd
    assert "--maxShapes=images:128x3x40x40" in cmd and "--int8" in cmd and "--fp16" in cmd and "--calib=m.calib" in cmd
    assert "--int8" not in trtexec_command(_manifest(), Path("m.onnx"), Path("m.engine"), "fp16")


def test_calibration_batches_resize_and_preprocess(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 255, (50, 50, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    batches = list(calibration_batches(tmp_path, _manifest(), batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 40, 40), (2, 3, 40, 40), (1, 3, 40, 40)]
    assert all(b.dtype == np.float32 and 0.0 <= b.min() and b.max() <= 1.0 for b in batches)


def test_build_all_without_tensorrt_says_so(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT present")
    except ImportError:
        pass
    from smearscope.export.tensorrt_build import build_all

    assert build_all(tmp_path, tmp_path) == 1
    out = capsys.readouterr().out
    # on a Jetson TensorRT is JetPack's: the apt package, not `pip install .[jetson]` (which fails there)
    assert "sudo apt install python3-libnvinfer" in out and "--system-site-packages" in out
    assert "jetson extra" not in out


def test_trtexec_command_reserves_a_gib_of_workspace():
    cmd = trtexec_command(_manifest(), Path("m.onnx"), Path("m.engine"), "fp16")
    assert "--memPoolSize=workspace:1024M" in cmd.split()  # WORKSPACE_BYTES, 1 GiB, in MiB
    assert "--fp16" in cmd.split() and "--calib" not in cmd


def test_calibration_batches_take_at_most_limit_images_in_name_order(tmp_path):
    for i in range(5):
        rows = 10 * i + np.arange(40, dtype=np.uint8)  # not blank; row 0 is 10 * i
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.repeat(rows[:, None, None], 40, 1).repeat(3, 2))
    batches = list(calibration_batches(tmp_path, _manifest(), batch_size=2, limit=3))
    assert [len(b) for b in batches] == [2, 1]
    # the first rows of images 0, 1, 2 (grey 0, 10, 20): the first three names, scaled by 1/255
    np.testing.assert_allclose(np.concatenate(batches)[:, :, 0, 0], np.array([[0] * 3, [10] * 3, [20] * 3]) / 255,
                               rtol=1e-6)


def test_build_all_on_missing_or_broken_models_says_which_without_a_traceback(tmp_path, capsys, monkeypatch):
    """On a Jetson (TensorRT present), `build-engines --models DIR` with no models there, or one cut
    short, ended in a ManifestError traceback (exit 1), after building the engines before it."""
    import shutil
    import sys
    import types

    from smearscope.export.tensorrt_build import build_all
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))  # no call reaches it
    assert build_all(tmp_path / "nowhere", tmp_path / "engines") == 2
    out = capsys.readouterr().out
    assert "nowhere/seg.json" in out and "smearscope install-models" in out, out
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models, ignore=shutil.ignore_patterns("README.md"))
    (models / "wbc_head.onnx").write_bytes((models / "wbc_head.onnx").read_bytes()[:4096])
    assert build_all(models, tmp_path / "engines") == 2
    out = capsys.readouterr().out
    assert "sha256 of wbc_head.onnx does not match" in out, out
    assert not (tmp_path / "engines").exists()  # nothing built before the check


class _RecordingTrt:
    """NOT TensorRT: the builder calls `build_engine` makes, recorded; its "engine" is `size` bytes.
    It checks what the builder asks TensorRT for, not what TensorRT would build."""

    __version__ = "10.3.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16, INT8 = "fp16", "int8"

    #: How the stand-in's serialised timing caches begin; bytes that do not are refused as TensorRT
    #: refuses a cache it cannot read (`create_timing_cache` returns None).
    TIMING = b"recorded timing cache;"

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.profiles: list[dict] = []
        self.flags: list[str] = []
        self.timing_given: list[bytes] = []  # the bytes of each create_timing_cache call, in order
        self.timing_set: list[tuple[bytes, bool]] = []  # each set_timing_cache: the cache's bytes, ignore_mismatch
        self.built_with: list[bytes | None] = []  # the timing cache each build had attached
        self.calibration_read: list[bytes | None] = []  # what each INT8 build's calibrator read as its cache
        self.raise_on_unreadable = False
        #: A cache whose bytes hold this was measured on a GPU whose properties differ from this one's
        #: (its header): `set_timing_cache(ignore_mismatch=False)` answers False, as TensorRT does.
        self.other_gpu = b"measured on another GPU;"
        trt = self

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data

        class Profile(dict):
            def set_shape(self, name, mn, opt, mx):
                self[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Config:
            timing = None
            int8_calibrator = None

            def set_calibration_profile(self, profile):
                pass

            def set_memory_pool_limit(self, pool, nbytes):
                pass

            def create_timing_cache(self, serialized):
                trt.timing_given.append(bytes(serialized))
                if serialized and not bytes(serialized).startswith(trt.TIMING):
                    if trt.raise_on_unreadable:  # the other way a binding may refuse it
                        raise RuntimeError("timing cache: invalid header")
                    return None
                return TimingCache(bytes(serialized) or trt.TIMING)

            def set_timing_cache(self, cache, ignore_mismatch):
                trt.timing_set.append((cache.data, ignore_mismatch))
                if trt.other_gpu in cache.data and not ignore_mismatch:
                    return False
                self.timing = cache
                return True

            def add_optimization_profile(self, profile):
                trt.profiles.append(profile)
                return len(trt.profiles) - 1

            def set_flag(self, flag):
                trt.flags.append(flag)

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                trt.built_with.append(None if config.timing is None else config.timing.data)
                if config.int8_calibrator is not None:  # TensorRT asks the calibrator for a saved cache first
                    trt.calibration_read.append(config.int8_calibrator.read_calibration_cache())
                if config.timing is not None:  # the layers this build timed, for the next one
                    config.timing.data += b"layer %d;" % len(trt.built_with)
                return bytes(range(256)) * (trt.size // 256)

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                return True

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        self.Builder, self.OnnxParser, self.IInt8EntropyCalibrator2 = Builder, OnnxParser, IInt8EntropyCalibrator2


def test_build_engine_asks_for_one_identical_profile_per_lane(tmp_path, monkeypatch):
    import sys

    from smearscope.engines.manifest import load_manifest
    from smearscope.engines.trt_cache import profile_shapes
    from smearscope.export.tensorrt_build import build_engine
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    trt = _RecordingTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = build_engine(DEFAULT_MODELS_DIR / "rbc_head.json", tmp_path, "fp16", lanes=3, cuda=HostCudaApi())
    want = profile_shapes(load_manifest(DEFAULT_MODELS_DIR / "rbc_head.json"))
    assert trt.profiles == [want] * 3 and trt.flags == ["fp16"]
    assert "-l3-" in out.name and out.stat().st_size == trt.size


def test_an_engine_write_cut_short_is_not_taken_for_a_built_engine(tmp_path, monkeypatch):
    """A build whose engine file could not be written whole (the disk full, here a file size limit
    of 64 KiB, a real write failure) must leave no file under the engine's name: the next
    build-engines saw one, said "already built", and the station failed to load it for good."""
    import resource
    import signal
    import sys

    from smearscope.engines.trt_cache import record_path, whole_problem
    from smearscope.export.tensorrt_build import build_engine
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    trt = _RecordingTrt(size=1 << 20)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    manifest = DEFAULT_MODELS_DIR / "rbc_head.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(OSError):
            build_engine(manifest, tmp_path, "fp16", lanes=2, cuda=HostCudaApi())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert not list(tmp_path.glob("*.engine"))
    out = build_engine(manifest, tmp_path, "fp16", lanes=2, cuda=HostCudaApi())  # the next run builds it whole
    assert out.stat().st_size == trt.size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, record_path(out).name, "timing-trt10.3.0-sm87.cache"])  # no temporary file left
    # readable by the station's user, whoever built them (the temporary file was 0600)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}
    # cut short afterwards (a copy, a full disk elsewhere): the next build-engines builds it again
    out.write_bytes(out.read_bytes()[:1000])
    assert whole_problem(out) is not None
    assert build_engine(manifest, tmp_path, "fp16", lanes=2, cuda=HostCudaApi()) == out
    assert out.stat().st_size == trt.size and whole_problem(out) is None


def test_an_fp16_build_on_a_gpu_without_fast_fp16_says_it_runs_in_fp32(tmp_path, monkeypatch, caplog):
    import sys

    from smearscope.export.tensorrt_build import build_engine
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    trt = _RecordingTrt()
    trt.Builder.platform_has_fast_fp16 = False
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with caplog.at_level("WARNING", logger="smearscope.export.tensorrt_build"):
        build_engine(DEFAULT_MODELS_DIR / "rbc_head.json", tmp_path, "fp16", lanes=1, cuda=HostCudaApi())
    assert trt.flags == [] and "no fast FP16; the engine named fp16 runs in FP32" in caplog.text


def test_int8_without_calibration_is_refused_in_one_line_before_any_build(tmp_path, monkeypatch, capsys):
    """`build-engines --precision int8` with no --calibration and no saved calibration cache ended in
    a RuntimeError traceback from the first model's build; now one line and exit 2, nothing built.
    With images for every model, or the caches a former build saved, the check lets the build on."""
    import shutil
    import sys

    from smearscope.cli import main
    from smearscope.engines.manifest import load_manifest
    from smearscope.engines.trt_cache import calibration_cache_path
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    monkeypatch.setitem(sys.modules, "tensorrt", _RecordingTrt())
    monkeypatch.setattr("smearscope.export.tensorrt_build.cuda_api", lambda name: HostCudaApi())
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models, ignore=shutil.ignore_patterns("README.md"))
    cache = models / "engines"
    code = main(["build-engines", "--models", str(models), "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "int8 needs --calibration DIR" in err and "(seg, rbc_head, wbc_head)" in err, err
    assert not cache.exists() or not list(cache.glob("*.engine"))

    calib = tmp_path / "calib"
    for stem in ("seg", "rbc_head"):  # wbc_head's images missing
        (calib / stem).mkdir(parents=True)
        cv2.imwrite(str(calib / stem / "a.png"), np.full((40, 40, 3), 200, np.uint8))
    code = main(["build-engines", "--models", str(models), "--precision", "int8", "--calibration", str(calib)])
    err = capsys.readouterr().err
    assert code == 2 and f"no PNG/JPEG images in {calib / 'wbc_head'}" in err and "Traceback" not in err, err
    assert main(["build-engines", "--models", str(models), "--precision", "int8",
                 "--calibration", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err

    from smearscope.export.tensorrt_build import _calibration_problem

    (calib / "wbc_head").mkdir()
    cv2.imwrite(str(calib / "wbc_head" / "a.jpg"), np.full((40, 40, 3), 200, np.uint8))
    assert _calibration_problem(models, cache, "int8", calib, "10.3.0", ORIN, 2) is None
    cache.mkdir()
    for name in ("seg.json", "rbc_head.json", "wbc_head.json"):  # a former build's saved caches
        calibration_cache_path(cache, load_manifest(models / name), "10.3.0", 2).write_bytes(b"c")
    assert _calibration_problem(models, cache, "int8", None, "10.3.0", ORIN, 2) is None
    assert _calibration_problem(models, cache, "int8", None, "10.3.0", ORIN, 3) is not None  # other lanes: other caches


def test_the_printed_int8_build_command_names_the_calibration_folder_and_parses():
    """The command doctor and the station print for int8 engines lacked --calibration, so running it
    as printed failed; it now names DIR and says what DIR is, and its words parse as build-engines."""
    from smearscope.cli import build_parser
    from smearscope.engines.trt_cache import build_command

    command = build_command(Path("/var/lib/smearscope/models"), Path("/var/lib/smearscope/models/engines"), "int8", 2)
    words, note = command.split(" (DIR: ")
    assert words.endswith("--precision int8 --lanes 2 --calibration DIR"), command
    assert "one subfolder per model" in note and "calibration cache" in note
    args = build_parser().parse_args(words.split()[1:])
    assert args.precision == "int8" and args.calibration == Path("DIR") and args.lanes == 2
    assert "--calibration" not in build_command(Path("/m"), Path("/m/engines"), "fp16", 2)


def test_the_timing_cache_is_saved_beside_the_engines_and_given_to_the_next_build(tmp_path, monkeypatch, caplog):
    """TensorRT 10 times every layer's tactics at each build (minutes per engine on a Jetson): the
    timing cache a build filled in is saved beside the engines and handed to the next build as it
    was saved; another TensorRT version or GPU gets its own; a saved cache TensorRT cannot read is
    left out with a WARNING and the engine is built all the same. `_RecordingTrt` is not TensorRT:
    it records what the builder was handed, as TensorRT 10's Python API names the calls."""
    import sys

    from smearscope.engines.trt_cache import timing_cache_path
    from smearscope.export.tensorrt_build import build_engine
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    trt = _RecordingTrt(size=4096)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    saved = timing_cache_path(tmp_path, "10.3.0", ORIN)
    assert saved.name == "timing-trt10.3.0-sm87.cache"
    build_engine(DEFAULT_MODELS_DIR / "rbc_head.json", tmp_path, "fp16", lanes=1, cuda=HostCudaApi())
    assert trt.timing_given == [b""] and trt.timing_set == [(trt.TIMING, False)]
    first = saved.read_bytes()
    assert first == trt.TIMING + b"layer 1;"  # what the build timed, written after it

    build_engine(DEFAULT_MODELS_DIR / "wbc_head.json", tmp_path, "fp16", lanes=1, cuda=HostCudaApi())
    assert trt.timing_given[1] == first and trt.built_with[1] == first  # reused as saved
    assert saved.read_bytes() == first + b"layer 2;"

    # another GPU: its own cache, begun empty; the Orin's is left as it is
    other = build_engine(DEFAULT_MODELS_DIR / "wbc_head.json", tmp_path, "fp16", lanes=1,
                         cuda=HostCudaApi(capability=(8, 6)))
    assert "-sm86-" in other.name and trt.timing_given[2] == b""
    assert timing_cache_path(tmp_path, "10.3.0", (8, 6)).exists() and saved.read_bytes() == first + b"layer 2;"

    saved.write_bytes(b"\x00corrupt timing cache")  # cut short, overwritten, another tool's file
    with caplog.at_level("WARNING", logger="smearscope.export.tensorrt_build"):
        seg = build_engine(DEFAULT_MODELS_DIR / "seg.json", tmp_path, "fp16", lanes=1, cuda=HostCudaApi())
    assert seg.stat().st_size == 4096  # built all the same
    assert trt.timing_given[3:] == [b"\x00corrupt timing cache", b""]
    assert f"timing cache {saved} (21 bytes) is not one TensorRT 10.3.0 can use" in caplog.text, caplog.text
    assert saved.read_bytes() == trt.TIMING + b"layer 4;"  # a good one in its place
    assert [ignore for _, ignore in trt.timing_set] == [False] * 4

    # refused by raising: the same warning and a build, never a traceback
    saved.write_bytes(b"\x00corrupt timing cache")
    trt.raise_on_unreadable = True
    (tmp_path / seg.name).unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="smearscope.export.tensorrt_build"):
        assert build_engine(DEFAULT_MODELS_DIR / "seg.json", tmp_path, "fp16", lanes=1, cuda=HostCudaApi()) == seg
    assert "is not one TensorRT 10.3.0 can use" in caplog.text and seg.stat().st_size == 4096


def test_an_int8_rebuild_after_the_update_uses_the_calibration_caches_saved_before_it(tmp_path, monkeypatch, capsys):
    """Engines are now named by the GPU's compute capability, and the INT8 calibration cache beside
    each (ENGINE.calib) took that name too, so the caches an earlier release saved were no longer
    found: `build-engines --precision int8` without --calibration (install-jetson.sh without
    CALIBRATION_DIR) refused to build, and the service was not enabled. An IInt8EntropyCalibrator2
    cache holds the network's tensor ranges, not the GPU's (TensorRT's developer guide: portable
    between devices), so it keeps the name it had; the engines built from it carry the capability."""
    import shutil
    import sys

    from smearscope.cli import main
    from smearscope.engines.manifest import load_manifest
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    trt = _RecordingTrt(size=4096)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("smearscope.export.tensorrt_build.cuda_api", lambda name: HostCudaApi())
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models, ignore=shutil.ignore_patterns("README.md"))
    cache = models / "engines"
    cache.mkdir()
    saved = {}
    for name in ("seg.json", "rbc_head.json", "wbc_head.json"):  # as the earlier release named them
        m = load_manifest(models / name)
        calib = cache / f"{m.name}-{m.sha256[:12]}-trt10.3.0-int8-l2-b{m.batch.min}-{m.batch.opt}-{m.batch.max}.calib"
        saved[m.name] = f"calibration table of {m.name}".encode()
        calib.write_bytes(saved[m.name])
    code = main(["build-engines", "--models", str(models), "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert trt.calibration_read == [saved["seg"], saved["rbc_head"], saved["wbc_head"]]
    built = sorted(p.name for p in cache.glob("*.engine"))
    assert len(built) == 3 and all("-trt10.3.0-sm87-int8-l2-" in n for n in built), built


def test_a_timing_cache_from_a_gpu_of_other_properties_is_said_as_such_not_as_corrupt(tmp_path, monkeypatch, caplog):
    """A whole timing cache that TensorRT refuses only for its header (measured on another board of
    the same compute capability: set_timing_cache(ignore_mismatch=False) answers False) was logged
    as "corrupt or cut short", sending the operator after a disk fault that is not there. It is now
    said as measured on a GPU of other properties; the build goes on without it and saves this GPU's."""
    import sys

    from smearscope.engines.trt_cache import timing_cache_path
    from smearscope.export.tensorrt_build import build_engine
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    trt = _RecordingTrt(size=4096)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    saved = timing_cache_path(tmp_path, "10.3.0", ORIN)
    saved.write_bytes(trt.TIMING + trt.other_gpu)
    with caplog.at_level("WARNING", logger="smearscope.export.tensorrt_build"):
        out = build_engine(DEFAULT_MODELS_DIR / "rbc_head.json", tmp_path, "fp16", lanes=1, cuda=HostCudaApi())
    assert out.stat().st_size == 4096 and trt.built_with == [trt.TIMING]  # built with an empty cache of its own
    warning = caplog.text
    assert f"timing cache {saved} (46 bytes) is not one TensorRT 10.3.0 can use" in warning, warning
    assert "measured on a GPU whose properties differ from this one's" in warning and "corrupt" not in warning, warning
    assert saved.read_bytes() == trt.TIMING + b"layer 1;"  # this GPU's in its place


def test_a_build_removes_the_temporary_files_a_killed_build_left_and_keeps_a_fresh_one(tmp_path, monkeypatch, caplog):
    """A build killed mid-write (SIGKILL, power lost) left `.NAME.XXXXXXXX.tmp` files in the engines
    folder for ever; the next build removes those not written to for LEFTOVER_AGE_S, each logged with
    its size, and keeps a fresh one (a build running beside it) and files of other patterns."""
    import logging
    import os
    import shutil
    import sys
    import time

    from smearscope.cli import main
    from smearscope.engines.trt_cache import LEFTOVER_AGE_S
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    monkeypatch.setitem(sys.modules, "tensorrt", _RecordingTrt())
    monkeypatch.setattr("smearscope.export.tensorrt_build.cuda_api", lambda name: HostCudaApi())
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models, ignore=shutil.ignore_patterns("README.md"))
    cache = models / "engines"
    cache.mkdir()
    old = time.time() - LEFTOVER_AGE_S - 60
    stale = {cache / ".seg-trt10.3.0-sm87-fp16.engine.k3_x9q0a.tmp": 3000,
             cache / ".rbc_head-trt10.3.0-sm87-fp16.engine.json.ab12cd34.tmp": 70}
    fresh = cache / ".wbc_head-trt10.3.0-sm87-fp16.engine.zz9_0abc.tmp"
    other = cache / "notes.abcdefgh.tmp"  # not write_atomically's pattern (no leading dot)
    for path, size in stale.items():
        path.write_bytes(b"x" * size)
        os.utime(path, (old, old))
    for path in (fresh, other):
        path.write_bytes(b"y" * 10)
    os.utime(other, (old, old))
    with caplog.at_level(logging.INFO, logger="smearscope.engines.trt_cache"):
        assert main(["build-engines", "--models", str(models)]) == 0
    assert not any(p.exists() for p in stale), sorted(cache.iterdir())
    assert fresh.exists() and other.exists()
    removed = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "removed" in r.getMessage()]
    assert sorted(removed) == sorted(f"removed {p} ({n} bytes), a temporary file left by a killed build"
                                     for p, n in stale.items()), removed
    assert len(list(cache.glob("*.engine"))) == 3
