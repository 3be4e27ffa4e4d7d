"""`smearscope doctor` with engine_backend "tensorrt": for each model the station loads, the engine
file it would load exists under the same key and is whole, else the `smearscope build-engines`
command that builds it, word for word the station's start failure. TensorRT is `bench.trt_standin`
(TensorRT cannot be installed here) and the GPU `bench.trt_standin.HostCudaApi` (an Orin's compute
capability, 8.7, unless a test says another); the models and engine files are real files under
tmp_path."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_daemon import to_toml

from bench import trt_standin
from bench.trt_standin import HostCudaApi
from smearscope.cli import main
from smearscope.engines.base import EngineError
from smearscope.engines.tensorrt_engine import TensorRtEngine
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR, MODEL_FILES

pytestmark = pytest.mark.skipif(not (DEFAULT_MODELS_DIR / "seg.json").exists(), reason="models not trained yet")


@pytest.fixture(autouse=True)
def gpu(monkeypatch: pytest.MonkeyPatch) -> HostCudaApi:
    """The CUDA API doctor reads the compute capability through (`engines.cuda_api.cuda_api`)."""
    api = HostCudaApi()
    monkeypatch.setattr("smearscope.engines.cuda_api.cuda_api", lambda name="auto", device_index=0: api)
    return api


@pytest.fixture
def models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "models"
    assert main(["install-models", str(folder)]) == 0
    capsys.readouterr()
    return folder


def _doctor(tmp_path: Path, models: Path, capsys, backend: str = "tensorrt", lanes: int = 2) -> list[str]:
    """Doctor's engine lines for a station on `backend`, TensorRT the stand-in."""
    path = tmp_path / "station.toml"
    path.write_text(to_toml({
        "station_id": "doc-trt", "source": {"kind": "simulated"},
        "analysis": {"models_dir": str(models), "engine_backend": backend, "tensorrt_lanes": lanes},
        "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}}}) + "\n")
    main(["doctor", "--config", str(path)])
    return [ln for ln in capsys.readouterr().out.splitlines() if ln[6:].startswith("engine")]


def _station_error(models: Path, role: str, lanes: int = 2, capability: tuple[int, int] = (8, 7)) -> str:
    """What the station's start says for this model's engine."""
    with pytest.raises(EngineError) as err:
        TensorRtEngine(models / MODEL_FILES[role], cuda=HostCudaApi(capability=capability), lanes=lanes).load()
    return str(err.value)


def _write_all(models: Path, lanes: int = 2) -> dict[str, Path]:
    return {role: trt_standin.write_engine(models / name, models / "engines", lanes=lanes)
            for role, name in MODEL_FILES.items()}


def test_with_onnxruntime_doctor_says_engines_are_not_used(tmp_path, models, capsys) -> None:
    assert _doctor(tmp_path, models, capsys, backend="onnxruntime") == [
        "INFO  engines            engine_backend onnxruntime: TensorRT engines are not used"]


def test_each_missing_engine_fails_with_the_command_the_station_start_gives(tmp_path, models, capsys) -> None:
    with trt_standin.installed():
        lines = _doctor(tmp_path, models, capsys)
        assert len(lines) == len(MODEL_FILES), lines
        for role, line in zip(MODEL_FILES, lines, strict=True):
            station = _station_error(models, role)
            assert line == f"FAIL  engine {role:<11} {station}", (line, station)
        command = f"smearscope build-engines --models {shlex.quote(str(models))} --precision fp16 --lanes 2"
        assert station.endswith(f"build it first: {command}")
        # present and whole: OK, and the station loads them
        paths = _write_all(models)
        lines = _doctor(tmp_path, models, capsys)
        assert all(ln.startswith("OK") and "whole" in ln for ln in lines) and len(lines) == 3, lines
        assert all(str(p) in ln for p, ln in zip(paths.values(), lines, strict=True))
        TensorRtEngine(paths["rbc_head"].parent.parent / "rbc_head.json", cuda=HostCudaApi()).load().close()


def test_a_truncated_engine_fails_with_the_rebuild_command_in_doctor_and_at_start(tmp_path, models, capsys) -> None:
    with trt_standin.installed():
        path = _write_all(models)["wbc_head"]
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        lines = _doctor(tmp_path, models, capsys)
        bad = [ln for ln in lines if not ln.startswith("OK")]
        assert len(lines) == 3 and len(bad) == 1, lines
        assert bad[0].startswith(f"FAIL  engine wbc_head    {path}: {len(whole) // 2} bytes where its build wrote "
                                 f"{len(whole)}: cut short or changed; rebuild it: smearscope build-engines"), bad
        station = _station_error(models, "wbc_head")
        assert bad[0].endswith(station.split("; rebuild it: ")[1]) and "cut short" in station, station


def test_an_engine_built_for_other_lanes_is_missing_and_named_as_stale(tmp_path, models, capsys) -> None:
    with trt_standin.installed():
        old = _write_all(models, lanes=1)
        lines = _doctor(tmp_path, models, capsys, lanes=2)
        assert len(lines) == 3 and all(ln.startswith("FAIL") for ln in lines), lines
        for (role, path), line in zip(old.items(), lines, strict=True):
            assert _station_error(models, role) in line
            assert f"the folder holds {path.name}: built for another TensorRT version, GPU compute" in line, line
        assert all(ln.startswith("OK") for ln in _doctor(tmp_path, models, capsys, lanes=1))


def test_without_tensorrt_doctor_says_it_cannot_check_the_version(tmp_path, models, capsys) -> None:
    try:
        import tensorrt  # noqa: F401
        pytest.skip("a real tensorrt is installed")
    except ImportError:
        pass
    lines = _doctor(tmp_path, models, capsys)
    assert len(lines) == 3 and all(ln.startswith("FAIL") and "TensorRT cannot be imported here" in ln
                                   for ln in lines), lines
    assert "-trt*-sm87-fp16-l2-" in lines[0] and "build it first: smearscope build-engines --models" in lines[0]
    _write_all(models)
    lines = _doctor(tmp_path, models, capsys)
    assert len(lines) == 3 and all(ln.startswith("WARN") for ln in lines), lines
    assert "whether it was built by the installed TensorRT version cannot be checked" in lines[0]


def test_engines_built_for_another_gpu_fail_with_the_build_command_as_at_start(tmp_path, models, capsys, gpu) -> None:
    """Engines built on an Orin (compute capability 8.7) and copied to a station whose GPU is 8.6:
    TensorRT would refuse them only at deserialisation. Doctor and the station both look for the
    8.6 engine, find none, and name the command; doctor names the Orin's as stale."""
    with trt_standin.installed():
        orin = _write_all(models)
        gpu.capability = (8, 6)
        lines = _doctor(tmp_path, models, capsys)
        assert len(lines) == 3 and all(ln.startswith("FAIL") for ln in lines), lines
        for (role, path), line in zip(orin.items(), lines, strict=True):
            station = _station_error(models, role, capability=(8, 6))
            assert line.startswith(f"FAIL  engine {role:<11} {station} (the folder holds {path.name}: "), (line, station)
            assert "-sm86-" in station and "build it first: smearscope build-engines --models" in station
        gpu.capability = (8, 7)
        assert all(ln.startswith("OK") for ln in _doctor(tmp_path, models, capsys))


def test_without_a_gpu_doctor_fails_and_says_it_cannot_check_the_compute_capability(tmp_path, models, capsys, gpu) -> None:
    def no_gpu():
        raise EngineError("CUDA device 0: no CUDA-capable device is detected")

    gpu.compute_capability = no_gpu
    with trt_standin.installed():
        _write_all(models)
        lines = _doctor(tmp_path, models, capsys)
    assert len(lines) == 4 and lines[0].startswith("FAIL  engines            the station cannot load TensorRT engines: ")
    assert all(ln.startswith("WARN") for ln in lines[1:]), lines
    assert ("the GPU's compute capability cannot be read here (CUDA device 0: no CUDA-capable device is "
            "detected), so whether it was built for this GPU cannot be checked") in lines[1], lines[1]


def test_a_gpu_the_station_cannot_read_fails_doctor_as_it_stops_the_station(tmp_path, models, capsys, monkeypatch,
                                                                            gpu) -> None:
    """The station's start reads the compute capability through analysis.cuda_api and stops where it
    cannot (here cuda-python configured, pycuda the binding installed: doctor's binding line is OK);
    doctor only WARNed that it could not check the engines, passed, and install-jetson.sh enabled a
    unit that failed at every start. It now FAILs with the station's own reason."""
    import importlib.util
    import sys
    import types

    from smearscope.engines.tensorrt_engine import (
        cuda_api as station_cuda_api,  # the real one, unpatched
    )

    if importlib.util.find_spec("cuda") is not None:
        pytest.skip("cuda-python is installed here")
    monkeypatch.setattr("smearscope.engines.cuda_api.cuda_api", station_cuda_api)
    pycuda = types.ModuleType("pycuda")  # installed, as on the Jetson: the binding check passes
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", types.ModuleType("pycuda.driver"))
    with trt_standin.installed():
        _write_all(models)
        config = tmp_path / "station.toml"
        config.write_text(to_toml({
            "station_id": "doc-trt", "source": {"kind": "simulated"},
            "analysis": {"models_dir": str(models), "engine_backend": "tensorrt", "cuda_api": "cuda-python"},
            "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "state" / "o.sqlite3")}}}) + "\n")
        code = main(["doctor", "--no-wait", "--config", str(config)])
        with pytest.raises(EngineError) as start:  # the station's start, the same reason
            TensorRtEngine(models / MODEL_FILES["rbc_head"], cuda="cuda-python").load()
    out = capsys.readouterr().out
    assert "OK    CUDA binding       pycuda" in out, out
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    want = ("FAIL  engines            the station cannot load TensorRT engines: the GPU's compute capability "
            f"cannot be read through analysis.cuda_api 'cuda-python' ({start.value})")
    assert fails == [want], out
    assert code == 1, out


def test_temporary_files_of_a_killed_build_are_a_warning_with_their_size_and_the_build_command(
        tmp_path, models, capsys) -> None:
    import os
    import time

    from smearscope.engines.trt_cache import LEFTOVER_AGE_S, build_command

    _write_all(models)
    cache = models / "engines"
    old = time.time() - LEFTOVER_AGE_S - 60
    for name, size in ((".seg-x.engine.abcd1234.tmp", 500), (".rbc-x.engine.json.zz_90abc.tmp", 20)):
        (cache / name).write_bytes(b"x" * size)
        os.utime(cache / name, (old, old))
    (cache / ".wbc-x.engine.qqqq1111.tmp").write_bytes(b"y" * 7)  # fresh: a build writing it now
    lines = [ln for ln in _doctor(tmp_path, models, capsys) if "leftovers" in ln]
    assert len(lines) == 1 and lines[0].startswith("WARN"), lines
    assert "2 temporary file(s)" in lines[0] and "520 bytes" in lines[0], lines
    assert build_command(models, cache, "fp16", 2) in lines[0], lines
    (cache / ".seg-x.engine.abcd1234.tmp").unlink()
    (cache / ".rbc-x.engine.json.zz_90abc.tmp").unlink()
    assert not [ln for ln in _doctor(tmp_path, models, capsys) if "leftovers" in ln]
