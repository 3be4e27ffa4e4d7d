"""Engine interface, batching to a profile, registry, TensorRT cache naming (pure parts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from smearscope.engines.base import EngineError
from smearscope.engines.batching import plan_batches, run_batched
from smearscope.engines.manifest import BatchProfile, ManifestError, load_manifest
from smearscope.engines.registry import create_engine, engine_class
from smearscope.engines.trt_cache import engine_filename, profile_shapes, timing_cache_path

ORIN = (8, 7)  # a Jetson Orin's compute capability

MODELS = Path(__file__).resolve().parents[1] / "models"
needs_models = pytest.mark.skipif(not (MODELS / "rbc_head.json").exists(), reason="models/rbc_head.json not trained yet")


def test_plan_batches_splits_and_pads():
    p = BatchProfile(min=2, opt=8, max=16)
    assert plan_batches(40, p) == [(0, 16, 16), (16, 32, 16), (32, 40, 8)]
    assert plan_batches(1, p) == [(0, 1, 2)]  # padded up to the profile minimum
    assert plan_batches(3, p, pad_to_opt=True) == [(0, 3, 8)]
    assert plan_batches(0, p) == []


def test_unknown_backend_is_a_configuration_error():
    with pytest.raises(EngineError, match="unknown engine backend"):
        engine_class("tflite")


def test_tensorrt_backend_absent_here_fails_clearly(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    if not (MODELS / "rbc_head.json").exists():
        pytest.skip("models not trained yet")
    eng = create_engine("tensorrt", MODELS / "rbc_head.json")
    with pytest.raises(EngineError, match="tensorrt is not importable"):
        eng.load()


@needs_models
def test_trt_cache_key_changes_with_version_capability_hash_precision():
    m = load_manifest(MODELS / "rbc_head.json")
    a = engine_filename(m, "10.3.0", ORIN, "fp16", 2)
    assert m.sha256[:12] in a and "trt10.3.0-sm87-fp16" in a
    assert a != engine_filename(m, "10.4.0", ORIN, "fp16", 2) != engine_filename(m, "10.3.0", ORIN, "int8", 2)
    assert a != engine_filename(m, "10.3.0", ORIN, "fp16", 1)  # one optimisation profile per lane
    # an engine serialised for one GPU architecture does not deserialise on another
    assert a != engine_filename(m, "10.3.0", (8, 6), "fp16", 2) != engine_filename(m, "10.3.0", (9, 0), "fp16", 2)
    assert "-sm86-" in engine_filename(m, "10.3.0", (8, 6), "fp16", 2)
    # so is the builder's timing cache: another TensorRT version or GPU has its own
    t = timing_cache_path(Path("/e"), "10.3.0", ORIN)
    assert t.parent == Path("/e") and t != timing_cache_path(Path("/e"), "10.4.0", ORIN)
    assert t != timing_cache_path(Path("/e"), "10.3.0", (8, 6))
    shapes = profile_shapes(m)
    (mn, opt, mx), = shapes.values()
    assert mn[0] == m.batch.min and opt[0] == m.batch.opt and mx[0] == m.batch.max


@needs_models
def test_onnxruntime_engine_batches_beyond_profile_and_matches_single_runs():
    eng = create_engine("onnxruntime", MODELS / "rbc_head.json").load()
    s = eng.manifest.input_size
    x = np.random.default_rng(0).random((eng.manifest.batch.max + 7, 3, s, s), dtype=np.float32)
    out = run_batched(eng, x)["logits"]
    assert out.shape == (x.shape[0], len(eng.manifest.classes))
    single = eng.run(x[-1:])["logits"]
    np.testing.assert_allclose(out[-1:], single, rtol=1e-4, atol=1e-4)
    with pytest.raises(EngineError, match="outside profile"):
        eng.run(x[: eng.manifest.batch.max + 1])
    with pytest.raises(EngineError, match="input shape"):
        eng.run(np.zeros((1, 3, s + 1, s + 1), np.float32))


@needs_models
def test_manifest_hash_mismatch_is_refused(tmp_path):
    shutil.copy(MODELS / "rbc_head.json", tmp_path / "rbc_head.json")
    data = bytearray((MODELS / "rbc_head.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "rbc_head.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(tmp_path / "rbc_head.json")
    m = json.loads((tmp_path / "rbc_head.json").read_text())
    m["surprise"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="invalid manifest"):
        load_manifest(tmp_path / "bad.json")


@needs_models
@pytest.mark.parametrize("name", ["seg", "rbc_head", "wbc_head"])
def test_onnxruntime_rows_do_not_depend_on_their_batch_mates(name):
    """Re-batching (streamed tiles, crops of several fields in one batch) changes no output."""
    eng = create_engine("onnxruntime", MODELS / f"{name}.json").load()
    s = eng.manifest.input_size
    x = np.random.default_rng(1).random((min(9, eng.manifest.batch.max), 3, s, s), dtype=np.float32)
    whole = eng.run(x)
    for start, stop in ((0, 1), (2, 5), (4, len(x))):
        part = eng.run(x[start:stop])
        for key, value in part.items():
            assert np.array_equal(value, whole[key][start:stop]), (key, start, stop)


class _CountingEngine:
    """Rows times two; records each batch size it ran."""

    def __init__(self, max_batch: int = 16, fail: bool = False) -> None:
        self.manifest = type("M", (), {"batch": BatchProfile(min=1, opt=4, max=max_batch)})()
        self.sizes: list[int] = []
        self.fail = fail

    def run(self, batch):
        self.sizes.append(len(batch))
        if self.fail:
            raise EngineError("engine broke")
        return {"out": batch * 2}


def _concurrently(fn, args):
    import threading

    results: dict[int, object] = {}

    def call(i, a):
        try:
            results[i] = fn(a)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return [results[i] for i in range(len(args))]


def test_coalescing_engine_joins_concurrent_batches_and_returns_each_callers_rows():
    from smearscope.engines.coalesce import CoalescingEngine

    inner = _CountingEngine(max_batch=16)
    # Four callers at work: each leader waits (up to a generous delay) for the other three.
    eng = CoalescingEngine(inner, max_delay_s=5.0, peers=lambda: 3)
    batches = [np.full((n, 2), i, np.float32) for i, n in enumerate((3, 5, 4, 9))]
    out = _concurrently(lambda b: eng.run(b)["out"], batches)
    for b, o in zip(batches, out):
        np.testing.assert_array_equal(o, b * 2)
    assert sum(inner.sizes) == 21 and max(inner.sizes) <= 16
    assert len(inner.sizes) < 4  # some requests shared an engine run
    assert eng.requests == 4 and eng.runs == len(inner.sizes)


def test_coalescing_engine_alone_runs_at_once_and_errors_reach_every_caller():
    from smearscope.engines.coalesce import CoalescingEngine

    inner = _CountingEngine()
    eng = CoalescingEngine(inner, max_delay_s=3600.0, peers=lambda: 0)  # nobody else at work
    np.testing.assert_array_equal(eng.run(np.ones((2, 2), np.float32))["out"], 2 * np.ones((2, 2)))
    assert inner.sizes == [2] and eng.manifest is inner.manifest
    broken = CoalescingEngine(_CountingEngine(fail=True), max_delay_s=5.0, peers=lambda: 1)
    out = _concurrently(lambda b: broken.run(b), [np.ones((1, 2), np.float32)] * 2)
    assert all(isinstance(o, EngineError) for o in out)


@pytest.mark.parametrize("color", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_model_input_is_the_plain_conversion(color, layout):
    """Channel by channel into the output layout: the values of uint8 -> float32 times scale."""
    from smearscope.engines.manifest import Preprocessing
    from smearscope.engines.preprocess import to_model_input

    pre = Preprocessing(color=color, scale=1 / 255, layout=layout)
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (4, 21, 17, 3), dtype=np.uint8)  # head crops
    large = rng.integers(0, 256, (2, 131, 129, 3), dtype=np.uint8)  # detector tiles (split into planes)
    for images in (small, small[:, ::-1, ::-1], large, large[:, ::-1, ::-1]):  # mirrored tiles: strided views
        want = images[..., ::-1] if color == "RGB" else images
        want = want.astype(np.float32) * np.float32(1 / 255)
        want = np.ascontiguousarray(want.transpose(0, 3, 1, 2) if layout == "NCHW" else want)
        got = to_model_input(images, pre)
        assert got.flags.c_contiguous and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


@needs_models
@pytest.mark.parametrize("spin,threads,sessions,split", [(False, 1, 0, 0), (True, 2, 0, 2), (False, 2, 1, 0),
                                                         (False, 1, 3, 3)])
def test_the_stations_onnxruntime_threading_reaches_every_session(spin, threads, sessions, split):
    """`analysis.onnxruntime_spin` / `onnxruntime_threads` end up in each model's ONNX Runtime
    session (spinning off by default: the pools would take the cores the station shares)."""
    from smearscope.service.config.station import StationConfig
    from smearscope.service.station.startup import build_analyzer

    base = {"station_id": "t", "source": {"kind": "simulated"}}
    assert StationConfig.model_validate(base).analysis.onnxruntime_spin is False
    cfg = StationConfig.model_validate({**base, "analysis": {"models_dir": str(MODELS), "onnxruntime_spin": spin,
                                                             "onnxruntime_threads": threads,
                                                             "onnxruntime_sessions": sessions}})
    analyzer = build_analyzer(cfg)
    try:
        engines = [analyzer.segmenter.engine, analyzer.rbc_head.engine, analyzer.wbc_head.engine]
        for e in engines:
            opts = e._session.get_session_options()
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
            assert opts.intra_op_num_threads == threads
            assert e.split_sessions == split  # "auto" (0): one per thread, none for one thread
    finally:
        analyzer.close()


@needs_models
def test_onnxruntime_never_picks_its_tensorrt_provider_unasked(monkeypatch):
    """The Jetson's onnxruntime-gpu lists TensorrtExecutionProvider; taken by default, it would build
    a TensorRT engine per model at every start and on every batch larger than any seen. Here the
    installed ONNX Runtime is told it has the Jetson's providers: the session is asked for CUDA,
    then the CPU, never TensorRT (this build lacks CUDA, so it runs on the CPU, as it would say)."""
    import onnxruntime as ort

    from smearscope.engines.onnxruntime_engine import OnnxRuntimeEngine

    jetson = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(jetson))
    asked: list[list[str]] = []
    real_session = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        asked.append(list(providers))
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    engine = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=1).load()
    try:
        assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
        x = np.zeros((2, *engine.manifest.inputs[0].shape[1:]), np.float32)
        assert engine.run(x)["logits"].shape[0] == 2
    finally:
        engine.close()


@needs_models
def test_run_batched_on_no_inputs_gives_empty_outputs_of_the_manifests_shapes():
    """A field without crops: every output has no rows and the manifest's other axes; an axis the
    manifest leaves open (-1) has no size to give, so it is empty too."""
    eng = create_engine("onnxruntime", MODELS / "wbc_head.json")
    s = eng.manifest.input_size
    none = np.zeros((0, 3, s, s), np.float32)
    out = run_batched(eng, none)
    assert {k: v.shape for k, v in out.items()} == {
        "logits": (0, len(eng.manifest.classes)), "ood": (0,), "features": (0, eng.manifest.feature_space.dim)}
    assert all(v.dtype == np.float32 for v in out.values())
    eng.manifest = eng.manifest.model_copy(update={"outputs": [
        o.model_copy(update={"shape": [-1] * len(o.shape)}) for o in eng.manifest.outputs]})
    assert {k: v.shape for k, v in run_batched(eng, none).items()} == {"logits": (0, 0), "ood": (0,), "features": (0, 0)}


def test_a_backend_whose_module_cannot_be_imported_is_an_engine_error(monkeypatch):
    from smearscope.engines import registry

    monkeypatch.setitem(registry.BACKENDS, "openvino", "smearscope.engines.no_such_backend:OpenVinoEngine")
    with pytest.raises(EngineError, match="'openvino' is not installed here"):
        engine_class("openvino")


def _edited_manifest(tmp_path, edit, name="rbc_head", with_model=True) -> Path:
    """A copy of a committed manifest (and its model) in `tmp_path`, `edit(json dict)` applied."""
    if with_model:
        shutil.copy(MODELS / f"{name}.onnx", tmp_path / f"{name}.onnx")
    m = json.loads((MODELS / f"{name}.json").read_text())
    edit(m)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(m))
    return path


@needs_models
def test_a_misspelt_preprocessing_key_is_refused(tmp_path):
    """`colour` for `color` must not leave the model fed the default colour order unnoticed."""
    path = _edited_manifest(tmp_path, lambda m: m["preprocessing"].update(colour="BGR"))
    with pytest.raises(ManifestError, match="invalid manifest"):
        load_manifest(path)


@needs_models
def test_a_manifest_without_preprocessing_feeds_rgb_in_0_to_1_planes(tmp_path):
    """The default preprocessing is what the exported models are trained on (ultralytics, timm):
    RGB, uint8 / 255, channels first, letterbox grey 114, normalisation inside the graph."""
    m = load_manifest(_edited_manifest(tmp_path, lambda m: m.pop("preprocessing")))
    pre = m.preprocessing
    assert (pre.color, pre.layout, pre.pad_value, pre.normalization_in_graph) == ("RGB", "NCHW", 114, True)
    assert pre.scale == pytest.approx(1 / 255) and (pre.illumination, pre.stain) == ("none", "none")


@needs_models
def test_a_manifest_of_another_schema_version_is_refused(tmp_path):
    with pytest.raises(ManifestError, match="invalid manifest"):
        load_manifest(_edited_manifest(tmp_path, lambda m: m.update(schema_version=2)))


def _set(path: str, value):
    """An edit that sets one key of the manifest, its path given as "a.b" (lists by index)."""
    *parents, last = path.split(".")

    def edit(m):
        for key in parents:
            m = m[int(key)] if isinstance(m, list) else m[key]
        m[int(last) if isinstance(m, list) else last] = value
    return edit


@needs_models
@pytest.mark.parametrize(("name", "key", "value", "says"), [
    ("wbc_head", "temperature", -0.6, "temperature"),  # every white cell would go to review
    ("wbc_head", "temperature", 0, "temperature"),
    ("wbc_head", "temperature", float("nan"), "temperature"),  # Python's json reads NaN
    ("rbc_head", "class_log_prior_shift.normal", float("inf"), "class_log_prior_shift"),
    ("wbc_head", "open_set.0.threshold", float("nan"), "threshold"),
    ("seg", "score_calibration.rbc", [1.5], "score_calibration"),
    ("seg", "score_calibration.rbc", [1.5, float("nan")], "score_calibration"),
    ("seg", "score_calibration.erythrocyte", [1.5, 0.5], "score_calibration names classes"),
    ("seg", "canonical_um_per_px", 0.1, "feeds every model 0.2 um/px"),  # cells would be half their size
    ("seg", "input_size", 0, "input_size"),
    ("seg", "batch", {"min": 4, "opt": 2, "max": 16}, "min <= opt <= max"),
    ("seg", "batch", {"min": 0, "opt": 2, "max": 16}, "batch.min"),
    ("seg", "preprocessing.scale", 0, "scale"),
    ("seg", "preprocessing.pad_value", 300, "pad_value"),
    ("seg", "classes", ["rbc", "rbc", "platelet"], "distinct"),
    ("seg", "classes", [], "classes"),
    ("seg", "inputs.0.shape", [-1, 3, 0, 256], "axis"),
    ("seg", "sha256", "not-a-hash", "sha256"),
    ("seg", "file", "../seg.onnx", "not a file name"),
    ("wbc_head", "feature_space.file", "/etc/features.npz", "not a file name"),
    ("rbc_head", "crop", None, "needs its crop"),
    ("rbc_head", "crop.input_size", 64, "is not the model's input_size 56"),
    ("rbc_head", "crop.extent_um", -11.2, "extent_um"),
])
def test_a_manifest_value_no_model_can_have_is_refused_at_load(tmp_path, name, key, value, says):
    """What the pipeline would otherwise read silently (a negative temperature sent every white
    cell to review with no error; a model of another scale would be fed 0.2 um/px) is a
    ManifestError naming the value."""
    assert load_manifest(_edited_manifest(tmp_path, lambda m: None, name=name)).name == name  # as committed
    with pytest.raises(ManifestError, match="invalid manifest") as err:
        load_manifest(_edited_manifest(tmp_path, _set(key, value), name=name))
    assert says in str(err.value)


@needs_models
def test_a_feature_space_output_the_model_lacks_is_refused(tmp_path):
    def edit(m):
        m["feature_space"]["output"] = "penultimate"

    with pytest.raises(ManifestError, match="feature_space output 'penultimate' is not among the outputs"):
        load_manifest(_edited_manifest(tmp_path, edit, name="wbc_head", with_model=False))


@needs_models
def test_a_manifest_whose_model_file_is_missing_is_refused_with_or_without_the_hash(tmp_path):
    path = _edited_manifest(tmp_path, lambda m: None, with_model=False)
    for verify in (True, False):
        with pytest.raises(ManifestError, match="model file .*rbc_head.onnx is missing"):
            load_manifest(path, verify_hash=verify)


@needs_models
def test_a_manifest_naming_an_input_the_model_lacks_fails_at_load(tmp_path):
    path = _edited_manifest(tmp_path, lambda m: m["inputs"][0].update(name="pixels"))
    with pytest.raises(EngineError, match="input 'pixels' not in model inputs"):
        create_engine("onnxruntime", path, sessions=1).load()


@needs_models
@pytest.mark.parametrize("sessions", [1, 2])
def test_outputs_are_matched_by_name_not_by_their_order_in_the_manifest(tmp_path, sessions):
    """The manifest may list a model's outputs in another order than the graph: each name gets its
    own tensor (logits of one row per class, one distance per crop, the features)."""
    path = _edited_manifest(tmp_path, lambda m: m["outputs"].reverse(), name="wbc_head")
    want = create_engine("onnxruntime", MODELS / "wbc_head.json", sessions=1)
    got = create_engine("onnxruntime", path, sessions=sessions)
    try:
        assert got.output_names == ["features", "ood", "logits"]
        x = np.random.default_rng(4).random((3, 3, 96, 96), dtype=np.float32)
        a, b = want.run(x), got.run(x)
        assert b["logits"].shape == (3, len(want.manifest.classes)) and b["ood"].shape == (3,)
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5)
    finally:
        want.close()
        got.close()


@needs_models
def test_trt_cache_key_refuses_unknown_precisions_and_follows_the_batch_profile():
    """An engine is built for one profile: a manifest whose maximum batch changed must not find the
    engine built for the old one."""
    m = load_manifest(MODELS / "rbc_head.json")
    with pytest.raises(ValueError, match="precision"):
        engine_filename(m, "10.3.0", ORIN, "fp8", 2)
    wider = m.model_copy(update={"batch": BatchProfile(min=1, opt=m.batch.opt, max=2 * m.batch.max)})
    assert engine_filename(wider, "10.3.0", ORIN, "fp16", 2) != engine_filename(m, "10.3.0", ORIN, "fp16", 2)
    assert engine_filename(wider, "10.3.0", ORIN, "fp16", 2).endswith(f"-b1-{m.batch.opt}-{2 * m.batch.max}.engine")
    # so do its minimum and optimum: an engine built for another profile would load without a word
    for other in ({"min": 2}, {"opt": m.batch.opt // 2}):
        changed = m.model_copy(update={"batch": m.batch.model_copy(update=other)})
        assert engine_filename(changed, "10.3.0", ORIN, "fp16", 2) != engine_filename(m, "10.3.0", ORIN, "fp16", 2), other


@needs_models
def test_profile_shapes_refuse_a_dynamic_axis_other_than_the_batch():
    m = load_manifest(MODELS / "rbc_head.json")
    s = m.input_size
    dynamic = m.model_copy(update={"inputs": [m.inputs[0].model_copy(update={"shape": [-1, 3, -1, s]})]})
    with pytest.raises(ValueError, match="only the batch axis may be dynamic"):
        profile_shapes(dynamic)


@needs_models
def test_a_detector_trained_with_another_tile_pad_is_refused(tmp_path):
    """The analysis pads tiles and packed windows with one grey (tiling.PAD_VALUE, what the
    committed detector was trained with): a detector whose manifest says it was trained with
    another pad is refused with both values, not fed a grey it never saw."""
    from smearscope.service.analysis.tiling import PAD_VALUE
    from smearscope.service.analysis.yolo_decode import YoloSegmenter

    assert load_manifest(MODELS / "seg.json").preprocessing.pad_value == PAD_VALUE
    committed = create_engine("onnxruntime", MODELS / "seg.json", sessions=1).load()
    try:
        assert YoloSegmenter(committed).input_size == committed.manifest.input_size
    finally:
        committed.close()
    path = _edited_manifest(tmp_path, lambda m: m["preprocessing"].update(pad_value=0), name="seg")
    engine = create_engine("onnxruntime", path, sessions=1).load()
    try:
        with pytest.raises(ManifestError, match=f"padded with 0; the analysis pads them with {PAD_VALUE}"):
            YoloSegmenter(engine)
    finally:
        engine.close()
