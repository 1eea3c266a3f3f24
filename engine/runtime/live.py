"""Live localization: each 5-second window scored as its frames arrive, from running sums.

Why it can be exact. In eval mode a NeXtVLAD leaf's aggregation is a sum over frames of
per-frame terms: for frame ``i`` the expansion ``ẋ_i``, the group attention ``att_ig``
(times the frame's mask), the cluster assignment ``α_igk`` (its BatchNorm is a fixed
affine map in eval mode) and the residual ``x̃_igj − c_jk``; the unnormalized descriptor is
``Σ_i Σ_g att_ig · α_igk · (x̃_igj − c_jk)``. Everything after it (the intra-normalization
over ``j``, the BatchNorms, the hidden layer, the context gating, the classifier) reads only
those sums. A tree's gates read the reference's frame mean, ``Σ_real c / max(n, 300)`` on
centered codes (:func:`modloc.training.models.reference_gate_input`): a sum and a count.
So the video model splits into an **encoder** (frames + mask → the sums of those frames)
and a **head** (sums → probabilities), and the encoder's outputs add up over any split of
a video's frames: a stream keeps running sums, each frame costs what it costs offline, and
the candidates can be refreshed at any moment for the cost of the head. What does not add
up stays in the head: the L2 intra-normalization and everything after it. (In training, the
cluster BatchNorm's batch statistics mix frames, which is why only eval mode splits.)
:mod:`modloc.export.live` builds both graphs and checks encoder + head against the
one-piece graph; the manifest's ``live`` record names them (:mod:`modloc.engine.runtime.artifacts`).

The engine. A :class:`LiveStream` holds one stream's state: up to 4 frames of its open
window, its sums in blocks of ``block_frames`` frames, the segment scores of its recent
windows (to re-fuse them when the stream ends) and its current candidates. The
:class:`LiveEngine`'s one worker thread takes the completed windows of every stream in
large batches: the encoder and the segment model score them in one call each, the head
refreshes the candidates of the streams that are due (every ``refresh_frames`` frames, at
the first window, and at the end), and each window is fused with its stream's candidates
of that moment, ``P_vid^a · P_seg^b``, into one :class:`WindowEvent`, in window order. At
the end of a stream the final candidates re-fuse every kept window into a
:class:`~modloc.engine.runtime.pipeline.VideoLocalization`: for a stream of at most 300
frames it is what ``Localize`` returns for the whole video (the same windows, the same
segment scores; candidates from the same sums).

Streams longer than 300 frames. The video model reads 300 frames (the reference crops to
them). A stream keeps its sums in blocks of ``block_frames`` frames and drops the oldest
block once the kept frames would pass ``horizon_frames`` (300): the candidates always come
from the latest ``horizon - block + 1`` to ``horizon`` frames (241-300 by default), and the
final localization covers the windows of the last ``horizon`` frames (earlier windows had
their events). Memory per stream is therefore bounded:
``(horizon / block + 1) · S · 4`` bytes of sums, ``horizon / 5 · C_seg · 4`` bytes of window
scores, and 4 frames of 1152 bytes (:func:`stream_bound_bytes`).

Pure numpy and the models' runners; no torch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES, SEGMENT_FRAMES
from modloc.engine.base.vocab import ClassSpace
from modloc.engine.runtime.artifacts import Artifact, ArtifactError, TensorSpec
from modloc.engine.runtime.fusion import FusionConfig, top_candidates
from modloc.engine.runtime.pipeline import ScoringModel, VideoLocalization, fuse_windows

log = logging.getLogger(__name__)


class LiveQueueFull(RuntimeError):
    """The engine holds ``max_queued_windows`` windows already."""


class LiveEngineClosed(RuntimeError):
    """The engine no longer accepts work."""


# --- the video model's two graphs ----------------------------------------------------------


class LiveVideoModel:
    """An artifact's live graphs on ONNX Runtime (the manifest's ``live`` record).

    ``encode``: ``(W, M, 1152)`` uint8 frames + ``(W,)`` valid frames → ``(W, S)`` float32
    sums (the last column counts the frames); ``head``: ``(B, S)`` sums → ``(B, C)``
    probabilities. Both sessions are thread-safe.

    Args:
        artifact: a video-level artifact exported with live graphs.
        threads: intra-op threads of each session (None: ONNX Runtime's default).
        session_config: session configuration entries (default: idle threads do not spin,
            as the live engine shares the cores with the offline pipeline).
    """

    def __init__(self, artifact: Artifact, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        record = artifact.manifest.get("live")
        if artifact.kind != "video" or not record:
            raise ArtifactError(f"{artifact.path}: no live graphs (a {artifact.kind}-level "
                                f"{artifact.graph}-{artifact.precision} artifact; live localization "
                                "needs a video-level fp32 artifact from modloc export)")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {"session.intra_op.allow_spinning": "0"}).items():
            options.add_session_config_entry(key, value)
        self.artifact = artifact
        self.class_ids = artifact.class_ids
        self.sums_size = int(record["sums"]["size"])
        self.sessions = {}
        for part in ("encoder", "head"):
            graph = record[part]
            session = onnxruntime.InferenceSession(str(artifact.path / graph["file"]), options,
                                                   providers=["CPUExecutionProvider"])
            for role, nodes in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
                expected = [TensorSpec.from_json(spec) for spec in graph[role]]
                actual = [TensorSpec(node.name, _ORT_TYPES.get(node.type, node.type), tuple(node.shape))
                          for node in nodes]
                if [(s.name, s.dtype) for s in actual] != [(s.name, s.dtype) for s in expected]:
                    raise ArtifactError(
                        f"{artifact.path}: the live {part}'s {role} "
                        f"{[s.describe() for s in actual]} differ from the manifest's "
                        f"{[s.describe() for s in expected]}")
            self.sessions[part] = session

    def encode(self, features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        """``(W, M, 1152)`` uint8, ``(W,)`` → ``(W, S)`` float32 sums."""
        frames = features.shape[1]
        mask = (np.arange(frames)[None, :] < np.asarray(num_frames)[:, None]).astype(np.float32)
        return self.sessions["encoder"].run(["sums"], {"features": features, "mask": mask})[0]

    def head(self, sums: np.ndarray) -> np.ndarray:
        """``(B, S)`` float32 sums → ``(B, C)`` float32 probabilities."""
        return self.sessions["head"].run(["probabilities"], {"sums": np.ascontiguousarray(sums)})[0]

    def close(self) -> None:
        self.sessions = {}


_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


# --- one stream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveConfig:
    """The live engine's settings.

    Attributes:
        refresh_frames: a stream's candidates are refreshed at its first window and then at
            the first window that ends at least this many frames after the last refresh
            (5: every window), and at the end (1 frame = 1 second of video).
        horizon_frames: the candidates come from at most this many latest frames.
        block_frames: sums are kept in blocks of this many frames (a multiple of 5 that
            divides ``horizon_frames``); the oldest block goes once the kept frames would
            pass the horizon.
        max_batch_windows: windows per model call.
        max_wait: seconds the oldest waiting window may wait for company.
        max_queued_windows: windows waiting at once, server-wide; beyond it a push is refused.
    """

    refresh_frames: int = 5
    horizon_frames: int = MAX_FRAMES
    block_frames: int = 60
    max_batch_windows: int = 512
    max_wait: float = 0.002
    max_queued_windows: int = 16384

    def __post_init__(self):
        for name in ("refresh_frames", "horizon_frames", "block_frames", "max_batch_windows",
                     "max_queued_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_frames % SEGMENT_FRAMES or self.horizon_frames % self.block_frames:
            raise ValueError(f"block_frames ({self.block_frames}) must be a multiple of "
                             f"{SEGMENT_FRAMES} that divides horizon_frames ({self.horizon_frames})")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {self.max_wait}")


@dataclass(frozen=True)
class StreamOptions:
    """What one stream asks for.

    Attributes:
        threshold: a window event carries the candidates whose fused score is above it.
        top_n: at most this many of them, best first (0: all).
        refresh_frames: the stream's candidate cadence (None: the engine's).
    """

    threshold: float = 0.0
    top_n: int = 0
    refresh_frames: int | None = None


@dataclass(frozen=True)
class CandidateUpdate:
    """New candidates: ``version`` counts the refreshes from 1; ``frames`` is how many of the
    stream's frames they come from (at most the horizon), ``through`` the stream's frames
    so far."""

    version: int
    frames: int
    through: int
    class_ids: np.ndarray
    scores: np.ndarray
    scored: np.ndarray


@dataclass(frozen=True)
class WindowEvent:
    """One completed window fused with the candidates of ``version``: ``(class id, fused
    score)`` pairs above the threshold, best first (ties: the better candidate first)."""

    start: int
    partial: bool
    version: int
    scores: list[tuple[int, float]]
    completed: float  # time.monotonic() when its last frame was pushed


@dataclass(frozen=True)
class StreamEnd:
    """The stream's final localization (its kept windows, fused with the final candidates)."""

    localization: VideoLocalization


