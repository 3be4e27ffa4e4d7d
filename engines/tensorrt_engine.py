"""TensorRT 10 backend: named tensors, one optimisation profile, `execute_async_v3` on explicit
CUDA streams, pinned host buffers sized to the profile's maximum batch.

NOT RUN on the development machines (no GPU, TensorRT not installable there). Written against the
TensorRT 10 Python API and pycuda; the pure parts it depends on (`engines.trt_cache`,
`engines.batching`) are unit-tested. See README "What was verified where".

Concurrency: the engine holds `lanes` execution contexts, each with its own CUDA stream and its own
pinned/device buffers. `run()` borrows a free lane, so two threads (e.g. the RBC and WBC heads of
two fields) overlap on the GPU without sharing buffers.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineError
from engines.trt_cache import engine_path

logger = logging.getLogger(__name__)


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    host: np.ndarray  # pinned, flat, sized for the max batch
    device: object  # pycuda DeviceAllocation


@dataclass
class _Lane:
    context: object  # trt.IExecutionContext
    stream: object  # pycuda Stream
    bindings: dict[str, _Binding]


class TensorRtEngine(Engine):
    backend_name = "tensorrt"
    pads_to_opt = True

    def __init__(self, manifest_path: Path, verify_hash: bool = True, cache_dir: Path | None = None,
                 precision: str = "fp16", lanes: int = 2, device_index: int = 0) -> None:
        super().__init__(manifest_path, verify_hash)
        self.cache_dir = Path(cache_dir) if cache_dir else self.manifest_path.parent / "engines"
        self.precision = precision
        self.n_lanes = lanes
        self.device_index = device_index
        self._cuda_ctx = None
        self._engine = None
        self._lanes: queue.Queue[_Lane] = queue.Queue()

    def _load(self) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(f"TensorRT backend needs tensorrt and pycuda (the jetson extra): {exc}") from exc
        path = engine_path(self.cache_dir, self.manifest, trt.__version__, self.precision)
        if not path.exists():
            raise EngineError(f"no TensorRT engine at {path}; build it first: smearscope build-engines")
        cuda.init()
        self._cuda_ctx = cuda.Device(self.device_index).retain_primary_context()
        self._cuda_ctx.push()
        try:
            trt_logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(trt_logger)
            self._engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialize {path}")
            max_b = self.manifest.batch.max
            for _ in range(self.n_lanes):
                ctx = self._engine.create_execution_context()
                stream = cuda.Stream()
                ctx.set_optimization_profile_async(0, stream.handle)
                bindings = {}
                for i in range(self._engine.num_io_tensors):
                    name = self._engine.get_tensor_name(i)
                    is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                    dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                    shape = list(self._engine.get_tensor_shape(name))
                    if is_input:
                        shape = list(self._engine.get_tensor_profile_shape(name, 0)[2])
                    shape = [max_b if d < 0 else d for d in shape]
                    host = cuda.pagelocked_empty(int(np.prod(shape)), dtype)
                    dev = cuda.mem_alloc(host.nbytes)
                    ctx.set_tensor_address(name, int(dev))
                    bindings[name] = _Binding(name, is_input, dtype, host, dev)
                self._lanes.put(_Lane(ctx, stream, bindings))
            missing = {self.input_name, *self.output_names} - set(bindings)
            if missing:
                raise EngineError(f"{path}: engine lacks tensors {sorted(missing)}")
        finally:
            self._cuda_ctx.pop()
        logger.info("loaded TensorRT engine %s with %d lanes", path.name, self.n_lanes)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import pycuda.driver as cuda

        lane = self._lanes.get()
        self._cuda_ctx.push()
        try:
            inp = lane.bindings[self.input_name]
            n = batch.size
            np.copyto(inp.host[:n], batch.reshape(-1).astype(inp.dtype, copy=False))
            cuda.memcpy_htod_async(inp.device, inp.host[:n], lane.stream)
            if not lane.context.set_input_shape(self.input_name, batch.shape):
                raise EngineError(f"shape {batch.shape} rejected by the optimisation profile")
            if not lane.context.execute_async_v3(stream_handle=lane.stream.handle):
                raise EngineError("execute_async_v3 failed")
            shapes = {}
            for name in self.output_names:
                out = lane.bindings[name]
                shape = tuple(lane.context.get_tensor_shape(name))
                shapes[name] = shape
                cuda.memcpy_dtoh_async(out.host[: int(np.prod(shape))], out.device, lane.stream)
            lane.stream.synchronize()
            return {name: lane.bindings[name].host[: int(np.prod(s))].reshape(s).astype(np.float32)
                    for name, s in shapes.items()}
        finally:
            self._cuda_ctx.pop()
            self._lanes.put(lane)

    def close(self) -> None:
        """Free device memory explicitly, with the CUDA context current (never from __del__)."""
        if self._cuda_ctx is None:
            return
        self._cuda_ctx.push()
        try:
            while not self._lanes.empty():
                lane = self._lanes.get_nowait()
                for b in lane.bindings.values():
                    b.device.free()
            self._engine = None
        finally:
            self._cuda_ctx.pop()
            self._cuda_ctx.detach()
            self._cuda_ctx = None
            self._loaded = False
