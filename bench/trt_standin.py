"""A stand-in for the `tensorrt` module, to run `engines.tensorrt_engine` where TensorRT is absent.

NOT TensorRT. It answers the TensorRT 10 Python calls that `TensorRtEngine` makes (Runtime,
deserialize_cuda_engine, named I/O tensors, optimisation profiles (identical, one per lane; as
TensorRT 10 documents, a profile is held by one execution context at a time, so a second context
choosing a held one is refused), set_tensor_address,
set_input_shape, execute_async_v3 on a stream handle, get_tensor_shape) and executes the ONNX
network itself, reading its input from, and writing its outputs to, the addresses the engine
bound, so every buffer, copy, lane and stream of the real backend is exercised:

  executor "onnxruntime"  host addresses (with `HostCudaApi`, asynchronous like CUDA: work waits
                          on its stream until synchronised): the engine's logic on any machine,
                          in the test suite
  executor "torch"        device addresses: the network runs as PyTorch CUDA kernels (onnx2torch)
                          enqueued on the stream handle given to execute_async_v3, asynchronously;
                          with `sleep_cycles` a GPU busy-wait is enqueued before the outputs are
                          written, so an engine that does not wait for its stream reads stale ones
                          (`bench.device_check` on a GPU)

Install it with `install()` (puts it in `sys.modules["tensorrt"]`); `write_engine()` writes the
"engine" file where `TensorRtEngine` looks for it. What it cannot tell: anything about TensorRT
itself (parsing, tactics, FP16/INT8 numerics, engine files).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smearscope.engines.base import EngineError
from smearscope.engines.cuda_api import CudaApi, CudaStream
from smearscope.engines.manifest import load_manifest
from smearscope.engines.trt_cache import build_record, engine_path, profile_shapes, record_path

__version__ = "10.0.0"  # the API level it mimics; engine file names carry it
ORIN = (8, 7)  # the compute capability `HostCudaApi` answers unless told another
MAGIC = "smearscope bench.trt_standin engine"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1


def nptype(dtype: DataType) -> type:
    return {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[dtype]


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
        try:
            spec = json.loads(data)
        except ValueError:
            return None  # TensorRT returns None for a blob it cannot read
        if spec.get("magic") != MAGIC:
            return None
        return ICudaEngine(spec)


class ICudaEngine:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.tensors = [*spec["inputs"], *spec["outputs"]]
        self._by_name = {t["name"]: t for t in self.tensors}
        self.executor = _make_executor(spec)
        self.contexts: weakref.WeakSet[IExecutionContext] = weakref.WeakSet()  # live ones

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i]["name"]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.spec["profile"] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._by_name[name]["shape"])

    @property
    def num_optimization_profiles(self) -> int:
        return int(self.spec["profiles"])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        if not 0 <= profile < self.num_optimization_profiles:
            raise IndexError(f"profile {profile} of {self.num_optimization_profiles}")
        return [tuple(s) for s in self.spec["profile"][name]]

    def create_execution_context(self) -> IExecutionContext:
        ctx = IExecutionContext(self)
        # as TensorRT: the first context takes profile 0 implicitly; later ones must choose another
        if not any(c.profile == 0 for c in self.contexts):
            ctx.profile = 0
        self.contexts.add(ctx)
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.profile: int | None = None
        self.executed: list[tuple[int, ...]] = []  # input shapes of every execute_async_v3, in order

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        e = self.engine
        if not 0 <= index < e.num_optimization_profiles or any(
                c is not self and c.profile == index for c in e.contexts):
            return False  # TensorRT: "profile index ... already chosen by another context"
        self.profile = index
        self.input_shapes.clear()
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine._by_name or not address:
            return False
        self.addresses[name] = int(address)
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        if self.profile is None:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.input_shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.input_shapes:
            return self.input_shapes[name]
        batch = next(iter(self.input_shapes.values()), (-1,))[0]
        return tuple(batch if d < 0 else d for d in self.engine.get_tensor_shape(name))

    def execute_async_v3(self, stream_handle: int) -> bool:
        e = self.engine
        if self.profile is None or set(self.addresses) != set(e._by_name) or set(self.input_shapes) != set(e.spec["profile"]):
            return False  # as TensorRT: unbound tensors or unset shapes fail the call
        ins = {n: (self.addresses[n], s) for n, s in self.input_shapes.items()}
        outs = {t["name"]: (self.addresses[t["name"]], self.get_tensor_shape(t["name"])) for t in e.spec["outputs"]}
        e.executor(ins, outs, int(stream_handle))
        self.executed.append(next(iter(self.input_shapes.values())))
        return True


# executors -------------------------------------------------------------------------------------

def _host_view(address: int, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    raw = (ctypes.c_float * n).from_address(address)
    return np.frombuffer(raw, np.float32, count=n).reshape(shape)


def _make_executor(spec: dict):
    kind = spec.get("executor", "onnxruntime")
    if kind == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        out_names = [t["name"] for t in spec["outputs"]]

        def network(ins, outs):
            feeds = {n: _host_view(a, s).copy() for n, (a, s) in ins.items()}
            for name, value in zip(out_names, sess.run(out_names, feeds)):
                addr, shape = outs[name]
                np.copyto(_host_view(addr, shape), value.reshape(shape))

        def run_ort(ins, outs, stream_handle):
            stream = _HOST_STREAMS.get(stream_handle)
            if stream is None:
                network(ins, outs)
            else:  # enqueued: runs when the stream is synchronised, after the copies before it
                stream.pending.append(lambda: network(ins, outs))
        return run_ort
    if kind == "torch":
        return _TorchExecutor(spec)
    raise ValueError(f"unknown stand-in executor {kind!r}")


class _CudaView:
    """`__cuda_array_interface__` over a raw device address, for torch.as_tensor (no copy)."""

    def __init__(self, address: int, shape: tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "data": (address, False),
                                         "version": 3, "strides": None, "stream": None}


class _TorchExecutor:
    def __init__(self, spec: dict) -> None:
        import onnx
        import torch
        from onnx2torch import convert

        torch.backends.cudnn.allow_tf32 = False  # fp32 as ONNX Runtime computes, for the parity check
        torch.backends.cuda.matmul.allow_tf32 = False
        self.torch = torch
        self.module = convert(onnx.load(spec["onnx"])).eval().cuda()
        self.out_names = [t["name"] for t in spec["outputs"]]
        self.in_names = list(spec["profile"])
        self.sleep_cycles = int(spec.get("sleep_cycles", 0))

    def __call__(self, ins, outs, stream_handle):
        torch = self.torch
        stream = torch.cuda.ExternalStream(stream_handle)
        with torch.cuda.stream(stream), torch.no_grad():
            args = [torch.as_tensor(_CudaView(*ins[n]), device="cuda") for n in self.in_names]
            result = self.module(*args)
            if isinstance(result, torch.Tensor):
                result = [result]
            if self.sleep_cycles:  # a GPU busy-wait before the outputs are written: they land late
                torch.cuda._sleep(self.sleep_cycles)
            for name, value in zip(self.out_names, result):
                addr, shape = outs[name]
                torch.as_tensor(_CudaView(addr, shape), device="cuda").copy_(value.reshape(shape))


# engine files ----------------------------------------------------------------------------------

def write_engine(manifest_path: Path, cache_dir: Path, precision: str = "fp16", executor: str = "onnxruntime",
                 sleep_cycles: int = 0, lanes: int = 2, profiles: int | None = None,
                 capability: tuple[int, int] = ORIN) -> Path:
    """Write the stand-in "engine" for a manifest where `TensorRtEngine` with `lanes` on a GPU of
    `capability` looks for one, with `profiles` optimisation profiles (default: one per lane, as
    `smearscope build-engines`)."""
    manifest_path = Path(manifest_path)
    m = load_manifest(manifest_path)
    spec = {
        "magic": MAGIC,
        "onnx": str(m.model_path(manifest_path).resolve()),
        "executor": executor,
        "sleep_cycles": sleep_cycles,
        "precision": precision,
        "inputs": [{"name": t.name, "shape": list(t.shape)} for t in m.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape)} for t in m.outputs],
        "profile": {k: [list(s) for s in v] for k, v in profile_shapes(m).items()},
        "profiles": lanes if profiles is None else profiles,
        "compute_capability": list(capability),
    }
    path = engine_path(Path(cache_dir), m, __version__, capability, precision, lanes)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(spec).encode()
    record_path(path).write_text(build_record(data, __version__, capability))  # as build-engines writes it
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """`import tensorrt` gives this module inside the block."""
    saved = sys.modules.get("tensorrt")
    sys.modules["tensorrt"] = sys.modules[__name__]
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = saved


class _HostStream:
    """Work enqueued on a host "stream": it runs, in order, when the stream is synchronised."""

    def __init__(self) -> None:
        self.pending: list = []

    def drain(self) -> None:
        while self.pending:
            self.pending.pop(0)()


_HOST_STREAMS: dict[int, _HostStream] = {}
_HANDLES = iter(range(0x5000, 1 << 62))


class HostCudaApi(CudaApi):
    """`engines.cuda_api.CudaApi` over plain host memory, for the "onnxruntime" executor on
    machines without a GPU. Asynchronous like CUDA: copies (reading their source when they run)
    and the stand-in's network wait on their stream until `synchronize`, so an engine that reads
    its outputs before waiting reads stale buffers. Every call must come with the device current
    (inside `current()`), and `alloc` fails after `fail_alloc_after` allocations when set. Counts
    what is still allocated. Its device's compute capability is `capability` (an Orin's unless
    told another), answered as pycuda's `Device(i).compute_capability()` answers it."""

    name = "host (stand-in)"

    def __init__(self, fail_alloc_after: int | None = None, capability: tuple[int, int] = ORIN) -> None:
        self.capability = (int(capability[0]), int(capability[1]))
        self.live: dict[int, np.ndarray] = {}
        self.pinned_live: set[int] = set()
        self.streams_live = 0
        self.fail_alloc_after = fail_alloc_after
        self.allocs = 0
        self._local = threading.local()

    def _need_current(self, what: str) -> None:
        if not getattr(self._local, "depth", 0):
            raise AssertionError(f"{what} called without the device current")

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def stream(self) -> CudaStream:
        self._need_current("stream")
        handle = next(_HANDLES)
        _HOST_STREAMS[handle] = raw = _HostStream()
        self.streams_live += 1
        return CudaStream(raw, handle)

    def pinned_empty(self, n: int, dtype) -> np.ndarray:
        self._need_current("pinned_empty")
        arr = np.zeros(int(n), dtype)
        self.pinned_live.add(arr.ctypes.data)
        return arr

    def alloc(self, nbytes: int) -> int:
        self._need_current("alloc")
        if self.fail_alloc_after is not None and self.allocs >= self.fail_alloc_after:
            raise EngineError("CUDA cudaMalloc: cudaErrorMemoryAllocation: out of memory (stand-in)")
        self.allocs += 1
        buf = np.empty(max(int(nbytes), 1), np.uint8)
        buf[:] = 0xFF  # garbage until written, as device memory is
        self.live[buf.ctypes.data] = buf
        return buf.ctypes.data

    def htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        self._need_current("htod_async")
        ptr, n = src.ctypes.data, src.nbytes
        stream.raw.pending.append(lambda: ctypes.memmove(dst, ptr, n))

    def dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        self._need_current("dtoh_async")
        ptr, n = dst.ctypes.data, dst.nbytes
        stream.raw.pending.append(lambda: ctypes.memmove(ptr, src, n))

    def synchronize(self, stream: CudaStream) -> None:
        self._need_current("synchronize")
        stream.raw.drain()

    def free(self, ptr: int) -> None:
        self._need_current("free")
        del self.live[ptr]

    def free_pinned(self, arr: np.ndarray) -> None:
        self._need_current("free_pinned")
        self.pinned_live.discard(arr.ctypes.data)

    def compute_capability(self) -> tuple[int, int]:
        self._need_current("compute_capability")
        return self.capability

    def destroy_stream(self, stream: CudaStream) -> None:
        self._need_current("destroy_stream")
        stream.raw.drain()  # CUDA finishes a destroyed stream's work
        _HOST_STREAMS.pop(stream.handle, None)
        self.streams_live -= 1
