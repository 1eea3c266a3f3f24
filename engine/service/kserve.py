"""The Open Inference Protocol (KServe v2) gRPC service over the engine's models.

Existing KServe and Triton clients (``tritonclient.grpc``, KServe's ``InferenceGRPCClient``)
call the video-level and segment-level artifacts as two plain models, unchanged::

    servicer = KServeServicer({"modloc-video": video_backend, "modloc-segment": segment_backend},
                              ready=lambda: state.ready)
    servicer.add_to_server(server)   # package inference, service GRPCInferenceService

Each model has one version, ``"1"`` (a request may leave the version empty). Its tensors:

================  ========  ================  ===============================================
name              datatype  shape             meaning
================  ========  ================  ===============================================
``features``      UINT8     ``[B, M, 1152]``  quantized frames (1024 RGB + 128 audio), padded
``num_frames``    INT32     ``[B]``           valid frames per row, in ``[1, M]`` (INT64 too)
``mask``          FP32      ``[B, M]``        instead of ``num_frames``: 1 at valid frames, 0
                                              at padding (BOOL too); at least one 1 per row
``probabilities`` FP32      ``[B, C]``        the output, columns in the model's class order
================  ========  ================  ===============================================

A request gives ``features`` and exactly one of ``num_frames`` and ``mask`` (the metadata
lists ``num_frames``, the form most clients build; ``mask`` is accepted because it is what
the artifact's graph takes). The padding is required rather than defaulted: a client that
forgot it would silently get scores over its padding frames. ``B`` is at most ``max_batch``
and ``M`` at most ``max_frames``.

Data may come as ``raw_input_contents`` (one little-endian, row-major byte string per input,
in input order: what ``tritonclient`` sends) or as typed ``contents`` (``uint_contents`` for
UINT8, ``int_contents`` for INT32, ``int64_contents``, ``fp32_contents``, ``bool_contents``),
never both in one request, as the protocol requires. The response answers in the same form:
``raw_output_contents`` for a raw request, typed ``fp32_contents`` for a typed one.

The output columns are the model's class ids (:attr:`modloc.engine.runtime.backends.Backend.class_ids`);
ModelMetadata has no field for them, so a request that sets the bool parameter
``class_ids`` gets them back as the response's string parameter ``class_ids`` (comma-separated
vocabulary ids, one per column). The modloc.v1 API's ModelInfo gives them too.

Errors: an unknown model or version is ``NOT_FOUND``; a malformed request is
``INVALID_ARGUMENT`` with the field or tensor at fault in the message; a server that is not
ready answers inference with ``UNAVAILABLE``. ModelStreamInfer (Triton's streaming
extension) answers every request on the stream in order, and a bad request gets a response
whose ``error_message`` is set instead of ending the stream, as Triton does.

Request parameters other than ``class_ids`` and any tensor parameter (shared memory regions,
the classification extension) are refused rather than ignored: each of them would change
what the data or the answer means, and this server implements none of them.

**Admission** (:class:`KServeLimits`): at most ``max_requests`` inference requests in
flight at once, holding at most ``max_bytes`` of request messages. gRPC parses a unary
request before its handler runs, so a limit checked there comes after the memory is spent
(a flood of 48 calls of 3.8 MB parsed them all). ModelInfer is therefore served as a
request stream of raw bytes (the wire format of a unary call is the same, clients see no
difference): its handler runs before the message is read and refuses a call past
``max_requests`` with RESOURCE_EXHAUSTED at once, so a refused call never has more than
its HTTP/2 flow-control window read; the admitted message is then checked against
``max_bytes`` (RESOURCE_EXHAUSTED) and parsed (INVALID_ARGUMENT if it does not decode).
ModelStreamInfer reads its next request only once a slot is free (the stream waits: flow
control holds its client back) and answers a request past ``max_bytes`` with an
``error_message``. The server sets the transport's side (per-connection streams, windows,
connections: :mod:`modloc.engine.service.app`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from modloc._version import __version__
from modloc.engine._proto.inference import grpc_predict_v2_pb2 as pb
from modloc.engine._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES
from modloc.engine.runtime.backends import Backend

log = logging.getLogger(__name__)

MODEL_VERSION = "1"
DEFAULT_MODEL_NAMES = {"video": "modloc-video", "segment": "modloc-segment"}
DEFAULT_MAX_BATCH = 256
SERVICE = "inference.GRPCInferenceService"
# the extensions this servicer implements: Triton's bidirectional ModelStreamInfer, and
# request/response parameters (the ``class_ids`` parameter)
EXTENSIONS = ("model_stream_infer", "parameters")
CLASS_IDS_PARAMETER = "class_ids"

FEATURES = "features"
NUM_FRAMES = "num_frames"
MASK = "mask"
PROBABILITIES = "probabilities"

# KServe platform strings (<project>_<format>) for each backend's runtime and file
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan",
             "torch": "pytorch_pt2"}


@dataclass(frozen=True)
class _Datatype:
    """One protocol datatype: its numpy dtype (little-endian) and its typed contents field."""

    dtype: np.dtype
    contents_field: str


_DATATYPES = {
    "UINT8": _Datatype(np.dtype("u1"), "uint_contents"),
    "INT32": _Datatype(np.dtype("<i4"), "int_contents"),
    "INT64": _Datatype(np.dtype("<i8"), "int64_contents"),
    "FP32": _Datatype(np.dtype("<f4"), "fp32_contents"),
    # BOOL travels as one byte per element in raw form (0 or 1)
    "BOOL": _Datatype(np.dtype("?"), "bool_contents"),
}
# the datatypes each input accepts, the first being the one ModelMetadata advertises
_INPUT_DATATYPES = {FEATURES: ("UINT8",), NUM_FRAMES: ("INT32", "INT64"), MASK: ("FP32", "BOOL")}


def _decoded(data: bytes, what: str) -> pb.ModelInferRequest:
    """``data`` parsed as a ModelInferRequest; KServeError INVALID_ARGUMENT if it is not one."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError as error:
        raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} is not a valid inference.ModelInferRequest message ({error}; "
                          f"{len(data)} bytes)") from None


