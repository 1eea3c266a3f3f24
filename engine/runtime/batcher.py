"""The batcher: videos from many concurrent callers packed into large pipeline batches.

Callers (gRPC streams, client threads) :meth:`Batcher.submit` a few videos each and get a
:class:`concurrent.futures.Future` of their :class:`~modloc.engine.runtime.pipeline.VideoLocalization`
list. One worker thread owns the :class:`~modloc.engine.runtime.pipeline.Pipeline` (so the device sees
one stream of large batches): it takes the oldest request, then keeps adding queued
requests until the batch holds ``max_batch_videos`` videos or ``max_wait`` seconds have
passed since that oldest request arrived, runs the pipeline once on all of their videos,
and hands each request its own results.

Limits are explicit: at most ``max_queued_videos`` videos wait at once; beyond that
:meth:`submit` raises :class:`QueueFull` (the service answers RESOURCE_EXHAUSTED), so memory
is bounded whatever the clients do. A request whose deadline passes while it waits is
dropped before the device and fails with :class:`DeadlineExceeded`; a request whose future
is cancelled while it waits is skipped.

asyncio callers wrap the future: ``await asyncio.wrap_future(batcher.submit(videos))``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from modloc.engine.base.io.examples import Video
from modloc.engine.runtime.pipeline import Pipeline, VideoLocalization, check_video

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The batcher holds ``max_queued_videos`` videos already."""


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed before the device reached it."""


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts work."""


@dataclass(frozen=True)
class BatcherConfig:
    """Attributes:
        max_batch_videos: videos per pipeline call (requests are never split, so one
            larger request makes a larger call).
        max_wait: seconds the oldest waiting request may wait for company.
        max_queued_videos: videos waiting at once, beyond which submit refuses.
    """

    max_batch_videos: int = 64
    max_wait: float = 0.002
    max_queued_videos: int = 4096

    def __post_init__(self):
        if self.max_batch_videos < 1 or self.max_queued_videos < 1:
            raise ValueError("max_batch_videos and max_queued_videos must be >= 1")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {self.max_wait}")


@dataclass(eq=False)
class _Request:
    videos: Sequence[Video]
    future: Future
    deadline: float | None  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    """Counts since start; ``batch_sizes`` maps videos per pipeline call → calls."""

    requests: int = 0
    videos: int = 0
    batches: int = 0
    expired: int = 0
    cancelled: int = 0
    refused: int = 0
    failed: int = 0
    queued_videos: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    queue_seconds: float = 0.0  # summed over requests

    def to_json(self) -> dict:
        return {"requests": self.requests, "videos": self.videos, "batches": self.batches,
                "expired": self.expired, "cancelled": self.cancelled, "refused": self.refused,
                "failed": self.failed, "queued_videos": self.queued_videos,
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "mean_queue_seconds": self.queue_seconds / self.requests if self.requests else 0.0}


@dataclass(frozen=True)
class BatchRecord:
    """One pipeline call of the batcher, for whoever observes them (the server's metrics).

    Attributes:
        videos: videos in the call.
        windows: 5-frame windows the segment model scored.
        stage_seconds: this call's seconds per pipeline stage (:class:`StageTimes` keys).
        queue_seconds: each merged request's wait from submit to the device.
    """

    videos: int
    windows: int
    stage_seconds: dict[str, float]
    queue_seconds: list[float]


