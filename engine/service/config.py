"""The server's settings: one validated dataclass, built by ``modloc serve`` or by code.

Every limit is explicit and checked here, so that a bad setting fails at start-up with a
message naming the field, not later inside a request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from modloc.engine.base.features import FEATURE_SIZE
from modloc.engine.runtime.backends import BACKENDS
from modloc.engine.runtime.batcher import BatcherConfig
from modloc.engine.runtime.live import LiveConfig
from modloc.engine.runtime.pipeline import PipelineConfig
from modloc.engine.runtime.ranking_stores import RedisSettings
from modloc.engine.runtime.topk import StatePolicy

MIB = 1 << 20
# gRPC refuses message limits at or above 2 GiB (its length fields are signed 32-bit).
GRPC_MESSAGE_CEILING = (1 << 31) - 1
# One whole 300-frame video (300 x 1152 bytes) plus the request's framing fits in far less.
DEFAULT_MAX_MESSAGE_BYTES = 4 * MIB
MESSAGE_OVERHEAD = 4096  # bytes a request adds around its features (id, flags, framing)


@dataclass(frozen=True)
class ServerConfig:
    """What ``serve`` needs.

    Attributes:
        artifacts: ``modloc export``'s output (``video/<variant>``, ``segment/<variant>``).
        video, segment: variants or artifact directories (default ``distill-fp32``).
        backend: ``onnxruntime``, ``torch`` or ``tensorrt``; ``backend_options`` are passed on.
        pipeline, batcher: batching and fusion (``pipeline.fusion.k`` is the ranking depth).
        address: ``host:port`` to bind; port 0 picks a free port (one process only).
        state_dir: where the per-class rankings live (:class:`modloc.engine.runtime.topk.DurableTopK`);
            None serves Localize only (Ingest answers FAILED_PRECONDITION).
        redis: keep the rankings in Redis instead (``--rankings redis://…``), shared by every
            replica of a fleet; such a server keeps no state of its own.
        state_policy: what opening ``state_dir`` may do beyond restoring intact state
            (accept a loss, other models or settings, or start fresh): operator choices.
        snapshot_seconds, snapshot_videos: write a snapshot after this many seconds or
            ingested videos, whichever comes first (0 disables that trigger).
        max_message_bytes: largest request or response message.
        max_frames: frames a video may have (the pipeline localizes the first
            ``pipeline.max_frames``; this refuses absurd sizes before buffering them).
        max_streams: Localize and Ingest streams open at once, server-wide.
        max_inflight_videos: videos received and not yet answered, server-wide (a video is
            answered once its response is handed to the transport).
        max_stream_videos: unanswered videos of one stream at which it stops reading
            requests until one is answered (backpressure: what a client that never reads
            its responses can make the server hold).
        max_kserve_requests, max_kserve_bytes: KServe inference requests in flight at once,
            and the request bytes they hold (RESOURCE_EXHAUSTED beyond; see
            :class:`modloc.engine.service.kserve.KServeLimits`). ``max_kserve_bytes`` is at
            least ``max_message_bytes``, so that any valid request can be admitted alone.
        max_connection_streams: concurrent HTTP/2 streams (calls) per client connection
            (the transport's SETTINGS_MAX_CONCURRENT_STREAMS: a client queues past it).
        max_connections: client connections at once (more are closed as they arrive).
        max_id_bytes: UTF-8 bytes of a video id.
        max_top_k: largest ``k`` of one TopSegments call (never more than the ranking
            depth ``pipeline.fusion.k``, see :attr:`top_k_limit`).
        grace_seconds: how long a drain waits for in-flight work on SIGTERM.
        processes: server processes sharing the port (SO_REUSEPORT); refused together with
            ``state_dir`` (rankings in a directory need one owner); with ``redis`` each
            process is a replica of the fleet.
        token_file: file of bearer tokens, one a line (the security module checks them).
        insecure_no_auth: allow serving beyond loopback without tokens.
        tls_cert, tls_key: server certificate and key (PEM); tls_client_ca: require client
            certificates signed by this CA (mutual TLS).
        metrics_port: Prometheus exposition port (None: no metrics endpoint).
        live: the live engine's batching, cadence and horizon (LocalizeLive).
        max_live_streams: LocalizeLive streams open at once, server-wide.
        max_live_frames: frames one live stream may send.
        live_idle_seconds: a live stream that sends nothing for this long is ended.
    """

    artifacts: Path
    video: str | None = None
    segment: str | None = None
    backend: str = "onnxruntime"
    backend_options: dict = field(default_factory=dict)
    pipeline: PipelineConfig = PipelineConfig()
    batcher: BatcherConfig = BatcherConfig()
    address: str = "127.0.0.1:50051"
    state_dir: Path | None = None
    redis: RedisSettings | None = None
    state_policy: StatePolicy = StatePolicy()
    snapshot_seconds: float = 300.0
    snapshot_videos: int = 100_000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_frames: int = 3600
    max_streams: int = 64
    max_inflight_videos: int = 1024
    max_stream_videos: int = 64
    max_kserve_requests: int = 8
    max_kserve_bytes: int = 32 * MIB
    max_connection_streams: int = 100
    max_connections: int = 1024
    max_id_bytes: int = 256
    max_top_k: int = 10_000
    grace_seconds: float = 30.0
    processes: int = 1
    token_file: Path | None = None
    insecure_no_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_port: int | None = None
    live: LiveConfig = LiveConfig()
    max_live_streams: int = 1024
    max_live_frames: int = 86_400
    live_idle_seconds: float = 60.0

    def __post_init__(self):
        object.__setattr__(self, "artifacts", Path(self.artifacts))
        for name in ("state_dir", "token_file", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        problems = self.problems()
        if problems:
            raise ValueError("invalid server configuration: " + "; ".join(problems))

    @property
    def top_k_limit(self) -> int:
        """The largest ``k`` a TopSegments call may ask for."""
        return min(self.max_top_k, self.pipeline.fusion.k)

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def bare_host(self) -> str:
        """:attr:`host` without the brackets of an IPv6 literal (``[::1]`` → ``::1``), as
        socket APIs other than gRPC's take it."""
        host = self.host
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def problems(self) -> list[str]:
        """Every invalid field, each as ``name: why``."""
        problems = []
        if not self.artifacts.is_dir():
            problems.append(f"artifacts: {self.artifacts} is not a directory")
        if self.backend not in BACKENDS:
            problems.append(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        host, colon, port = self.address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            problems.append(f"address: {self.address!r} is not host:port with a port in 0..65535")
        elif int(port) == 0 and self.processes > 1:
            problems.append("address: port 0 would give each of the processes its own port; "
                            "name a port when processes > 1")
        minimum_message = self.pipeline.max_frames * FEATURE_SIZE + MESSAGE_OVERHEAD
        if not minimum_message <= self.max_message_bytes <= GRPC_MESSAGE_CEILING:
            problems.append(f"max_message_bytes: {self.max_message_bytes} is outside "
                            f"{minimum_message}..{GRPC_MESSAGE_CEILING} (a message must hold one "
                            f"{self.pipeline.max_frames}-frame video and stay under gRPC's 2 GiB)")
        for name, low, high in (("max_frames", 1, 1 << 24), ("max_streams", 1, 1 << 16),
                                ("max_inflight_videos", 1, 1 << 24), ("max_stream_videos", 1, 1 << 20),
                                ("max_kserve_requests", 1, 1 << 16),
                                ("max_connection_streams", 1, 1 << 20), ("max_connections", 1, 1 << 20),
                                ("max_id_bytes", 1, 4096),
                                ("max_top_k", 1, 1 << 24), ("processes", 1, 256),
                                ("max_live_streams", 1, 1 << 20), ("max_live_frames", 1, 1 << 31),
                                ("snapshot_videos", 0, 1 << 40)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                problems.append(f"{name}: {value!r} is not an integer in {low}..{high}")
        if not isinstance(self.max_kserve_bytes, int) or not (
                self.max_message_bytes <= self.max_kserve_bytes <= 1 << 40):
            problems.append(f"max_kserve_bytes: {self.max_kserve_bytes!r} is not an integer in "
                            f"{self.max_message_bytes}..{1 << 40} (at least max_message_bytes, so "
                            "that one request of the largest size can be admitted)")
        if not (isinstance(self.live_idle_seconds, (int, float)) and 0 < self.live_idle_seconds < float("inf")):
            problems.append(f"live_idle_seconds: {self.live_idle_seconds!r} is not a finite number > 0")
        for name in ("snapshot_seconds", "grace_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                problems.append(f"{name}: {value!r} is not a finite number >= 0")
        if self.state_dir is not None and self.redis is not None:
            problems.append("state_dir, redis: the rankings live in a state directory or in "
                            "Redis, not both")
        if self.state_dir is not None and self.processes > 1:
            problems.append("state_dir: rankings need a single owner; processes > 1 serve "
                            "Localize only, so run them without a state directory")
        if self.state_dir is None and self.state_policy != StatePolicy():
            problems.append("state_policy: accepting a loss or a settings change, or starting "
                            "fresh, needs a state directory")
        if self.state_dir is not None and self.state_dir.exists() and not self.state_dir.is_dir():
            problems.append(f"state_dir: {self.state_dir} exists and is not a directory")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert, tls_key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca: client certificates need TLS (tls_cert, tls_key)")
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
                problems.append(f"{name}: {path} is not a readable file")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port: {self.metrics_port} is outside 0..65535")
        if self.metrics_port is not None and self.processes > 1:
            problems.append("metrics_port: each of the processes would bind it; the metrics "
                            "endpoint needs processes = 1")
        return problems


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "MESSAGE_OVERHEAD", "ServerConfig"]