class KServeError(Exception):
    """A request this service refuses: the gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> KServeError:
    return KServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class KServeLimits:
    """Admission of KServe inference (module docstring).

    Attributes:
        max_requests: ModelInfer calls and ModelStreamInfer requests in flight at once.
        max_bytes: request message bytes those hold at once.
    """

    max_requests: int = 8
    max_bytes: int = 32 << 20

    def __post_init__(self):
        if self.max_requests < 1 or self.max_bytes < 1:
            raise ValueError(f"KServe limits must be >= 1, got {self}")


class Admission:
    """The requests and bytes admitted now (event-loop thread only), against the limits."""

    def __init__(self, limits: KServeLimits):
        self.limits = limits
        self.requests = 0
        self.bytes = 0
        self._freed = asyncio.Condition()

    def enter(self) -> None:
        """Admit one request now, or raise KServeError RESOURCE_EXHAUSTED."""
        if self.requests >= self.limits.max_requests:
            raise KServeError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.requests} KServe requests are in flight, the server's limit "
                              f"is {self.limits.max_requests}; retry after a backoff")
        self.requests += 1

    async def wait_room(self) -> None:
        """Return once a slot is free (without taking it)."""
        async with self._freed:
            await self._freed.wait_for(lambda: self.requests < self.limits.max_requests)

    async def wait_enter(self) -> None:
        """Admit one request once a slot is free."""
        async with self._freed:
            await self._freed.wait_for(lambda: self.requests < self.limits.max_requests)
            self.requests += 1

    def hold(self, size: int) -> None:
        """Count an admitted request's ``size`` message bytes, or raise RESOURCE_EXHAUSTED."""
        if self.bytes + size > self.limits.max_bytes:
            raise KServeError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"KServe requests in flight hold {self.bytes} bytes; this one's "
                              f"{size} would pass the server's limit of {self.limits.max_bytes}; "
                              "retry after a backoff")
        self.bytes += size

    async def leave(self, size: int) -> None:
        """A request admitted (with ``size`` bytes held, 0 if none) is done."""
        self.requests -= 1
        self.bytes -= size
        async with self._freed:
            self._freed.notify()


