"""Who may call the server: bearer tokens, TLS and mutual TLS.

- :class:`BearerTokenInterceptor` requires ``authorization: Bearer <token>`` metadata on
  every call but the health service's (load balancers and orchestrators probe health
  without credentials). Server reflection is *not* exempt: it lists the whole API, which
  is for callers who hold a token; pass ``exempt_prefixes`` to change that (e.g. add
  ``"/grpc.reflection."``).
- :func:`load_tokens` / :func:`tokens_from_env` read the accepted tokens.
- :func:`requires_auth` / :func:`check_exposure`: a server listening beyond loopback must
  have tokens, unless its operator explicitly opts out (``--insecure-no-auth``).
- :func:`server_credentials` / :func:`channel_credentials`: TLS for the server and its
  clients, mutual TLS when the server is given a client CA.

Tokens travel in metadata, so without TLS anyone on the path can read them: serve tokens
over TLS beyond loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKENS_ENV = "MODLOC_AUTH_TOKENS"
MIN_TOKEN_LENGTH = 16
# a token must survive as a gRPC metadata value after "Bearer ": printable ASCII, no spaces
_TOKEN = re.compile(r"[\x21-\x7e]+")


class SecurityConfigError(ValueError):
    """Tokens, certificates or an address that the server cannot be started with."""


# ----------------------------------------------------------------------------- tokens


def parse_tokens(text: str, source: str) -> list[str]:
    """Tokens from ``text``: one per line (or comma-separated), ``#`` comments and blank
    lines ignored.

    Raises:
        SecurityConfigError: naming ``source`` and the line, when there is no token, or a
            token is shorter than :data:`MIN_TOKEN_LENGTH` or not printable ASCII.
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        for token in filter(None, (part.strip() for part in line.split(","))):
            if not _TOKEN.fullmatch(token):
                raise SecurityConfigError(f"{source} line {number}: a token must be printable "
                                          f"ASCII without spaces")
            if len(token) < MIN_TOKEN_LENGTH:
                raise SecurityConfigError(f"{source} line {number}: token of {len(token)} "
                                          f"characters, at least {MIN_TOKEN_LENGTH} are required")
            tokens.append(token)
    if not tokens:
        raise SecurityConfigError(f"{source} holds no token (one per line; '#' starts a comment)")
    return tokens


def load_tokens(path: str | os.PathLike) -> list[str]:
    """The tokens of a file (see :func:`parse_tokens`)."""
    return parse_tokens(_read_text(path, "token file"), str(path))


def tokens_from_env(name: str = TOKENS_ENV) -> list[str] | None:
    """The comma-separated tokens of environment variable ``name``; None when it is unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    return parse_tokens(value, f"environment variable {name}")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` naming an accepted token.

    A refused call ends with UNAUTHENTICATED, ``"missing bearer token"`` or ``"invalid
    bearer token"``, before its request is decoded or its handler runs. Unknown methods
    are left to gRPC (UNIMPLEMENTED).

    Args:
        tokens: the accepted tokens (at least one).
        exempt_prefixes: method-name prefixes served without a token (default: health).
    """

    def __init__(self, tokens: Sequence[str], exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)):
        if not tokens:
            raise SecurityConfigError("BearerTokenInterceptor needs at least one token")
        self._tokens = [token.encode() for token in tokens]
        self.exempt_prefixes = tuple(exempt_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.exempt_prefixes):
            return handler
        values = [value for key, value in handler_call_details.invocation_metadata or ()
                  if key == "authorization"]
        if not values:
            return _refusal(handler, "missing bearer token")
        if len(values) > 1 or not self._accepts(values[0]):
            return _refusal(handler, "invalid bearer token")
        return handler

    def _accepts(self, value: str | bytes) -> bool:
        if isinstance(value, bytes):  # only "-bin" keys carry bytes; be safe anyway
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235 §2.1)
        if scheme.lower() != "bearer":
            return False
        presented = token.strip().encode("utf-8", "replace")
        # compare against every token, without stopping at a match, so that the time taken
        # tells nothing about which token (or how much of one) matched
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(presented, accepted)
        return matched


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same cardinality as ``handler`` that aborts with UNAUTHENTICATED.

    It has no request deserializer: an unauthenticated caller's payload is never parsed.
    """

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


# --------------------------------------------------------------------------- exposure


def requires_auth(address: str) -> bool:
    """Whether a server listening on ``address`` can be reached from other machines.

    False for loopback (``127.0.0.0/8``, ``::1``, ``localhost``) and Unix sockets
    (``unix:``, guarded by file permissions); True for everything else, wildcards
    (``0.0.0.0``, ``[::]``, ``:50051``) and host names included.
    """
    address = address.strip()
    if address.startswith(("unix:", "unix-abstract:")):
        return False
    host = _host(address)
    if host.lower() == "localhost":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name other than localhost may resolve to anything
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_loopback


def _host(address: str) -> str:
    """The host part of ``host:port``, ``[v6]:port``, ``[v6]``, a bare host or ``:port``."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise SecurityConfigError(f"malformed address {address!r}: no closing ']'")
        return address[1:end]
    if address.count(":") > 1:  # a bare IPv6 address
        return address
    return address.rpartition(":")[0] if ":" in address else address


