"""Bearer tokens, TLS and mutual TLS (modloc.engine.service.security) on a real grpc.aio server.

The server is in-process on a loopback port, with an echo service of every cardinality
(bytes in, bytes out) and the gRPC health service; certificates are made with
``cryptography`` for each session: a CA, a server certificate for 127.0.0.1 and localhost,
and a client certificate.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modloc.engine.service.security import (
    MIN_TOKEN_LENGTH,
    BearerTokenInterceptor,
    SecurityConfigError,
    channel_credentials,
    check_exposure,
    load_tokens,
    parse_tokens,
    requires_auth,
    server_credentials,
    tokens_from_env,
)

TOKEN = "s3cret-token-0123456789"
OTHER_TOKEN = "another-token-abcdefghij"
SERVICE = "modloc.test.Echo"


# ------------------------------------------------------------------------- certificates


# ------------------------------------------------------------------------------ server


async def _unary(request: bytes, context) -> bytes:
    return b"unary:" + request


async def _unary_stream(request: bytes, context):
    for part in (b"a", b"b"):
        yield part + request


async def _stream_unary(requests, context) -> bytes:
    return b"".join([request async for request in requests])


async def _stream_stream(requests, context):
    async for request in requests:
        yield b"echo:" + request


def _echo_service() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream),
    })


@asynccontextmanager
async def _server(interceptors=(), credentials=None):
    """A started server with the echo and health services; yields its port."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((_echo_service(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def _call_all(target: str, metadata=None, credentials=None) -> dict[str, object]:
    """Each echo method once, from a blocking client (the kind tritonclient is): its result,
    or the RpcError it ended with.

    (grpc.aio's client can report a refused client-streaming call as INTERNAL when its
    request writer loses the race with the server's status; the blocking client reports
    the server's status.)
    """
    with (grpc.insecure_channel(target) if credentials is None
          else grpc.secure_channel(target, credentials)) as channel:
        calls = {
            "Unary": lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"x", metadata=metadata),
            "UnaryStream": lambda: list(
                channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"x", metadata=metadata)),
            "StreamUnary": lambda: channel.stream_unary(f"/{SERVICE}/StreamUnary")(
                iter([b"p", b"q"]), metadata=metadata),
            "StreamStream": lambda: list(channel.stream_stream(f"/{SERVICE}/StreamStream")(
                iter([b"p", b"q"]), metadata=metadata)),
        }
        results = {}
        for name, call in calls.items():
            try:
                results[name] = call()
            except grpc.RpcError as error:
                results[name] = error
        return results


EXPECTED = {"Unary": b"unary:x", "UnaryStream": [b"ax", b"bx"], "StreamUnary": b"pq",
            "StreamStream": [b"echo:p", b"echo:q"]}


def _auth_results(metadata):
    async def scenario():
        async with _server([BearerTokenInterceptor([TOKEN, OTHER_TOKEN])]) as port:
            return await asyncio.to_thread(_call_all, f"127.0.0.1:{port}", metadata)
    return asyncio.run(scenario())


# -------------------------------------------------------------------------- bearer tokens


@pytest.mark.parametrize("metadata", [(("authorization", f"Bearer {TOKEN}"),),
                                      (("authorization", f"bearer {OTHER_TOKEN}"),)])
def test_accepted_token_reaches_every_cardinality(metadata):
    assert _auth_results(metadata) == EXPECTED


@pytest.mark.parametrize("metadata, message", [
    (None, "missing bearer token"),
    ((("x-other", "1"),), "missing bearer token"),
    ((("authorization", "Bearer wrong-token-0123456789"),), "invalid bearer token"),
    ((("authorization", f"Bearer {TOKEN}x"),), "invalid bearer token"),
    ((("authorization", f"Bearer {TOKEN[:-1]}"),), "invalid bearer token"),
    ((("authorization", f"Basic {TOKEN}"),), "invalid bearer token"),
    ((("authorization", TOKEN),), "invalid bearer token"),
    ((("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer nope")), "invalid bearer token"),
])
def test_refused_token_is_unauthenticated_for_every_cardinality(metadata, message):
    results = _auth_results(metadata)
    assert set(results) == set(EXPECTED)
    for name, result in results.items():
        assert isinstance(result, grpc.RpcError), name
        assert result.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert result.details() == message, name


