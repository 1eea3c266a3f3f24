"""``serve(config)``: the gRPC server process, from loading the models to a graceful drain.

Start-up: the server binds and opens first, health (``grpc.health.v1``, overall and per
service) NOT_SERVING and the APIs answering UNAVAILABLE; then the core loads the artifacts
and restores the rankings; health turns SERVING only then, and the bound address is
announced (``on_ready``; ``modloc serve`` prints it).

Ingestion has a health entry of its own, ``modloc.v1.Localization/Ingest``
(:data:`INGEST_HEALTH`): SERVING while the server can ingest, NOT_SERVING without rankings
and while rankings in Redis cannot be reached (then back to SERVING by itself once they
can), so that a load balancer can route Ingest streams away while Localize, whose entries
stay SERVING, goes on.

Services: ``modloc.v1.Localization``, ``grpc.health.v1.Health``, server reflection and
KServe v2 (``inference.GRPCInferenceService`` over the same backends,
:mod:`modloc.engine.service.kserve`); interceptors: Prometheus metrics first, so refusals are
counted too (:mod:`modloc.engine.service.metrics`), then the bearer-token check; TLS from
certificate files (:mod:`modloc.engine.service.security`).

Drain (SIGTERM or SIGINT): health turns NOT_SERVING and new Localize/Ingest streams are
refused with UNAVAILABLE while the server still answers other calls; the streams in
progress get up to ``grace_seconds`` to finish (they may go on sending videos meanwhile);
then the server stops (cancelling what is left: a video not yet acknowledged is not
ingested, and a client's retry sends it again), the batcher finishes its queue, a final
snapshot is written, and the process exits 0.

Exit status :data:`EXIT_STATE_FAILED` (75, sysexits' EX_TEMPFAIL): the state directory
failed while serving (a full disk, an I/O error), so the server stopped acknowledging
ingestion and turned NOT_SERVING; it still drained cleanly, wrote nothing over the files
(they hold every acknowledged video), and a restart recovers them.

Several processes (``processes > 1``): the parent forks them before any gRPC object
exists; each binds the same port with ``SO_REUSEPORT`` (the kernel spreads connections
over them) and loads its own models. Rankings in a state directory need one owner, so this
mode serves without one (the config refuses both together): Localize and KServe scale out,
and ingestion runs on a separate single-process server, or, with rankings in Redis
(``--rankings``), on every process, each a replica of the fleet. With one process SO_REUSEPORT is off,
so a second server on a taken port fails instead of silently sharing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.features import FEATURE_SIZE
from modloc.engine.service import kserve, metrics, security
from modloc.engine.service.config import MESSAGE_OVERHEAD, ServerConfig
from modloc.engine.service.core import EngineCore, log_event
from modloc.engine.service.decoding import DecodeInterceptor
from modloc.engine.service.live import LiveLocalizationService

log = logging.getLogger("modloc.server")

LOCALIZATION_SERVICE = pb.DESCRIPTOR.services_by_name["Localization"].full_name
INGEST_HEALTH = f"{LOCALIZATION_SERVICE}/Ingest"  # a health entry, not a service
DRAIN_POLL_SECONDS = 0.05
# No bandwidth-delay probing: the receive window of a stream whose messages the server is not
# reading stays at gRPC's 64 KiB lookahead instead of growing to megabytes.
TRANSPORT_OPTIONS = (("grpc.http2.bdp_probe", 0),)
EXIT_STATE_FAILED = 75  # the state directory failed while serving; a restart recovers it
FEATURE_BYTES_WITH_MASK = FEATURE_SIZE + 4  # a KServe frame: uint8 features, an FP32 mask entry


def _kserve_servicer(config: ServerConfig, ready: Callable[[], bool]) -> kserve.KServeServicer:
    """The KServe servicer (models attached once loaded), its batch bounded so that a full
    request fits the server's message limit."""
    per_video = config.pipeline.max_frames * FEATURE_BYTES_WITH_MASK
    max_batch = max(1, (config.max_message_bytes - (64 << 10) - MESSAGE_OVERHEAD) // per_video)
    return kserve.KServeServicer(None, ready=ready, max_batch=max_batch,
                                 max_frames=config.pipeline.max_frames,
                                 limits=kserve.KServeLimits(config.max_kserve_requests,
                                                            config.max_kserve_bytes))


class _Server:
    """One serving process: core, gRPC server, health, and the drain."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.core: EngineCore | None = None
        self.localization = LiveLocalizationService()
        self.kserve: kserve.KServeServicer | None = None
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self.services = [LOCALIZATION_SERVICE]
        self.metrics = None
        self.metrics_http = None
        self.ready = False

    async def start(self) -> int:
        """Bind and open (health NOT_SERVING), load the models, then serve; the bound port."""
        port = await self.bind()
        await self.load()
        return port

    async def bind(self) -> int:
        """Open the port with every service registered, before the models load: health
        answers NOT_SERVING and the APIs UNAVAILABLE until :meth:`load` is done."""
        config = self.config
        self.tokens = security.load_tokens(config.token_file) if config.token_file is not None \
            else security.tokens_from_env()
        security.check_exposure(config.address, self.tokens, config.insecure_no_auth)
        self.metrics = metrics.ServerMetrics()
        interceptors = [self.metrics.interceptor()]  # first: counts refusals too
        if self.tokens:
            interceptors.append(security.BearerTokenInterceptor(self.tokens))
        interceptors.append(DecodeInterceptor())  # last: what reaches a handler decodes
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", int(config.processes > 1)),
                   *TRANSPORT_OPTIONS,
                   ("grpc.max_concurrent_streams", config.max_connection_streams),
                   ("grpc.max_allowed_incoming_connections", config.max_connections)]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_LocalizationServicer_to_server(self.localization, self.server)
        self.kserve = _kserve_servicer(config, lambda: self.ready)
        self.kserve.add_to_server(self.server)
        self.services.append(kserve.pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        for name in ("", *self.services, INGEST_HEALTH):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if config.tls_cert is not None:
                credentials = security.server_credentials(config.tls_cert, config.tls_key,
                                                          config.tls_client_ca)
                self.port = self.server.add_secure_port(config.address, credentials)
            else:
                self.port = self.server.add_insecure_port(config.address)
        except RuntimeError as error:  # gRPC's way of saying the address cannot be bound
            raise OSError(f"--address {config.address}: cannot listen there (the port is in use, "
                          f"or the host is not an address of this machine): {error}") from None
        await self.server.start()
        log_event("loading", address=f"{config.host}:{self.port}", pid=os.getpid())
        return self.port

    async def load(self) -> None:
        """Load the models and the rankings, attach them to the services, turn SERVING."""
        config = self.config
        self.core = await asyncio.to_thread(EngineCore.load, config)
        self.localization.core = self.core
        # the engine's own backends: KServe clients call the very models the pipeline runs
        video_backend, segment_backend = self.core.localizer.backends
        self.kserve.attach({kserve.DEFAULT_MODEL_NAMES["video"]: video_backend,
                            kserve.DEFAULT_MODEL_NAMES["segment"]: segment_backend})
        self.core.start_background()
        loop = asyncio.get_running_loop()
        self.core.on_state_failure = lambda: asyncio.run_coroutine_threadsafe(self._unhealthy(), loop)
        self.core.on_rankings_health = lambda available: asyncio.run_coroutine_threadsafe(
            self._ingest_health(available), loop)
        self.core.batcher.on_batch = self._observe_batch
        self.core.on_commit = lambda seconds: self.metrics.observe_stage("commit", seconds)
        if config.metrics_port is not None:
            self.metrics_http = self.metrics.start_http_server(config.metrics_port, config.bare_host)
            log_event("metrics", address=f"{config.host}:{self.metrics_http.port}")  # port 0: the one picked
            asyncio.get_running_loop().create_task(self._refresh_metrics())
        self.ready = True
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._ingest_health(self.core.rankings is not None and self.core.rankings_available)
        log_event("serving", address=f"{config.host}:{self.port}", pid=os.getpid(),
                  services=",".join(self.services))

    async def _unhealthy(self) -> None:
        """The state directory failed: health NOT_SERVING, so that an orchestrator restarts
        the server (a restart recovers the durable rankings)."""
        for name in ("", *self.services, INGEST_HEALTH):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _ingest_health(self, serving: bool) -> None:
        if self.ready and self.core.state_failure is None:  # a drain or a failure has the last word
            await self.health.set(INGEST_HEALTH, health_pb2.HealthCheckResponse.SERVING if serving
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _observe_batch(self, record) -> None:
        """One pipeline call into the metrics (from the batcher's thread)."""
        self.metrics.batch_size.observe(record.videos)
        self.metrics.segments.inc(record.windows)
        for stage, seconds in record.stage_seconds.items():
            self.metrics.observe_stage(stage, seconds)
        for seconds in record.queue_seconds:
            self.metrics.observe_stage("queue", seconds)

    async def _refresh_metrics(self) -> None:
        """Copy the core's gauges, and the videos it received per RPC, into the metrics once
        a second."""
        counted: dict[str, int] = {}
        while True:
            stats = self.core.stats()
            self.metrics.queue_depth.set(stats["queue_depth"])
            self.metrics.in_flight_videos.set(stats["inflight_videos"])
            self.metrics.kserve_in_flight_requests.set(self.kserve.admission.requests)
            self.metrics.kserve_in_flight_bytes.set(self.kserve.admission.bytes)
            for rpc, total in stats["videos_received"].items():
                self.metrics.videos.labels(rpc=rpc).inc(total - counted.get(rpc, 0))
                counted[rpc] = total
            await asyncio.sleep(1.0)

    async def drain(self, reason: str) -> None:
        """Health NOT_SERVING, refuse new streams, let the open ones finish within the grace
        period, stop, final snapshot."""
        log_event("drain_started", reason=reason, active_streams=self.localization.active_streams,
                  inflight_videos=self.core.inflight)
        self.ready = False
        self.core.draining = True
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace_seconds
        while (self.localization.active_streams or self.core.inflight) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        await self.server.stop(max(0.0, deadline - loop.time()))
        await self.core.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        log_event("drain_finished", videos_ingested=self.core.videos_ingested)


async def serve_async(config: ServerConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain (see the module docstring); the exit
    status (0, or :data:`EXIT_STATE_FAILED`)."""
    server = _Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = await server.start()
    except BaseException:
        if server.server is not None:
            await server.server.stop(0)
        if server.core is not None:
            await server.core.close()
        raise
    if on_ready is not None:
        on_ready(f"{config.host}:{port}")
    await stop.wait()
    await server.drain("signal")
    return EXIT_STATE_FAILED if server.core.state_failure is not None else 0


def serve(config: ServerConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Run the server (``config.processes`` of them); returns the exit status.

    ``on_ready(address)`` is called once, when every process is serving.
    """
    if config.processes == 1:
        return asyncio.run(serve_async(config, on_ready))
    return _serve_forked(config, on_ready)


def _serve_forked(config: ServerConfig, on_ready: Callable[[str], None] | None) -> int:
    """Fork the processes (before any gRPC object exists), wait until each reports ready,
    forward SIGTERM/SIGINT to them, and exit with the worst of their statuses."""
    children = []
    ready_read, ready_write = os.pipe()
    for _ in range(config.processes):
        pid = os.fork()
        if pid == 0:  # child
            os.close(ready_read)

            def announce(address: str) -> None:
                # closing at once lets the parent see EOF when a sibling fails
                os.write(ready_write, b"+")
                os.close(ready_write)

            status = 1
            try:
                status = asyncio.run(serve_async(config, announce))
            except BaseException:
                log.exception("event=process_failed pid=%d", os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children.append(pid)
    os.close(ready_write)

    def forward(signum, frame):
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    announced = 0
    while announced < config.processes:
        byte = os.read(ready_read, 1)
        if not byte:  # every child closed its end: one failed before serving
            break
        announced += 1
    os.close(ready_read)
    if announced == config.processes and on_ready is not None:
        on_ready(config.address)
    elif announced < config.processes:
        forward(signal.SIGTERM, None)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status) & 0xFF)
    return worst if announced == config.processes else max(worst, 1)


__all__ = ["EXIT_STATE_FAILED", "INGEST_HEALTH", "LOCALIZATION_SERVICE", "serve", "serve_async"]
