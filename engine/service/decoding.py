"""Requests that do not decode answer INVALID_ARGUMENT naming the RPC: no traceback, counted.

gRPC parses each request message before the handler sees it. A message that is not valid
protobuf of its type (garbage bytes, a string field that is not UTF-8) would otherwise end
the call INTERNAL (a unary call, before any interceptor's handler runs, so the metrics
never count it) or UNKNOWN (a stream, when the handler's iterator raises), with an ERROR
traceback in the log, and a client would take the server's fault for a retryable one.

:class:`DecodeInterceptor` wraps every method's request deserializer so that it never
raises; an undecodable message then ends the call with INVALID_ARGUMENT and a message such
as ``Ingest: request 3 is not a valid modloc.v1.IngestRequest message (Error parsing
message ...; 1204 bytes)``. A streaming handler sees it as :class:`UndecodableRequest`
raised from its request iterator, which it may map itself (the Localization handlers do).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from modloc.engine.service.metrics import handler_parts

log = logging.getLogger("modloc.server")


class UndecodableRequest(Exception):
    """A request message that is not valid protobuf of its type; the message says which."""


class _Undecodable:
    """What the guarded deserializer returns in place of a message it cannot parse."""

    def __init__(self, type_name: str, error: DecodeError, size: int):
        self.type_name = type_name
        self.error = error
        self.size = size

    def refusal(self, rpc: str, index: int | None) -> UndecodableRequest:
        which = "the request" if index is None else f"request {index}"
        return UndecodableRequest(f"{rpc}: {which} is not a valid {self.type_name} message "
                                  f"({self.error}; {self.size} bytes)")


def _rpc_name(method: str) -> str:
    """``/package.Service/Method`` → ``Method``."""
    return method.rsplit("/", 1)[-1]


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable requests with INVALID_ARGUMENT (module docstring)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guarded(handler_call_details.method, handler)


def _guarded(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    rpc = _rpc_name(method)
    parse = handler.request_deserializer
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "request"

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            log.info("event=undecodable_request rpc=%s bytes=%d", rpc, len(data))
            return _Undecodable(type_name, error, len(data))

    behavior, factory = handler_parts(handler)

    async def checked(request, context):
        """The request as the handler takes it: a unary one refused here, a stream's
        messages checked as the handler reads them."""
        if not handler.request_streaming:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.refusal(rpc, None)))
            return request
        return _checked_stream(request, rpc)

    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request, context):
            try:
                async for response in behavior(await checked(request, context), context):
                    yield response
            except UndecodableRequest as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    else:  # a coroutine: unary responses, or streaming ones written with context.write
        async def wrapped(request, context):
            try:
                return await behavior(await checked(request, context), context)
            except UndecodableRequest as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    return factory(wrapped, request_deserializer=deserialize,
                   response_serializer=handler.response_serializer)


async def _checked_stream(iterator, rpc: str) -> AsyncIterator:
    index = 0
    async for request in iterator:
        if isinstance(request, _Undecodable):
            raise request.refusal(rpc, index)
        yield request
        index += 1


__all__ = ["DecodeInterceptor", "UndecodableRequest"]
