"""The engine core behind the gRPC handlers: models, batcher, durable rankings.

The asyncio front (:mod:`modloc.engine.service.handlers`: decode, validate, respond) talks to this
object only, through a narrow interface (``localize``, ``ingest``, ``ranking``,
``submission_csv``, ``stats``, ``model_info``, ``close``), the front/core split of vLLM's
v1 engine: today both live in one process; the core could move to its own process without
the handlers changing.

**Durability and acknowledgement order.** :meth:`EngineCore.ingest` localizes a group of
videos, adds each to the durable :class:`modloc.engine.runtime.rankings.Rankings` (appending to its
insert log), then commits once for the whole group (flush + fsync) and only then returns, so an
acknowledgement always means "on disk": a crash loses nothing acknowledged. A video that
was added before is reported as a duplicate and changes nothing, which makes re-sending
an unacknowledged tail after a crash safe.

**Ingestion order** is the rankings' tie key (``sequence``): videos are added in the order
of the ``ingest`` calls' ``after`` chain, so one stream's videos enter in the order it sent
them even though several of its groups are localized at once.

**Snapshots**: after ``snapshot_videos`` ingested videos (in the committing thread), every
``snapshot_seconds`` (a background task) when something changed, and at :meth:`close`.

**Rankings in Redis** (``config.redis``): the server holds no state; an add returns once
durable as configured (:mod:`modloc.engine.runtime.redis_rankings`), and the ingestion order
is the fleet's. While Redis cannot be reached, ingestion and the rankings' reads answer
UNAVAILABLE (nothing acknowledged; a client re-sends) and ``on_rankings_health(False)`` is
called; a probe (every :data:`RANKINGS_PROBE_SECONDS`) calls ``on_rankings_health(True)``
once Redis answers again. Localize never touches Redis.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modloc.engine.base.io.examples import Video
from modloc.engine.base.vocab import default_vocabulary
from modloc.engine.runtime.artifacts import ArtifactError
from modloc.engine.runtime.batcher import Batcher
from modloc.engine.runtime.live import LiveEngine, LiveVideoModel
from modloc.engine.runtime.localizer import Localizer
from modloc.engine.runtime.pipeline import VideoLocalization
from modloc.engine.runtime.ranking_stores import StoreUnavailable
from modloc.engine.service.config import ServerConfig

log = logging.getLogger("modloc.server")

RANKINGS_PROBE_SECONDS = 1.0


class InflightLimit(RuntimeError):
    """Admitting more videos would pass ``max_inflight_videos``."""


class NoRankings(RuntimeError):
    """The server runs without a state directory, so it keeps no rankings."""


class StateFailure(RuntimeError):
    """The state directory could not be written (a full disk, an I/O error): the rankings in
    memory may hold videos that are not on disk, so ingestion and the rankings' reads stop
    until a restart recovers the durable state."""


@dataclass(frozen=True)
class IngestOutcome:
    """One ingested video: ``duplicate`` when it was ingested before (nothing changed);
    ``sequence`` its place in the ingestion order from 1 (the tie key + 1, so that 0 can
    mean a duplicate)."""

    video_id: str
    duplicate: bool
    sequence: int


def log_event(event: str, **fields) -> None:
    """One structured log line: ``event=<event> key=value ...`` (values repr'd when they
    hold spaces, so that a line splits unambiguously)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if not text or any(c.isspace() or c == "=" for c in text) else
                     f"{key}={text}")
    log.info(" ".join(parts))


