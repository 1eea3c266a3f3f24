"""Prometheus metrics of the server: what it was asked, what it did, where the time went.

::

    metrics = ServerMetrics()
    server = grpc.aio.server(interceptors=[metrics.interceptor(), auth])  # metrics first
    http = metrics.start_http_server(9464, "127.0.0.1")                    # GET /metrics
    with metrics.time_stage("video_model"):
        ...
    metrics.batch_size.observe(len(videos))

Metric names (all prefixed ``modloc_``):

=================================  =========  =============================================
``requests_total{method,code}``    counter    finished gRPC calls by full method name and
                                              final status code (UNAUTHENTICATED refusals
                                              included when the interceptor runs first)
``errors_total{method,code}``      counter    the calls above whose code is not OK
``videos_total{rpc}``              counter    videos received, by the RPC that carried them
``segments_total``                 counter    5-frame windows the segment model scored
``queue_depth``                    gauge      videos waiting for the pipeline
``active_streams``                 gauge      streaming calls in progress (kept by the
                                              interceptor)
``in_flight_videos``               gauge      videos accepted and not yet answered
``kserve_in_flight_requests``      gauge      KServe inference requests admitted now
``kserve_in_flight_bytes``         gauge      request bytes those hold (refusals past the
                                              limits: ``requests_total`` with
                                              code RESOURCE_EXHAUSTED)
``batch_size``                     histogram  videos per pipeline call
``stage_seconds{stage}``           histogram  seconds per pipeline stage (:data:`STAGES`)
``request_seconds{method}``        histogram  seconds per gRPC call, start to final status
=================================  =========  =============================================

Each :class:`ServerMetrics` has its own registry by default (with the process and garbage
collector metrics), so that several servers or tests in one process do not collide in
prometheus_client's global one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

PREFIX = "modloc"
STAGES = ("video_model", "candidates", "pack", "segment_model", "fusion", "queue", "commit")
# the label of calls to methods no service registered (gRPC answers them UNIMPLEMENTED):
# one label for all of them, so that a caller cannot grow the label set with made-up names
UNKNOWN_METHOD = "<unimplemented>"

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)
REQUEST_BUCKETS = STAGE_BUCKETS + (30.0, 60.0, 300.0)


@dataclass
class MetricsHTTPServer:
    """The running ``/metrics`` endpoint: its bound address and port, and how to stop it."""

    address: str
    port: int
    _server: WSGIServer

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ServerMetrics:
    """The server's metrics (see the module docstring for names and meanings).

    Args:
        registry: where the metrics are registered (default: a new registry that also holds
            the process, platform and GC collectors).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is None:
            registry = CollectorRegistry()
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry

        def name(base: str) -> str:
            return f"{PREFIX}_{base}"

        self.requests = Counter(name("requests_total"), "Finished gRPC calls by method and status code.",
                                ("method", "code"), registry=registry)
        self.errors = Counter(name("errors_total"), "Finished gRPC calls whose status code is not OK.",
                              ("method", "code"), registry=registry)
        self.videos = Counter(name("videos_total"), "Videos received, by RPC.", ("rpc",),
                              registry=registry)
        self.segments = Counter(name("segments_total"), "5-frame windows the segment model scored.",
                                registry=registry)
        self.queue_depth = Gauge(name("queue_depth"), "Videos waiting for the pipeline.",
                                 registry=registry)
        self.active_streams = Gauge(name("active_streams"), "Streaming gRPC calls in progress.",
                                    registry=registry)
        self.in_flight_videos = Gauge(name("in_flight_videos"),
                                      "Videos accepted and not yet answered.", registry=registry)
        self.kserve_in_flight_requests = Gauge(name("kserve_in_flight_requests"),
                                               "KServe inference requests admitted now.",
                                               registry=registry)
        self.kserve_in_flight_bytes = Gauge(name("kserve_in_flight_bytes"),
                                            "Request bytes the admitted KServe requests hold.",
                                            registry=registry)
        self.batch_size = Histogram(name("batch_size"), "Videos per pipeline call.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.stage_seconds = Histogram(name("stage_seconds"), "Seconds per pipeline stage.",
                                       ("stage",), buckets=STAGE_BUCKETS, registry=registry)
        self.request_seconds = Histogram(name("request_seconds"),
                                         "Seconds per gRPC call, start to final status.",
                                         ("method",), buckets=REQUEST_BUCKETS, registry=registry)
        # every stage shows from the first scrape, at zero, so dashboards need no special case
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record ``seconds`` spent in ``stage`` (one of :data:`STAGES`)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        self.stage_seconds.labels(stage=stage).observe(seconds)

    @contextlib.contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block as ``stage`` (recorded even when it raises)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage=stage).observe(time.perf_counter() - start)

    def record_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished call (what :class:`MetricsInterceptor` does for every call)."""
        self.requests.labels(method=method, code=code.name).inc()
        if code is not grpc.StatusCode.OK:
            self.errors.labels(method=method, code=code.name).inc()
        self.request_seconds.labels(method=method).observe(seconds)

    def interceptor(self) -> MetricsInterceptor:
        """A server interceptor that records every call into these metrics."""
        return MetricsInterceptor(self)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format, as ``/metrics`` serves them."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(self, port: int, address: str = "127.0.0.1") -> MetricsHTTPServer:
        """Serve ``/metrics`` over HTTP from a daemon thread.

        Args:
            port: the TCP port; 0 picks a free one (see the result's ``port``).
            address: where to listen; loopback by default, as the metrics describe the
                traffic (open it to the scraper's network deliberately).
        """
        server, _ = prometheus_client.start_http_server(port, addr=address, registry=self.registry)
        return MetricsHTTPServer(address, server.server_port, server)


def handler_parts(handler: grpc.RpcMethodHandler) -> tuple[Callable, Callable]:
    """A method handler's behavior, and the ``grpc.*_rpc_method_handler`` factory that makes
    one of the same cardinality (what an interceptor needs to wrap the behavior)."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call of a ``grpc.aio`` server by method and final status code.

    The final code is what the client sees: OK, the code of ``context.abort`` or
    ``context.set_code``, CANCELLED when the call is cancelled, UNKNOWN for an exception
    the handler let through. One limit of ``grpc.aio``: a client's cancellation that finds
    the handler waiting on the request stream may reach it as the stream's end rather than
    as ``CancelledError``; a handler that then finishes normally is counted with the code it
    finished with, as the server cannot tell that end from the client's half-close.

    Works for the four cardinalities with coroutine or async-generator handlers; keeps
    :attr:`ServerMetrics.active_streams` for streaming calls.
    Put it first in the server's interceptors so that it also sees the calls later
    interceptors refuse.
    """

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            # gRPC answers UNIMPLEMENTED and no handler runs: count it here
            self.metrics.record_call(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED, 0.0)
            return None
        return self._wrap(handler_call_details.method, handler)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = handler.request_streaming or handler.response_streaming
        behavior, factory = handler_parts(handler)

        if inspect.isasyncgenfunction(behavior):
            async def wrapped(request, context):
                with self._call(method, context, streaming):
                    async for response in behavior(request, context):
                        yield response
        else:
            # a coroutine: unary responses, or streaming ones written with context.write
            async def wrapped(request, context):
                with self._call(method, context, streaming):
                    return await behavior(request, context)

        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    @contextlib.contextmanager
    def _call(self, method: str, context, streaming: bool) -> Iterator[None]:
        start = time.perf_counter()
        if streaming:
            self.metrics.active_streams.inc()
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away (or the server is stopping): the call ends CANCELLED
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if streaming:
                self.metrics.active_streams.dec()
            self.metrics.record_call(method, code, time.perf_counter() - start)


__all__ = ["STAGES", "UNKNOWN_METHOD", "MetricsHTTPServer", "MetricsInterceptor", "ServerMetrics",
           "handler_parts"]
