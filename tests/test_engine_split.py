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


def _random_batches(engine, seed: int, count: int, most: int) -> list[np.ndarray]:
    """`count` batches of 2 to `most` - 1 random inputs for `engine`, every input different."""
    rng = np.random.default_rng(seed)
    return [rng.random((int(n), *engine.manifest.inputs[0].shape[1:]), dtype=np.float32)
            for n in rng.integers(2, most, count)]


@needs_models
def test_two_threads_running_one_split_engine_each_get_their_own_outputs():
    """The daemon analyses two fields at once: two threads share a model's engine, and each
    batch's outputs must be its own."""
    from concurrent.futures import ThreadPoolExecutor

    one = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        batches = _random_batches(one, seed=13, count=16, most=40)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(split.run, batches))
        for batch, out in zip(batches, got):
            np.testing.assert_allclose(out["logits"], one.run(batch)["logits"], rtol=1e-5, atol=1e-5)
    finally:
        one.close()
        split.close()


class _Gated(_Counting):
    """A session whose runs wait for `gate` (at most `timeout` seconds) before they start."""

    def __init__(self, session, gate, timeout: float = 10.0) -> None:
        super().__init__(session)
        self.gate, self.timeout, self.opened = gate, timeout, []

    def run_with_iobinding(self, binding):
        self.opened.append(self.gate.wait(self.timeout))
        return super().run_with_iobinding(binding)