@dataclass(frozen=True)
class _Batch:
    """A validated request: the arrays for ``Backend.run`` and how to answer."""

    features: np.ndarray
    num_frames: np.ndarray | None
    mask: np.ndarray | None
    raw: bool
    class_ids: bool


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over named backends (see the module docstring).

    Args:
        models: model name → backend (e.g. :data:`DEFAULT_MODEL_NAMES` → the engine's
            video-level and segment-level backends); None to :meth:`attach` them later.
        ready: whether the server is ready for inference (ServerReady, ModelReady; inference
            is refused with UNAVAILABLE while it is false, e.g. while draining).
        server_name, server_version: what ServerMetadata reports.
        max_batch: most videos per request (``B``).
        max_frames: most frames per video (``M``).
        locks: model name → the lock that serializes calls into its backend. By default each
            distinct backend gets its own lock (backends need not be thread-safe); pass the
            lock the engine's own pipeline holds when it shares the backend object.
        limits: the admission of inference requests (:class:`KServeLimits`).
    """

    def __init__(self, models: Mapping[str, Backend] | None, ready: Callable[[], bool],
                 server_name: str = "modloc", server_version: str = __version__,
                 max_batch: int = DEFAULT_MAX_BATCH, max_frames: int = MAX_FRAMES,
                 locks: Mapping[str, threading.Lock] | None = None,
                 limits: KServeLimits | None = None):
        for label, value in (("max_batch", max_batch), ("max_frames", max_frames)):
            if int(value) < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        self.ready = ready
        self.server_name = server_name
        self.server_version = server_version
        self.max_batch = int(max_batch)
        self.max_frames = int(max_frames)
        self.admission = Admission(limits or KServeLimits())
        self.models: dict[str, Backend] = {}
        if models is not None:
            self.attach(models, locks)

    def attach(self, models: Mapping[str, Backend],
               locks: Mapping[str, threading.Lock] | None = None) -> None:
        """Serve ``models`` (a server registers the service before its models have loaded:
        until then every model call answers UNAVAILABLE)."""
        if not models:
            raise ValueError("KServeServicer needs at least one model")
        if any(not name for name in models):
            raise ValueError("model names must not be empty")
        by_backend: dict[int, threading.Lock] = {}
        self._locks = {}
        for name, backend in models.items():
            if locks is not None and name in locks:
                self._locks[name] = locks[name]
            else:
                self._locks[name] = by_backend.setdefault(id(backend), threading.Lock())
        # Calls that share a lock run on one thread of their own: they are serialized anyway,
        # and a backend keeps per-thread state (torch's CUDA graphs are recorded per thread,
        # so a pool of threads would record and hold them once per thread).
        by_lock: dict[int, ThreadPoolExecutor] = {}
        self._threads = {name: by_lock.setdefault(id(lock), ThreadPoolExecutor(
                             1, thread_name_prefix=f"kserve-{name}")) for name, lock in self._locks.items()}
        # the class ids parameter is the same string for every response of a model
        self._class_ids = {name: ",".join(map(str, backend.class_ids))
                           for name, backend in models.items()}
        self.models = dict(models)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the service on a ``grpc.aio`` server: the five unary calls as generated,
        the two inference calls reading raw request bytes (admission before reading)."""
        handlers = {name: grpc.unary_unary_rpc_method_handler(
                        getattr(self, name), request_deserializer=getattr(pb, f"{name}Request").FromString,
                        response_serializer=getattr(pb, f"{name}Response").SerializeToString)
                    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                 "ModelMetadata")}
        handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
            self.ModelInfer, response_serializer=pb.ModelInferResponse.SerializeToString)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer, response_serializer=pb.ModelStreamInferResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    @property
    def max_request_bytes(self) -> int:
        """An upper bound on a valid ModelInfer message: the largest ``features`` plus an FP32
        ``mask`` and 64 KiB for names, shapes and parameters. The server's
        ``grpc.max_receive_message_length`` must be at least this (gRPC's default is 4 MiB)."""
        elements = self.max_batch * self.max_frames
        return elements * FEATURE_SIZE + elements * 4 + (64 << 10)

    # ------------------------------------------------------------------ health and metadata

    async def ServerLive(self, request, context):
        # the process answers, so it is live; readiness is ServerReady's question
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.ready()))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version,
                                         extensions=list(EXTENSIONS))

    async def ModelReady(self, request, context):
        try:
            self._model(request.name, request.version)
        except KServeError as error:
            await context.abort(error.code, error.message)
        return pb.ModelReadyResponse(ready=bool(self.ready()))

    async def ModelMetadata(self, request, context):
        try:
            backend = self._model(request.name, request.version)
        except KServeError as error:
            await context.abort(error.code, error.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[MODEL_VERSION],
            platform=PLATFORMS.get(backend.name, backend.name),
            inputs=[tensor(name=FEATURES, datatype=_INPUT_DATATYPES[FEATURES][0],
                           shape=[-1, -1, FEATURE_SIZE]),
                    tensor(name=NUM_FRAMES, datatype=_INPUT_DATATYPES[NUM_FRAMES][0], shape=[-1])],
            outputs=[tensor(name=PROBABILITIES, datatype="FP32",
                            shape=[-1, len(backend.class_ids)])])

    # ------------------------------------------------------------------------- inference

    async def ModelInfer(self, request_iterator: AsyncIterator[bytes], context):
        """ModelInfer over the raw bytes of its one request (see :meth:`add_to_server`).

        Messages are read with ``context.read()``, not through ``request_iterator``: the
        iterator's suspended frame would keep the last message alive after the call.
        """
        held = 0
        try:
            self.admission.enter()  # before the message is read: a refusal costs no memory
        except KServeError as error:
            await context.abort(error.code, f"ModelInfer: {error.message}")
        try:
            data = await context.read()
            if data is grpc.aio.EOF:
                data = b""
            self.admission.hold(len(data))
            held = len(data)
            request = _decoded(data, "ModelInfer: the request")
            del data
            return await self._run(request, *self._prepared(request, release=True))
        except KServeError as error:
            await context.abort(error.code, error.message)
        finally:
            await self.admission.leave(held)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[bytes],
                               context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in request order; a refused request is answered with
        its message and the stream goes on, as Triton's streaming endpoint does. The next
        request is read only once the admission has room (an idle stream holds no slot:
        it waits for room, reads, then takes a slot)."""
        for index in itertools.count():
            await self.admission.wait_room()
            data = await context.read()  # not the iterator (see ModelInfer)
            if data is grpc.aio.EOF:
                return
            await self.admission.wait_enter()
            held = 0
            request = None
            try:
                self.admission.hold(len(data))
                held = len(data)
                request = _decoded(data, f"ModelStreamInfer: request {index}")
                del data
                response = pb.ModelStreamInferResponse(
                    infer_response=await self._run(request, *self._prepared(request, release=True)))
            except KServeError as error:
                response = pb.ModelStreamInferResponse(
                    error_message=error.message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version,
                        id=request.id) if request is not None else None)
            finally:
                await self.admission.leave(held)
            yield response

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Validate and run one ModelInfer request.

        Raises:
            KServeError: NOT_FOUND for an unknown model or version, UNAVAILABLE while the
                server is not ready, INVALID_ARGUMENT for a malformed request, INTERNAL when
                the backend fails.
        """
        return await self._run(request, *self._prepared(request))

    def _prepared(self, request: pb.ModelInferRequest, release: bool = False) -> tuple[Backend, _Batch]:
        """The model and the validated batch of a request; ``release``: then drop the
        request's input data, which the batch has copied (an admitted request waiting for
        its model holds one copy of its data, not three)."""
        backend = self._model(request.model_name, request.model_version)
        if not self.ready():
            raise KServeError(grpc.StatusCode.UNAVAILABLE, "the server is not ready for inference")
        batch = self._parse(request)
        if release:
            request.ClearField("raw_input_contents")
            request.ClearField("inputs")
        return backend, batch

    async def _run(self, request: pb.ModelInferRequest, backend: Backend,
                   batch: _Batch) -> pb.ModelInferResponse:
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self._threads[request.model_name], self._call, request.model_name, backend, batch)
        except Exception as error:
            # the request was valid, so this is the server's fault: INTERNAL, logged in full,
            # and (on a stream) answered like any other failed request
            log.exception("model %r failed on request %r", request.model_name, request.id)
            raise KServeError(grpc.StatusCode.INTERNAL,
                              f"model {request.model_name!r} failed: {error}") from error
        return self._response(request, probabilities, batch)

    def _model(self, name: str, version: str) -> Backend:
        if not self.models:
            raise KServeError(grpc.StatusCode.UNAVAILABLE, "the server is loading its models")
        backend = self.models.get(name)
        if backend is None:
            raise KServeError(grpc.StatusCode.NOT_FOUND,
                              f"unknown model {name!r}; this server has {', '.join(sorted(self.models))}")
        if version not in ("", MODEL_VERSION):
            raise KServeError(grpc.StatusCode.NOT_FOUND,
                              f"model {name!r} has no version {version!r}; versions: {MODEL_VERSION}")
        return backend

    def _call(self, name: str, backend: Backend, batch: _Batch) -> np.ndarray:
        with self._locks[name]:
            return backend.run(batch.features, mask=batch.mask, num_frames=batch.num_frames)

    def _parse(self, request: pb.ModelInferRequest) -> _Batch:
        class_ids = self._request_parameters(request)
        self._check_requested_outputs(request)
        inputs: dict[str, tuple[int, pb.ModelInferRequest.InferInputTensor]] = {}
        for index, tensor in enumerate(request.inputs):
            if tensor.name not in _INPUT_DATATYPES:
                raise _invalid(f"unknown input {tensor.name!r}; inputs: {FEATURES}, "
                               f"{NUM_FRAMES} (or {MASK})")
            if tensor.name in inputs:
                raise _invalid(f"input {tensor.name!r} is given more than once")
            if tensor.parameters:
                raise _invalid(f"input {tensor.name!r}: tensor parameters are not supported "
                               f"(got {', '.join(sorted(tensor.parameters))}; shared memory is "
                               f"not implemented)")
            inputs[tensor.name] = (index, tensor)
        if FEATURES not in inputs:
            raise _invalid(f"missing input {FEATURES!r}")
        if NUM_FRAMES in inputs and MASK in inputs:
            raise _invalid(f"give the padding as input {NUM_FRAMES!r} or as input {MASK!r}, not both")
        if NUM_FRAMES not in inputs and MASK not in inputs:
            raise _invalid(f"missing input {NUM_FRAMES!r} (or {MASK!r}): the valid frames of "
                           f"each video")

        raw = len(request.raw_input_contents) > 0
        if raw and len(request.raw_input_contents) != len(request.inputs):
            raise _invalid(f"raw_input_contents holds {len(request.raw_input_contents)} entries for "
                           f"{len(request.inputs)} inputs: give one per input, in input order")
        for name, (_, tensor) in inputs.items():
            if raw and tensor.HasField("contents"):
                raise _invalid(f"input {name!r} has contents while the request uses "
                               f"raw_input_contents: use one form for every input")
            if not raw and not tensor.HasField("contents"):
                raise _invalid(f"input {name!r} has no data: set its contents or the request's "
                               f"raw_input_contents")

        # shapes are checked against the limits before any data is decoded
        features_tensor = inputs[FEATURES][1]
        batch_size, frames = self._features_shape(features_tensor)
        padding_name = NUM_FRAMES if NUM_FRAMES in inputs else MASK
        padding_tensor = inputs[padding_name][1]
        expected = [batch_size] if padding_name == NUM_FRAMES else [batch_size, frames]
        self._check_datatype(padding_tensor)
        if list(padding_tensor.shape) != expected:
            raise _invalid(f"input {padding_name!r} has shape {list(padding_tensor.shape)}, "
                           f"expected {expected} to match {FEATURES!r} {list(features_tensor.shape)}")

        features = self._decode(request, raw, *inputs[FEATURES])
        padding = self._decode(request, raw, *inputs[padding_name])
        num_frames = mask = None
        if padding_name == NUM_FRAMES:
            num_frames = padding.astype(np.int64)
            bad = np.flatnonzero((num_frames < 1) | (num_frames > frames))
            if bad.size:
                raise _invalid(f"input {NUM_FRAMES!r}: row {bad[0]} has {num_frames[bad[0]]} frames, "
                               f"expected 1 to {frames} (the frames of {FEATURES!r})")
        else:
            mask = padding.astype(np.float32)
            if not np.all((mask == 0) | (mask == 1)):
                raise _invalid(f"input {MASK!r} must hold only 0 and 1")
            empty = np.flatnonzero(mask.sum(axis=1) == 0)
            if empty.size:
                raise _invalid(f"input {MASK!r}: row {empty[0]} has no valid frame")
        return _Batch(features, num_frames, mask, raw, class_ids)

    @staticmethod
    def _request_parameters(request: pb.ModelInferRequest) -> bool:
        """Whether the request asks for the class ids (the one request parameter known)."""
        for name, value in request.parameters.items():
            if name != CLASS_IDS_PARAMETER:
                raise _invalid(f"request parameter {name!r} is not supported (supported: "
                               f"{CLASS_IDS_PARAMETER})")
            if value.WhichOneof("parameter_choice") != "bool_param":
                raise _invalid(f"request parameter {CLASS_IDS_PARAMETER!r} must be a bool_param")
        parameter = request.parameters.get(CLASS_IDS_PARAMETER)
        return parameter is not None and parameter.bool_param

    @staticmethod
    def _check_requested_outputs(request: pb.ModelInferRequest) -> None:
        seen = set()
        for output in request.outputs:
            if output.name != PROBABILITIES:
                raise _invalid(f"unknown output {output.name!r}; outputs: {PROBABILITIES}")
            if output.name in seen:
                raise _invalid(f"output {output.name!r} is requested more than once")
            if output.parameters:
                raise _invalid(f"output {output.name!r}: tensor parameters are not supported "
                               f"(got {', '.join(sorted(output.parameters))}; shared memory and "
                               f"classification are not implemented)")
            seen.add(output.name)

    @staticmethod
    def _check_datatype(tensor) -> None:
        allowed = _INPUT_DATATYPES[tensor.name]
        if tensor.datatype not in allowed:
            raise _invalid(f"input {tensor.name!r} has datatype {tensor.datatype!r}, expected "
                           f"{' or '.join(allowed)}")

    def _features_shape(self, tensor) -> tuple[int, int]:
        self._check_datatype(tensor)
        shape = list(tensor.shape)
        if len(shape) != 3 or shape[2] != FEATURE_SIZE:
            raise _invalid(f"input {FEATURES!r} has shape {shape}, expected [batch, frames, "
                           f"{FEATURE_SIZE}]")
        batch_size, frames = shape[0], shape[1]
        if not 1 <= batch_size <= self.max_batch:
            raise _invalid(f"input {FEATURES!r} holds a batch of {batch_size}, expected 1 to "
                           f"{self.max_batch} (the server's max_batch)")
        if not 1 <= frames <= self.max_frames:
            raise _invalid(f"input {FEATURES!r} holds {frames} frames per video, expected 1 to "
                           f"{self.max_frames} (the server's max_frames)")
        return batch_size, frames

    @staticmethod
    def _decode(request: pb.ModelInferRequest, raw: bool, index: int, tensor) -> np.ndarray:
        """The tensor's data as an array of its (already checked) shape."""
        datatype = _DATATYPES[tensor.datatype]
        shape = tuple(tensor.shape)
        count = math.prod(shape)
        if raw:
            data = request.raw_input_contents[index]
            expected = count * datatype.dtype.itemsize
            if len(data) != expected:
                raise _invalid(f"input {tensor.name!r}: raw_input_contents[{index}] holds "
                               f"{len(data)} bytes, expected {expected} for {tensor.datatype} "
                               f"{list(shape)}")
            if tensor.datatype == "BOOL":
                # numpy would read any nonzero byte as True; the protocol's BOOL bytes are 0 or 1
                codes = np.frombuffer(data, np.uint8)
                if np.any(codes > 1):
                    raise _invalid(f"input {tensor.name!r}: BOOL bytes must be 0 or 1")
            return np.frombuffer(data, datatype.dtype).reshape(shape)
        values = getattr(tensor.contents, datatype.contents_field)
        for field, _ in tensor.contents.ListFields():
            if field.name != datatype.contents_field:
                raise _invalid(f"input {tensor.name!r}: {tensor.datatype} data goes in "
                               f"contents.{datatype.contents_field}, not contents.{field.name}")
        if len(values) != count:
            raise _invalid(f"input {tensor.name!r}: contents.{datatype.contents_field} holds "
                           f"{len(values)} values, expected {count} for {list(shape)}")
        if tensor.datatype == "UINT8":
            # uint_contents carries uint32 values: a UINT8 tensor's must fit in a byte
            wide = np.fromiter(values, np.uint32, count)
            if np.any(wide > 255):
                raise _invalid(f"input {tensor.name!r}: UINT8 values must be 0 to 255")
            return wide.astype(np.uint8).reshape(shape)
        return np.fromiter(values, datatype.dtype, count).reshape(shape)

    def _response(self, request: pb.ModelInferRequest, probabilities: np.ndarray,
                  batch: _Batch) -> pb.ModelInferResponse:
        probabilities = np.ascontiguousarray(probabilities, dtype="<f4")
        output = pb.ModelInferResponse.InferOutputTensor(name=PROBABILITIES, datatype="FP32",
                                                         shape=list(probabilities.shape))
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=MODEL_VERSION, id=request.id)
        if batch.raw:
            response.raw_output_contents.append(probabilities.tobytes())
        else:
            output.contents.fp32_contents.extend(probabilities.ravel().tolist())
        response.outputs.append(output)
        if batch.class_ids:
            response.parameters[CLASS_IDS_PARAMETER].string_param = self._class_ids[request.model_name]
        return response


__all__ = ["CLASS_IDS_PARAMETER", "DEFAULT_MAX_BATCH", "DEFAULT_MODEL_NAMES", "EXTENSIONS",
           "MODEL_VERSION", "PLATFORMS", "SERVICE", "Admission", "KServeError", "KServeLimits",
           "KServeServicer"]
