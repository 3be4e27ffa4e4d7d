"""The few CUDA calls the TensorRT backend makes, behind one small interface.

`TensorRtEngine` needs pinned host buffers, device buffers, streams, asynchronous copies and a
stream synchronisation; nothing else. Two implementations:

  pycuda        the jetson extra's package (driver API, the device's primary context pushed
                around each call)
  cuda-python   NVIDIA's `cuda.bindings` runtime API, which TensorRT 10's own Python samples use
                (it also uses the primary context, so both share memory with TensorRT and with
                any other CUDA library in the process)

`cuda_api("auto")` takes pycuda where it imports, else cuda-python; one instance per API and
device serves the whole process. Device pointers are plain
ints and streams are opaque objects whose `handle` TensorRT's `execute_async_v3` takes.
Every call that fails raises `EngineError` with CUDA's own error text.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import threading
from collections.abc import Iterator

import numpy as np

from smearscope.engines.base import EngineError

CUDA_APIS = ("pycuda", "cuda-python")


class CudaStream:
    """A CUDA stream; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self, raw: object, handle: int) -> None:
        self.raw = raw
        self.handle = int(handle)


class CudaApi(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    def current(self) -> contextlib.AbstractContextManager:
        """Make the device current in the calling thread for the duration of the block."""

    @abc.abstractmethod
    def stream(self) -> CudaStream: ...

    @abc.abstractmethod
    def pinned_empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        """A flat page-locked host array of n elements (asynchronous copies need page-locked memory)."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> int:
        """Device memory; returns its address."""

    @abc.abstractmethod
    def htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None: ...

    @abc.abstractmethod
    def dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None: ...

    @abc.abstractmethod
    def synchronize(self, stream: CudaStream) -> None: ...

    @abc.abstractmethod
    def free(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def free_pinned(self, arr: np.ndarray) -> None: ...

    @abc.abstractmethod
    def destroy_stream(self, stream: CudaStream) -> None: ...

    @abc.abstractmethod
    def compute_capability(self) -> tuple[int, int]:
        """The device's compute capability (major, minor), e.g. (8, 7) on a Jetson Orin: a TensorRT
        engine is built for one and part of its cache key (`engines.trt_cache`)."""


class PyCudaApi(CudaApi):
    name = "pycuda"

    def __init__(self, device_index: int = 0) -> None:
        try:
            import pycuda.driver as cuda
        except ImportError as exc:
            raise EngineError(f"pycuda is not installed here: {exc}") from exc
        self._cuda = cuda
        self.device_index = device_index
        try:
            cuda.init()
            self._ctx = cuda.Device(device_index).retain_primary_context()
        except cuda.Error as exc:
            raise EngineError(f"CUDA device {device_index}: {exc}") from exc
        self._allocs: dict[int, object] = {}

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._cuda.Error as exc:
            raise EngineError(f"CUDA: {exc}") from exc

    def stream(self) -> CudaStream:
        s = self._call(self._cuda.Stream)
        return CudaStream(s, s.handle)

    def pinned_empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        return self._call(self._cuda.pagelocked_empty, int(n), np.dtype(dtype))

    def alloc(self, nbytes: int) -> int:
        a = self._call(self._cuda.mem_alloc, int(nbytes))
        self._allocs[int(a)] = a
        return int(a)

    def htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        self._call(self._cuda.memcpy_htod_async, dst, src, stream.raw)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        self._call(self._cuda.memcpy_dtoh_async, dst, src, stream.raw)

    def synchronize(self, stream: CudaStream) -> None:
        self._call(stream.raw.synchronize)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def free_pinned(self, arr: np.ndarray) -> None:
        base = arr.base if arr.base is not None else arr
        free = getattr(base, "free", None)  # pycuda's HostAllocation; otherwise freed on release
        if free is not None:
            free()

    def destroy_stream(self, stream: CudaStream) -> None:
        stream.raw = None  # pycuda destroys the stream when the object goes

    def compute_capability(self) -> tuple[int, int]:
        major, minor = self._call(lambda: self._cuda.Device(self.device_index).compute_capability())
        return int(major), int(minor)


class CudaPythonApi(CudaApi):
    name = "cuda-python"

    def __init__(self, device_index: int = 0) -> None:
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:  # cuda-python before 12.6 names the module cuda.cudart
                from cuda import cudart
        except ImportError as exc:
            raise EngineError(f"cuda-python is not installed here: {exc}") from exc
        self._rt = cudart
        self.device_index = device_index
        self._check(cudart.cudaSetDevice(device_index), "cudaSetDevice")
        self._pinned: dict[int, int] = {}  # array address -> cudaHostAlloc pointer

    def _check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(err)
            raise EngineError(f"CUDA {what}: {err.name if hasattr(err, 'name') else err}: "
                              f"{text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else rest

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        # the runtime API's current device is per thread; the primary context comes with it
        self._check(self._rt.cudaSetDevice(self.device_index), "cudaSetDevice")
        yield

    def stream(self) -> CudaStream:
        s = self._check(self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking),
                        "cudaStreamCreate")
        return CudaStream(s, int(s))

    def pinned_empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(n) * dtype.itemsize, 1)
        ptr = self._check(self._rt.cudaHostAlloc(nbytes, self._rt.cudaHostAllocDefault), "cudaHostAlloc")
        raw = (ctypes.c_byte * nbytes).from_address(int(ptr))
        arr = np.frombuffer(raw, np.uint8, count=int(n) * dtype.itemsize).view(dtype)
        self._pinned[arr.ctypes.data] = int(ptr)
        return arr

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def htod_async(self, dst: int, src: np.ndarray, stream: CudaStream) -> None:
        self._check(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                             self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw),
                    "cudaMemcpyAsync(H2D)")

    def dtoh_async(self, dst: np.ndarray, src: int, stream: CudaStream) -> None:
        self._check(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                             self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw),
                    "cudaMemcpyAsync(D2H)")

    def synchronize(self, stream: CudaStream) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream.raw), "cudaStreamSynchronize")

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "cudaFree")

    def free_pinned(self, arr: np.ndarray) -> None:
        ptr = self._pinned.pop(arr.ctypes.data, None)
        if ptr is not None:
            self._check(self._rt.cudaFreeHost(ptr), "cudaFreeHost")

    def destroy_stream(self, stream: CudaStream) -> None:
        self._check(self._rt.cudaStreamDestroy(stream.raw), "cudaStreamDestroy")

    def compute_capability(self) -> tuple[int, int]:
        attr, get = self._rt.cudaDeviceAttr, self._rt.cudaDeviceGetAttribute
        major = self._check(get(attr.cudaDevAttrComputeCapabilityMajor, self.device_index), "cudaDeviceGetAttribute")
        minor = self._check(get(attr.cudaDevAttrComputeCapabilityMinor, self.device_index), "cudaDeviceGetAttribute")
        return int(major), int(minor)


_SHARED: dict[tuple[str, int], CudaApi] = {}
_SHARED_LOCK = threading.Lock()


def cuda_api(name: str = "auto", device_index: int = 0) -> CudaApi:
    """The named CUDA API on `device_index`; 'auto' prefers pycuda, then cuda-python.

    One instance per (API, device) for the whole process, shared by every engine: it holds the
    device's primary context for the process's lifetime (as the CUDA runtime does), so engines
    can be closed and reloaded from any thread without retaining and releasing it each time.
    """
    if name not in ("auto", *CUDA_APIS):
        raise EngineError(f"unknown CUDA API {name!r}; known: auto, {', '.join(CUDA_APIS)}")
    with _SHARED_LOCK:
        key = (name, device_index)
        if key in _SHARED:
            return _SHARED[key]
        classes = {"pycuda": (PyCudaApi,), "cuda-python": (CudaPythonApi,)}.get(name, (PyCudaApi, CudaPythonApi))
        errors = []
        for cls in classes:
            resolved = (cls.name, device_index)
            try:
                api = _SHARED.get(resolved) or cls(device_index)
            except EngineError as exc:
                errors.append(str(exc))
                continue
            _SHARED[resolved] = _SHARED[key] = api
            return api
    if name != "auto":
        raise EngineError(errors[0])
    raise EngineError("no CUDA API for the TensorRT backend (needs pycuda or cuda-python, the "
                      "jetson extra): " + "; ".join(errors))