def test_health_is_exempt_and_unknown_methods_stay_unimplemented():
    async def scenario():
        async with _server([BearerTokenInterceptor([TOKEN])]) as port:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                status = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest())
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await channel.unary_unary(f"/{SERVICE}/Nope")(b"x")
                return status, unknown.value
    status, unknown = asyncio.run(scenario())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert unknown.code() == grpc.StatusCode.UNIMPLEMENTED


def test_exemptions_are_configurable():
    async def scenario():
        interceptor = BearerTokenInterceptor([TOKEN], exempt_prefixes=(f"/{SERVICE}/Unary",))
        async with _server([interceptor]) as port:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo = await channel.unary_unary(f"/{SERVICE}/Unary")(b"y")
                with pytest.raises(grpc.aio.AioRpcError) as health_error:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                return echo, health_error.value
    echo, health_error = asyncio.run(scenario())
    assert echo == b"unary:y"
    assert health_error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_interceptor_needs_a_token():
    with pytest.raises(SecurityConfigError, match="at least one token"):
        BearerTokenInterceptor([])


# ------------------------------------------------------------------------ token files


def test_load_tokens_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# service tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  # the batch job\n")
    assert load_tokens(path) == [TOKEN, OTHER_TOKEN]


@pytest.mark.parametrize("text, message", [
    ("", "holds no token"),
    ("# only a comment\n\n", "holds no token"),
    ("x" * (MIN_TOKEN_LENGTH - 1), f"line 1: token of {MIN_TOKEN_LENGTH - 1} characters"),
    (f"{TOKEN}\nshort\n", "line 2: token of 5 characters"),
    ("token with spaces inside it", "printable ASCII without spaces"),
    ("jeton-très-secret-0123456789", "printable ASCII"),
])
def test_load_tokens_refuses_bad_files(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(SecurityConfigError, match=message) as error:
        load_tokens(path)
    assert str(path) in str(error.value)


def test_exactly_min_length_token_is_accepted():
    assert parse_tokens("y" * MIN_TOKEN_LENGTH, "test") == ["y" * MIN_TOKEN_LENGTH]
    # the limit itself, written out: 16 characters pass, 15 do not
    assert MIN_TOKEN_LENGTH == 16 and parse_tokens("y" * 16, "test") == ["y" * 16]
    with pytest.raises(SecurityConfigError, match="token of 15 characters"):
        parse_tokens("y" * 15, "test")


@pytest.mark.parametrize("make", [grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler,
                                  grpc.stream_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler])
def test_a_refusal_has_the_refused_calls_cardinality(make):
    from modloc.engine.service.security import _refusal

    handler = make(lambda request, context: None)
    refusal = _refusal(handler, "missing bearer token")
    assert (refusal.request_streaming, refusal.response_streaming) == (
        handler.request_streaming, handler.response_streaming)
    assert refusal.request_deserializer is None  # an unauthenticated payload is never parsed


def test_load_tokens_names_a_missing_file(tmp_path):
    with pytest.raises(SecurityConfigError, match="token file .*nope: no such file"):
        load_tokens(tmp_path / "nope")
    with pytest.raises(SecurityConfigError, match="is a directory"):
        load_tokens(tmp_path)


def test_tokens_from_env(monkeypatch):
    monkeypatch.delenv("MODLOC_TEST_TOKENS", raising=False)
    assert tokens_from_env("MODLOC_TEST_TOKENS") is None
    monkeypatch.setenv("MODLOC_TEST_TOKENS", f"{TOKEN}, {OTHER_TOKEN}")
    assert tokens_from_env("MODLOC_TEST_TOKENS") == [TOKEN, OTHER_TOKEN]
    monkeypatch.setenv("MODLOC_TEST_TOKENS", "short")
    with pytest.raises(SecurityConfigError, match="environment variable MODLOC_TEST_TOKENS"):
        tokens_from_env("MODLOC_TEST_TOKENS")


# ------------------------------------------------------------------------------ exposure


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:50051", False), ("127.1.2.3:1", False), ("localhost:50051", False),
    ("LOCALHOST:1", False), ("[::1]:50051", False), ("::1", False), ("127.0.0.1", False),
    ("[::ffff:127.0.0.1]:5", False), ("unix:/tmp/modloc.sock", False),
    ("0.0.0.0:50051", True), ("[::]:50051", True), (":50051", True), ("10.0.0.5:50051", True),
    ("128.0.0.1:50051", True), ("example.com:443", True), ("[2001:db8::1]:50051", True),
])
def test_requires_auth(address, expected):
    assert requires_auth(address) is expected


