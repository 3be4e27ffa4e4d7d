"""`engines.tensorrt_engine.TensorRtEngine` with `bench.trt_standin` in place of TensorRT.

TensorRT cannot be installed here. The stand-in answers the TensorRT 10 calls the engine makes and
executes the committed ONNX networks with ONNX Runtime at the host addresses the engine bound
(`HostCudaApi`: plain memory; copies and the network wait on their stream until it is
synchronised, as on a GPU). So these tests check the engine's own logic:
bindings per lane, batches split and padded to the profile's optimum, output shapes, buffers
reused across batches, threads on lanes, what close() frees, its errors; and the pipeline on the
"tensorrt" backend. Streams and asynchrony on a real GPU: `bench.device_check` (README).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from bench import trt_standin
from bench.trt_standin import HostCudaApi
from smearscope.engines.base import EngineError
from smearscope.engines.batching import run_batched
from smearscope.engines.cuda_api import cuda_api
from smearscope.engines.onnxruntime_engine import OnnxRuntimeEngine
from smearscope.engines.tensorrt_engine import TensorRtEngine
from smearscope.engines.trt_cache import build_command, build_record, record_path

MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = pytest.mark.skipif(not (MODELS / "seg.json").exists(), reason="models not trained yet")


@pytest.fixture(autouse=True)
def standin():
    with trt_standin.installed():
        yield


def _engine(tmp_path, name="rbc_head", lanes=2, api=None):
    trt_standin.write_engine(MODELS / f"{name}.json", tmp_path, lanes=lanes)
    api = api or HostCudaApi()
    return TensorRtEngine(MODELS / f"{name}.json", cache_dir=tmp_path, cuda=api, lanes=lanes).load(), api


def _x(engine, n, seed):
    return np.random.default_rng(seed).random((n, *engine.manifest.inputs[0].shape[1:]), dtype=np.float32)


@pytest.mark.parametrize("name", ["rbc_head", "seg"])
def test_outputs_match_onnxruntime_across_the_profile(tmp_path, name):
    eng, _ = _engine(tmp_path, name)
    ref = OnnxRuntimeEngine(MODELS / f"{name}.json").load()
    prof = eng.manifest.batch
    for n in (1, 3, prof.opt, prof.max, 2 * prof.max + 3):
        x = _x(eng, n, seed=n)
        got, want = run_batched(eng, x), run_batched(ref, x)
        for k in want:
            assert got[k].shape == want[k].shape
            np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5)
    eng.close()


def test_batches_are_padded_to_the_optimum_and_split_at_the_maximum(tmp_path):
    eng, _ = _engine(tmp_path, "rbc_head", lanes=1)
    prof = eng.manifest.batch
    run_batched(eng, _x(eng, 3, 0))
    run_batched(eng, _x(eng, prof.max + 5, 1))
    lane = eng._all_lanes[0]
    assert [s[0] for s in lane.context.executed] == [prof.opt, prof.max, prof.opt]
    eng.close()


def test_a_smaller_batch_after_a_larger_one_reads_only_its_own_outputs(tmp_path):
    """The pinned buffers are reused: a batch of 2 after a batch of max must not see stale rows."""
    eng, _ = _engine(tmp_path, "rbc_head", lanes=1)
    ref = OnnxRuntimeEngine(MODELS / "rbc_head.json").load()
    big, small = _x(eng, eng.manifest.batch.max, 5), _x(eng, 2, 6)
    eng.run(big)
    got = eng.run(small)["logits"]
    assert got.shape == (2, len(eng.manifest.classes))
    np.testing.assert_allclose(got, ref.run(small)["logits"], atol=1e-5)
    # the result is a copy: the next batch does not change it
    before = got.copy()
    eng.run(big)
    np.testing.assert_array_equal(got, before)
    eng.close()


def test_threads_on_two_lanes_each_get_their_own_results(tmp_path):
    eng, _ = _engine(tmp_path, "rbc_head", lanes=2)
    ref = OnnxRuntimeEngine(MODELS / "rbc_head.json").load()
    work = {t: [_x(eng, 1 + (3 * t + i) % 40, 100 * t + i) for i in range(6)] for t in range(4)}
    want = {t: [ref.run(x)["logits"] for x in xs] for t, xs in work.items()}
    wrong: list[int] = []

    def worker(t):
        for x, w in zip(work[t], want[t]):
            if not np.allclose(eng.run(x)["logits"], w, atol=1e-5):
                wrong.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert wrong == []
    assert sum(len(lane.context.executed) for lane in eng._all_lanes) == 24
    eng.close()


def test_each_lane_holds_its_own_optimisation_profile(tmp_path):
    """TensorRT 10: execution contexts in concurrent use on a dynamic-shape engine may not share an
    optimisation profile. The engine is built with one per lane, and lane i takes profile i; a
    second context choosing profile 0 is refused (the stand-in refuses it as TensorRT does)."""
    eng, api = _engine(tmp_path, "rbc_head", lanes=3)
    assert sorted(lane.context.profile for lane in eng._all_lanes) == [0, 1, 2]
    for lane in eng._all_lanes:  # every lane runs, on its own profile
        with api.current():
            got = eng._run_lane(lane, _x(eng, 5, lane.context.profile))["logits"]
        assert got.shape[0] == 5 and lane.context.executed == [(5, *eng.manifest.inputs[0].shape[1:])]
    eng.close()


def test_an_engine_built_for_fewer_lanes_is_refused_with_the_rebuild_command(tmp_path):
    """The command is `trt_cache.build_command`'s, as in every other engine error: it named neither
    --models nor --cache, so run as printed it built into another folder."""
    trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path, lanes=2, profiles=1)
    api = HostCudaApi()
    with pytest.raises(EngineError) as err:
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=api, lanes=2).load()
    assert "built with 1 optimisation profile(s), 2 lanes need one each" in str(err.value)
    assert str(err.value).endswith(f"; rebuild it: {build_command(MODELS, tmp_path, 'fp16', 2)}"), err.value
    assert (api.live, api.pinned_live, api.streams_live) == ({}, set(), 0)


def test_an_engine_built_for_another_compute_capability_is_never_loaded(tmp_path):
    """An engine built on an Orin (SM 8.7) and copied to a GPU of SM 8.6 is not the engine that GPU
    looks for: it is missing, with the command that builds it, and nothing is deserialised. Copied
    under the other GPU's name, its build record (which names SM 8.7) refuses it."""
    orin = trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path, capability=(8, 7))
    assert "-sm87-" in orin.name and json.loads(record_path(orin).read_text())["compute_capability"] == "8.7"
    api = HostCudaApi(capability=(8, 6))
    command = build_command(MODELS, tmp_path, "fp16", 2)
    with pytest.raises(EngineError) as err:
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=api).load()
    want = orin.with_name(orin.name.replace("-sm87-", "-sm86-"))
    assert str(err.value) == f"no TensorRT engine at {want}; build it first: {command}"
    renamed = want
    renamed.write_bytes(orin.read_bytes())
    record_path(renamed).write_bytes(record_path(orin).read_bytes())
    with pytest.raises(EngineError, match=r"built for a GPU of compute capability 8\.7, this one is 8\.6.*"
                                          r"rebuild it: smearscope build-engines"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=api).load()
    assert api.allocs == 0 and api.streams_live == 0  # never deserialised: no lane was set up
    TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi()).load().close()  # the Orin's


