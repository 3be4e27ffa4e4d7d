"""TensorRT 10 backend: named tensors, one optimisation profile per lane, `execute_async_v3` on explicit
CUDA streams, pinned host buffers sized to the profile's maximum batch.

TensorRT itself has NOT RUN anywhere in this project (it cannot be installed on the development
machines, and the GPU machines used have no TensorRT either). Everything around it has: with
`bench.trt_standin` in place of the `tensorrt` module (same calls, the network executed by ONNX
Runtime on the host in `tests/test_tensorrt_engine.py`, by PyTorch's CUDA kernels on the given
stream in `bench.device_check` on an H200), this class ran with real pinned memory, device
buffers, streams and asynchronous copies through both CUDA APIs (`engines.cuda_api`). See
docs/RESULTS.md, "What was verified on which hardware".

Concurrency: the engine holds `lanes` execution contexts, each with its own CUDA stream, its own
pinned/device buffers and its own optimisation profile (the engine is built with one identical
profile per lane: TensorRT 10 requires each execution context in concurrent use on a dynamic-shape
engine to use a separate profile). `run()` borrows a free lane, so two threads (e.g. the RBC and
WBC heads of two fields) overlap on the GPU without sharing buffers or a profile.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscope.engines.base import Engine, EngineError
from smearscope.engines.cuda_api import CudaApi, CudaStream, cuda_api
from smearscope.engines.trt_cache import (
    TENSORRT_MISSING,
    build_command,
    engine_path,
    missing_engine,
    whole_problem,
)

logger = logging.getLogger(__name__)


@dataclass
class _Binding:
    host: np.ndarray  # pinned, flat, sized for the max batch; its dtype is the tensor's
    device: int  # device address


@dataclass
class _Lane:
    context: object  # trt.IExecutionContext
    stream: CudaStream
    bindings: dict[str, _Binding]


class TensorRtEngine(Engine):
    backend_name = "tensorrt"
    pads_to_opt = True

    def __init__(self, manifest_path: Path, verify_hash: bool = True, cache_dir: Path | None = None,
                 precision: str = "fp16", lanes: int = 2, device_index: int = 0,
                 cuda: str | CudaApi = "auto") -> None:
        super().__init__(manifest_path, verify_hash)
        if lanes < 1:
            raise EngineError(f"lanes must be at least 1, got {lanes}")
        self.cache_dir = Path(cache_dir) if cache_dir else self.manifest_path.parent / "engines"
        self.precision = precision
        self.n_lanes = lanes
        self.device_index = device_index
        self._cuda_choice = cuda
        self.cuda: CudaApi | None = None
        self._engine = None
        self._lanes: queue.Queue[_Lane] = queue.Queue()
        self._all_lanes: list[_Lane] = []

    def _load(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(f"TensorRT backend: tensorrt is not importable ({exc}); {TENSORRT_MISSING}") from exc
        if int(trt.__version__.split(".")[0]) < 10:
            raise EngineError(f"TensorRT {trt.__version__} is too old: this backend needs TensorRT 10 "
                              "(JetPack 6.1 or later); use engine_backend 'onnxruntime'")
        choice = self._cuda_choice
        cuda = choice if isinstance(choice, CudaApi) else cuda_api(choice, self.device_index)
        with cuda.current():
            capability = cuda.compute_capability()  # an engine built for another GPU is another key
        path = engine_path(self.cache_dir, self.manifest, trt.__version__, capability, self.precision, self.n_lanes)
        command = build_command(self.manifest_path.parent, self.cache_dir, self.precision, self.n_lanes)
        if not path.exists():
            raise EngineError(missing_engine(path, command))
        try:
            problem = whole_problem(path, capability)
        except OSError as exc:
            raise EngineError(f"TensorRT engine {path} cannot be read: {exc}") from exc
        if problem is not None:
            raise EngineError(f"TensorRT engine {path}: {problem}; rebuild it: {command}")
        self.cuda = cuda
        try:
            with self.cuda.current():
                self._deserialize(trt, path, command)
        except BaseException as exc:
            self._release()
            if isinstance(exc, Exception) and not isinstance(exc, EngineError):
                # TensorRT raises RuntimeError / returns None on e.g. out-of-memory: a load error
                raise EngineError(f"TensorRT could not load {path.name}: {type(exc).__name__}: {exc}") from exc
            raise
        logger.info("loaded TensorRT engine %s with %d lanes (%s)", path.name, self.n_lanes, self.cuda.name)

    def _deserialize(self, trt, path: Path, command: str) -> None:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize {path}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        missing = {self.input_name, *self.output_names} - set(names)
        if missing:
            raise EngineError(f"{path}: engine lacks tensors {sorted(missing)}")
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        profiles = self._engine.num_optimization_profiles
        if profiles < self.n_lanes:
            raise EngineError(f"{path}: built with {profiles} optimisation profile(s), {self.n_lanes} lanes need "
                              f"one each; rebuild it: {command}")
        for index in range(self.n_lanes):
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{path}: TensorRT could not create an execution context (device memory?)")
            stream = self.cuda.stream()
            lane = _Lane(ctx, stream, {})
            self._all_lanes.append(lane)
            # lane i holds profile i alone: contexts in concurrent use may not share one
            if not ctx.set_optimization_profile_async(index, stream.handle):
                raise EngineError(f"{path}: TensorRT refused optimisation profile {index} for lane {index}")
            # size every buffer for the profile's largest input: outputs from the shapes TensorRT
            # infers for it (so not only the batch axis may vary)
            for name in inputs:
                if not ctx.set_input_shape(name, self._engine.get_tensor_profile_shape(name, index)[2]):
                    raise EngineError(f"{path}: TensorRT refused the profile maximum of {name!r}")
            for name in names:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"{path}: {name!r} has no size at the profile maximum: {shape}")
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                host = self.cuda.pinned_empty(int(np.prod(shape)), dtype)
                binding = _Binding(host, 0)
                lane.bindings[name] = binding  # recorded first: _release frees what a failure leaves
                binding.device = self.cuda.alloc(host.nbytes)
                if not ctx.set_tensor_address(name, binding.device):
                    raise EngineError(f"{path}: TensorRT refused the address of {name!r}")
            self.cuda.synchronize(stream)  # the profile switch is enqueued on the stream
            self._lanes.put(lane)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        lane = self._lanes.get()
        try:
            with self.cuda.current():
                return self._run_lane(lane, batch)
        finally:
            self._lanes.put(lane)

    def _run_lane(self, lane: _Lane, batch: np.ndarray) -> dict[str, np.ndarray]:
        inp = lane.bindings[self.input_name]
        n = batch.size
        if not lane.context.set_input_shape(self.input_name, batch.shape):
            raise EngineError(f"shape {batch.shape} rejected by the optimisation profile")
        np.copyto(inp.host[:n], batch.reshape(-1).astype(inp.host.dtype, copy=False))
        try:
            self.cuda.htod_async(inp.device, inp.host[:n], lane.stream)
            if not lane.context.execute_async_v3(lane.stream.handle):
                raise EngineError("execute_async_v3 failed")
            shapes = {}
            for name in self.output_names:
                out = lane.bindings[name]
                shape = tuple(int(d) for d in lane.context.get_tensor_shape(name))
                size = int(np.prod(shape))
                if any(d < 0 for d in shape) or size > out.host.size:
                    raise EngineError(f"output {name!r} has shape {shape}, beyond its buffer")
                shapes[name] = shape
                self.cuda.dtoh_async(out.host[:size], out.device, lane.stream)
        finally:
            # also on failure: the lane's buffers go back to the pool only once its stream is idle
            self.cuda.synchronize(lane.stream)
        # copies: the pinned buffers are reused by the lane's next batch
        return {name: lane.bindings[name].host[: int(np.prod(s))].reshape(s).astype(np.float32, copy=True)
                for name, s in shapes.items()}

    def _release(self) -> None:
        if self.cuda is None:
            return
        with self.cuda.current():
            for lane in self._all_lanes:
                self.cuda.synchronize(lane.stream)
                for b in lane.bindings.values():
                    if b.device:
                        self.cuda.free(b.device)
                    self.cuda.free_pinned(b.host)
                self.cuda.destroy_stream(lane.stream)
                lane.context = None
            self._all_lanes.clear()
            self._lanes = queue.Queue()
            self._engine = None  # TensorRT frees the engine's device memory here, device current
        self.cuda = None

    def close(self) -> None:
        """Free device and pinned memory explicitly, with the device current (never from __del__).

        Call it once no thread is running a batch on this engine.
        """
        self._release()
        self._loaded = False
