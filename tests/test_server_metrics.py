"""The server's Prometheus metrics (modloc.engine.service.metrics) through a real grpc.aio server.

(tests/test_metrics.py is the evaluation metrics' file: MAP@K, GAP.)
"""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modloc.engine.service.metrics import STAGES, UNKNOWN_METHOD, ServerMetrics
from modloc.engine.service.security import BearerTokenInterceptor

SERVICE = "modloc.test.Probe"
TOKEN = "metrics-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def _echo(request: bytes, context) -> bytes:
    return request


async def _fail(request: bytes, context) -> bytes:
    raise RuntimeError("handler bug")


async def _set_code(request: bytes, context) -> bytes:
    context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    context.set_details("busy")
    return b""


async def _count(request: bytes, context):
    for index in range(int(request)):
        yield str(index).encode()


async def _abort_mid_stream(request: bytes, context):
    yield b"first"
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stopped")


async def _written(request: bytes, context) -> None:
    # the coroutine form of a server-streaming handler
    await context.write(b"one")
    await context.write(b"two")


async def _sum(requests, context) -> bytes:
    return str(sum([int(r) async for r in requests])).encode()


async def _chat(requests, context):
    async for request in requests:
        yield request.upper()


def _probe_service(started: asyncio.Event) -> grpc.GenericRpcHandler:
    async def hang(requests, context):
        # busy after the first message, not waiting on the request stream: grpc.aio can hand a
        # cancellation to a handler waiting in read() as the stream's end instead (see
        # MetricsInterceptor), which a handler cannot tell from the client's half-close
        async for request in requests:
            started.set()
            await asyncio.Event().wait()
            yield request

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "SetCode": grpc.unary_unary_rpc_method_handler(_set_code),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "AbortMidStream": grpc.unary_stream_rpc_method_handler(_abort_mid_stream),
        "Written": grpc.unary_stream_rpc_method_handler(_written),
        "Sum": grpc.stream_unary_rpc_method_handler(_sum),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Hang": grpc.stream_stream_rpc_method_handler(hang),
    })


async def _wait_for(predicate, timeout: float = 20.0, state=None) -> None:
    # a call's final code is recorded on the server after the client has seen it (and a
    # cancellation crosses the loopback first): generous under a loaded machine
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the metrics did not reach the expected state"
                                 + (f": {state()}" if state is not None else ""))
        await asyncio.sleep(0.01)


def test_interceptor_counts_codes_for_every_cardinality():
    metrics = ServerMetrics()

    def count(method: str, code: str, name: str = "modloc_requests_total") -> float:
        return metrics.registry.get_sample_value(name, {"method": method, "code": code}) or 0.0

    async def scenario():
        started = asyncio.Event()
        server = grpc.aio.server(interceptors=[metrics.interceptor(),
                                               BearerTokenInterceptor([TOKEN])])
        server.add_generic_rpc_handlers((_probe_service(started),))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await channel.unary_unary(_method("Echo"))(b"x", metadata=AUTH) == b"x"
                assert await channel.unary_unary(_method("Echo"))(b"y", metadata=AUTH) == b"y"
                for name, code in (("Fail", grpc.StatusCode.UNKNOWN),
                                   ("SetCode", grpc.StatusCode.RESOURCE_EXHAUSTED),
                                   ("Nope", grpc.StatusCode.UNIMPLEMENTED)):
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await channel.unary_unary(_method(name))(b"", metadata=AUTH)
                    assert error.value.code() == code
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await channel.unary_unary(_method("Echo"))(b"no token")
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # health is exempt from the token; an unknown service is aborted NOT_FOUND
                health_stub = health_pb2_grpc.HealthStub(channel)
                await health_stub.Check(health_pb2.HealthCheckRequest())
                with pytest.raises(grpc.aio.AioRpcError):
                    await health_stub.Check(health_pb2.HealthCheckRequest(service="nope"))

                count_call = channel.unary_stream(_method("Count"))
                assert [m async for m in count_call(b"3", metadata=AUTH)] == [b"0", b"1", b"2"]
                written = channel.unary_stream(_method("Written"))
                assert [m async for m in written(b"", metadata=AUTH)] == [b"one", b"two"]
                aborted = channel.unary_stream(_method("AbortMidStream"))(b"", metadata=AUTH)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    _ = [m async for m in aborted]
                assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                summed = await channel.stream_unary(_method("Sum"))(iter([b"1", b"2"]), metadata=AUTH)
                assert summed == b"3"
                chat = channel.stream_stream(_method("Chat"))(iter([b"a", b"b"]), metadata=AUTH)
                assert [m async for m in chat] == [b"A", b"B"]

                # a stream in progress shows in active_streams; cancelling it counts CANCELLED
                await _wait_for(lambda: metrics.active_streams._value.get() == 0)
                hanging = channel.stream_stream(_method("Hang"))(metadata=AUTH)
                await hanging.write(b"ping")
                await started.wait()
                assert metrics.active_streams._value.get() == 1
                hanging.cancel()
                await _wait_for(lambda: count(_method("Hang"), "CANCELLED") == 1,
                                state=lambda: [line for line in metrics.exposition().decode().splitlines()
                                               if "Hang" in line and "requests_total" in line])
                await _wait_for(lambda: metrics.active_streams._value.get() == 0)
                await _wait_for(lambda: count(_method("AbortMidStream"), "FAILED_PRECONDITION") == 1)
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    health_check = "/grpc.health.v1.Health/Check"
    expected = {
        (_method("Echo"), "OK"): 2, (_method("Echo"), "UNAUTHENTICATED"): 1,
        (_method("Fail"), "UNKNOWN"): 1, (_method("SetCode"), "RESOURCE_EXHAUSTED"): 1,
        (UNKNOWN_METHOD, "UNIMPLEMENTED"): 1, (health_check, "OK"): 1,
        (health_check, "NOT_FOUND"): 1, (_method("Count"), "OK"): 1,
        (_method("Written"), "OK"): 1, (_method("AbortMidStream"), "FAILED_PRECONDITION"): 1,
        (_method("Sum"), "OK"): 1, (_method("Chat"), "OK"): 1, (_method("Hang"), "CANCELLED"): 1,
    }
    for (method, code), value in expected.items():
        assert count(method, code) == value, (method, code)
        errors = 0 if code == "OK" else value
        assert count(method, code, "modloc_errors_total") == errors, (method, code)
    assert count(_method("Nope"), "UNIMPLEMENTED") == 0  # made-up names never become labels
    assert metrics.registry.get_sample_value(
        "modloc_request_seconds_count", {"method": _method("Echo")}) == 3
    assert metrics.active_streams._value.get() == 0


