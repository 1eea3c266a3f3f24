"""``LocalizeLive``: frames of a live stream in, one event per completed window out.

The stream's messages (``LiveFrames``) carry any number of frames each; the first names the
stream (a video id, as in Localize; one bound for the rankings when it asks to be
ingested) and its options. The engine (:mod:`modloc.engine.runtime.live`) scores each
completed 5-frame window and fuses it with the stream's current candidates; the answer is a
sequence of ``LiveEvent``: ``candidates`` whenever they are refreshed (a version, the
frames they come from, the candidates), ``window`` once per completed window in window
order (its start, the candidates' version it was fused with, its fused scores above the
threshold, best first, at most ``top_n``), and at the end one ``final``: the localization
of the whole stream (for a stream of at most 300 frames, what Localize answers for the
same video), and with ``ingest`` its IngestAck.

Guarantees and limits:

- the final localization comes only after ``last``; a stream that ends otherwise (the
  client cancels, the connection drops, a refusal) applies nothing: with ``ingest`` the
  stream enters the rankings only at its end, and is acknowledged only once durable
  (Ingest's semantics: a re-sent id is answered DUPLICATE and changes nothing);
- at most ``max_live_streams`` live streams server-wide (RESOURCE_EXHAUSTED beyond), at
  most ``max_live_frames`` frames per stream (OUT_OF_RANGE), a stream that sends nothing for
  ``live_idle_seconds`` ends with DEADLINE_EXCEEDED, and windows waiting for the engine
  are bounded server-wide (:attr:`LiveConfig.max_queued_windows`, RESOURCE_EXHAUSTED);
- bad input ends the stream with a status naming the request index, the field and the
  stream (INVALID_ARGUMENT), before any of the message's frames are kept;
- a server without live graphs (a video artifact exported before them, or not fp32)
  answers FAILED_PRECONDITION; bearer tokens and TLS apply as to every call.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import numpy as np

from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine.base.features import AUDIO_SIZE, RGB_SIZE
from modloc.engine.runtime.live import (
    CandidateUpdate,
    LiveEngineClosed,
    LiveQueueFull,
    StreamEnd,
    StreamOptions,
    WindowEvent,
)
from modloc.engine.runtime.ranking_stores import StoreUnavailable
from modloc.engine.service.core import EngineCore, StateFailure, log_event
from modloc.engine.service.handlers import (
    LocalizationService,
    Refusal,
    check_video_id,
    frame_count,
    interleave,
    localize_response,
)

_CLOSED = object()


class Deliveries:
    """What the engine's thread hands to the event loop (events, errors), batched: one
    wake-up of the loop per burst, not one per stream (each costs a write to the loop's
    self-pipe, under the GIL: it was an eighth of the engine thread's time at 1000 streams)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list = []
        self.scheduled = False

    def post(self, deliver, item) -> None:
        """Call ``deliver(item)`` on the loop (from any thread)."""
        with self.lock:
            self.pending.append((deliver, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for deliver, item in pending:
            deliver(item)


class LiveStreamCall:
    """One LocalizeLive call: a reader task pushing frames, an outbox of events."""

    def __init__(self, core: EngineCore, context, deliveries: Deliveries):
        self.core = core
        self.context = context
        self.config = core.config
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.deliveries = deliveries
        self.stream = None
        self.stream_id = ""
        self.ingest = False
        self.max_segments = 0
        self.threshold = 0.0

    async def events(self, requests):
        """The call's events; the first error aborts the call with its status."""
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while (item := await self.outbox.get()) is not _CLOSED:
                if isinstance(item, BaseException):
                    code, message = _status(item)
                    log_event("stream_refused", rpc="LocalizeLive", code=code.name, message=message)
                    await self.context.abort(code, message)
                if isinstance(item, StreamEnd):
                    yield await self._final(item)
                    return
                yield item
        finally:
            reader.cancel()

    # --- requests ---------------------------------------------------------------------

    async def _read(self, requests) -> None:
        index = 0
        iterator = requests.__aiter__()
        try:
            while True:
                try:
                    request = await asyncio.wait_for(iterator.__anext__(), self.config.live_idle_seconds)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"stream {self.stream_id!r}: no message for "
                                  f"{self.config.live_idle_seconds:g} s (the server's live idle "
                                  "timeout)") from None
                self._take(request, index)
                index += 1
                if request.last:
                    return
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request {index}: the stream ended without a message with last set"
                          + (f" (stream {self.stream_id!r})" if self.stream_id else ""))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.outbox.put_nowait(error)

    def _take(self, request: pb.LiveFrames, index: int) -> None:
        """Check request ``index`` whole, then push its frames (nothing kept on a refusal)."""
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        where = f"request {index} (stream {self.stream_id or request.stream_id!r})"
        if index == 0:
            self._open(request)
        else:
            if request.stream_id not in ("", self.stream_id):
                raise Refusal(invalid, f"{where}: stream_id {request.stream_id!r} differs from the "
                              "first message's")
            if request.HasField("options"):
                raise Refusal(invalid, f"{where}: options are read from the first message only")
        frames = frame_count(request.rgb, request.audio, where)
        total = self.stream.frames + frames
        if total > self.config.max_live_frames:
            raise Refusal(grpc.StatusCode.OUT_OF_RANGE,
                          f"{where}: the stream has {total} frames so far, more than the limit "
                          f"of {self.config.max_live_frames}")
        if request.last and total == 0:
            raise Refusal(invalid, f"{where}: the stream ended without frames")
        self.stream.push(interleave(request.rgb, request.audio) if frames else
                         np.zeros((0, RGB_SIZE + AUDIO_SIZE), np.uint8), last=request.last)

    def _open(self, request: pb.LiveFrames) -> None:
        options = request.options
        self.ingest = options.ingest
        check_video_id(request.stream_id, self.config.max_id_bytes, 0, for_rankings=self.ingest)
        self.stream_id = request.stream_id
        where = f"request 0 (stream {self.stream_id!r})"
        if not (math.isfinite(options.threshold) and 0.0 <= options.threshold <= 1.0):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: options.threshold="
                          f"{options.threshold} is not a number in [0, 1] (fused scores are)")
        if self.ingest and self.core.rankings is None:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"{where}: options.ingest is set but "
                          "this server keeps no rankings (start it with a state directory or --rankings)")
        self.threshold, self.max_segments = options.threshold, options.max_segments
        self.stream = self.core.live.open(
            self.stream_id,
            StreamOptions(threshold=options.threshold, top_n=options.top_n,
                          refresh_frames=options.refresh_frames or None),
            on_events=lambda events: self.deliveries.post(self._deliver, events),
            on_error=lambda error: self.deliveries.post(self.outbox.put_nowait, error))

    def _deliver(self, events) -> None:
        for event in events:
            self.outbox.put_nowait(event if isinstance(event, StreamEnd) else _message(event, self))

    # --- the end ----------------------------------------------------------------------

    async def _final(self, end: StreamEnd) -> pb.LiveEvent:
        """The final event: the localization, and its ingestion when asked (durable first)."""
        include_partial = self.config.pipeline.fusion.include_partial
        final = pb.LiveFinal(localization=localize_response(
            end.localization, self.core.vocabulary, self.threshold, self.max_segments, include_partial))
        if self.ingest:
            [outcome] = await self.core.ingest_localized([end.localization])
            final.ingest.CopyFrom(pb.IngestAck(
                video_id=outcome.video_id, sequence=outcome.sequence,
                status=pb.IngestAck.DUPLICATE if outcome.duplicate else pb.IngestAck.INGESTED))
        return pb.LiveEvent(final=final)