def test_an_engine_built_for_other_lanes_is_not_loaded(tmp_path):
    trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path, lanes=1)
    with pytest.raises(EngineError, match=f"build-engines --models {MODELS} --cache {tmp_path} --precision fp16 --lanes 2"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi(), lanes=2).load()


def test_an_engine_cut_short_is_refused_with_the_rebuild_command(tmp_path):
    """Its size against the build record beside it: the station says to rebuild, not only that
    TensorRT could not read it (build-engines rebuilds such an engine: test_tensorrt_build)."""
    path = trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    with pytest.raises(EngineError, match=f"{len(whole) - 10} bytes where its build wrote {len(whole)}: cut short.*"
                       f"rebuild it: smearscope build-engines --models {MODELS} --cache {tmp_path}"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi()).load()


def test_close_frees_every_buffer_and_stream_and_the_engine_reloads(tmp_path):
    eng, api = _engine(tmp_path, "seg", lanes=3)
    n_tensors = 3  # images, output0, output1
    assert len(api.live) == len(api.pinned_live) == 3 * n_tensors and api.streams_live == 3
    eng.run(_x(eng, 2, 0))
    eng.close()
    assert (api.live, api.pinned_live, api.streams_live) == ({}, set(), 0)
    eng.load()
    assert len(api.live) == 3 * n_tensors
    eng.close()
    assert api.live == {}


