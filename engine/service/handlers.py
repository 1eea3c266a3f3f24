"""The ``modloc.v1.Localization`` servicer (grpc.aio): decode, validate, respond.

Streams (Localize, Ingest) carry videos as :class:`VideoChunk` pieces. Every piece is
checked before anything is kept, and a video reaches the engine only once complete and
valid, so a bad request never half-applies a video: it aborts its stream with a status
naming the request index, the field and the video id, and everything answered before
stays answered (and, for Ingest, durable).

Concurrency within a stream: Localize hands each completed video to the batcher at once
and answers in completion order (each response carries its id). Ingest gathers the videos
that arrive while its previous group is being processed into the next group (at most the
batcher's ``max_batch_videos``), so one fsync covers a group; groups enter the rankings in
the order they were sent (see :meth:`modloc.engine.service.core.EngineCore.ingest`).

Limits (all from :class:`modloc.engine.service.config.ServerConfig`): ``max_streams`` open
Localize/Ingest streams and ``max_inflight_videos`` received-but-unanswered videos
server-wide (RESOURCE_EXHAUSTED beyond), ``max_frames`` per video (OUT_OF_RANGE),
``max_id_bytes`` per id; the message size limit is gRPC's own (RESOURCE_EXHAUSTED).

Backpressure: a video counts as unanswered until its response has been handed to the
transport (gRPC's send completes only while the peer's flow-control window has room), not
when the response is built; and a stream stops reading requests while
``max_stream_videos`` of its videos are unanswered, so HTTP/2 flow control holds its client
back. A client that never reads its responses therefore holds at most
``max_stream_videos`` videos (their responses, once localized) plus gRPC's buffers of its
stream, whatever it sends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import unicodedata
from collections.abc import AsyncIterator

import grpc
import numpy as np

from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.features import AUDIO_SIZE, FEATURE_SIZE, RGB_SIZE
from modloc.engine.base.io.examples import Video
from modloc.engine.base.submission import check_rankable_id
from modloc.engine.runtime.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from modloc.engine.runtime.pipeline import VideoLocalization
from modloc.engine.runtime.ranking_stores import StoreUnavailable
from modloc.engine.service.core import (
    EngineCore,
    InflightLimit,
    NoRankings,
    StateFailure,
    log_event,
)
from modloc.engine.service.decoding import UndecodableRequest

log = logging.getLogger("modloc.server")

SUBMISSION_PIECE_BYTES = 1 << 20  # CSV bytes per SubmissionChunk (well under any message limit)


class Refusal(Exception):
    """A request the service refuses: the stream ends with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _where(index: int, video_id: str | None) -> str:
    return f"request {index}" + (f" (video {video_id!r})" if video_id else "")


def check_video_id(video_id: str, max_bytes: int, index: int, for_rankings: bool) -> None:
    """Refuse an id that is empty, too long, whitespace-only or holds control characters;
    ids bound for the rankings must also follow the rankable id rule
    (:func:`~modloc.engine.base.submission.check_rankable_id`)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if not video_id:
        raise Refusal(invalid, f"request {index}: video.video_id is empty")
    size = len(video_id.encode("utf-8"))
    if size > max_bytes:
        raise Refusal(invalid, f"request {index}: video.video_id is {size} bytes of UTF-8, more "
                      f"than the limit of {max_bytes} (starts {video_id[:32]!r})")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in video_id):
        raise Refusal(invalid, f"{_where(index, video_id)}: video.video_id holds a control character")
    if not video_id.strip():
        raise Refusal(invalid, f"{_where(index, video_id)}: video.video_id is only whitespace")
    if for_rankings:
        try:
            check_rankable_id(video_id, f"{_where(index, video_id)}: video.video_id: ")
        except ValueError as error:
            raise Refusal(invalid, str(error)) from None


def frame_count(rgb: bytes, audio: bytes, where: str, prefix: str = "") -> int:
    """Frames of a message's ``rgb`` and ``audio`` codes; a Refusal naming ``where`` and the
    fields (``prefix`` + ``rgb``/``audio``) unless both hold whole, equally many frames."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if len(rgb) % RGB_SIZE:
        raise Refusal(invalid, f"{where}: {prefix}rgb holds {len(rgb)} bytes, not a multiple of "
                      f"{RGB_SIZE} (one frame's RGB codes)")
    if len(audio) % AUDIO_SIZE:
        raise Refusal(invalid, f"{where}: {prefix}audio holds {len(audio)} bytes, not a multiple "
                      f"of {AUDIO_SIZE} (one frame's audio codes)")
    frames = len(rgb) // RGB_SIZE
    if len(audio) // AUDIO_SIZE != frames:
        raise Refusal(invalid, f"{where}: {prefix}rgb holds {frames} frames but {prefix}audio "
                      f"{len(audio) // AUDIO_SIZE}")
    return frames


