"""Clients of the ``modloc.v1.Localization`` service: :class:`LocalizationClient` (blocking)
and :class:`AsyncLocalizationClient` (asyncio).

::

    with LocalizationClient("127.0.0.1:50051") as client:
        for response in client.localize(read_videos("test/*.tfrecord")):
            ...
        acks = client.ingest(read_videos("test/*.tfrecord"))   # retried, idempotent
        client.submission("submission.csv")

Videos larger than one message are sent in pieces (:func:`video_chunks`). Both streams
keep at most ``window`` videos sent and unanswered, reading the input lazily: the server
counts every received video against its server-wide in-flight limit and refuses the ones
past it (RESOURCE_EXHAUSTED), so a window under that limit lets any number of videos through.

``localize_live`` sends one live stream (:func:`replay` paces a recorded video at a chosen
speed) and yields its events as they come: candidate updates, one event per completed
window, and the final localization; :class:`LiveTimer` turns the send times it records into
each window's latency. A broken live stream is not retried: the server applied nothing of
it (re-send the whole stream).

When an ``ingest`` stream breaks (server restarted, connection lost) the client waits up to
``reconnect_timeout`` seconds for the server to accept connections again (else raises the
error that broke the stream), then sends the unacknowledged tail again, in order, then the
rest: the server reports videos it already holds as DUPLICATE and changes nothing, so a
retry never ingests twice and ties keep the order the videos were given. Only what a retry
can cure is retried: UNAVAILABLE (a restart, a lost connection, a drain) and
RESOURCE_EXHAUSTED (a server-wide limit; after a backoff) but not a message over the size
limit; a refusal (INVALID_ARGUMENT, …) or a server fault (INTERNAL, UNKNOWN) is raised.

A video that cannot be read (a missing file, a corrupt record) ends the request stream
where it is: the videos sent before it are still answered, then its error is raised (what
``on_ack`` saw tells how far the ingest got).
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np

from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.features import FEATURE_SIZE, RGB_SIZE, SEGMENT_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.progress import Progress
from modloc.engine.service.config import DEFAULT_MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD

# A broken stream (restart, lost connection, drain) or a server-wide limit is worth another
# try; a refusal or a server fault is not.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
DEFAULT_WINDOW = 32
DEFAULT_RETRIES = 8
DEFAULT_RECONNECT_TIMEOUT = 60.0  # seconds a retry waits for the server to accept connections
BACKOFF_SECONDS = 0.2  # doubled per consecutive failure, capped at MAX_BACKOFF_SECONDS
MAX_BACKOFF_SECONDS = 5.0


def video_chunks(video: Video, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                 ) -> list[pb.VideoChunk]:
    """``video`` as VideoChunks, each message under ``max_message_bytes``; one chunk (with
    ``last``) when it fits, else pieces of whole frames (the first carries
    ``expected_frames``)."""
    features = np.ascontiguousarray(video.features, dtype=np.uint8).reshape(-1, FEATURE_SIZE)
    per_chunk = max(1, (max_message_bytes - MESSAGE_OVERHEAD) // FEATURE_SIZE)
    frames = len(features)
    chunks = []
    for begin in range(0, max(frames, 1), per_chunk):
        part = features[begin: begin + per_chunk]
        chunks.append(pb.VideoChunk(
            video_id=video.id, rgb=part[:, :RGB_SIZE].tobytes(), audio=part[:, RGB_SIZE:].tobytes(),
            expected_frames=frames if begin == 0 and frames > per_chunk else 0,
            continued=begin > 0, last=begin + per_chunk >= frames))
    return chunks


def as_videos(source) -> Iterable[Video]:
    """Videos from TFRecord paths or globs (a str, a path or a list of them) or Video objects."""
    if isinstance(source, (str, os.PathLike)) or (
            isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, os.PathLike))):
        from modloc.engine.base.io.readers import read_videos

        return read_videos(source)
    return source


def _check_window(window: int) -> None:
    if window < 1:
        raise ValueError(f"window={window}: at least 1 video must be allowed unanswered")


# grpc.aio's own report of a send into a stream that broke as it was sending: INTERNAL from
# the client's side, not the server's (the server's status, if any, is lost with the stream).
BROKEN_SEND = "Failed execute_batch"


def retryable(error: grpc.RpcError) -> bool:
    """Whether a failed call may succeed when tried again (:data:`RETRYABLE`; a message over
    a size limit is RESOURCE_EXHAUSTED too, and no retry makes it smaller), or grpc.aio's
    INTERNAL for a send on a broken stream (:data:`BROKEN_SEND`)."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.INTERNAL:
        return details.startswith(BROKEN_SEND)
    return error.code() in RETRYABLE and "larger than max" not in details