def test_outputs_are_read_only_after_the_stream_is_synchronised(tmp_path):
    """HostCudaApi runs copies and the network only when the stream is synchronised, as a GPU
    finishes them late: with the engine's wait removed it returns the previous batch's outputs,
    so the parity tests above would catch an engine that forgot to wait."""
    eng, api = _engine(tmp_path, "rbc_head", lanes=1)
    ref = OnnxRuntimeEngine(MODELS / "rbc_head.json").load()
    first, second = _x(eng, 4, 1), _x(eng, 4, 2)
    want_first = ref.run(first)["logits"]
    np.testing.assert_allclose(eng.run(first)["logits"], want_first, atol=1e-5)
    real = api.synchronize
    api.synchronize = lambda stream: None
    try:
        stale = eng.run(second)["logits"]
    finally:
        api.synchronize = real
    np.testing.assert_allclose(stale, want_first, atol=1e-5)
    assert not np.allclose(stale, ref.run(second)["logits"], atol=1e-3)
    eng.close()


def test_a_failed_allocation_frees_what_was_allocated(tmp_path):
    trt_standin.write_engine(MODELS / "seg.json", tmp_path)
    for after in (0, 1, 4):  # the first tensor, the second, the second lane's first
        api = HostCudaApi(fail_alloc_after=after)
        with pytest.raises(EngineError, match="out of memory"):
            TensorRtEngine(MODELS / "seg.json", cache_dir=tmp_path, cuda=api, lanes=2).load()
        assert api.allocs == after
        assert (api.live, api.pinned_live, api.streams_live) == ({}, set(), 0)


def test_tensorrt_before_10_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_standin, "__version__", "8.6.2")
    trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path)
    with pytest.raises(EngineError, match="needs TensorRT 10"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi()).load()


def test_missing_engine_file_says_how_to_build_it(tmp_path):
    eng = TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi())
    with pytest.raises(EngineError, match="build-engines"):
        eng.load()


def test_unreadable_engine_file_is_an_engine_error(tmp_path):
    path = trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path)
    record_path(path).unlink()  # copied without its build record: TensorRT itself judges it
    path.write_bytes(b"\x00not an engine")
    with pytest.raises(EngineError, match="could not deserialize"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi()).load()


def test_engine_without_the_manifest_tensors_is_refused(tmp_path):
    path = trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path)
    spec = json.loads(path.read_text())
    spec["outputs"][0]["name"] = "probabilities"  # built from another export
    path.write_text(json.dumps(spec))
    record_path(path).write_text(build_record(path.read_bytes(), trt_standin.__version__, trt_standin.ORIN))
    with pytest.raises(EngineError, match="lacks tensors"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi()).load()


def test_engine_file_name_follows_precision(tmp_path):
    trt_standin.write_engine(MODELS / "rbc_head.json", tmp_path, precision="fp16")
    with pytest.raises(EngineError, match="int8"):
        TensorRtEngine(MODELS / "rbc_head.json", cache_dir=tmp_path, cuda=HostCudaApi(), precision="int8").load()


def test_lanes_must_be_positive():
    with pytest.raises(EngineError, match="lanes"):
        TensorRtEngine(MODELS / "rbc_head.json", lanes=0)


def test_cuda_api_names():
    with pytest.raises(EngineError, match="unknown CUDA API"):
        cuda_api("opencl")
    try:
        import pycuda.driver  # noqa: F401
        pytest.skip("pycuda is installed here")
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime  # noqa: F401
        pytest.skip("cuda-python is installed here")
    except ImportError:
        pass
    with pytest.raises(EngineError, match="needs pycuda or cuda-python"):
        cuda_api("auto")


def test_pipeline_on_the_tensorrt_backend_reports_what_onnxruntime_reports(tmp_path):
    from smearscope.device.synthetic import render_field
    from smearscope.service.analysis.pipeline import MODEL_FILES, Analyzer

    for f in MODEL_FILES.values():
        trt_standin.write_engine(MODELS / f, tmp_path)
    api = HostCudaApi()
    trt = Analyzer.from_models_dir(MODELS, backend="tensorrt", cache_dir=tmp_path, cuda=api, warmup=False)
    ort = Analyzer.from_models_dir(MODELS, warmup=False)
    field = render_field(21, width=640, height=480, microns_per_pixel=0.1)
    a, b = trt.analyze(field.frame).report, ort.analyze(field.frame).report
    assert {m.backend for m in a.models.values()} == {"tensorrt"}
    assert a.counts == b.counts and a.counts.rbc > 0
    assert [(c.kind, c.label, c.bbox) for c in a.cells] == [(c.kind, c.label, c.bbox) for c in b.cells]
    trt.close()
    assert api.live == {}