def _message(event: WindowEvent | CandidateUpdate, call: LiveStreamCall) -> pb.LiveEvent:
    """An engine event as a LiveEvent."""
    if isinstance(event, WindowEvent):
        return pb.LiveEvent(window=pb.LiveWindow(
            start_seconds=event.start, partial=event.partial, candidates_version=event.version,
            scores=[pb.WindowScore(class_id=class_id, score=score) for class_id, score in event.scores],
            server_seconds=time.monotonic() - event.completed))
    vocabulary = call.core.vocabulary
    return pb.LiveEvent(candidates=pb.LiveCandidates(
        version=event.version, frames=event.frames, through_frames=event.through,
        candidates=[pb.Candidate(class_id=int(class_id), name=vocabulary.name(int(class_id)),
                                 video_score=float(score), scored=bool(scored))
                    for class_id, score, scored in zip(event.class_ids.tolist(), event.scores.tolist(),
                                                       event.scored.tolist(), strict=True)]))


def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, Refusal):
        return error.code, error.message
    if isinstance(error, LiveQueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (LiveEngineClosed, StateFailure, StoreUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


class LiveLocalizationService(LocalizationService):
    """The modloc.v1 API with ``LocalizeLive``."""

    def __init__(self, core: EngineCore | None = None):
        super().__init__(core)
        self.live_streams = 0  # LocalizeLive calls open now
        self.deliveries: Deliveries | None = None  # made on the serving loop

    async def LocalizeLive(self, request_iterator, context):
        await self._loaded(context)
        if self.core.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; "
                                "retry on another server or later")
        if self.core.live is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.core.live_unavailable)
        limit = self.core.config.max_live_streams
        if self.live_streams >= limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"LocalizeLive: {self.live_streams} live streams are open, the "
                                f"server's limit is {limit}")
        self.live_streams += 1
        if self.deliveries is None:
            self.deliveries = Deliveries(asyncio.get_running_loop())
        try:
            async for event in LiveStreamCall(self.core, context, self.deliveries).events(request_iterator):
                yield event
        finally:
            self.live_streams -= 1


__all__ = ["LiveLocalizationService", "LiveStreamCall"]
