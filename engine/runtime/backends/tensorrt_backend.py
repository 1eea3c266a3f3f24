"""The TensorRT backend: an artifact's ``model.plan`` (``modloc build``) on an NVIDIA GPU.

- **Name-based I/O** (TensorRT ≥ 8.5): per call, ``set_input_shape`` for each input,
  ``set_tensor_address`` for every input and output, ``execute_async_v3`` on the slot's
  stream. Batches larger than the optimization profile's maximum run in chunks.
- **Concurrency**: one execution context per stream (``streams``); a call takes a free
  context with its stream and buffers, so that that many threads run at once.
- **Device memory** from torch when it is installed with CUDA, otherwise from cuda-python
  (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6). Buffers grow to the largest
  batch seen and are reused.
- **Plan checks**: a plan runs only where it was built: the same TensorRT version, the same
  device model and compute capability, and built from the artifact's own model.onnx
  (:func:`plan_mismatches`). On a mismatch the backend refuses, naming each difference, or,
  given a ``rebuild`` function (:func:`modloc.export.trt.rebuild_plan`), rebuilds the plan with
  the recorded profiles first. (The engine never imports the exporter itself.)

TensorRT and the CUDA bindings are imported only when a backend is created: the
``tensorrt`` extra (``pip install modloc[trt]``).
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import numpy as np

from modloc.engine.runtime.artifacts import Artifact, ArtifactError, TensorSpec, check_io
from modloc.engine.runtime.backends.interface import Backend, graph_inputs

Rebuild = Callable[[Artifact], Artifact]


def import_tensorrt():
    """The ``tensorrt`` module, or an ImportError that says how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise ImportError("the tensorrt backend needs TensorRT and an NVIDIA GPU: pip install "
                          "'modloc[trt]' (tensorrt>=8.6, cuda-python)") from None
    return tensorrt


