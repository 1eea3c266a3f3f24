"""The KServe v2 / Open Inference Protocol service (modloc.engine.service.kserve) over real backends.

The tiny exported artifacts run in ONNX Runtime behind a grpc.aio server on a loopback port
(its own event loop in a thread, so that the tests call it with plain blocking stubs).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from modloc._version import __version__
from modloc.engine._proto.inference import grpc_predict_v2_pb2 as pb
from modloc.engine._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from modloc.engine.base.features import FEATURE_SIZE
from modloc.engine.service.kserve import (
    DEFAULT_MODEL_NAMES,
    EXTENSIONS,
    KServeServicer,
)

VIDEO = DEFAULT_MODEL_NAMES["video"]
SEGMENT = DEFAULT_MODEL_NAMES["segment"]
MAX_BATCH = 4
MAX_FRAMES = 16
FRAMES = 12


class ServerThread:
    """A grpc.aio server with ``servicer``, on its own event loop in a daemon thread."""

    def __init__(self, servicer: KServeServicer):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._call(self._start(servicer))

    async def _start(self, servicer):
        server = grpc.aio.server()
        servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self._call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class Flag:
    """A settable readiness flag for the servicer's ``ready`` callable."""

    def __init__(self):
        self.value = True

    def __call__(self) -> bool:
        return self.value


@pytest.fixture(scope="module")
def backends(tiny_artifacts):
    from modloc.engine.runtime.backends import open_backend

    opened = {VIDEO: open_backend(tiny_artifacts / "video" / "distill-fp32", threads=1),
              SEGMENT: open_backend(tiny_artifacts / "segment" / "ensemble-fp32", threads=1)}
    yield opened
    for backend in opened.values():
        backend.close()


@pytest.fixture(scope="module")
def served(backends):
    """(stub, ready flag): the service over both tiny models, max batch 4, max frames 16."""
    ready = Flag()
    server = ServerThread(KServeServicer(backends, ready, max_batch=MAX_BATCH, max_frames=MAX_FRAMES))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel), ready
    channel.close()
    server.close()


@pytest.fixture
def stub(served):
    stub, ready = served
    ready.value = True
    return stub


def batch(rows: int = 3, frames: int = FRAMES, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 256, (rows, frames, FEATURE_SIZE), dtype=np.uint8)
    num_frames = np.array([frames, 5, 1, 7][:rows] + [frames] * max(0, rows - 4), np.int32)
    return features, num_frames


def tensor(name: str, datatype: str, shape) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


def raw_request(features, padding, model: str = VIDEO, padding_name: str = "num_frames",
                padding_type: str = "INT32", **fields) -> pb.ModelInferRequest:
    """A request as tritonclient builds it: every input's bytes in raw_input_contents."""
    return pb.ModelInferRequest(
        model_name=model, id="req-1", **fields,
        inputs=[tensor("features", "UINT8", features.shape),
                tensor(padding_name, padding_type, padding.shape)],
        raw_input_contents=[features.tobytes(), padding.tobytes()])


def typed_request(features, num_frames, model: str = VIDEO) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version="1", id="typed")
    request.inputs.append(tensor("features", "UINT8", features.shape))
    request.inputs[0].contents.uint_contents.extend(features.ravel().tolist())
    request.inputs.append(tensor("num_frames", "INT32", num_frames.shape))
    request.inputs[1].contents.int_contents.extend(num_frames.tolist())
    return request


def raw_probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("probabilities", "FP32")
    assert not output.HasField("contents")
    (data,) = response.raw_output_contents
    return np.frombuffer(data, "<f4").reshape(tuple(output.shape))


# ------------------------------------------------------------------- health, metadata


def test_server_health_and_metadata(served):
    stub, ready = served
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    ready.value = True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=VIDEO)).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=SEGMENT, version="1")).ready
    ready.value = False
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name=VIDEO)).ready
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # live while not ready
    ready.value = True
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (metadata.name, metadata.version) == ("modloc", __version__)
    assert list(metadata.extensions) == list(EXTENSIONS)