class _Source:
    """The caller's videos as chunks, read lazily by the request side of a call.

    gRPC reports an exception raised there only as a bare status (UNKNOWN "Exception
    iterating requests!" from the blocking API, with a traceback in its log; a cancelled
    call from asyncio), which ingest would even retry as a broken stream. So an error
    reading the videos ends the requests instead (the videos before it are answered), is
    kept here, and :meth:`raise_if_failed` raises it to the caller once the call is over.
    """

    def __init__(self, videos, max_message_bytes: int):
        self._videos = iter(as_videos(videos))
        self._max_message_bytes = max_message_bytes
        self.error: Exception | None = None

    def next(self) -> tuple[Video, list[pb.VideoChunk]] | None:
        """The next video and its chunks; None at the end, or when reading failed."""
        if self.error is not None:
            return None
        try:
            video = next(self._videos, None)
            return None if video is None else (video, video_chunks(video, self._max_message_bytes))
        except Exception as error:
            self.error = error
            return None

    def raise_if_failed(self, status: BaseException | None = None) -> None:
        """Raise the exception reading the videos ended with, if any, in place of ``status``
        (how the call ended; None: normally)."""
        if self.error is not None:
            raise self.error from status


def _take_slot(slots: threading.Semaphore, stop: threading.Event) -> bool:
    """Wait for a free place in the window; False once the call is over (``stop``), as
    gRPC's request thread would otherwise wait on the semaphore forever."""
    while not slots.acquire(timeout=0.1):
        if stop.is_set():
            return False
    return not stop.is_set()


def _channel_setup(address: str, token: str | None, tls_ca: str | os.PathLike | None,
                   max_message_bytes: int):
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # a connection of its own: gRPC would otherwise share one among every channel
               # of the process to the same address, and a server allows a connection only
               # --max-connection-streams calls at once (many live streams need many clients)
               ("grpc.use_local_subchannel_pool", 1)]
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    credentials = None
    if tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    return options, metadata, credentials


def _backoff(failures: int) -> float:
    return min(BACKOFF_SECONDS * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)


def replay(features: np.ndarray, chunk_frames: int = 1, speed: float | None = None
           ) -> Iterator[np.ndarray]:
    """A recorded video's ``(M, 1152)`` frames in chunks of ``chunk_frames``, each handed out
    once its last frame would exist in a live stream played at ``speed`` times real time
    (frame ``i`` is captured during second ``i``; None or 0: as fast as they are taken)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if speed is not None and speed < 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    features = np.ascontiguousarray(features, np.uint8).reshape(-1, FEATURE_SIZE)
    started = time.monotonic()
    for begin in range(0, len(features), chunk_frames):
        end = min(begin + chunk_frames, len(features))
        if speed:
            delay = started + end / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield features[begin:end]


class LiveTimer:
    """When each frame of a live stream was sent, for the latency of its window events.

    :meth:`sent` is called by the request side after each message; :meth:`latency` gives a
    window event's seconds from the message that carried the window's last frame.
    """

    def __init__(self):
        self.frames: list[int] = []  # frames sent so far, after each message
        self.times: list[float] = []

    def sent(self, frames: int) -> None:
        self.frames.append(frames)
        self.times.append(time.monotonic())

    def latency(self, window: pb.LiveWindow, received: float | None = None) -> float:
        """Seconds from sending the window's last frame to ``received`` (default: now)."""
        last_frame = window.start_seconds + SEGMENT_FRAMES if not window.partial else self.frames[-1]
        message = int(np.searchsorted(self.frames, last_frame))
        return (time.monotonic() if received is None else received) - self.times[message]


