"""ONNX Runtime batches split over single-threaded sessions: every input keeps its own outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smearscope.engines.onnxruntime_engine import OnnxRuntimeEngine

MODELS = Path(__file__).resolve().parents[1] / "models"
needs_models = pytest.mark.skipif(not (MODELS / "seg.json").exists(), reason="models/seg.json not trained yet")


class _Counting:
    """A session that counts the inputs it was given (and passes every call on)."""

    def __init__(self, session) -> None:
        self.session = session
        self.inputs: list[int] = []

    def run(self, names, feed):
        self.inputs.append(len(next(iter(feed.values()))))
        return self.session.run(names, feed)

    def io_binding(self):
        return _CountingBinding(self, self.session.io_binding())

    def run_with_iobinding(self, binding):
        return self.session.run_with_iobinding(binding.binding)


class _CountingBinding:
    def __init__(self, counter: _Counting, binding) -> None:
        self.counter, self.binding = counter, binding

    def bind_cpu_input(self, name, array):
        self.counter.inputs.append(len(array))
        return self.binding.bind_cpu_input(name, array)

    def bind_output(self, *args, **kwargs):
        return self.binding.bind_output(*args, **kwargs)


@needs_models
@pytest.mark.parametrize("model", ["seg", "rbc_head", "wbc_head"])
def test_a_split_batch_gives_every_input_the_outputs_of_one_session(model):
    """Split over three sessions (parts of sizes differing by one at most, in order), each input's
    outputs equal those of the same batch on one session; a batch of one is not split."""
    one = OnnxRuntimeEngine(MODELS / f"{model}.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / f"{model}.json", sessions=3).load()
    try:
        assert one.split_sessions == 0 and split.split_sessions == 3
        counters = [_Counting(s) for s in split._split]
        split._split = counters
        shape = tuple(one.manifest.inputs[0].shape[1:])
        rng = np.random.default_rng(5)
        for n in (1, 2, 5, 7):
            batch = rng.random((n, *shape), dtype=np.float32)  # every input different: order shows
            want, got = one.run(batch), split.run(batch)
            assert set(got) == set(want)
            for name in want:
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
            sizes = [c.inputs.pop() for c in counters if c.inputs]
            assert sizes == ([] if n == 1 else [n * (i + 1) // min(3, n) - n * i // min(3, n) for i in range(min(3, n))])
            assert not any(c.inputs for c in counters)
    finally:
        one.close()
        split.close()


@needs_models
def test_sessions_follow_the_models_threads_and_are_validated():
    """"Auto" makes one session per thread the model would have: none with one thread; a
    negative count is refused."""
    e = OnnxRuntimeEngine(MODELS / "rbc_head.json", intra_op_threads=1).load()
    try:
        assert e.split_sessions == 0
    finally:
        e.close()
    e = OnnxRuntimeEngine(MODELS / "rbc_head.json", intra_op_threads=2).load()
    try:
        assert e.split_sessions == 2
    finally:
        e.close()
    with pytest.raises(ValueError, match="sessions"):
        OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=-1)


@needs_models
def test_outputs_of_unknown_size_are_joined_from_the_parts():
    """A model whose output size the manifest leaves open (-1 beyond the batch axis) cannot have
    its outputs bound in advance: the parts' outputs are joined, in order."""
    one = OnnxRuntimeEngine(MODELS / "wbc_head.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / "wbc_head.json", sessions=2).load()
    try:
        open_outputs = [o.model_copy(update={"shape": [-1] * len(o.shape)}) for o in split.manifest.outputs]
        split.manifest = split.manifest.model_copy(update={"outputs": open_outputs})
        batch = np.random.default_rng(9).random((5, *one.manifest.inputs[0].shape[1:]), dtype=np.float32)
        want, got = one.run(batch), split.run(batch)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    finally:
        one.close()
        split.close()


@needs_models
def test_warmup_reaches_the_session_a_single_input_runs_on():
    """Where batches are split, a batch of one runs on the main session: the warm-up runs it too."""
    e = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        e._session = _Counting(e._session)
        e.warmup(iterations=2)
        assert e._session.inputs == [1, 1]
    finally:
        e.close()


@needs_models
def test_two_threads_running_one_split_engine_each_get_their_own_outputs():
    """The daemon analyses two fields at once: two threads share a model's engine, and each
    batch's outputs must be its own."""
    from concurrent.futures import ThreadPoolExecutor

    one = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        rng = np.random.default_rng(13)
        batches = [rng.random((int(n), *one.manifest.inputs[0].shape[1:]), dtype=np.float32)
                   for n in rng.integers(2, 40, 16)]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(split.run, batches))
        for batch, out in zip(batches, got):
            np.testing.assert_allclose(out["logits"], one.run(batch)["logits"], rtol=1e-5, atol=1e-5)
    finally:
        one.close()
        split.close()