def test_model_metadata(stub, backends):
    for name, backend in backends.items():
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        assert (metadata.name, list(metadata.versions), metadata.platform) == (
            name, ["1"], "onnxruntime_onnx")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("features", "UINT8", [-1, -1, FEATURE_SIZE]), ("num_frames", "INT32", [-1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("probabilities", "FP32", [-1, len(backend.class_ids)])]


@pytest.mark.parametrize("call", ["ModelReady", "ModelMetadata"])
def test_unknown_model_or_version_is_not_found(stub, call):
    request_type = getattr(pb, f"{call}Request")
    for request, fragment in ((request_type(name="nope"), "unknown model 'nope'; this server has "
                                                          f"{SEGMENT}, {VIDEO}"),
                              (request_type(name=VIDEO, version="2"), "has no version '2'")):
        with pytest.raises(grpc.RpcError) as error:
            getattr(stub, call)(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert fragment in error.value.details()


# ------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model", [VIDEO, SEGMENT])
def test_raw_infer_equals_the_backend(stub, backends, model):
    features, num_frames = batch()
    response = stub.ModelInfer(raw_request(features, num_frames, model))
    assert (response.model_name, response.model_version, response.id) == (model, "1", "req-1")
    expected = backends[model].run(features, num_frames=num_frames)
    np.testing.assert_array_equal(raw_probabilities(response), expected)
    assert not response.parameters


def test_typed_infer_equals_the_backend_and_answers_typed(stub, backends):
    features, num_frames = batch(seed=1)
    response = stub.ModelInfer(typed_request(features, num_frames))
    assert not response.raw_output_contents
    (output,) = response.outputs
    assert list(output.shape) == [3, len(backends[VIDEO].class_ids)]
    typed = np.array(output.contents.fp32_contents, np.float32).reshape(tuple(output.shape))
    np.testing.assert_array_equal(typed, backends[VIDEO].run(features, num_frames=num_frames))
    assert response.id == "typed"


@pytest.mark.parametrize("datatype, dtype", [("FP32", "<f4"), ("BOOL", "?")])
def test_mask_instead_of_num_frames(stub, backends, datatype, dtype):
    features, num_frames = batch(seed=2)
    mask = np.arange(FRAMES)[None, :] < num_frames[:, None]
    response = stub.ModelInfer(raw_request(features, mask.astype(dtype), padding_name="mask",
                                           padding_type=datatype))
    expected = backends[VIDEO].run(features, num_frames=num_frames)
    np.testing.assert_array_equal(raw_probabilities(response), expected)


def test_typed_mask_and_int64_num_frames(stub, backends):
    features, num_frames = batch(seed=3)
    expected = backends[VIDEO].run(features, num_frames=num_frames)
    wide = stub.ModelInfer(raw_request(features, num_frames.astype("<i8"), padding_type="INT64"))
    np.testing.assert_array_equal(raw_probabilities(wide), expected)
    request = typed_request(features, num_frames)
    del request.inputs[1]
    mask = request.inputs.add(name="mask", datatype="BOOL", shape=[3, FRAMES])
    mask.contents.bool_contents.extend((np.arange(FRAMES)[None, :] < num_frames[:, None]).ravel().tolist())
    typed = stub.ModelInfer(request).outputs[0]
    np.testing.assert_array_equal(
        np.array(typed.contents.fp32_contents, np.float32).reshape(expected.shape), expected)


def test_limits_are_inclusive(stub, backends):
    features, _ = batch(rows=MAX_BATCH, frames=MAX_FRAMES, seed=4)
    for num_frames in (np.full(MAX_BATCH, MAX_FRAMES, np.int32), np.ones(MAX_BATCH, np.int32)):
        response = stub.ModelInfer(raw_request(features, num_frames))
        np.testing.assert_array_equal(raw_probabilities(response),
                                      backends[VIDEO].run(features, num_frames=num_frames))
    single, _ = batch(rows=1, frames=1, seed=5)
    response = stub.ModelInfer(raw_request(single, np.ones(1, np.int32), SEGMENT))
    assert raw_probabilities(response).shape == (1, len(backends[SEGMENT].class_ids))


def test_requested_output_and_class_ids_parameter(stub, backends):
    features, num_frames = batch(rows=2, seed=6)
    request = raw_request(features, num_frames, SEGMENT, outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")])
    request.parameters["class_ids"].bool_param = True
    response = stub.ModelInfer(request)
    class_ids = [int(c) for c in response.parameters["class_ids"].string_param.split(",")]
    assert class_ids == list(backends[SEGMENT].class_ids)
    assert raw_probabilities(response).shape == (2, len(class_ids))
    request.parameters["class_ids"].bool_param = False
    assert "class_ids" not in stub.ModelInfer(request).parameters


def test_infer_is_unavailable_while_not_ready(served):
    stub, ready = served
    features, num_frames = batch(rows=1)
    ready.value = False
    try:
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(raw_request(features, num_frames[:1]))
    finally:
        ready.value = True
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not ready" in error.value.details()


def test_stream_answers_in_order_and_survives_bad_requests(stub, backends):
    requests, expected = [], []
    for index in range(4):
        features, num_frames = batch(rows=2, seed=10 + index)
        request = raw_request(features, num_frames[:2], VIDEO if index % 2 else SEGMENT)
        request.id = f"stream-{index}"
        if index == 1:
            request.inputs[0].datatype = "INT8"
            expected.append(None)
        else:
            expected.append(backends[request.model_name].run(features, num_frames=num_frames[:2]))
        requests.append(request)
    responses = list(stub.ModelStreamInfer(iter(requests)))
    assert [r.infer_response.id for r in responses] == [f"stream-{i}" for i in range(4)]
    for response, want in zip(responses, expected, strict=True):
        if want is None:
            assert "input 'features' has datatype 'INT8', expected UINT8" in response.error_message
            assert not response.infer_response.outputs
        else:
            assert response.error_message == ""
            np.testing.assert_array_equal(raw_probabilities(response.infer_response), want)


# ---------------------------------------------------------------------- bad requests


def _shape(index, shape):
    def mutate(request):
        request.inputs[index].ClearField("shape")
        request.inputs[index].shape.extend(shape)
    return mutate


def _set_raw(index, data):
    def mutate(request):
        request.raw_input_contents[index] = data
    return mutate


def _num_frames(values):
    def mutate(request):
        request.raw_input_contents[1] = np.array(values, "<i4").tobytes()
    return mutate


def _with_mask(mask, datatype="FP32", dtype="<f4"):
    def mutate(request):
        del request.inputs[1]
        request.inputs.add(name="mask", datatype=datatype, shape=list(np.shape(mask)))
        request.raw_input_contents[1] = np.asarray(mask, dtype).tobytes()
    return mutate


def _typed(mutate_typed):
    def mutate(request):
        features = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(3, FRAMES, FEATURE_SIZE)
        num_frames = np.frombuffer(request.raw_input_contents[1], "<i4")
        request.CopyFrom(typed_request(features, num_frames))
        mutate_typed(request)
    return mutate


def _oversized(rows, frames):
    # the shape claims more than the limit; the bytes match, so only the limit can refuse it
    def mutate(request):
        del request.inputs[:]
        del request.raw_input_contents[:]
        request.inputs.extend([tensor("features", "UINT8", [rows, frames, FEATURE_SIZE]),
                               tensor("num_frames", "INT32", [rows])])
        request.raw_input_contents.extend([bytes(rows * frames * FEATURE_SIZE),
                                           np.full(rows, 1, "<i4").tobytes()])
    return mutate


def _attr(path: str, value):
    def mutate(request):
        target = request
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, last, value)
    return mutate


def _call(method: str, *args):
    def mutate(request):
        getattr(request, method)(*args)
    return mutate


def _compose(*mutations):
    def mutate(request):
        for mutation in mutations:
            mutation(request)
    return mutate


_NOT_FOUND = grpc.StatusCode.NOT_FOUND
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_OUTPUT = pb.ModelInferRequest.InferRequestedOutputTensor

BAD_REQUESTS: list[tuple[str, Callable, grpc.StatusCode, str]] = [
    ("unknown model", _attr("model_name", "nope"), _NOT_FOUND, "unknown model 'nope'"),
    ("unknown version", _attr("model_version", "2"), _NOT_FOUND, "has no version '2'; versions: 1"),
    ("features dtype", _attr("inputs.0.datatype", "FP32"), _INVALID,
     "input 'features' has datatype 'FP32', expected UINT8"),
    ("num_frames dtype", _attr("inputs.1.datatype", "FP32"), _INVALID,
     "input 'num_frames' has datatype 'FP32', expected INT32 or INT64"),
    ("features rank", _shape(0, [3, FRAMES * FEATURE_SIZE]), _INVALID,
     f"input 'features' has shape [3, {FRAMES * FEATURE_SIZE}], expected [batch, frames, 1152]"),
    ("feature width", _shape(0, [3, FRAMES * 9, 128]), _INVALID,
     "expected [batch, frames, 1152]"),
    ("features bytes", _set_raw(0, bytes(3 * FRAMES * FEATURE_SIZE - 1)), _INVALID,
     f"input 'features': raw_input_contents[0] holds {3 * FRAMES * FEATURE_SIZE - 1} bytes, "
     f"expected {3 * FRAMES * FEATURE_SIZE}"),
    ("num_frames bytes", _set_raw(1, bytes(3 * 4 + 1)), _INVALID,
     "input 'num_frames': raw_input_contents[1] holds 13 bytes, expected 12 for INT32 [3]"),
    ("num_frames shape", _shape(1, [2]), _INVALID,
     f"input 'num_frames' has shape [2], expected [3] to match 'features' [3, {FRAMES}, 1152]"),
    ("unknown input", _compose(_call("MergeFrom", pb.ModelInferRequest(
        inputs=[tensor("rgb", "UINT8", [1])], raw_input_contents=[b"\0"]))), _INVALID,
     "unknown input 'rgb'"),
    ("duplicate input", _compose(_call("MergeFrom", pb.ModelInferRequest(
        inputs=[tensor("num_frames", "INT32", [3])], raw_input_contents=[bytes(12)]))), _INVALID,
     "input 'num_frames' is given more than once"),
    ("missing features", _compose(_call("ClearField", "inputs"), _call("ClearField", "raw_input_contents"),
                                  _call("MergeFrom", pb.ModelInferRequest(
                                      inputs=[tensor("num_frames", "INT32", [3])],
                                      raw_input_contents=[bytes(12)]))), _INVALID,
     "missing input 'features'"),
    ("missing num_frames", _compose(lambda r: r.inputs.pop(), lambda r: r.raw_input_contents.pop()),
     _INVALID, "missing input 'num_frames' (or 'mask')"),
    ("num_frames and mask", _call("MergeFrom", pb.ModelInferRequest(
        inputs=[tensor("mask", "FP32", [3, FRAMES])], raw_input_contents=[bytes(3 * FRAMES * 4)])),
     _INVALID, "not both"),
    ("num_frames zero", _num_frames([FRAMES, 0, 1]), _INVALID,
     f"input 'num_frames': row 1 has 0 frames, expected 1 to {FRAMES}"),
    ("num_frames negative", _num_frames([-3, 1, 1]), _INVALID, "row 0 has -3 frames"),
    ("num_frames past frames", _num_frames([1, 1, FRAMES + 1]), _INVALID,
     f"row 2 has {FRAMES + 1} frames, expected 1 to {FRAMES}"),
    ("batch over max", _oversized(MAX_BATCH + 1, 2), _INVALID,
     f"holds a batch of {MAX_BATCH + 1}, expected 1 to {MAX_BATCH} (the server's max_batch)"),
    ("empty batch", _oversized(0, 2), _INVALID, "holds a batch of 0, expected 1"),
    ("frames over max", _oversized(1, MAX_FRAMES + 1), _INVALID,
     f"holds {MAX_FRAMES + 1} frames per video, expected 1 to {MAX_FRAMES} (the server's max_frames)"),
    ("no frames", _oversized(1, 0), _INVALID, "holds 0 frames per video"),
    ("raw count", lambda r: r.raw_input_contents.pop(), _INVALID,
     "raw_input_contents holds 1 entries for 2 inputs"),
    ("raw and typed", lambda r: r.inputs[1].contents.int_contents.extend([1, 1, 1]), _INVALID,
     "input 'num_frames' has contents while the request uses raw_input_contents"),
    ("no data", _typed(lambda r: r.inputs[1].ClearField("contents")), _INVALID,
     "input 'num_frames' has no data"),
    ("typed count", _typed(lambda r: r.inputs[0].contents.uint_contents.append(0)), _INVALID,
     f"input 'features': contents.uint_contents holds {3 * FRAMES * FEATURE_SIZE + 1} values"),
    ("typed field", _typed(lambda r: r.inputs[1].contents.int64_contents.extend([1, 1, 1])), _INVALID,
     "INT32 data goes in contents.int_contents, not contents.int64_contents"),
    ("typed uint8 range", _typed(lambda r: r.inputs[0].contents.uint_contents.__setitem__(5, 256)),
     _INVALID, "input 'features': UINT8 values must be 0 to 255"),
    ("mask values", _with_mask(np.full((3, FRAMES), 0.5)), _INVALID, "input 'mask' must hold only 0 and 1"),
    ("mask empty row", _with_mask(np.eye(3, FRAMES) * [[1], [0], [1]]), _INVALID,
     "input 'mask': row 1 has no valid frame"),
    ("mask shape", _with_mask(np.ones((3, FRAMES - 1))), _INVALID,
     f"input 'mask' has shape [3, {FRAMES - 1}], expected [3, {FRAMES}]"),
    ("mask bool bytes", _with_mask(np.full((3, FRAMES), 2), "BOOL", "u1"), _INVALID,
     "BOOL bytes must be 0 or 1"),
    ("unknown output", _call("MergeFrom", pb.ModelInferRequest(outputs=[_OUTPUT(name="logits")])),
     _INVALID, "unknown output 'logits'; outputs: probabilities"),
    ("duplicate output", _call("MergeFrom", pb.ModelInferRequest(
        outputs=[_OUTPUT(name="probabilities"), _OUTPUT(name="probabilities")])),
     _INVALID, "output 'probabilities' is requested more than once"),
    ("classification", _call("MergeFrom", pb.ModelInferRequest(outputs=[_OUTPUT(
        name="probabilities", parameters={"classification": pb.InferParameter(int64_param=3)})])),
     _INVALID, "output 'probabilities': tensor parameters are not supported (got classification"),
    ("shared memory", lambda r: r.inputs[0].parameters["shared_memory_region"].CopyFrom(
        pb.InferParameter(string_param="region")), _INVALID,
     "input 'features': tensor parameters are not supported (got shared_memory_region"),
    ("request parameter", lambda r: r.parameters["priority"].CopyFrom(pb.InferParameter(int64_param=1)),
     _INVALID, "request parameter 'priority' is not supported (supported: class_ids)"),
    ("class_ids type", lambda r: r.parameters["class_ids"].CopyFrom(pb.InferParameter(string_param="yes")),
     _INVALID, "request parameter 'class_ids' must be a bool_param"),
]


@pytest.mark.parametrize("name, mutate, code, fragment", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(stub, name, mutate, code, fragment):
    features, num_frames = batch()
    request = raw_request(features, num_frames)
    mutate(request)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == code, error.value.details()
    assert fragment in error.value.details()
    # the streaming endpoint refuses the same request with the same message, and goes on
    (response,) = stub.ModelStreamInfer(iter([request]))
    assert fragment in response.error_message


# --------------------------------------------------------- locking and backend failures


class Overlap:
    """The most ``with`` blocks that were ever open at once, across threads."""

    def __init__(self):
        self.active = 0
        self.most = 0
        self.guard = threading.Lock()

    def __enter__(self):
        with self.guard:
            self.active += 1
            self.most = max(self.most, self.active)

    def __exit__(self, *exc):
        with self.guard:
            self.active -= 1


class RecordingBackend:
    """Stands in for a backend to observe how the servicer calls it: ``run`` sleeps inside
    its own :class:`Overlap` and the one all backends of a test share; it fails when
    ``fail`` is set."""

    name = "onnxruntime"
    class_ids = (3, 5)

    def __init__(self, fail: bool = False, everyone: Overlap | None = None,
                 meet: threading.Barrier | None = None):
        self.fail = fail
        self.overlap = Overlap()
        self.everyone = everyone or Overlap()
        self.threads: set[int] = set()
        self.meet = meet  # the first call waits there for another backend's first call

    def run(self, features, mask=None, num_frames=None):
        if self.fail:
            raise RuntimeError("device lost")
        self.threads.add(threading.get_ident())
        with self.overlap, self.everyone:
            if self.meet is not None:
                meet, self.meet = self.meet, None
                meet.wait(30)  # BrokenBarrierError if the other backend cannot run meanwhile
            time.sleep(0.01)  # gives a call that wrongly overlaps this one the time to show
        return np.zeros((len(features), 2), np.float32)


def test_each_backend_is_called_by_one_thread_at_a_time():
    everyone, meet = Overlap(), threading.Barrier(2)
    shared = RecordingBackend(everyone=everyone, meet=meet)
    other = RecordingBackend(everyone=everyone, meet=meet)
    servicer = KServeServicer({"a": shared, "b": shared, "c": other}, lambda: True)
    features, num_frames = batch(rows=1)

    async def scenario():
        requests = [raw_request(features, num_frames[:1], model) for model in "abcabc"]
        await asyncio.gather(*(servicer.infer(request) for request in requests))

    asyncio.run(scenario())
    assert shared.overlap.most == 1  # "a" and "b" share the backend, so they share its lock
    assert other.overlap.most == 1
    # "c" ran beside them (their first calls met at the barrier): one lock per backend, not
    # one for all
    assert everyone.most == 2
    # and one thread per backend (per-thread state such as CUDA graphs is made once)
    assert len(shared.threads) == len(other.threads) == 1 and shared.threads != other.threads


def test_backend_failure_is_internal_and_the_stream_goes_on():
    server = ServerThread(KServeServicer({"broken": RecordingBackend(fail=True),
                                          "fine": RecordingBackend()}, lambda: True))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            features, num_frames = batch(rows=1)
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(raw_request(features, num_frames[:1], "broken"))
            assert error.value.code() == grpc.StatusCode.INTERNAL
            assert "model 'broken' failed: device lost" in error.value.details()
            responses = list(stub.ModelStreamInfer(iter([
                raw_request(features, num_frames[:1], "broken"),
                raw_request(features, num_frames[:1], "fine")])))
            assert "device lost" in responses[0].error_message
            assert responses[1].error_message == ""
            assert raw_probabilities(responses[1].infer_response).shape == (1, 2)
    finally:
        server.close()


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="at least one model"):
        KServeServicer({}, lambda: True)
    with pytest.raises(ValueError, match="model names must not be empty"):
        KServeServicer({"": RecordingBackend()}, lambda: True)
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        KServeServicer({"a": RecordingBackend()}, lambda: True, max_batch=0)
    with pytest.raises(ValueError, match="max_frames must be >= 1, got 0"):
        KServeServicer({"a": RecordingBackend()}, lambda: True, max_frames=0)
    servicer = KServeServicer({"a": RecordingBackend()}, lambda: True, max_batch=2, max_frames=3)
    assert servicer.max_request_bytes == 6 * FEATURE_SIZE + 6 * 4 + 65536


def test_a_given_lock_is_the_one_held_around_the_backend():
    backend = RecordingBackend()
    given = threading.Lock()
    holds = []

    def run(features, mask=None, num_frames=None):
        holds.append(given.locked())
        return np.zeros((len(features), 2), np.float32)

    backend.run = run
    servicer = KServeServicer({"a": backend, "b": backend}, lambda: True, locks={"a": given})
    features, num_frames = batch(rows=1)
    for model in "ab":
        asyncio.run(servicer.infer(raw_request(features, num_frames[:1], model)))
    assert holds == [True, False]  # "b" has the backend's own lock, not the one given for "a"