def test_check_exposure():
    check_exposure("127.0.0.1:50051", None, insecure_no_auth=False)
    check_exposure("0.0.0.0:50051", [TOKEN], insecure_no_auth=False)
    check_exposure("0.0.0.0:50051", None, insecure_no_auth=True)
    with pytest.raises(SecurityConfigError, match="refusing to listen on 0.0.0.0:50051 .*--insecure-no-auth"):
        check_exposure("0.0.0.0:50051", [], insecure_no_auth=False)
    with pytest.raises(SecurityConfigError, match="no closing"):
        requires_auth("[::1:50051")


# ----------------------------------------------------------------------------------- TLS


def _health_over(port: int, credentials, override: str | None = None):
    async def scenario():
        options = [("grpc.ssl_target_name_override", override)] if override else []
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
            return await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
    return scenario()


def _tls_case(server_creds, client):
    """Run ``client(port)`` against a TLS server; its result, or the AioRpcError."""
    async def scenario():
        async with _server(credentials=server_creds) as port:
            try:
                return await client(port)
            except grpc.aio.AioRpcError as error:
                return error
    return asyncio.run(scenario())


def test_tls_with_the_ca_works_and_plaintext_fails(pki):
    creds = server_credentials(pki / "server.pem", pki / "server.key")
    ok = _tls_case(creds, lambda port: _health_over(port, channel_credentials(pki / "ca.pem")))
    assert ok.status == health_pb2.HealthCheckResponse.SERVING

    async def plaintext(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)

    refused = _tls_case(creds, plaintext)
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_refuses_a_server_the_client_ca_did_not_sign(pki):
    creds = server_credentials(pki / "server.pem", pki / "server.key")
    refused = _tls_case(creds, lambda port: _health_over(
        port, channel_credentials(pki / "rogue-ca.pem")))
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(pki):
    creds = server_credentials(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    ok = _tls_case(creds, lambda port: _health_over(port, channel_credentials(
        pki / "ca.pem", pki / "client.pem", pki / "client.key")))
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    for client_creds in (channel_credentials(pki / "ca.pem"),
                         channel_credentials(pki / "ca.pem", pki / "rogue.pem", pki / "rogue.key")):
        refused = _tls_case(creds, lambda port, c=client_creds: _health_over(port, c))
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_over_tls(pki):
    async def scenario():
        creds = server_credentials(pki / "server.pem", pki / "server.key")
        async with _server([BearerTokenInterceptor([TOKEN])], creds) as port:
            return await asyncio.to_thread(_call_all, f"localhost:{port}",
                                           (("authorization", f"Bearer {TOKEN}"),),
                                           channel_credentials(pki / "ca.pem"))
    assert asyncio.run(scenario()) == EXPECTED


def test_credentials_name_the_file_at_fault(pki, tmp_path):
    with pytest.raises(SecurityConfigError, match="TLS certificate .*missing.pem: no such file"):
        server_credentials(tmp_path / "missing.pem", pki / "server.key")
    with pytest.raises(SecurityConfigError, match="TLS private key .*server.pem: no PEM 'PRIVATE KEY'"):
        server_credentials(pki / "server.pem", pki / "server.pem")
    with pytest.raises(SecurityConfigError, match="client CA .*server.key: no PEM 'CERTIFICATE'"):
        server_credentials(pki / "server.pem", pki / "server.key", pki / "server.key")
    with pytest.raises(SecurityConfigError, match="CA certificate .*: no such file"):
        channel_credentials(tmp_path / "nope.pem")
    with pytest.raises(SecurityConfigError, match="give both cert_file and key_file"):
        channel_credentials(pki / "ca.pem", cert_file=pki / "client.pem")
    binary = tmp_path / "binary.pem"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SecurityConfigError, match="binary.pem: not a text file"):
        channel_credentials(binary)