class Batcher:
    """One worker thread running ``pipeline`` over batches merged from many requests.

    ``on_batch``, when set, is called from the worker thread with a :class:`BatchRecord`
    after every successful pipeline call (it must be quick and must not raise).
    """

    def __init__(self, pipeline: Pipeline, config: BatcherConfig = BatcherConfig(),
                 on_batch: Callable[[BatchRecord], None] | None = None):
        self.pipeline = pipeline
        self.config = config
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._queue: collections.deque[_Request] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="modloc-batcher", daemon=True)
        self._worker.start()

    def submit(self, videos: Sequence[Video], deadline: float | None = None) -> Future:
        """Queue ``videos`` (one request); the future gets their localizations in order.

        Args:
            videos: at least one video.
            deadline: a ``time.monotonic()`` instant after which the request is dropped.

        Raises:
            QueueFull: ``max_queued_videos`` would be exceeded (nothing was queued).
            BatcherClosed: after :meth:`close`.
        """
        if not videos:
            raise ValueError("a request needs at least one video")
        for video in videos:  # here, so that one bad video cannot fail a whole batch
            check_video(video)
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self.stats.queued_videos + len(videos) > self.config.max_queued_videos:
                self.stats.refused += 1
                raise QueueFull(f"{self.stats.queued_videos} videos are queued; {len(videos)} more "
                                f"would pass the limit of {self.config.max_queued_videos}")
            self._queue.append(_Request(list(videos), future, deadline))
            self.stats.queued_videos += len(videos)
            self._condition.notify()
        return future

    def localize(self, videos: Sequence[Video], timeout: float | None = None) -> list[VideoLocalization]:
        """Submit and wait: the localizations of ``videos``."""
        return self.submit(videos).result(timeout)

    @property
    def queue_depth(self) -> int:
        """Videos waiting for the device."""
        with self._condition:
            return self.stats.queued_videos

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; finish what is queued (``drain``) or cancel it, then stop."""
        with self._condition:
            self._closed = True
            if not drain:
                while self._queue:
                    request = self._queue.popleft()
                    self.stats.queued_videos -= len(request.videos)
                    request.future.set_exception(BatcherClosed("the batcher closed before this request ran"))
            self._condition.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_batch(self) -> list[_Request] | None:
        """Block for the oldest request, gather company until full or its wait is over."""
        with self._condition:
            while not self._queue:
                if self._closed:
                    return None
                self._condition.wait()
            leave_by = self._queue[0].enqueued + self.config.max_wait
            while self.stats.queued_videos < self.config.max_batch_videos and not self._closed:
                remaining = leave_by - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch, videos = [], 0
            while self._queue and (not batch or videos + len(self._queue[0].videos)
                                   <= self.config.max_batch_videos):
                request = self._queue.popleft()
                self.stats.queued_videos -= len(request.videos)
                batch.append(request)
                videos += len(request.videos)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            now = time.monotonic()
            live, waits = [], []
            for request in batch:
                if not request.future.set_running_or_notify_cancel():
                    self.stats.cancelled += 1
                elif request.deadline is not None and now > request.deadline:
                    self.stats.expired += 1
                    request.future.set_exception(DeadlineExceeded(
                        f"the deadline passed {now - request.deadline:.3f} s before the device "
                        f"reached the request"))
                else:
                    waits.append(now - request.enqueued)
                    self.stats.queue_seconds += waits[-1]
                    live.append(request)
            if not live:
                continue
            videos = [video for request in live for video in request.videos]
            times = self.pipeline.times
            seconds_before, windows_before = dict(times.seconds), times.windows
            try:
                results = self.pipeline.localize(videos)
            except Exception as error:  # the requests fail, the worker goes on
                log.exception("pipeline failed on a batch of %d videos", len(videos))
                self.stats.failed += len(live)
                for request in live:
                    request.future.set_exception(error)
                continue
            self.stats.requests += len(live)
            self.stats.videos += len(videos)
            self.stats.batches += 1
            self.stats.batch_sizes[len(videos)] += 1
            if self.on_batch is not None:
                self.on_batch(BatchRecord(
                    len(videos), times.windows - windows_before,
                    {stage: times.seconds[stage] - seconds_before[stage] for stage in times.seconds},
                    waits))
            begin = 0
            for request in live:
                request.future.set_result(results[begin: begin + len(request.videos)])
                begin += len(request.videos)


__all__ = ["BatchRecord", "Batcher", "BatcherClosed", "BatcherConfig", "BatcherStats", "DeadlineExceeded", "QueueFull"]