@needs_models
def test_run_parts_hands_over_the_first_part_while_the_others_still_run():
    """`run_parts` on a split engine: consecutive ranges covering the batch, in order (the second
    part in steps of PART_STEP), each with the rows `run` gives. The second session cannot start
    its part until the caller has been handed the first one: an engine that waited for every
    part before reporting would keep it waiting (its gate times out and the test fails)."""
    import threading

    one = OnnxRuntimeEngine(MODELS / "seg.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / "seg.json", sessions=2).load()
    try:
        gate = threading.Event()
        gated = _Gated(split._split[1], gate, timeout=10.0)
        split._split[1] = gated
        batch = np.random.default_rng(21).random((5, *one.manifest.inputs[0].shape[1:]), dtype=np.float32)
        want = one.run(batch)
        parts = []

        def on_part(lo, hi, outs):
            parts.append((lo, hi, {k: v.copy() for k, v in outs.items()}))
            gate.set()  # the second part may run once the first is in the caller's hands

        got = split.run_parts(batch, on_part)
        assert gated.opened == [True, True]
        assert [(lo, hi) for lo, hi, _ in parts] == [(0, 2), (2, 4), (4, 5)]
        for lo, hi, outs in parts:
            for name in want:
                np.testing.assert_allclose(outs[name], want[name][lo:hi], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(got[name][lo:hi], want[name][lo:hi], rtol=1e-5, atol=1e-5)
    finally:
        one.close()
        split.close()


class _Slow(_Counting):
    """A session whose runs take at least `delay` seconds longer; counts runs begun and ended."""

    def __init__(self, session, delay: float) -> None:
        super().__init__(session)
        self.delay, self.begun, self.finished = delay, 0, 0

    def run_with_iobinding(self, binding):
        import time

        self.begun += 1
        time.sleep(self.delay)
        out = super().run_with_iobinding(binding)
        self.finished += 1
        return out


class _Failing(_Counting):
    """A session that fails, once `ready()` holds (or after 5 s)."""

    def __init__(self, session, ready=lambda: True) -> None:
        super().__init__(session)
        self.ready = ready

    def run_with_iobinding(self, binding):
        import time

        deadline = time.monotonic() + 5
        while not self.ready() and time.monotonic() < deadline:
            time.sleep(0.001)
        raise RuntimeError("session failed")


@needs_models
def test_a_failing_part_callback_waits_for_the_running_parts():
    """An error in the caller's part callback comes back to the caller only after the other
    parts are done writing (nothing runs on into outputs nobody holds); the engine stays usable."""
    split = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        batch = np.zeros((6, *split.manifest.inputs[0].shape[1:]), np.float32)
        slow = _Slow(split._split[1], delay=0.3)
        split._split[1] = slow
        seen = []

        def boom(lo, hi, outs):
            import time

            seen.append((lo, hi))
            deadline = time.monotonic() + 5
            while not slow.begun and time.monotonic() < deadline:  # the second part's first step is running
                time.sleep(0.001)
            raise RuntimeError("caller failed")

        with pytest.raises(RuntimeError, match="caller failed"):
            split.run_parts(batch, boom)
        # the second part's running step had ended when the error came back, and no step began after it
        assert seen == [(0, 3)] and slow.finished == slow.begun == 1
        assert split.run(batch)["logits"].shape == (6, len(split.manifest.classes))
    finally:
        split.close()


@needs_models
def test_a_failing_session_part_reaches_the_caller_after_the_others_end():
    """A part whose session fails: the error reaches the caller, the parts before it were handed
    over, and the slower part on another session had ended first."""
    split = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=3).load()
    try:
        batch = np.zeros((6, *split.manifest.inputs[0].shape[1:]), np.float32)
        slow = _Slow(split._split[2], delay=0.3)
        split._split[2] = slow
        split._split[1] = _Failing(split._split[1], ready=lambda: slow.begun > 0)  # fails while the slow part runs
        seen = []
        with pytest.raises(RuntimeError, match="session failed"):
            split.run_parts(batch, lambda lo, hi, outs: seen.append((lo, hi)))
        assert seen == [(0, 2)] and slow.finished == 1
    finally:
        split.close()


@needs_models
def test_run_batched_hands_over_real_rows_in_the_batch_numbering():
    """run_batched's `on_part` over several padded chunks: ranges in the whole batch's numbering,
    covering it once and in order, no padding rows, outputs those of `run_batched` without it;
    an engine that is not an `Engine` (a wrapper) hands over each chunk whole."""
    from smearscope.engines.batching import run_batched
    from smearscope.engines.manifest import BatchProfile

    engine = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        engine.manifest = engine.manifest.model_copy(update={"batch": BatchProfile(min=4, opt=4, max=5)})
        batch = np.random.default_rng(3).random((11, *engine.manifest.inputs[0].shape[1:]), dtype=np.float32)
        want = run_batched(engine, batch)["logits"]

        class Wrapper:  # what engines.coalesce's CoalescingEngine looks like to run_batched
            def __init__(self, inner):
                self.inner, self.manifest, self.output_names, self.pads_to_opt = (
                    inner, inner.manifest, inner.output_names, False)

            def run(self, b):
                return self.inner.run(b)

        for eng, expected in ((engine, [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10), (10, 11)]),
                              (Wrapper(engine), [(0, 5), (5, 10), (10, 11)])):
            seen: list = []
            got = run_batched(eng, batch, on_part=lambda lo, hi, outs, seen=seen: seen.append(
                (lo, hi, outs["logits"].copy())))
            assert [(lo, hi) for lo, hi, _ in seen] == expected
            for lo, hi, rows in seen:
                np.testing.assert_allclose(rows, want[lo:hi], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
    finally:
        engine.close()


@needs_models
def test_the_detector_decodes_each_part_into_the_detections_of_an_unsplit_engine():
    """The segmenter decodes each part of a split batch as it is handed over: the detections
    (tile, kind, box, score, mask) are those of one session decoding the whole batch."""
    import cv2

    from smearscope.device.synthetic import render_field
    from smearscope.service.analysis.records import Tile
    from smearscope.service.analysis.tiling import tile_grid
    from smearscope.service.analysis.yolo_decode import YoloSegmenter

    frame = cv2.resize(render_field(7, width=1000, height=700, microns_per_pixel=0.1).frame.pixels, (500, 350),
                       interpolation=cv2.INTER_AREA)
    tiles = []
    for i, (x, y) in enumerate(tile_grid(500, 350, 256, 0.15)):
        px = np.zeros((256, 256, 3), np.uint8)
        window = frame[y:y + 256, x:x + 256]
        px[: window.shape[0], : window.shape[1]] = window
        tiles.append(Tile(i, x, y, px))
    engines = [OnnxRuntimeEngine(MODELS / "seg.json", sessions=s).load() for s in (1, 2, 3)]
    try:
        found = [YoloSegmenter(e).detect(tiles, 500, 350, calibrate=False) for e in engines]
        assert len(found[0]) > 20
        for other in found[1:]:
            assert [(d.tile_index, d.kind, d.cut_by_tile_edge) for d in other] == [
                (d.tile_index, d.kind, d.cut_by_tile_edge) for d in found[0]]
            for a, b in zip(found[0], other):
                assert a.box.as_list() == pytest.approx(b.box.as_list(), abs=1e-3)
                assert a.score == pytest.approx(b.score, abs=1e-5)
                assert np.array_equal(a.mask, b.mask)
    finally:
        for e in engines:
            e.close()


@needs_models
def test_two_threads_taking_parts_from_one_split_engine_each_get_their_own_rows():
    """Two fields analysed at once may both ask one split engine for parts: each caller's
    hand-overs cover its own batch, in order, with its own rows."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    one = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        batches = _random_batches(one, seed=17, count=12, most=30)

        def take(batch):
            got = []
            split.run_parts(batch, lambda lo, hi, outs: got.append((lo, hi, outs["logits"].copy())))
            return got

        with ThreadPoolExecutor(2) as pool:
            handed = list(pool.map(take, batches))
        for batch, got in zip(batches, handed):
            assert got[0][0] == 0 and got[-1][1] == len(batch)
            assert all(a[1] == b[0] for a, b in itertools.pairwise(got))  # consecutive, in order
            want = one.run(batch)["logits"]
            for lo, hi, rows in got:
                np.testing.assert_allclose(rows, want[lo:hi], rtol=1e-5, atol=1e-5)
    finally:
        one.close()
        split.close()


@needs_models
def test_run_batched_hands_over_no_empty_range_where_the_real_rows_end_with_a_part():
    """A padded chunk whose real rows end exactly where a split part ends: the part after them,
    all padding, is not handed over at all (no empty range)."""
    from smearscope.engines.batching import run_batched
    from smearscope.engines.manifest import BatchProfile

    engine = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=2).load()
    try:
        engine.manifest = engine.manifest.model_copy(update={"batch": BatchProfile(min=4, opt=4, max=5)})
        batch = np.random.default_rng(8).random((7, *engine.manifest.inputs[0].shape[1:]), dtype=np.float32)
        seen = []
        run_batched(engine, batch, on_part=lambda lo, hi, outs: seen.append((lo, hi, len(outs["logits"]))))
        # rows 0:5 split 2 + 3 (the second part 2 at a time); rows 5:7 padded to 4 and split 2 + 2: the
        # first part holds both real rows, the second only padding
        assert seen == [(0, 2, 2), (2, 4, 2), (4, 5, 1), (5, 7, 2)]
    finally:
        engine.close()


class _Meeting(_Counting):
    """A session whose runs wait (at most 10 s) until every session of `barrier` runs too."""

    def __init__(self, session, barrier) -> None:
        super().__init__(session)
        self.barrier, self.met = barrier, []

    def run_with_iobinding(self, binding):
        import threading

        try:
            self.barrier.wait()
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)
        return super().run_with_iobinding(binding)


@needs_models
@pytest.mark.parametrize("parts", [False, True])
def test_the_parts_of_a_split_batch_run_side_by_side(parts):
    """Every session of a split batch runs its part at the same time as the others (each part
    waits for all three to have begun; parts run one after another would time out)."""
    import threading

    split = OnnxRuntimeEngine(MODELS / "rbc_head.json", sessions=3).load()
    try:
        barrier = threading.Barrier(3, timeout=10)
        split._split = [_Meeting(s, barrier) for s in split._split]
        batch = np.random.default_rng(2).random((3, *split.manifest.inputs[0].shape[1:]), dtype=np.float32)
        if parts:
            split.run_parts(batch, lambda lo, hi, outs: None)
        else:
            split.run(batch)
        assert [s.met for s in split._split] == [[True]] * 3
    finally:
        split.close()


@needs_models
def test_one_output_of_unknown_size_is_enough_to_join_the_parts():
    """Only the logits' size left open (the distance's and the features' known): the outputs still
    cannot all be bound in advance, so the parts' outputs are joined and handed over once."""
    one = OnnxRuntimeEngine(MODELS / "wbc_head.json", sessions=1).load()
    split = OnnxRuntimeEngine(MODELS / "wbc_head.json", sessions=2).load()
    try:
        split.manifest = split.manifest.model_copy(update={"outputs": [
            o.model_copy(update={"shape": [-1, -1]}) if o.name == "logits" else o for o in split.manifest.outputs]})
        batch = np.random.default_rng(10).random((5, *one.manifest.inputs[0].shape[1:]), dtype=np.float32)
        want, handed = one.run(batch), []
        for got in (split.run(batch), split.run_parts(batch, lambda lo, hi, outs: handed.append((lo, hi)))):
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert handed == [(0, 5)]
    finally:
        one.close()
        split.close()