def device_info(device: int = 0) -> dict:
    """``{"name", "compute_capability"}`` of CUDA device ``device`` (torch or cuda-python)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    cudart = _cudart()
    properties = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = properties.name.decode() if isinstance(properties.name, bytes) else str(properties.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{properties.major}.{properties.minor}"}


def plan_mismatches(plan: dict, tensorrt_version: str, device: dict) -> list[str]:
    """Why a plan recorded in a manifest cannot run here (empty when it can)."""
    problems = []
    if plan.get("tensorrt_version") != tensorrt_version:
        problems.append(f"built with TensorRT {plan.get('tensorrt_version')}, this is {tensorrt_version}")
    recorded = plan.get("device") or {}
    for key, label in (("compute_capability", "compute capability"), ("name", "device")):
        if recorded.get(key) != device.get(key):
            problems.append(f"built for {label} {recorded.get(key)}, this is {device.get(key)}")
    return problems


class TensorRTBackend(Backend):
    """``model.plan`` of an artifact, run with TensorRT.

    Args:
        artifact: a verified artifact holding a plan.
        device: the CUDA device index.
        streams: execution contexts (each with its stream and buffers) for concurrent calls.
        rebuild: called with the artifact when its plan does not fit this machine; returns
            the artifact with a new plan (:func:`modloc.export.trt.rebuild_plan`). None refuses.
        memory: ``"torch"``, ``"cuda-python"`` or ``"auto"`` (torch when it has CUDA).
    """

    name = "tensorrt"

    def __init__(self, artifact: Artifact, device: int = 0, streams: int = 1,
                 rebuild: Rebuild | None = None, memory: str = "auto"):
        trt = import_tensorrt()
        if artifact.plan is None:
            raise ArtifactError(f"{artifact.path}: no model.plan; build one with `modloc build "
                                f"{artifact.path}`")
        problems = plan_mismatches(artifact.plan, trt.__version__, device_info(device))
        if problems and rebuild is not None:
            artifact = rebuild(artifact)
            problems = plan_mismatches(artifact.plan, trt.__version__, device_info(device))
        if problems:
            raise ArtifactError(f"{artifact.path}: model.plan does not fit this machine ("
                                + "; ".join(problems) + f"); rebuild it: modloc build {artifact.path}")
        super().__init__(artifact)
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.device = device
        self.memory = _device_memory(memory, device)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(artifact.plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{artifact.plan_path}: TensorRT could not deserialize the plan")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        specs = {"inputs": [], "outputs": []}
        for name in names:
            role = "inputs" if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
            specs[role].append(TensorSpec(name, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name,
                                          tuple(self.engine.get_tensor_shape(name))))
        for role, expected in (("inputs", artifact.inputs), ("outputs", artifact.outputs)):
            check_io(artifact, role, _in_order(specs[role], expected), "TensorRT engine")
        self.outputs = [spec.name for spec in artifact.outputs]
        self.max_batch = min(self.engine.get_tensor_profile_shape(spec.name, 0)[2][0]
                             for spec in artifact.inputs)
        self.frame_range = tuple(int(self.engine.get_tensor_profile_shape("mask", 0)[i][1])
                                 for i in (0, 2))
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(streams):
            self._slots.put(_Slot(self.engine.create_execution_context(), self.memory))

    def run(self, features: np.ndarray, mask: np.ndarray | None = None,
            num_frames: np.ndarray | None = None) -> np.ndarray:
        return self.run_outputs(features, mask, num_frames)["probabilities"]

    def run_outputs(self, features: np.ndarray, mask: np.ndarray | None = None,
                    num_frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every output of the engine (probabilities and logits), by name."""
        inputs = graph_inputs(self.artifact, features, mask, num_frames)
        frames = inputs["mask"].shape[1]
        if not self.frame_range[0] <= frames <= self.frame_range[1]:
            raise ValueError(f"{frames} frames per row: the plan's profile takes "
                             f"{self.frame_range[0]}..{self.frame_range[1]} (modloc build --frames)")
        slot = self._slots.get()
        try:
            parts = [slot.execute({name: array[begin:begin + self.max_batch]
                                   for name, array in inputs.items()}, self.outputs)
                     for begin in range(0, len(inputs["mask"]), self.max_batch)]
        finally:
            self._slots.put(slot)
        return {name: np.concatenate([part[name] for part in parts]) for name in self.outputs}

    def close(self) -> None:
        while not self._slots.empty():
            self._slots.get().close()
        self.engine = None


class _Slot:
    """One execution context with its stream and its device buffers (one call at a time)."""

    def __init__(self, context, memory: _DeviceMemory):
        self.context = context
        self.memory = memory
        self.stream = memory.stream()
        self.buffers: dict[str, _Buffer] = {}

    def _buffer(self, name: str, nbytes: int) -> _Buffer:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                self.memory.free(buffer)
            buffer = self.buffers[name] = self.memory.allocate(max(nbytes, 1))
        return buffer

    def execute(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        for name, array in inputs.items():
            if not self.context.set_input_shape(name, array.shape):
                raise ValueError(f"TensorRT refused input {name} of shape {array.shape}")
            buffer = self._buffer(name, array.nbytes)
            self.memory.upload(buffer, array, self.stream)
            self.context.set_tensor_address(name, buffer.ptr)
        results = {}
        for name in outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, np.float32)
            self.context.set_tensor_address(name, self._buffer(name, results[name].nbytes).ptr)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name, array in results.items():
            self.memory.download(array, self.buffers[name], self.stream)
        self.memory.synchronize(self.stream)
        return results

    def close(self) -> None:
        for buffer in self.buffers.values():
            self.memory.free(buffer)
        self.buffers.clear()
        self.context = None


class _Buffer:
    """Device memory: its address and size (and, with torch, the tensor owning it)."""

    def __init__(self, ptr: int, nbytes: int, owner=None):
        self.ptr, self.nbytes, self.owner = ptr, nbytes, owner


class _Stream:
    def __init__(self, handle: int, owner=None):
        self.handle, self.owner = handle, owner


