"""ONNX Runtime backend: CPU here; the CUDA execution provider when the build has it.

ONNX Runtime's TensorRT execution provider is never chosen by default, though the Jetson's
onnxruntime-gpu has it: without an engine cache and fixed profile shapes it builds a TensorRT
engine per model at every start (minutes on a Jetson) and again whenever a batch outgrows the
shapes it has seen. TensorRT is the `tensorrt` backend's job (engines built once, by
`smearscope build-engines`); pass `providers` to ask for the provider anyway.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from smearscope.engines.base import Engine, EngineError, PartCallback

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: Most split sessions "auto" makes (one per core up to this).
MAX_AUTO_SESSIONS = 4
#: Inputs a split session runs at a time where the caller takes rows as they are ready (run_parts).
PART_STEP = 2


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxRuntimeEngine(Engine):
    backend_name = "onnxruntime"

    def __init__(self, manifest_path: Path, verify_hash: bool = True, providers: list[str] | None = None,
                 intra_op_threads: int = 0, spin: bool = False, sessions: int = 0) -> None:
        """`intra_op_threads` 0: ONNX Runtime's default (one per core). `spin`: let idle pool
        threads busy-wait for the next operator (ONNX Runtime's default). Off here: the analyzer
        runs three sessions, each with its own pool, between stages of its own numpy work, and a
        station shares its cores with capture and MQTT; spinning threads take those cores. On
        this 2-core machine, with a training on the other core, one-view 640x480 fields took 37
        to 40 ms without spinning against 61 to 73 ms with it (1280x960: 253 to 267 against 369
        to 438), in alternating runs of the same script.

        `sessions`: on the CPU, a batch of two or more inputs is split into that many contiguous
        parts, each run on a session of its own with one thread, side by side (0: one per thread
        the model would otherwise have, `intra_op_threads` or one per logical CPU the process may
        use, at most MAX_AUTO_SESSIONS; 1: never split). Each session holds its own copy of the
        model (the detector's peak memory 297 MB with one session, 385 MB with four). ONNX Runtime's intra-op threads share one
        input's operators and wait for each other after every one of them; the detector's
        batches ran 10 to 40 % faster split over two single-threaded sessions than on one
        session with two threads, the heads' about as fast. Each input's outputs are the same
        either way (tests/test_engine_split.py). A batch of one runs on the main session, with
        `intra_op_threads`."""
        super().__init__(manifest_path, verify_hash)
        if sessions < 0:
            raise ValueError(f"sessions must be 0 (auto) or more, got {sessions}")
        self._providers_wanted = providers
        self._threads = intra_op_threads
        self._spin = spin
        self._sessions_wanted = sessions
        self._session = None
        self._split: list = []
        self._pool: ThreadPoolExecutor | None = None

    def _load(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = self._providers_wanted or [p for p in PREFERRED_PROVIDERS if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(f"ONNX Runtime here lacks providers {missing} (has {available})")
        path = self.manifest.model_path(self.manifest_path)
        self._session = self._new_session(ort, path, wanted, self._threads)
        names = {i.name for i in self._session.get_inputs()}
        if self.input_name not in names:
            raise EngineError(f"{path}: input {self.input_name!r} not in model inputs {sorted(names)}")
        n = self._sessions_wanted or min(self._threads or available_cores(), MAX_AUTO_SESSIONS)
        if n >= 2 and self.manifest.batch.max >= 2 and self._session.get_providers() == ["CPUExecutionProvider"]:
            self._split = [self._new_session(ort, path, wanted, 1) for _ in range(n)]
            self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix=f"ort-{self.manifest.name}")
        logger.info("loaded %s with %s%s", path.name, self._session.get_providers(),
                    f", batches split over {len(self._split)} single-threaded sessions" if self._split else "")

    def _new_session(self, ort, path: Path, providers: list[str], threads: int):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if self._spin else "0")
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load {path}: {exc}") from exc

    @property
    def split_sessions(self) -> int:
        """How many single-threaded sessions a batch is split over (0: batches are not split)."""
        return len(self._split)

    @property
    def _bindable(self) -> bool:
        """Every output's size per input is known: the parts can write into one preallocated output."""
        return all(d >= 0 for o in self.manifest.outputs for d in o.shape[1:])

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session else []

    def run_parts(self, batch: np.ndarray, on_part: PartCallback) -> dict[str, np.ndarray]:
        """Where a batch is split and its outputs can be bound (every output's size known), each
        part's rows go to `on_part` in order as soon as they are done (the other parts'
        `PART_STEP` inputs at a time); otherwise the whole batch's, once. The first part runs on
        this thread and is never the larger one, so the caller works on its rows while the other
        sessions finish theirs (a 15-tile detector batch splits 7 + 8, and this thread's core
        would otherwise wait a tile's time), then on theirs as they come.

        Tried and not kept: sessions taking the next tile whenever they are free, this thread
        reporting finished tiles once none is left to start. It overlaps the same work for an odd
        number of tiles but runs a tile at a time, which cost 1.5 ms on an even batch (6 tiles:
        43.9 against 42.4 ms, median of 16 alternating runs)."""
        if self._split and len(batch) >= 2 and self._bindable:
            return self._run_bound(self._checked(batch), on_part)
        return super().run_parts(batch, on_part)  # one hand-over of the whole batch

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        if not self._split or n < 2:
            return dict(zip(self.output_names, self._session.run(self.output_names, {self.input_name: batch})))
        if not self._bindable:  # an output's size unknown: join the parts' outputs
            k = min(len(self._split), n)
            bounds = [n * i // k for i in range(k + 1)]
            parts = self._side_by_side(k, lambda i: self._split[i].run(
                self.output_names, {self.input_name: batch[bounds[i]:bounds[i + 1]]}))
            return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.output_names)}
        return self._run_bound(batch, None)

    def _run_bound(self, batch: np.ndarray, on_part: PartCallback | None) -> dict[str, np.ndarray]:
        """The split batch, each part's outputs written straight into its rows of the batch's (no
        copies to join); `on_part` gets the rows in order, on this thread: the first part's when
        this thread has run it, the others' `PART_STEP` inputs at a time as their sessions finish
        them, so the caller's work on them overlaps the rest of their part."""
        assert self._pool is not None
        n = len(batch)
        k = min(len(self._split), n)
        bounds = [n * i // k for i in range(k + 1)]  # contiguous parts, sizes differing by one at most
        outs = {o.name: np.empty((n, *o.shape[1:]), np.dtype(o.dtype)) for o in self.manifest.outputs}
        stop = threading.Event()  # set when the caller gives up: no part starts another step
        steps: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(1, k)]
        if on_part is None:
            later = [self._pool.submit(self._run_part, self._split[i], batch, outs, bounds[i], bounds[i + 1])
                     for i in range(1, k)]
        else:
            later = [self._pool.submit(self._run_steps, self._split[i], batch, outs, bounds[i], bounds[i + 1],
                                       steps[i - 1], stop) for i in range(1, k)]
        try:
            self._run_part(self._split[0], batch, outs, bounds[0], bounds[1])
            if on_part is None:
                for f in later:
                    f.result()
                return outs
            on_part(bounds[0], bounds[1], {name: v[bounds[0]:bounds[1]] for name, v in outs.items()})
            for q in steps:
                while True:
                    got = q.get()
                    if got is None:  # the part is done
                        break
                    if isinstance(got, BaseException):
                        raise got
                    lo, hi = got
                    on_part(lo, hi, {name: v[lo:hi] for name, v in outs.items()})
        finally:
            stop.set()
            wait(later)  # never leave a part writing into outputs nobody holds
        return outs

    def _run_steps(self, session, batch: np.ndarray, outs: dict[str, np.ndarray], lo: int, hi: int,
                   done: queue.SimpleQueue, stop: threading.Event) -> None:
        """A part run `PART_STEP` inputs at a time, each finished range put on `done`, then None
        (or the error); it stops early once `stop` is set. A single-threaded session runs a
        detector tile as fast alone as in a batch (8 tiles: 99 ms in one batch, 98 ms one at a
        time); 15 tiles decoded as they came, 2 at a time: 121.6 ms against 127.5 with the
        second part handed over whole and 122.9 one tile at a time (floor 115.3; medians of 20
        alternating runs)."""
        try:
            for a in range(lo, hi, PART_STEP):
                if stop.is_set():
                    break
                b = min(hi, a + PART_STEP)
                self._run_part(session, batch, outs, a, b)
                done.put((a, b))
            done.put(None)
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
            done.put(exc)

    def _side_by_side(self, k: int, job) -> list:
        """`job(i)` for i in 0..k-1, part 0 on this thread and the others on the pool; results in order."""
        assert self._pool is not None
        later = [self._pool.submit(job, i) for i in range(1, k)]
        first = job(0)
        return [first, *(f.result() for f in later)]

    def _run_part(self, session, batch: np.ndarray, outs: dict[str, np.ndarray], lo: int, hi: int) -> None:
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, batch[lo:hi])
        for name, out in outs.items():
            rows = out[lo:hi]  # contiguous: whole rows of a C-ordered array
            binding.bind_output(name, "cpu", 0, rows.dtype.type, list(rows.shape), rows.ctypes.data)
        session.run_with_iobinding(binding)

    def warmup(self, iterations: int = 2) -> float:
        """The base warm-up (the profile's optimal batch, split where batches are) and, where
        batches are split, a batch of one too: it runs on the main session, which the optimal
        batch never reaches."""
        dt = super().warmup(iterations)
        if self._split:
            dummy = np.zeros((1, *self.manifest.inputs[0].shape[1:]), np.float32)
            for _ in range(iterations):
                self.run(dummy)
        return dt

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None
        self._split = []
        self._session = None
        self._loaded = False