def test_stages_are_timed_and_checked():
    metrics = ServerMetrics()
    metrics.observe_stage("video_model", 0.25)
    with metrics.time_stage("fusion"):
        pass
    with pytest.raises(KeyError), metrics.time_stage("commit"):
        raise KeyError("a failing stage is still timed")
    sample = metrics.registry.get_sample_value
    assert sample("modloc_stage_seconds_count", {"stage": "video_model"}) == 1
    assert sample("modloc_stage_seconds_sum", {"stage": "video_model"}) == 0.25
    assert sample("modloc_stage_seconds_count", {"stage": "fusion"}) == 1
    assert sample("modloc_stage_seconds_count", {"stage": "commit"}) == 1
    assert sample("modloc_stage_seconds_count", {"stage": "pack"}) == 0  # present from the start
    for bad in (lambda: metrics.observe_stage("decode", 1.0),
                lambda: metrics.time_stage("decode").__enter__()):
        with pytest.raises(ValueError, match="unknown stage 'decode'; stages: video_model"):
            bad()


def test_registries_are_separate():
    first, second = ServerMetrics(), ServerMetrics()
    first.videos.labels(rpc="Localize").inc(3)
    assert first.registry.get_sample_value("modloc_videos_total", {"rpc": "Localize"}) == 3
    assert second.registry.get_sample_value("modloc_videos_total", {"rpc": "Localize"}) is None


def test_http_endpoint_serves_the_exposition():
    metrics = ServerMetrics()
    metrics.videos.labels(rpc="LocalizeStream").inc(5)
    metrics.segments.inc(40)
    metrics.batch_size.observe(17)
    metrics.queue_depth.set(4)
    metrics.in_flight_videos.set(2)
    server = metrics.start_http_server(0)
    try:
        assert server.port > 0 and server.address == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
    finally:
        server.close()
    assert 'modloc_videos_total{rpc="LocalizeStream"} 5.0' in text
    assert "modloc_segments_total 40.0" in text
    assert 'modloc_batch_size_bucket{le="32.0"} 1.0' in text
    assert 'modloc_batch_size_bucket{le="16.0"} 0.0' in text
    assert "modloc_queue_depth 4.0" in text
    assert "modloc_in_flight_videos 2.0" in text
    for name in ("modloc_requests_total", "modloc_errors_total", "modloc_active_streams",
                 "modloc_request_seconds", "process_cpu_seconds_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    for stage in STAGES:
        assert f'modloc_stage_seconds_count{{stage="{stage}"}} 0.0' in text
    # the same text without HTTP (process metrics move between the two reads)
    assert 'modloc_videos_total{rpc="LocalizeStream"} 5.0' in metrics.exposition().decode()