class _LiveMessages:
    """Chunks of a live stream → LiveFrames, one chunk behind: the last message must carry
    ``last``, known only when the chunks end."""

    def __init__(self, stream_id: str, options: pb.LiveOptions, timer: LiveTimer | None):
        self.stream_id, self.options, self.timer = stream_id, options, timer
        self.pending: np.ndarray | None = None
        self.frames = 0
        self.first = True

    def add(self, chunk) -> pb.LiveFrames | None:
        """The message of the chunk before ``chunk`` (None for the first chunk)."""
        message = None if self.pending is None else self._message(last=False)
        self.pending = np.ascontiguousarray(chunk, np.uint8).reshape(-1, FEATURE_SIZE)
        return message

    def finish(self) -> pb.LiveFrames:
        """The last message (empty when the chunks held no frames)."""
        if self.pending is None:
            self.pending = np.zeros((0, FEATURE_SIZE), np.uint8)
        return self._message(last=True)

    def _message(self, last: bool) -> pb.LiveFrames:
        frames = self.pending
        message = pb.LiveFrames(stream_id=self.stream_id if self.first else "",
                                rgb=frames[:, :RGB_SIZE].tobytes(), audio=frames[:, RGB_SIZE:].tobytes(),
                                last=last)
        if self.first:
            message.options.CopyFrom(self.options)
        self.first = False
        self.frames += len(frames)
        return message

    def sent(self) -> None:
        if self.timer is not None:
            self.timer.sent(self.frames)


def live_requests(stream_id: str, chunks: Iterable[np.ndarray], options: pb.LiveOptions,
                  timer: LiveTimer | None = None) -> Iterator[pb.LiveFrames]:
    """``chunks`` of ``(m, 1152)`` uint8 frames as LiveFrames: the first carries the id and
    the options, the last ``last`` (an empty message when the chunks end without frames);
    ``timer`` records when each was handed to gRPC."""
    messages = _LiveMessages(stream_id, options, timer)
    for chunk in chunks:
        message = messages.add(chunk)
        if message is not None:
            yield message
            messages.sent()
    yield messages.finish()
    messages.sent()