def check_exposure(address: str, tokens: Sequence[str] | None, insecure_no_auth: bool) -> None:
    """Refuse to serve ``address`` beyond loopback without tokens, unless explicitly allowed.

    Raises:
        SecurityConfigError: saying how to fix it.
    """
    if tokens or insecure_no_auth or not requires_auth(address):
        return
    raise SecurityConfigError(
        f"refusing to listen on {address} without authentication: it is reachable from other "
        f"machines. Give bearer tokens (a token file or ${TOKENS_ENV}), listen on loopback "
        f"(127.0.0.1), or pass --insecure-no-auth to accept unauthenticated callers")


# -------------------------------------------------------------------------------- TLS


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike,
                       client_ca_file: str | os.PathLike | None = None) -> grpc.ServerCredentials:
    """TLS for a server: its certificate chain and key (PEM); with ``client_ca_file``,
    mutual TLS, every client must present a certificate that CA signed.

    Raises:
        SecurityConfigError: naming the file that is missing, unreadable or not PEM.
    """
    certificate = _read_pem(cert_file, "TLS certificate", ("CERTIFICATE",))
    key = _read_pem(key_file, "TLS private key", ("PRIVATE KEY",))
    client_ca = None if client_ca_file is None else _read_pem(client_ca_file, "client CA",
                                                              ("CERTIFICATE",))
    return grpc.ssl_server_credentials([(key, certificate)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca_file: str | os.PathLike | None = None,
                        cert_file: str | os.PathLike | None = None,
                        key_file: str | os.PathLike | None = None) -> grpc.ChannelCredentials:
    """TLS for a client: the CA that signed the server's certificate (None: the system's
    roots), and for mutual TLS the client's own certificate and key (both or neither).

    Raises:
        SecurityConfigError: naming the file that is missing, unreadable or not PEM, or
            when only one of ``cert_file`` and ``key_file`` is given.
    """
    if (cert_file is None) != (key_file is None):
        raise SecurityConfigError("a client certificate needs its key and a key its certificate: "
                                  "give both cert_file and key_file, or neither")
    ca = None if ca_file is None else _read_pem(ca_file, "CA certificate", ("CERTIFICATE",))
    certificate = None if cert_file is None else _read_pem(cert_file, "client certificate",
                                                           ("CERTIFICATE",))
    key = None if key_file is None else _read_pem(key_file, "client private key", ("PRIVATE KEY",))
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=certificate)


def _read_text(path: str | os.PathLike, role: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecurityConfigError(f"{role} {path}: no such file") from None
    except IsADirectoryError:
        raise SecurityConfigError(f"{role} {path}: is a directory, not a file") from None
    except PermissionError:
        raise SecurityConfigError(f"{role} {path}: permission denied") from None
    except UnicodeDecodeError:
        raise SecurityConfigError(f"{role} {path}: not a text file") from None
    except OSError as error:
        raise SecurityConfigError(f"{role} {path}: cannot be read ({error.strerror})") from None


def _read_pem(path: str | os.PathLike, role: str, labels: Iterable[str]) -> bytes:
    """A PEM file's bytes, after checking it holds a block of one of ``labels`` (so that a
    swapped certificate and key fail here, by name, not inside gRPC's TLS stack)."""
    text = _read_text(path, role)
    if not any(re.search(rf"-----BEGIN [A-Z ]*{label}-----", text) for label in labels):
        raise SecurityConfigError(f"{role} {path}: no PEM '{' or '.join(labels)}' block "
                                  f"(-----BEGIN ...-----) found")
    return text.encode()


__all__ = ["HEALTH_PREFIX", "MIN_TOKEN_LENGTH", "TOKENS_ENV",
           "BearerTokenInterceptor", "SecurityConfigError", "channel_credentials",
           "check_exposure", "load_tokens", "parse_tokens", "requires_auth",
           "server_credentials", "tokens_from_env"]