LiveEventType = CandidateUpdate | WindowEvent | StreamEnd


class LiveStream:
    """One live stream's state (module doc). Frames are pushed from one thread (the stream's
    handler); the engine's worker owns everything past the open window."""

    def __init__(self, stream_id: str, options: StreamOptions, engine: LiveEngine,
                 on_events: Callable[[list[LiveEventType]], None],
                 on_error: Callable[[BaseException], None]):
        self.id = stream_id
        self.options = options
        self.engine = engine
        self.on_events = on_events
        self.on_error = on_error
        self.frames = 0  # frames pushed (the handler's count)
        self._open = np.zeros((SEGMENT_FRAMES, FEATURE_SIZE), np.uint8)
        self._open_frames = 0
        self.ended = False
        # the worker's part
        config = engine.config
        self.refresh_frames = options.refresh_frames or config.refresh_frames
        self.blocks: collections.deque[np.ndarray] = collections.deque()  # closed blocks' sums
        self.block: np.ndarray | None = None  # the open block's sums
        self.block_frames = 0
        self.windows: collections.deque[tuple[int, bool, np.ndarray]] = collections.deque(
            maxlen=config.horizon_frames // SEGMENT_FRAMES)
        self.processed = 0  # frames the worker has added to the sums
        self.refreshed_at = -1
        self.version = 0
        self.candidate_ids = np.zeros(0, np.int64)
        self.candidate_scores = np.zeros(0, np.float64)
        self.video_scores = np.zeros(0, np.float32)

    # --- the handler's side -------------------------------------------------------------

    def push(self, features: np.ndarray, last: bool = False) -> None:
        """Append ``(m, 1152)`` uint8 frames (any ``m >= 0``); ``last`` ends the stream (its
        partial last window, if any, is scored too). Raises LiveQueueFull (nothing kept)."""
        if self.ended:
            raise ValueError(f"stream {self.id!r} has ended")
        features = np.asarray(features, np.uint8).reshape(-1, FEATURE_SIZE)
        if last and self.frames + len(features) == 0:
            raise ValueError(f"stream {self.id!r} ended without frames")
        windows: list[tuple[np.ndarray, int, int]] = []  # (5 frames, valid, start)
        start = self.frames - self._open_frames
        buffer, filled = self._open.copy(), self._open_frames
        for frame in features:
            buffer[filled] = frame
            filled += 1
            if filled == SEGMENT_FRAMES:
                windows.append((buffer, SEGMENT_FRAMES, start))
                buffer, filled, start = np.zeros_like(buffer), 0, start + SEGMENT_FRAMES
        if last and filled:
            buffer[filled:] = 0
            windows.append((buffer, filled, start))
        self.engine.submit(self, windows, last)  # raises before anything changes
        self._open, self._open_frames = buffer, (0 if last else filled)
        self.frames += len(features)
        self.ended = last

    # --- the worker's side --------------------------------------------------------------

    def add_sums(self, sums: np.ndarray, frames: int) -> None:
        """Add a window's sums; closes the open block when it is full and drops the oldest
        block once the kept frames would pass the horizon."""
        config = self.engine.config
        if self.block is None:
            self.block = sums.copy()
        else:
            self.block += sums
        self.block_frames += frames
        self.processed += frames
        if self.block_frames >= config.block_frames:
            self.blocks.append(self.block)
            self.block, self.block_frames = None, 0
        while len(self.blocks) * config.block_frames + self.block_frames > config.horizon_frames:
            self.blocks.popleft()

    def kept_sums(self) -> np.ndarray:
        """``(S,)`` the sums of the frames within the horizon (last column: their count)."""
        parts = [*self.blocks, *(() if self.block is None else (self.block,))]
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total

    def refresh_due(self, last_window: bool) -> bool:
        return (self.refreshed_at < 0 or last_window
                or self.processed - self.refreshed_at >= self.refresh_frames)


def stream_bound_bytes(config: LiveConfig, sums_size: int, segment_classes: int) -> int:
    """The most memory one stream's arrays can hold (module doc): the sums' blocks, the kept
    windows' segment scores (and start, flag), the open window's frames."""
    blocks = config.horizon_frames // config.block_frames + 1
    windows = config.horizon_frames // SEGMENT_FRAMES
    return (blocks * sums_size * 4 + windows * (segment_classes * 4 + 16)
            + SEGMENT_FRAMES * FEATURE_SIZE)


# --- the engine ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Work:
    stream: LiveStream
    windows: list[tuple[np.ndarray, int, int]]
    last: bool
    pushed: float = field(default_factory=time.monotonic)


@dataclass
class LiveStats:
    """Counts since start."""

    streams: int = 0
    windows: int = 0
    refreshes: int = 0
    batches: int = 0
    refused: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("encoder", "segment_model", "head", "fusion"), 0.0))