class EngineCore:
    """The localizer, its batcher and (with a state directory) its durable rankings.

    Args:
        config: the server's settings.
        localizer: the models and rankings to serve; rankings that are not durable serve
            Localize only.

    Use :meth:`load` to build one from ``config``.
    """

    def __init__(self, config: ServerConfig, localizer: Localizer):
        self.config = config
        self.localizer = localizer
        self.rankings = localizer.rankings if localizer.rankings.durable else None
        # what ModelInfo reports: the manifests of the artifacts just opened
        self.manifests = tuple((Path(backend.artifact.path) / "manifest.json").read_text()
                               for backend in localizer.backends)
        self.batcher = Batcher(localizer.pipeline, config.batcher)
        self.vocabulary = default_vocabulary()
        self.started = time.monotonic()
        self.draining = False
        self.inflight = 0  # videos admitted and not yet answered (event-loop thread only)
        self.videos_localized = 0
        self.videos_ingested = 0
        self.duplicates = 0
        self.received: collections.Counter[str] = collections.Counter()  # admitted videos by RPC
        self._add_lock = threading.Lock()  # adds (and their sequence numbers) one group at a time
        self._since_snapshot = 0  # videos ingested since the last snapshot (under _add_lock)
        self._snapshot_task: asyncio.Task | None = None
        # called with each group commit's seconds (the server's metrics)
        self.on_commit: Callable[[float], None] | None = None
        # set when the state directory could not be written; then called once (the health)
        self.state_failure: BaseException | None = None
        self.on_state_failure: Callable[[], None] | None = None
        # shared rankings (Redis): whether they answered last, and who hears of a change
        self.rankings_available = True
        self.on_rankings_health: Callable[[bool], None] | None = None
        self._probe_task: asyncio.Task | None = None
        # live localization (LocalizeLive): the engine, or why there is none
        self.live: LiveEngine | None = None
        self.live_unavailable = "live localization is not started"

    def open_live(self) -> None:
        """Start the live engine over the video artifact's live graphs and the segment model
        the pipeline runs; without live graphs, :attr:`live_unavailable` says why."""
        video_backend = self.localizer.backends[0]
        try:
            video = LiveVideoModel(video_backend.artifact, **{
                key: value for key, value in self.config.backend_options.items()
                if key in ("threads", "session_config")})
        except ArtifactError as error:
            self.live_unavailable = f"LocalizeLive: {error}"
            return
        self.live = LiveEngine(video, self.localizer.pipeline.segment_model,
                               self.config.pipeline.fusion, self.config.live)

    @classmethod
    def load(cls, config: ServerConfig) -> EngineCore:
        """Open the artifacts on the backend and restore the rankings from ``state_dir``."""
        localizer = Localizer.from_artifacts(config.artifacts, config.video, config.segment,
                                             config.backend, config.pipeline,
                                             backend_options=config.backend_options,
                                             state_dir=config.state_dir, redis=config.redis,
                                             state_policy=config.state_policy)
        core = cls(config, localizer)
        core.open_live()
        log_event("core_loaded", backend=config.backend, state_dir=config.state_dir,
                  ingested_before=core.ranked_videos)
        return core

    # --- admission --------------------------------------------------------------------

    def admit(self, videos: int, rpc: str) -> None:
        """Count ``videos`` received by ``rpc`` as in flight; raises :class:`InflightLimit`.

        While the server drains, new streams are refused where they enter; the streams open
        before go on taking videos until the grace period ends (the drain's promise)."""
        if self.inflight + videos > self.config.max_inflight_videos:
            raise InflightLimit(f"{self.inflight} videos are in flight server-wide; {videos} more "
                                f"would pass the limit of {self.config.max_inflight_videos}")
        self.inflight += videos
        self.received[rpc] += videos

    def release(self, videos: int) -> None:
        """The front answered (or gave up on) ``videos`` admitted videos."""
        self.inflight -= videos

    # --- work -------------------------------------------------------------------------

    async def localize(self, videos: Sequence[Video], deadline: float | None = None
                       ) -> list[VideoLocalization]:
        """Stages 1–3 through the batcher; results in the order of ``videos``.

        ``deadline`` is a ``time.monotonic()`` instant. Raises QueueFull, DeadlineExceeded,
        BatcherClosed (from :mod:`modloc.engine.runtime.batcher`).
        """
        results = await asyncio.wrap_future(self.batcher.submit(videos, deadline))
        self.videos_localized += len(videos)
        return results

    async def ingest(self, videos: Sequence[Video], deadline: float | None = None,
                     after: Awaitable | None = None) -> list[IngestOutcome]:
        """Localize ``videos``, add them to the rankings and commit durably; one outcome per
        video, in order. The group is added only once ``after`` (the same stream's previous
        group) is done, so that ingestion order follows the stream's order."""
        self._check_ingestion()  # before the models spend time on it
        results = await self.localize(videos, deadline)
        if after is not None:
            await after
        return await asyncio.to_thread(self._add_and_commit, results)

    def _check_ingestion(self) -> None:
        """Raise what would refuse an add now: no rankings, a failed state directory, or
        rankings in Redis that cannot be reached."""
        if self.rankings is None:
            raise NoRankings("this server keeps no rankings (start it with a state directory or --rankings)")
        self._check_state()
        if not self.rankings_available:
            raise StoreUnavailable(f"the rankings ({self.rankings.store!r}) cannot be reached now; "
                                   "retry later (this server's ingestion health says when)")

    def _check_state(self) -> None:
        if self.state_failure is not None:
            raise self._state_failure_error()

    def _state_failure_error(self) -> StateFailure:
        return StateFailure(f"the state directory {self.config.state_dir} could not be written "
                            f"({self.state_failure}); the server must restart to recover its "
                            "durable rankings")

    def _add_and_commit(self, results: Sequence[VideoLocalization]) -> list[IngestOutcome]:
        try:
            return self._add_and_commit_durably(results)
        except OSError as error:  # the log could not be written: nothing more is acknowledged
            self._fail(error)
            raise self._state_failure_error() from error
        except StoreUnavailable:  # Redis: nothing acknowledged; the client's re-send is safe
            self._rankings_health(False)
            raise
        except RuntimeError:  # the durable top-K refuses writes after another call's failure
            if self.state_failure is None:
                raise
            raise self._state_failure_error() from None

    def _rankings_health(self, available: bool) -> None:
        if available != self.rankings_available:
            self.rankings_available = available
            log_event("rankings_available" if available else "rankings_unavailable",
                      store=repr(self.rankings.store))
            if self.on_rankings_health is not None:
                self.on_rankings_health(available)

    def _fail(self, error: BaseException) -> None:
        if self.state_failure is None:
            self.state_failure = error
            log_event("state_failed", state_dir=self.config.state_dir, error=repr(error))
            if self.on_state_failure is not None:
                self.on_state_failure()

    def _add_and_commit_durably(self, results: Sequence[VideoLocalization]) -> list[IngestOutcome]:
        with self._add_lock:
            # Without an explicit order a video's tie key is the number registered before it.
            orders = self.rankings.add_videos(results)
            outcomes = [IngestOutcome(result.video_id, order is None, 0 if order is None else order + 1)
                        for result, order in zip(results, orders, strict=True)]
            fresh = sum(not outcome.duplicate for outcome in outcomes)
            self._since_snapshot += fresh
            snapshot_due = self.rankings.snapshots and 0 < self.config.snapshot_videos <= self._since_snapshot
        started = time.perf_counter()
        self.rankings.commit()  # the acknowledgements below promise this
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        self.videos_ingested += fresh
        self.duplicates += len(outcomes) - fresh
        if snapshot_due:
            self._snapshot("videos")
        return outcomes

    def _snapshot(self, reason: str) -> None:
        """A snapshot; one that cannot be written is logged and tried again later (the log
        still holds everything, so acknowledged videos are not at risk)."""
        with self._add_lock:
            try:
                path = self.rankings.snapshot()
            except OSError as error:
                log_event("snapshot_failed", reason=reason, error=repr(error))
                if self.rankings.failure is not None:  # the manifest's rename: state unknown
                    self._fail(error)
                return
            self._since_snapshot = 0
        log_event("snapshot", reason=reason, path=path, videos=self.ranked_videos)

    def start_background(self) -> None:
        """Start the timed snapshots, or the shared rankings' probe (call from the serving
        event loop)."""
        loop = asyncio.get_running_loop()
        if self.rankings is not None and self.rankings.snapshots and self.config.snapshot_seconds > 0:
            self._snapshot_task = loop.create_task(self._snapshot_timer())
        if self.rankings is not None and self.rankings.shared:
            self._probe_task = loop.create_task(self._probe_rankings())

    async def _probe_rankings(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.rankings.ping)
                self._rankings_health(True)
            except StoreUnavailable:
                self._rankings_health(False)
            await asyncio.sleep(RANKINGS_PROBE_SECONDS)

    async def _snapshot_timer(self) -> None:
        while True:
            await asyncio.sleep(self.config.snapshot_seconds)
            if self._since_snapshot:
                await asyncio.to_thread(self._snapshot, "timer")

    async def ingest_localized(self, results: Sequence[VideoLocalization]) -> list[IngestOutcome]:
        """Add videos localized elsewhere (a finished live stream) to the rankings and commit
        durably, with :meth:`ingest`'s semantics (a video added before is a duplicate)."""
        self._check_ingestion()
        return await asyncio.to_thread(self._add_and_commit, results)

    # --- reading ----------------------------------------------------------------------

    @property
    def ranked_videos(self) -> int:
        """Videos in the rankings (0 without a state directory)."""
        return self.rankings.videos if self.rankings is not None else 0

    def ranking(self, class_id: int, k: int, offset: int) -> list[tuple[str, int, float]]:
        """``(video id, start, fused score)`` of ranks ``[offset, offset + k)`` of a class.

        Raises NoRankings, KeyError (a class not ranked), ValueError (``k`` outside
        ``1..top_k_limit``, ``offset`` at or past the ranking depth).
        """
        if self.rankings is None:
            raise NoRankings("this server keeps no rankings (start it with a state directory or --rankings)")
        self._check_state()
        if not 1 <= k <= self.config.top_k_limit:
            raise ValueError(f"k={k} is outside 1..{self.config.top_k_limit}")
        depth = self.config.pipeline.fusion.k
        if offset >= depth:
            raise IndexError(f"offset={offset} is at or past the ranking depth {depth}")
        return self.rankings.ranking(class_id, limit=k, offset=offset)

    def submission_csv(self) -> str:
        """The Kaggle CSV of the current rankings (what ``modloc infer`` writes)."""
        if self.rankings is None:
            raise NoRankings("this server keeps no rankings (start it with a state directory or --rankings)")
        self._check_state()
        return self.rankings.submission_csv()

    def stats(self) -> dict:
        """Counters for StatsResponse (and the metrics module)."""
        times = self.localizer.pipeline.times
        return {"videos_localized": self.videos_localized, "videos_ingested": self.videos_ingested,
                "windows_scored": times.windows, "duplicates": self.duplicates,
                "queue_depth": self.batcher.queue_depth,
                "inflight_videos": self.inflight, "stages": dict(times.seconds),
                "batch_sizes": dict(self.batcher.stats.batch_sizes),
                "videos_received": dict(self.received),
                "uptime_seconds": time.monotonic() - self.started}

    def model_info(self) -> dict:
        """The served artifacts' manifests verbatim (as read when they were loaded: a file
        changed or removed since is not what is served) and the fusion settings
        (ModelInfoResponse)."""
        fusion = self.config.pipeline.fusion
        video_manifest, segment_manifest = self.manifests
        return {"video_manifest_json": video_manifest, "segment_manifest_json": segment_manifest,
                "backend": self.config.backend, "top_n": fusion.top_n,
                "video_exponent": fusion.video_exponent,
                "segment_exponent": fusion.segment_exponent, "k": fusion.k,
                "ranked_class_ids": list(self.localizer.rankings.class_ids)}

    # --- shutdown ---------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the batcher's queue, write a final snapshot, release everything."""
        self.draining = True
        for task in (self._snapshot_task, self._probe_task):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self.batcher.close, True)
        if self.live is not None:
            await asyncio.to_thread(self.live.close)
        if self.rankings is not None and self.rankings.snapshots and self.state_failure is None:
            # after a failure the files are the state to keep
            await asyncio.to_thread(self._snapshot, "shutdown")
        self.localizer.close()
        log_event("core_closed", videos_ingested=self.videos_ingested,
                  videos_localized=self.videos_localized)


__all__ = ["EngineCore", "IngestOutcome", "InflightLimit", "NoRankings", "StateFailure", "log_event"]