class VideoAssembler:
    """One stream's pieces → complete :class:`Video` objects, every piece checked first.

    Args:
        max_frames: frames a video may have.
        max_id_bytes: UTF-8 bytes of an id.
        for_rankings: ids must fit Kaggle segment ids (Ingest).
        unique: refuse an id seen before in this stream (Localize: responses are matched
            by id; Ingest reports repeats as DUPLICATE instead).
    """

    def __init__(self, max_frames: int, max_id_bytes: int, for_rankings: bool, unique: bool):
        self.max_frames = max_frames
        self.max_id_bytes = max_id_bytes
        self.for_rankings = for_rankings
        self.unique = unique
        self.seen: set[str] = set()
        self._open_id: str | None = None
        self._expected = 0
        self._frames = 0
        self._rgb: list[bytes] = []
        self._audio: list[bytes] = []

    def feed(self, chunk: pb.VideoChunk, index: int) -> Video | None:
        """Take request ``index``'s piece; the completed video when it has ``last``.

        Raises Refusal (nothing of the piece kept) for any problem.
        """
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        video_id = chunk.video_id
        where = _where(index, video_id)
        if chunk.continued:
            if self._open_id is None:
                raise Refusal(invalid, f"{where}: video.continued is set but no video is open in "
                              "this stream")
            if video_id != self._open_id:
                raise Refusal(invalid, f"{where}: video.continued piece names another video than "
                              f"the open one, {self._open_id!r}")
            if chunk.expected_frames not in (0, self._expected):
                raise Refusal(invalid, f"{where}: video.expected_frames={chunk.expected_frames} "
                              f"differs from the first piece's {self._expected}")
        else:
            if self._open_id is not None:
                raise Refusal(invalid, f"{where}: video {self._open_id!r} is still open (its last "
                              "piece has not come); set video.continued to continue it or "
                              "video.last to end it")
            check_video_id(video_id, self.max_id_bytes, index, self.for_rankings)
            if self.unique and video_id in self.seen:
                raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                              f"{where}: video.video_id was already sent in this stream")
            if chunk.expected_frames > self.max_frames:
                raise Refusal(grpc.StatusCode.OUT_OF_RANGE,
                              f"{where}: video.expected_frames={chunk.expected_frames} is more "
                              f"than the limit of {self.max_frames} frames")
        frames = frame_count(chunk.rgb, chunk.audio, where, "video.")
        total = (self._frames if chunk.continued else 0) + frames
        if total > self.max_frames:
            raise Refusal(grpc.StatusCode.OUT_OF_RANGE,
                          f"{where}: the video has {total} frames so far, more than the limit "
                          f"of {self.max_frames}")
        expected = self._expected if chunk.continued else chunk.expected_frames
        if chunk.last:
            if total == 0:
                raise Refusal(invalid, f"{where}: the video has no frames (video.rgb and "
                              "video.audio are empty)")
            if expected and total != expected:
                raise Refusal(invalid, f"{where}: the video has {total} frames but "
                              f"video.expected_frames said {expected}")
        elif expected and total > expected:
            raise Refusal(invalid, f"{where}: the video has {total} frames so far, more than "
                          f"video.expected_frames={expected}")
        # Valid: keep the piece.
        if not chunk.continued:
            self._open_id, self._expected, self._frames = video_id, expected, 0
            self._rgb, self._audio = [], []
            if self.unique:
                self.seen.add(video_id)
        self._frames = total
        self._rgb.append(chunk.rgb)
        self._audio.append(chunk.audio)
        if not chunk.last:
            return None
        video = Video(video_id, interleave(b"".join(self._rgb), b"".join(self._audio)))
        self._open_id, self._rgb, self._audio = None, [], []
        return video

    def finish(self, index: int) -> None:
        """The stream ended after ``index`` requests: refuse a video left open."""
        if self._open_id is not None:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request {index}: the stream ended while video {self._open_id!r} was "
                          "open (its last piece never came)")


def interleave(rgb: bytes, audio: bytes) -> np.ndarray:
    """``(M, 1152)`` uint8 features from frame-major ``M×1024`` RGB and ``M×128`` audio bytes."""
    frames = len(rgb) // RGB_SIZE
    features = np.empty((frames, FEATURE_SIZE), np.uint8)
    features[:, :RGB_SIZE] = np.frombuffer(rgb, np.uint8).reshape(frames, RGB_SIZE)
    features[:, RGB_SIZE:] = np.frombuffer(audio, np.uint8).reshape(frames, AUDIO_SIZE)
    return features