class LiveEngine:
    """One worker thread scoring the completed windows of every live stream (module doc).

    Args:
        video: the video model's live graphs.
        segment: the segment model (shared with the offline pipeline; its runner must be
            thread-safe, as ONNX Runtime sessions are).
        fusion: candidates per stream and exponents (the pipeline's).
        config: batching, cadence, horizon.
    """

    def __init__(self, video: LiveVideoModel, segment: ScoringModel, fusion: FusionConfig,
                 config: LiveConfig = LiveConfig()):
        self.video = video
        self.segment = segment
        self.fusion = fusion
        self.config = config
        self.segment_space = ClassSpace(segment.class_ids)
        self.video_class_ids = np.asarray(video.class_ids, np.int64)
        self.stats = LiveStats()
        self._queue: collections.deque[_Work] = collections.deque()
        self._queued_windows = 0
        self._lock = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="modloc-live", daemon=True)
        self._worker.start()

    def open(self, stream_id: str, options: StreamOptions,
             on_events: Callable[[list[LiveEventType]], None],
             on_error: Callable[[BaseException], None]) -> LiveStream:
        """A new stream; ``on_events`` gets its events in order, ``on_error`` a failure of
        its model calls (both from the worker thread: they must be quick)."""
        if self._closed:
            raise LiveEngineClosed("the live engine is closed")
        self.stats.streams += 1
        return LiveStream(stream_id, options, self, on_events, on_error)

    def stream_bytes(self) -> int:
        """:func:`stream_bound_bytes` of this engine's models and settings."""
        return stream_bound_bytes(self.config, self.video.sums_size, self.segment_space.num_classes)

    def submit(self, stream: LiveStream, windows: list, last: bool) -> None:
        with self._lock:
            if self._closed:
                raise LiveEngineClosed("the live engine is closed")
            if self._queued_windows + len(windows) > self.config.max_queued_windows:
                self.stats.refused += 1
                raise LiveQueueFull(f"{self._queued_windows} live windows are queued; "
                                    f"{len(windows)} more would pass the limit of "
                                    f"{self.config.max_queued_windows}")
            if windows or last:
                self._queue.append(_Work(stream, windows, last))
                self._queued_windows += len(windows)
                self._lock.notify()

    def close(self) -> None:
        """Finish the queued work, then stop the worker."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._worker.join()

    # --- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                oldest = self._queue[0].pushed
                while (not self._closed and self._queued_windows < self.config.max_batch_windows
                       and time.monotonic() - oldest < self.config.max_wait):
                    self._lock.wait(self.config.max_wait - (time.monotonic() - oldest))
                batch, count = [], 0
                while self._queue and (not batch or count + len(self._queue[0].windows)
                                       <= self.config.max_batch_windows):
                    work = self._queue.popleft()
                    batch.append(work)
                    count += len(work.windows)
                self._queued_windows -= count
            try:
                events = self._process(batch)
            except Exception as error:  # a model call failed: every stream of the batch hears it
                log.exception("live batch failed")
                for stream in dict.fromkeys(work.stream for work in batch):
                    stream.on_error(error)
                continue
            for stream, stream_events in events.items():
                if stream_events:
                    stream.on_events(stream_events)

    def _process(self, batch: list[_Work]) -> dict[LiveStream, list[LiveEventType]]:
        """Score ``batch``'s windows, refresh the streams that are due, fuse, in order."""
        stats = self.stats
        items = [(work, window) for work in batch for window in work.windows]
        sums = scores = None
        if items:
            features = np.stack([window[0] for _, window in items])
            valid = np.array([window[1] for _, window in items], np.int32)
            started = time.perf_counter()
            sums = self.video.encode(features, valid)
            stats.seconds["encoder"] += time.perf_counter() - started
            started = time.perf_counter()
            scores = np.asarray(self.segment.score(features, valid), np.float32)
            stats.seconds["segment_model"] += time.perf_counter() - started

        # pass 1: the sums in order, and the candidate refreshes they call for
        steps: list[tuple[LiveStream, int | None, int | None, bool]] = []  # (stream, item, refresh, end)
        snapshots: list[np.ndarray] = []
        through: list[int] = []  # the stream's frames when each snapshot was taken

        def refresh(stream: LiveStream) -> int:
            snapshots.append(stream.kept_sums())
            through.append(stream.processed)
            stream.refreshed_at = stream.processed
            return len(snapshots) - 1

        row = 0
        for work in batch:
            stream = work.stream
            for index, (_, frames, _) in enumerate(work.windows):
                stream.add_sums(sums[row], frames)
                last_window = work.last and index == len(work.windows) - 1
                steps.append((stream, row, refresh(stream) if stream.refresh_due(last_window) else None,
                              False))
                row += 1
            if work.last:  # the final candidates read every frame (the last window forced it)
                steps.append((stream, None, None if stream.refreshed_at == stream.processed
                              else refresh(stream), True))
        probabilities = candidate_ids = candidate_scores = None
        if snapshots:
            started = time.perf_counter()
            probabilities = self.video.head(np.stack(snapshots))
            stats.seconds["head"] += time.perf_counter() - started
            stats.refreshes += len(snapshots)
            candidate_ids, candidate_scores = top_candidates(probabilities, self.video_class_ids,
                                                             self.fusion.top_n)

        # pass 2: candidates, window events and ends, in each stream's order
        started = time.perf_counter()
        events: dict[LiveStream, list[LiveEventType]] = {}
        for stream, item, refreshed, end in steps:
            out = events.setdefault(stream, [])
            if refreshed is not None:
                out.append(self._refresh(stream, probabilities[refreshed], candidate_ids[refreshed],
                                         candidate_scores[refreshed], int(snapshots[refreshed][-1]),
                                         through[refreshed]))
            if item is not None:
                work, (_, valid, start) = items[item]
                partial = valid < SEGMENT_FRAMES
                stream.windows.append((start, partial, scores[item]))
                out.append(self._window_event(stream, start, partial, scores[item], work.pushed))
            if end:
                out.append(StreamEnd(self._localization(stream)))
        stats.seconds["fusion"] += time.perf_counter() - started
        stats.windows += len(items)
        stats.batches += 1
        return events

    def _refresh(self, stream: LiveStream, probabilities: np.ndarray, ids: np.ndarray,
                 scores: np.ndarray, frames: int, through: int) -> CandidateUpdate:
        """New candidates for ``stream``: ``ids``, ``scores`` of ``(C,)`` ``probabilities``
        from the sums of its latest ``frames`` frames, ``through`` its frames then."""
        stream.candidate_ids, stream.candidate_scores = ids, scores.astype(np.float64)
        stream.video_scores = probabilities
        stream.version += 1
        return CandidateUpdate(version=stream.version, frames=frames, through=through,
                               class_ids=stream.candidate_ids, scores=stream.candidate_scores,
                               scored=self.segment_space.positions(stream.candidate_ids) >= 0)

    def _fused(self, stream: LiveStream, window_scores: np.ndarray) -> np.ndarray:
        """``(S, n)`` fused values of windows with the stream's candidates (NaN: unscored)."""
        return fuse_windows(stream.candidate_ids[None, :], stream.candidate_scores[None, :],
                            window_scores, np.array([len(window_scores)]), self.segment_space,
                            self.fusion)

    def _window_event(self, stream: LiveStream, start: int, partial: bool, window_scores: np.ndarray,
                      pushed: float) -> WindowEvent:
        fused = self._fused(stream, window_scores[None, :])[0]
        keep = np.flatnonzero(~np.isnan(fused) & (fused > stream.options.threshold))
        keep = keep[np.argsort(-fused[keep], kind="stable")]
        if stream.options.top_n:
            keep = keep[: stream.options.top_n]
        return WindowEvent(start=start, partial=partial, version=stream.version,
                           scores=[(int(stream.candidate_ids[c]), float(fused[c])) for c in keep],
                           completed=pushed)

    def _localization(self, stream: LiveStream) -> VideoLocalization:
        starts = np.array([start for start, _, _ in stream.windows], np.int64)
        partial = np.array([flag for _, flag, _ in stream.windows], bool)
        window_scores = np.stack([scores for _, _, scores in stream.windows])
        return VideoLocalization(
            video_id=stream.id, num_frames=stream.processed,
            candidate_ids=stream.candidate_ids, candidate_scores=stream.candidate_scores,
            window_starts=starts, partial=partial, fused=self._fused(stream, window_scores),
            video_scores=stream.video_scores, video_class_ids=self.video_class_ids,
            audio_frames=stream.processed)


__all__ = ["CandidateUpdate", "LiveConfig", "LiveEngine", "LiveEngineClosed", "LiveQueueFull",
           "LiveStream", "LiveVideoModel", "StreamEnd", "StreamOptions", "WindowEvent", "stream_bound_bytes"]
