"""Clients of the ``modloc.v1.Localization`` service: :class:`LocalizationClient` (blocking)
and :class:`AsyncLocalizationClient` (asyncio).

::

    with LocalizationClient("127.0.0.1:50051") as client:
        for response in client.localize(read_videos("test/*.tfrecord")):
            ...
        acks = client.ingest(read_videos("test/*.tfrecord"))   # retried, idempotent
        client.submission("submission.csv")

Videos larger than one message are sent in pieces (:func:`video_chunks`). ``ingest`` keeps
at most ``window`` videos unacknowledged; when the stream breaks (server restarted,
connection lost) it reconnects and sends the unacknowledged tail again, in order, then the
rest: the server reports videos it already holds as DUPLICATE and changes nothing, so a
retry never ingests twice and ties keep the order the videos were given.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from engine._proto.modloc.v1 import localization_pb2 as pb
from engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from engine.features import FEATURE_SIZE, RGB_SIZE
from engine.io.examples import Video
from engine.server.config import DEFAULT_MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD

# A broken stream (restart, lost connection) is worth another try; a refusal is not.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
DEFAULT_WINDOW = 32
DEFAULT_RETRIES = 8
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
        from engine.io.readers import read_videos

        return read_videos(source)
    return source


def _channel_setup(address: str, token: str | None, tls_ca: str | os.PathLike | None,
                   max_message_bytes: int):
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    credentials = None
    if tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    return options, metadata, credentials


def _backoff(failures: int) -> float:
    return min(BACKOFF_SECONDS * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)


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

    def localize(self, videos, threshold: float = 0.0, max_segments: int = 0
                 ) -> Iterator[pb.LocalizeResponse]:
        """One LocalizeResponse per video, in completion order (each names its video)."""
        def requests():
            first = True
            for video in as_videos(videos):
                for chunk in video_chunks(video, self.max_message_bytes):
                    yield pb.LocalizeRequest(video=chunk, threshold=threshold if first else 0.0,
                                             max_segments=max_segments if first else 0)
                    first = False

        yield from self.stub.Localize(requests(), timeout=self.timeout, metadata=self.metadata)

    def ingest(self, videos, window: int = DEFAULT_WINDOW, retries: int = DEFAULT_RETRIES,
               progress: bool | None = False) -> list[pb.IngestAck]:
        """Ingest ``videos`` in order; one IngestAck per video (DUPLICATE for those the
        server held before). A broken stream is retried up to ``retries`` times in a row,
        re-sending the unacknowledged tail; a refusal (INVALID_ARGUMENT, …) raises
        grpc.RpcError at once."""
        source = iter(as_videos(videos))
        unacked: collections.OrderedDict[str, Video] = collections.OrderedDict()
        lock = threading.Lock()
        acks: list[pb.IngestAck] = []
        failures = 0
        with tqdm(unit="video", desc="ingest", disable=not progress if progress is not None else None) as bar:
            while True:
                stop = threading.Event()
                slots = threading.Semaphore(max(window - len(unacked), 0))
                call = self.stub.Ingest(self._ingest_requests(source, unacked, lock, slots, stop),
                                        timeout=self.timeout, metadata=self.metadata,
                                        wait_for_ready=failures > 0)
                try:
                    for ack in call:
                        with lock:
                            unacked.pop(ack.video_id, None)
                        slots.release()
                        acks.append(ack)
                        bar.update(1)
                        failures = 0
                    return acks
                except grpc.RpcError as error:
                    if error.code() not in RETRYABLE or failures >= retries:
                        raise
                    failures += 1
                    time.sleep(_backoff(failures))
                finally:
                    stop.set()
                    call.cancel()

    def _ingest_requests(self, source, unacked, lock, slots, stop) -> Iterator[pb.IngestRequest]:
        with lock:
            tail = list(unacked.values())
        for video in tail:  # what the previous attempt sent without an answer, in order
            for chunk in video_chunks(video, self.max_message_bytes):
                yield pb.IngestRequest(video=chunk)
        while True:
            while not slots.acquire(timeout=0.1):  # the window is full: wait for acks
                if stop.is_set():
                    return
            if stop.is_set():
                return
            video = next(source, None)
            if video is None:
                return
            with lock:
                unacked[video.id] = video
            for chunk in video_chunks(video, self.max_message_bytes):
                yield pb.IngestRequest(video=chunk)

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

    async def localize(self, videos: Iterable[Video], threshold: float = 0.0,
                       max_segments: int = 0) -> AsyncIterator[pb.LocalizeResponse]:
        requests = [pb.LocalizeRequest(video=chunk) for video in videos
                    for chunk in video_chunks(video, self.max_message_bytes)]
        if requests:
            requests[0].threshold, requests[0].max_segments = threshold, max_segments
        async for response in self.stub.Localize(iter(requests), timeout=self.timeout,
                                                 metadata=self.metadata):
            yield response

    async def ingest(self, videos: Iterable[Video], window: int = DEFAULT_WINDOW,
                     retries: int = DEFAULT_RETRIES) -> list[pb.IngestAck]:
        """As :meth:`LocalizationClient.ingest`."""
        source = iter(videos)
        unacked: collections.OrderedDict[str, Video] = collections.OrderedDict()
        acks: list[pb.IngestAck] = []
        failures = 0
        while True:
            slots = asyncio.Semaphore(max(window - len(unacked), 0))

            requests = self._ingest_requests(list(unacked.values()), source, unacked, slots)
            call = self.stub.Ingest(requests, timeout=self.timeout, metadata=self.metadata,
                                    wait_for_ready=failures > 0)
            try:
                async for ack in call:
                    unacked.pop(ack.video_id, None)
                    slots.release()
                    acks.append(ack)
                    failures = 0
                return acks
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or failures >= retries:
                    raise
                failures += 1
                await asyncio.sleep(_backoff(failures))
            finally:
                call.cancel()

    async def _ingest_requests(self, tail, source, unacked, slots) -> AsyncIterator[pb.IngestRequest]:
        for video in tail:  # what the previous attempt sent without an answer, in order
            for chunk in video_chunks(video, self.max_message_bytes):
                yield pb.IngestRequest(video=chunk)
        while True:
            await slots.acquire()  # the window is full until an ack releases a slot
            video = next(source, None)
            if video is None:
                return
            unacked[video.id] = video
            for chunk in video_chunks(video, self.max_message_bytes):
                yield pb.IngestRequest(video=chunk)

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


__all__ = ["AsyncLocalizationClient", "LocalizationClient", "as_videos", "video_chunks"]