class _DeviceMemory:
    """Streams, buffers and copies on one CUDA device (torch or cuda-python below)."""

    def stream(self) -> _Stream: ...
    def allocate(self, nbytes: int) -> _Buffer: ...
    def free(self, buffer: _Buffer) -> None: ...
    def upload(self, buffer: _Buffer, array: np.ndarray, stream: _Stream) -> None: ...
    def download(self, array: np.ndarray, buffer: _Buffer, stream: _Stream) -> None: ...
    def synchronize(self, stream: _Stream) -> None: ...


class _TorchMemory(_DeviceMemory):
    def __init__(self, device: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)

    def stream(self) -> _Stream:
        stream = self.torch.cuda.Stream(device=self.device)
        return _Stream(stream.cuda_stream, stream)

    def allocate(self, nbytes: int) -> _Buffer:
        tensor = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        return _Buffer(tensor.data_ptr(), nbytes, tensor)

    def free(self, buffer: _Buffer) -> None:
        buffer.owner = None

    def upload(self, buffer: _Buffer, array: np.ndarray, stream: _Stream) -> None:
        with self.torch.cuda.stream(stream.owner):
            buffer.owner[: array.nbytes].copy_(self.torch.from_numpy(_bytes(array)), non_blocking=True)

    def download(self, array: np.ndarray, buffer: _Buffer, stream: _Stream) -> None:
        with self.torch.cuda.stream(stream.owner):
            self.torch.from_numpy(_bytes(array)).copy_(buffer.owner[: array.nbytes])

    def synchronize(self, stream: _Stream) -> None:
        stream.owner.synchronize()


class _CudaPythonMemory(_DeviceMemory):
    def __init__(self, device: int):
        self.cudart = _cudart()
        _check(self.cudart.cudaSetDevice(device), "cudaSetDevice")

    def stream(self) -> _Stream:
        stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        return _Stream(int(stream), stream)

    def allocate(self, nbytes: int) -> _Buffer:
        return _Buffer(int(_check(self.cudart.cudaMalloc(nbytes), "cudaMalloc")), nbytes)

    def free(self, buffer: _Buffer) -> None:
        _check(self.cudart.cudaFree(buffer.ptr), "cudaFree")

    def upload(self, buffer: _Buffer, array: np.ndarray, stream: _Stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(buffer.ptr, array.ctypes.data, array.nbytes, kind,
                                           stream.owner), "cudaMemcpyAsync")

    def download(self, array: np.ndarray, buffer: _Buffer, stream: _Stream) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(array.ctypes.data, buffer.ptr, array.nbytes, kind,
                                           stream.owner), "cudaMemcpyAsync")

    def synchronize(self, stream: _Stream) -> None:
        _check(self.cudart.cudaStreamSynchronize(stream.owner), "cudaStreamSynchronize")


def _device_memory(kind: str, device: int) -> _DeviceMemory:
    if kind not in ("auto", "torch", "cuda-python"):
        raise ValueError(f"memory must be 'auto', 'torch' or 'cuda-python', got {kind!r}")
    if kind == "auto":
        try:
            import torch

            kind = "torch" if torch.cuda.is_available() else "cuda-python"
        except ImportError:
            kind = "cuda-python"
    return _TorchMemory(device) if kind == "torch" else _CudaPythonMemory(device)


def _in_order(actual: list[TensorSpec], expected: tuple[TensorSpec, ...]) -> list[TensorSpec]:
    """``actual`` in the manifest's order when the names agree (an engine may list its
    tensors in another order than the graph), else as it is, for the mismatch message."""
    by_name = {spec.name: spec for spec in actual}
    if set(by_name) != {spec.name for spec in expected}:
        return actual
    return [by_name[spec.name] for spec in expected]


def _bytes(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (torch copies bytes, not dtypes)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ImportError("device memory without torch needs cuda-python: pip install "
                              "cuda-python") from None
    return runtime


def _check(result, call: str):
    """cuda-python returns ``(error, *values)``: raise on an error, else the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"{call} failed: {error}")
    return values[0] if len(values) == 1 else values or None


__all__ = ["Rebuild", "TensorRTBackend", "device_info", "import_tensorrt", "plan_mismatches"]