def localize_response(result: VideoLocalization, vocabulary, threshold: float,
                      max_segments: int, include_partial: bool) -> pb.LocalizeResponse:
    """A video's candidates with their segments above ``threshold`` (``max_segments`` per
    candidate, 0 = all)."""
    response = pb.LocalizeResponse(video_id=result.video_id, num_frames=result.num_frames)
    for column, class_id in enumerate(result.candidate_ids.tolist()):
        scored = bool(len(result.fused)) and not math.isnan(result.fused[0, column])
        segments = result.segments(class_id, threshold, include_partial) if scored else []
        if max_segments:
            segments = segments[:max_segments]
        response.candidates.add(
            class_id=class_id, name=vocabulary.name(class_id),
            video_score=float(result.candidate_scores[column]), scored=scored,
            segments=[pb.Segment(start_seconds=start, score=score) for start, score in segments])
    return response


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a core error answers with."""
    if isinstance(error, Refusal):
        return error.code, error.message
    if isinstance(error, UndecodableRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, (QueueFull, InflightLimit)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, BatcherClosed):
        return grpc.StatusCode.UNAVAILABLE, f"{error}; retry on another server or later"
    if isinstance(error, (StateFailure, StoreUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, NoRankings):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    log.error("event=internal_error error=%r", error, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


_END = object()


class _Stream:
    """One Localize or Ingest call: a reader task feeding work tasks, an outbox of answers."""

    def __init__(self, core: EngineCore, context, ingest: bool):
        self.core = core
        self.context = context
        self.ingest = ingest
        config = core.config
        self.assembler = VideoAssembler(config.max_frames, config.max_id_bytes,
                                        for_rankings=ingest, unique=not ingest)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.admitted = 0  # videos of this stream counted in core.inflight: not yet delivered
        self.room = asyncio.Event()  # set while admitted < max_stream_videos
        self.room.set()
        self.pending: list[Video] = []  # Ingest: videos waiting for the next group
        self.last_group: asyncio.Task | None = None
        self.reading = True
        self.threshold = 0.0
        self.max_segments = 0
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining

    async def answers(self, requests) -> AsyncIterator:
        """Responses as they complete; aborts the call on the first error."""
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while (item := await self.outbox.get()) is not _END:
                if isinstance(item, BaseException):
                    code, message = _status_of(item)
                    log_event("stream_refused", rpc="Ingest" if self.ingest else "Localize",
                              code=code.name, message=message)
                    await self.context.abort(code, message)
                yield item
                # gRPC asks for the next response once this one was handed to the transport:
                # only now is its video answered (every response answers one video)
                self._answered(1)
        finally:
            reader.cancel()
            for task in self.tasks:
                task.cancel()
            self.core.release(self.admitted)
            self.admitted = 0

    async def _read(self, requests) -> None:
        index = 0
        limit = self.core.config.max_stream_videos
        try:
            async for request in requests:
                if index == 0 and not self.ingest:
                    self._options(request)
                if not request.HasField("video"):
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"request {index}: the video "
                                  "field is missing")
                video = self.assembler.feed(request.video, index)
                index += 1
                if video is not None:
                    self.core.admit(1, "Ingest" if self.ingest else "Localize")
                    self.admitted += 1
                    if self.admitted >= limit:
                        self.room.clear()
                    if self.ingest:
                        self.pending.append(video)
                        self._dispatch()
                    else:
                        self._start(self._localize(video))
                    # stop reading (flow control holds the client back) until an answer is delivered
                    await self.room.wait()
            self.assembler.finish(index)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream ends with its status
            self.outbox.put_nowait(error)
            return
        self.reading = False
        self._dispatch()
        self._maybe_end()

    def _options(self, request: pb.LocalizeRequest) -> None:
        if not (math.isfinite(request.threshold) and 0.0 <= request.threshold <= 1.0):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"request 0: threshold="
                          f"{request.threshold} is not a number in [0, 1] (fused scores are)")
        self.threshold = request.threshold
        self.max_segments = request.max_segments

    def _start(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the outbox carries it (a later group awaits it too)
        if self.ingest:
            self._dispatch()
        self._maybe_end()

    def _maybe_end(self) -> None:
        if not self.reading and not self.tasks and not self.pending:
            self.outbox.put_nowait(_END)

    def _answered(self, videos: int) -> None:
        self.admitted -= videos
        self.core.release(videos)
        if self.admitted < self.core.config.max_stream_videos:
            self.room.set()

    async def _localize(self, video: Video) -> None:
        try:
            [result] = await self.core.localize([video], self.deadline)
        except Exception as error:
            self.outbox.put_nowait(error)
            return
        include_partial = self.core.config.pipeline.fusion.include_partial
        self.outbox.put_nowait(localize_response(result, self.core.vocabulary, self.threshold,
                                                 self.max_segments, include_partial))

    def _dispatch(self) -> None:
        """Send the waiting videos as one group once the previous group is done (or a
        batch's worth is waiting); the group chain keeps the stream's order."""
        if not self.pending:
            return
        busy = self.last_group is not None and not self.last_group.done()
        cap = self.core.config.batcher.max_batch_videos
        if busy and len(self.pending) < cap:
            return
        group, self.pending = self.pending[:cap], self.pending[cap:]
        self.last_group = asyncio.get_running_loop().create_task(
            self._ingest_group(group, self.last_group))
        self.tasks.add(self.last_group)
        self.last_group.add_done_callback(self._finished)

    async def _ingest_group(self, group: list[Video], after: asyncio.Task | None) -> None:
        try:
            outcomes = await self.core.ingest(group, self.deadline, after)
        except Exception as error:
            self.outbox.put_nowait(error)
            raise  # a later group waiting on this one must not go ahead of it
        for outcome in outcomes:
            self.outbox.put_nowait(pb.IngestAck(
                video_id=outcome.video_id, sequence=outcome.sequence,
                status=pb.IngestAck.DUPLICATE if outcome.duplicate else pb.IngestAck.INGESTED))


class LocalizationService(pb_grpc.LocalizationServicer):
    """The modloc.v1 API over an :class:`EngineCore`."""

    def __init__(self, core: EngineCore | None = None):
        self.core = core  # None while the server loads its models
        self.active_streams = 0  # Localize and Ingest streams open now

    async def _loaded(self, context) -> None:
        if self.core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is loading its models; "
                                "retry when its health reports SERVING")

    async def _enter(self, context, rpc: str) -> None:
        await self._loaded(context)
        if self.core.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; "
                                "retry on another server or later")
        limit = self.core.config.max_streams
        if self.active_streams >= limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{rpc}: {self.active_streams} streams are open, the "
                                f"server's limit is {limit}")
        self.active_streams += 1

    async def _stream(self, requests, context, ingest: bool):
        rpc = "Ingest" if ingest else "Localize"
        await self._enter(context, rpc)
        try:
            async for answer in _Stream(self.core, context, ingest).answers(requests):
                yield answer
        finally:
            self.active_streams -= 1

    async def Localize(self, request_iterator, context):
        async for answer in self._stream(request_iterator, context, ingest=False):
            yield answer

    async def Ingest(self, request_iterator, context):
        await self._loaded(context)
        if self.core.rankings is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server keeps no rankings (start it with a state directory or --rankings)")
        async for answer in self._stream(request_iterator, context, ingest=True):
            yield answer

    async def TopSegments(self, request, context):
        await self._loaded(context)
        k, offset = request.k, request.offset
        limit = self.core.config.top_k_limit
        if not 1 <= k <= limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"k={k} is outside 1..{limit} (the server's TopSegments limit)")
        try:
            # in a thread: shared rankings are a network call away (Localize must not wait)
            entries = await asyncio.to_thread(self.core.ranking, request.class_id, k, offset)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"class_id={request.class_id} is not one of the "
                                f"{len(self.core.localizer.rankings.class_ids)} ranked classes")
        except IndexError as error:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(error))
        except NoRankings as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except (StateFailure, StoreUnavailable) as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        for rank, (video_id, start, score) in enumerate(entries, start=offset):
            yield pb.RankedSegment(rank=rank, video_id=video_id, start_seconds=start, score=score)

    async def Submission(self, request, context):
        await self._loaded(context)
        try:
            text = await asyncio.to_thread(self.core.submission_csv)
        except NoRankings as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except (StateFailure, StoreUnavailable) as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        data = text.encode("utf-8")
        for begin in range(0, len(data), SUBMISSION_PIECE_BYTES):
            yield pb.SubmissionChunk(csv=data[begin: begin + SUBMISSION_PIECE_BYTES])

    async def Stats(self, request, context):
        await self._loaded(context)
        stats = self.core.stats()
        ranked_videos = await asyncio.to_thread(lambda: self.core.ranked_videos)
        return pb.StatsResponse(
            videos_localized=stats["videos_localized"], videos_ingested=stats["videos_ingested"],
            windows_scored=stats["windows_scored"], duplicates=stats["duplicates"],
            queue_depth=stats["queue_depth"], active_streams=self.active_streams,
            stages=[pb.StageLatency(stage=name, total_seconds=seconds)
                    for name, seconds in stats["stages"].items()],
            batch_sizes=stats["batch_sizes"], uptime_seconds=stats["uptime_seconds"],
            process_id=os.getpid(), inflight_videos=stats["inflight_videos"],
            ranked_videos=ranked_videos)

    async def ModelInfo(self, request, context):
        await self._loaded(context)
        return pb.ModelInfoResponse(**self.core.model_info())


__all__ = ["LocalizationService", "Refusal", "VideoAssembler", "check_video_id", "interleave",
           "localize_response"]