class LocalizationClient:
    """A blocking client.

    Args:
        address: ``host:port``.
        token: bearer token sent with every call.
        tls_ca: the CA certificate (PEM) that signed the server's; None: plaintext.
        max_message_bytes: the server's message limit (videos are cut to fit).
        timeout: seconds per call (None: no deadline).
    """

    def __init__(self, address: str, token: str | None = None, tls_ca: str | os.PathLike | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = None):
        options, self.metadata, credentials = _channel_setup(address, token, tls_ca, max_message_bytes)
        self.channel = grpc.secure_channel(address, credentials, options) if credentials else \
            grpc.insecure_channel(address, options)
        self.stub = pb_grpc.LocalizationStub(self.channel)
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout

    def localize(self, videos, threshold: float = 0.0, max_segments: int = 0,
                 window: int = DEFAULT_WINDOW) -> Iterator[pb.LocalizeResponse]:
        """One LocalizeResponse per video (TFRecord paths or globs, or Video objects), in
        completion order (each names its video). At most ``window`` videos are sent and
        unanswered at a time; keep it under the server's in-flight limit."""
        _check_window(window)
        source = _Source(videos, self.max_message_bytes)
        slots = threading.Semaphore(window)
        stop = threading.Event()
        call = self.stub.Localize(
            self._localize_requests(source, slots, stop, threshold, max_segments),
            timeout=self.timeout, metadata=self.metadata)
        try:
            for response in call:
                slots.release()  # a response answers exactly one video
                yield response
            source.raise_if_failed()
        except grpc.RpcError as error:
            source.raise_if_failed(error)
            raise
        finally:
            stop.set()
            call.cancel()
        source.raise_if_failed()

    def _localize_requests(self, source: _Source, slots, stop, threshold: float,
                           max_segments: int) -> Iterator[pb.LocalizeRequest]:
        first = True  # the stream's options travel in its first message only
        while _take_slot(slots, stop) and (item := source.next()) is not None:
            for chunk in item[1]:
                yield pb.LocalizeRequest(video=chunk, threshold=threshold if first else 0.0,
                                         max_segments=max_segments if first else 0)
                first = False

    def ingest(self, videos, window: int = DEFAULT_WINDOW, retries: int = DEFAULT_RETRIES,
               progress: bool | None = False,
               reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
               on_ack: Callable[[pb.IngestAck], None] | None = None) -> list[pb.IngestAck]:
        """Ingest ``videos`` (TFRecord paths or globs, or Video objects) in order; one
        IngestAck per video (DUPLICATE for those the server held before). At most ``window``
        videos are unacknowledged at a time. A broken stream is retried (:func:`retryable`)
        up to ``retries`` times in a row, each retry waiting up to ``reconnect_timeout``
        seconds (None: without bound) for the server to accept connections again, then
        re-sending the unacknowledged tail; when the server does not come back in time, or
        on a refusal (INVALID_ARGUMENT, …), grpc.RpcError is raised (the one that ended the
        stream). An error reading ``videos`` is raised once the videos before it are
        answered. ``on_ack`` is called with each IngestAck as it arrives (so a caller knows
        how far an ingest that raised got: every acknowledged video is durable)."""
        _check_window(window)
        source = _Source(videos, self.max_message_bytes)
        unacked: collections.OrderedDict[str, Video] = collections.OrderedDict()
        lock = threading.Lock()
        acks: list[pb.IngestAck] = []
        failures = 0
        with Progress("ingest", unit="video", enabled=progress) as bar:
            while True:
                stop = threading.Event()
                slots = threading.Semaphore(max(window - len(unacked), 0))
                call = self.stub.Ingest(self._ingest_requests(source, unacked, lock, slots, stop),
                                        timeout=self.timeout, metadata=self.metadata)
                try:
                    for ack in call:
                        with lock:
                            unacked.pop(ack.video_id, None)
                        slots.release()
                        acks.append(ack)
                        if on_ack is not None:
                            on_ack(ack)
                        bar.update(1)
                        failures = 0
                    source.raise_if_failed()
                    return acks
                except grpc.RpcError as error:
                    source.raise_if_failed(error)
                    if not retryable(error) or failures >= retries:
                        raise
                    failures += 1
                    time.sleep(_backoff(failures))
                    if not self._await_server(reconnect_timeout):
                        raise error  # the server is gone for good
                finally:
                    stop.set()
                    call.cancel()

    def _await_server(self, seconds: float | None) -> bool:
        """Wait up to ``seconds`` (None: without bound) for the channel to connect; whether
        it did. (A bounded wait, unlike wait_for_ready, which waits as long as the call's
        deadline, so forever without one.)"""
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=seconds)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()

    def _ingest_requests(self, source: _Source, unacked, lock, slots, stop
                         ) -> Iterator[pb.IngestRequest]:
        with lock:
            tail = list(unacked.values())
        for video in tail:  # what the previous attempt sent without an answer, in order
            for chunk in video_chunks(video, self.max_message_bytes):
                yield pb.IngestRequest(video=chunk)
        while _take_slot(slots, stop) and (item := source.next()) is not None:
            video, chunks = item
            with lock:
                unacked[video.id] = video
            for chunk in chunks:
                yield pb.IngestRequest(video=chunk)

    def localize_live(self, stream_id: str, chunks: Iterable[np.ndarray], threshold: float = 0.0,
                      top_n: int = 0, refresh_frames: int = 0, ingest: bool = False,
                      max_segments: int = 0, timer: LiveTimer | None = None
                      ) -> Iterator[pb.LiveEvent]:
        """One live stream: ``chunks`` of ``(m, 1152)`` uint8 frames (e.g. :func:`replay`) in,
        its LiveEvents out as they come (candidate updates, one event per completed window
        in window order, the final localization last; with ``ingest`` the final event carries
        the IngestAck, sent once durable). ``timer`` records the send times."""
        options = pb.LiveOptions(threshold=threshold, top_n=top_n, refresh_frames=refresh_frames,
                                 ingest=ingest, max_segments=max_segments)
        call = self.stub.LocalizeLive(live_requests(stream_id, chunks, options, timer),
                                      timeout=self.timeout, metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def top_segments(self, class_id: int, k: int, offset: int = 0) -> list[pb.RankedSegment]:
        return list(self.stub.TopSegments(pb.TopSegmentsRequest(class_id=class_id, k=k, offset=offset),
                                          timeout=self.timeout, metadata=self.metadata))

    def submission(self, path: str | os.PathLike | None = None) -> bytes:
        """The Kaggle CSV of the server's rankings (also written to ``path`` when given)."""
        data = b"".join(chunk.csv for chunk in self.stub.Submission(
            pb.SubmissionRequest(), timeout=self.timeout, metadata=self.metadata))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def stats(self) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=self.timeout, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LocalizationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLocalizationClient:
    """The asyncio client (same arguments and semantics as :class:`LocalizationClient`)."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | os.PathLike | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = None):
        options, self.metadata, credentials = _channel_setup(address, token, tls_ca, max_message_bytes)
        self.channel = grpc.aio.secure_channel(address, credentials, options) if credentials else \
            grpc.aio.insecure_channel(address, options)
        self.stub = pb_grpc.LocalizationStub(self.channel)
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout

    async def localize(self, videos, threshold: float = 0.0, max_segments: int = 0,
                       window: int = DEFAULT_WINDOW) -> AsyncIterator[pb.LocalizeResponse]:
        """As :meth:`LocalizationClient.localize`."""
        _check_window(window)
        source = _Source(videos, self.max_message_bytes)
        slots = asyncio.Semaphore(window)
        call = self.stub.Localize(self._localize_requests(source, slots, threshold, max_segments),
                                  timeout=self.timeout, metadata=self.metadata)
        try:
            async for response in call:
                slots.release()  # a response answers exactly one video
                yield response
        except (grpc.RpcError, asyncio.CancelledError) as error:
            source.raise_if_failed(error)  # a failure reading the videos cancels the call
            raise
        finally:
            call.cancel()
        source.raise_if_failed()

    async def _localize_requests(self, source: _Source, slots: asyncio.Semaphore,
                                 threshold: float, max_segments: int
                                 ) -> AsyncIterator[pb.LocalizeRequest]:
        first = True  # the stream's options travel in its first message only
        while True:
            await slots.acquire()  # the window is full until a response releases a slot
            item = source.next()
            if item is None:
                return
            for chunk in item[1]:
                yield pb.LocalizeRequest(video=chunk, threshold=threshold if first else 0.0,
                                         max_segments=max_segments if first else 0)
                first = False

    async def ingest(self, videos, window: int = DEFAULT_WINDOW, retries: int = DEFAULT_RETRIES,
                     reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
                     on_ack: Callable[[pb.IngestAck], None] | None = None
                     ) -> list[pb.IngestAck]:
        """As :meth:`LocalizationClient.ingest`."""
        _check_window(window)
        source = _Source(videos, self.max_message_bytes)
        unacked: collections.OrderedDict[str, Video] = collections.OrderedDict()
        acks: list[pb.IngestAck] = []
        failures = 0
        while True:
            slots = asyncio.Semaphore(max(window - len(unacked), 0))
            requests = self._ingest_requests(list(unacked.values()), source, unacked, slots)
            call = self.stub.Ingest(requests, timeout=self.timeout, metadata=self.metadata)
            try:
                async for ack in call:
                    unacked.pop(ack.video_id, None)
                    slots.release()
                    acks.append(ack)
                    if on_ack is not None:
                        on_ack(ack)
                    failures = 0
                source.raise_if_failed()
                return acks
            except grpc.RpcError as error:
                source.raise_if_failed(error)
                if not retryable(error) or failures >= retries:
                    raise
                failures += 1
                await asyncio.sleep(_backoff(failures))
                if not await self._await_server(reconnect_timeout):
                    raise error  # the server is gone for good
            finally:
                call.cancel()

    async def _await_server(self, seconds: float | None) -> bool:
        """As :meth:`LocalizationClient._await_server`."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _ingest_requests(self, tail, source: _Source, unacked, slots
                               ) -> AsyncIterator[pb.IngestRequest]:
        for video in tail:  # what the previous attempt sent without an answer, in order
            for chunk in video_chunks(video, self.max_message_bytes):
                yield pb.IngestRequest(video=chunk)
        while True:
            await slots.acquire()  # the window is full until an ack releases a slot
            item = source.next()
            if item is None:
                return
            video, chunks = item
            unacked[video.id] = video
            for chunk in chunks:
                yield pb.IngestRequest(video=chunk)

    async def localize_live(self, stream_id: str, chunks, threshold: float = 0.0, top_n: int = 0,
                            refresh_frames: int = 0, ingest: bool = False, max_segments: int = 0,
                            timer: LiveTimer | None = None) -> AsyncIterator[pb.LiveEvent]:
        """As :meth:`LocalizationClient.localize_live`; ``chunks`` may be an async iterable
        (to pace a stream without blocking the loop)."""
        options = pb.LiveOptions(threshold=threshold, top_n=top_n, refresh_frames=refresh_frames,
                                 ingest=ingest, max_segments=max_segments)
        requests = (_async_live_requests(stream_id, chunks, options, timer)
                    if hasattr(chunks, "__aiter__") else live_requests(stream_id, chunks, options, timer))
        call = self.stub.LocalizeLive(requests, timeout=self.timeout, metadata=self.metadata)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def top_segments(self, class_id: int, k: int, offset: int = 0) -> list[pb.RankedSegment]:
        call = self.stub.TopSegments(pb.TopSegmentsRequest(class_id=class_id, k=k, offset=offset),
                                     timeout=self.timeout, metadata=self.metadata)
        return [entry async for entry in call]

    async def submission(self, path: str | os.PathLike | None = None) -> bytes:
        call = self.stub.Submission(pb.SubmissionRequest(), timeout=self.timeout, metadata=self.metadata)
        data = b"".join([chunk.csv async for chunk in call])
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def stats(self) -> pb.StatsResponse:
        return await self.stub.Stats(pb.StatsRequest(), timeout=self.timeout, metadata=self.metadata)

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout,
                                         metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLocalizationClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _async_live_requests(stream_id: str, chunks, options: pb.LiveOptions,
                               timer: LiveTimer | None) -> AsyncIterator[pb.LiveFrames]:
    """:func:`live_requests` over an async iterable of chunks."""
    messages = _LiveMessages(stream_id, options, timer)
    async for chunk in chunks:
        message = messages.add(chunk)
        if message is not None:
            yield message
            messages.sent()
    yield messages.finish()
    messages.sent()


__all__ = ["RETRYABLE", "AsyncLocalizationClient", "LiveTimer", "LocalizationClient", "as_videos",
           "live_requests", "replay", "retryable", "video_chunks"]
