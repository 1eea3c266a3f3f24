"""The test-time cut of a video into non-overlapping 5-frame windows (REFERENCE §7).

:func:`segment_windows` for one video, :func:`pack_segment_windows` for many packed into
one array (no per-video padding to 300 frames): what the segment model scores at
inference, in the engine, the export checks and the benchmarks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modloc.engine.base.features import FEATURE_SIZE, SEGMENT_FRAMES, num_segments
from modloc.engine.base.io.examples import Video


@dataclass(eq=False)
class SegmentWindows:
    """Non-overlapping windows of one video at frames 0, 5, 10, ...

    Attributes:
        features: ``(S, 5, 1152)`` uint8, ``S = ceil(n / 5)``; the last window zero-padded
            past the video's end.
        starts: ``(S,)`` int64 first frame of each window.
        num_frames: ``(S,)`` int32 valid frames per window (5, except a partial last one).
        partial: ``(S,)`` bool, True for a window with fewer than 5 valid frames.
    """

    features: np.ndarray
    starts: np.ndarray
    num_frames: np.ndarray
    partial: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


@dataclass(eq=False)
class PackedWindows:
    """The windows of many videos in one array (no per-video padding to 300 frames).

    Attributes:
        video_ids: ``V`` video ids.
        features: ``(W, 5, 1152)`` uint8, ``W = sum_v ceil(n_v / 5)``.
        starts, num_frames, partial: ``(W,)`` as in :class:`SegmentWindows`.
        offsets: ``(V + 1,)`` int64; video ``v`` owns windows ``offsets[v]:offsets[v + 1]``.
    """

    video_ids: list[str]
    features: np.ndarray
    starts: np.ndarray
    num_frames: np.ndarray
    partial: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def windows(self, video: int) -> SegmentWindows:
        """The windows of video number ``video`` (views into the packed arrays)."""
        window = slice(int(self.offsets[video]), int(self.offsets[video + 1]))
        return SegmentWindows(
            self.features[window], self.starts[window], self.num_frames[window], self.partial[window]
        )


def _frames_of(video: Video | np.ndarray, max_frames: int | None) -> np.ndarray:
    frames = video.features if isinstance(video, Video) else np.asarray(video)
    if frames.dtype != np.uint8 or frames.ndim != 2 or frames.shape[1] != FEATURE_SIZE:
        raise ValueError(f"expected (n, {FEATURE_SIZE}) uint8 features, got {frames.dtype} {frames.shape}")
    return frames if max_frames is None else frames[:max_frames]


def _window_layout(frames: int, segment_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``starts``, ``num_frames`` and ``partial`` of the windows of a ``frames``-frame video."""
    starts = np.arange(num_segments(frames, segment_frames), dtype=np.int64) * segment_frames
    valid = np.minimum(frames - starts, segment_frames).astype(np.int32)
    return starts, valid, valid < segment_frames


def segment_windows(
    video: Video | np.ndarray, segment_frames: int = SEGMENT_FRAMES, max_frames: int | None = None
) -> SegmentWindows:
    """Cut a video (or its ``(n, 1152)`` uint8 features) into ``ceil(n / 5)`` windows.

    ``max_frames`` caps the video first (None: every frame; the reference reader capped at
    300). When ``n`` is a multiple of ``segment_frames`` the features are a reshaped view
    of the video's (C-contiguous) array; otherwise the zero-padded last window makes a
    single copy necessary.
    """
    frames = _frames_of(video, max_frames)
    starts, valid, partial = _window_layout(len(frames), segment_frames)
    count = len(starts)
    if len(frames) == count * segment_frames:
        features = frames.reshape(count, segment_frames, FEATURE_SIZE)
    else:
        features = np.zeros((count, segment_frames, FEATURE_SIZE), dtype=np.uint8)
        features.reshape(-1, FEATURE_SIZE)[: len(frames)] = frames
    return SegmentWindows(features, starts, valid, partial)


def pack_segment_windows(
    videos: Sequence[Video], segment_frames: int = SEGMENT_FRAMES, max_frames: int | None = None
) -> PackedWindows:
    """The windows of ``videos`` packed into one ``(W, 5, 1152)`` array with offsets.

    Each frame is copied once, and only the padding rows of partial windows are zeroed.
    """
    frame_arrays = [_frames_of(video, max_frames) for video in videos]
    layouts = [_window_layout(len(frames), segment_frames) for frames in frame_arrays]
    offsets = np.zeros(len(videos) + 1, dtype=np.int64)
    np.cumsum([len(starts) for starts, _, _ in layouts], out=offsets[1:])
    flat = np.empty((int(offsets[-1]) * segment_frames, FEATURE_SIZE), dtype=np.uint8)
    for frames, begin, end in zip(frame_arrays, offsets[:-1], offsets[1:], strict=True):
        row = int(begin) * segment_frames
        flat[row : row + len(frames)] = frames
        flat[row + len(frames) : int(end) * segment_frames] = 0
    return PackedWindows(
        video_ids=[video.id for video in videos],
        features=flat.reshape(-1, segment_frames, FEATURE_SIZE),
        starts=np.concatenate([starts for starts, _, _ in layouts] or [np.zeros(0, np.int64)]),
        num_frames=np.concatenate([valid for _, valid, _ in layouts] or [np.zeros(0, np.int32)]),
        partial=np.concatenate([partial for _, _, partial in layouts] or [np.zeros(0, bool)]),
        offsets=offsets,
    )


__all__ = ["PackedWindows", "SegmentWindows", "pack_segment_windows", "segment_windows"]
