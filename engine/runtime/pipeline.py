"""The localization pipeline, stages 1–3 of REFERENCE §7, over any two scoring models.

For a batch of videos (uint8 frames)::

    stage 1  candidates   the video model scores each video (batches sorted by length and
                          padded to the longest, not to 300 frames); its top-N classes
                          (default 20) over all the video model's classes (REFERENCE §7:
                          the top-20 of 3862), kept where they are ranked segment
                          classes, are the candidates
    stage 2  segments     every non-overlapping 5-frame window of every video is packed
                          into one (W, 5, 1152) array and scored in large batches
    stage 3  fusion       P_vid^a · P_seg^b for each (window, candidate), a = 0.05, b = 0.95

and returns one :class:`VideoLocalization` per video. Stage 4, the per-class top-K over
all videos, is :class:`modloc.engine.runtime.rankings.Rankings`; :class:`modloc.engine.runtime.localizer.Localizer`
joins them.

A model is anything that scores uint8 batches (:class:`ScoringModel`): a backend
(:meth:`ScoringModel.from_backend`, ONNX Runtime, PyTorch or TensorRT) or a function (the
training code wraps its PyTorch models this way), so every runtime shares this code and
their rankings compare directly.

Padding. A video-level batch is padded to its longest video (rounded up to a multiple of
``frame_bucket``, so compiled engines see few shapes): a NeXtVLAD leaf masks padded frames,
and a MOD tree's gates read the reference's 300-frame mean computed from the real frames,
so their scores do not depend on the padding. A model that does depend on it says so
(``fixed_frames``, from the artifact's ``frames.pad_to``: an ensemble exported from a
checkpoint with the older ``"padded_mean"`` gates, which average every input frame) and
gets batches padded to exactly that.

Batch invariance. A video's scores must not depend on the videos that share its batch, or
a served Submission would differ from ``modloc infer``'s (adjacent ties swapped) depending
on how requests happened to batch. With ONNX Runtime on CPU they do not, for every batch of
two or more rows (measured bit for bit: any batch size, any position, any padding) except
one: a single-row batch takes the matrix-vector path, whose sums round differently (~1 ulp
of float32). So a one-row batch is scored as two copies of the row. No other call changes,
so throughput at capacity (batches of many videos) is untouched; a video that is alone in
its call costs more CPU, as the second copy's frames are scored too (measured: +13.5% CPU
per video for the paper-size NeXtVLAD, +37% for a tiny one whose video model dominates;
``benchmarks/bench_batch_invariance.py``).

Pure numpy: no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.vocab import ClassSpace
from modloc.engine.base.windows import pack_segment_windows
from modloc.engine.runtime.backends.interface import Backend
from modloc.engine.runtime.fusion import FusionConfig, fuse, top_candidates

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(features (B, M, 1152) uint8, num_frames (B,) int32) → (B, C)`` probabilities."""


def check_video(video: Video) -> None:
    """Refuse a video the pipeline cannot localize: features not ``(M >= 1, 1152)`` uint8."""
    features = video.features
    if not isinstance(features, np.ndarray) or features.dtype != np.uint8 or features.ndim != 2 \
            or features.shape[1] != FEATURE_SIZE:
        raise ValueError(f"video {video.id!r}: features must be (M, {FEATURE_SIZE}) uint8, got "
                         f"{getattr(features, 'dtype', type(features).__name__)} "
                         f"{getattr(features, 'shape', '')}")
    if len(features) == 0:
        raise ValueError(f"video {video.id!r} has no frames")


def backend_scorer(backend: Backend) -> Scorer:
    """A backend's ``run`` as a :data:`Scorer`."""
    return lambda features, num_frames: backend.run(features, num_frames=num_frames)


@dataclass(frozen=True)
class ScoringModel:
    """A scorer and the classes of its output columns.

    Attributes:
        score: the scorer.
        class_ids: ``(C,)`` vocabulary ids of its columns.
        fixed_frames: pad every video-level batch to exactly this many frames (a model
            whose scores depend on the padding); None: pad to the longest video.
        name: what it is, for logs and stats.
    """

    score: Scorer
    class_ids: tuple[int, ...]
    fixed_frames: int | None = None
    name: str = "model"

    @classmethod
    def from_backend(cls, backend) -> ScoringModel:
        """A loaded :class:`modloc.engine.runtime.backends.Backend` as a scoring model."""
        artifact = backend.artifact
        return cls(score=backend_scorer(backend),
                   class_ids=tuple(int(c) for c in backend.class_ids),
                   # a segment model's windows are 5 frames whatever it says
                   fixed_frames=artifact.pad_to if artifact.kind == "video" else None,
                   name=f"{backend.name}:{artifact.path.name}")


@dataclass(frozen=True)
class PipelineConfig:
    """Batching and fusion settings.

    Attributes:
        fusion: candidates per video, exponents, partial windows, ``k`` (REFERENCE §7).
        video_batch_size: videos per video-model call.
        window_batch_size: 5-frame windows per segment-model call.
        max_frames: frames kept per video (the reference reader's 300).
        frame_bucket: a video-level batch is padded to a multiple of this many frames.
    """

    fusion: FusionConfig = FusionConfig()
    video_batch_size: int = 64
    window_batch_size: int = 4096
    max_frames: int = MAX_FRAMES
    frame_bucket: int = 30

    def __post_init__(self):
        for name in ("video_batch_size", "window_batch_size", "max_frames", "frame_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(eq=False)
class VideoLocalization:
    """One video's localization: its candidates and every window's fused score for each.

    Attributes:
        video_id: the video's id.
        num_frames: frames localized (at most ``max_frames``).
        candidate_ids: ``(n,)`` int64 candidate classes, best video score first.
        candidate_scores: ``(n,)`` float64 their video-level scores.
        window_starts: ``(S,)`` int64 first frame (= second) of each window.
        partial: ``(S,)`` bool, True for a last window shorter than 5 frames.
        fused: ``(S, n)`` float64 ``P_vid^a · P_seg^b``; NaN in the column of a candidate
            that the segment model does not score.
        video_scores: ``(C,)`` float32 the video model's scores of every class it scores,
            ``video_class_ids`` (shared by every result).
        audio_frames: the video's audio frames as stored, uncapped: the reference counts a
            video's windows from them when it expands video scores into segments
            (REFERENCE §7 steps 3 and 5).
    """

    video_id: str
    num_frames: int
    candidate_ids: np.ndarray
    candidate_scores: np.ndarray
    window_starts: np.ndarray
    partial: np.ndarray
    fused: np.ndarray
    video_scores: np.ndarray
    video_class_ids: np.ndarray
    audio_frames: int

    def ranking_pairs(self, include_partial: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What enters the per-class rankings: ``(m,)`` window starts, class ids, values.

        Window-major; full windows only unless ``include_partial`` (the reference never
        ranks a zero-padded last window); candidates the segment model scores only.
        """
        rows = np.arange(len(self.window_starts)) if include_partial else np.flatnonzero(~self.partial)
        columns = np.flatnonzero(~np.isnan(self.fused[0])) if len(self.fused) else np.zeros(0, np.int64)
        return (np.repeat(self.window_starts[rows], len(columns)),
                np.tile(self.candidate_ids[columns], len(rows)),
                self.fused[np.ix_(rows, columns)].ravel())

    def segments(self, class_id: int, threshold: float = 0.0,
                 include_partial: bool = False) -> list[tuple[int, float]]:
        """``(start, fused score)`` of the windows of candidate ``class_id`` scoring above
        ``threshold``, best first (ties: earlier window first); [] for a non-candidate."""
        matches = np.flatnonzero(self.candidate_ids == class_id)
        if not len(matches):
            return []
        values = self.fused[:, matches[0]]
        keep = (values > threshold) & (include_partial | ~self.partial)
        rows = np.flatnonzero(keep)
        rows = rows[np.argsort(-values[rows], kind="stable")]
        return [(int(self.window_starts[row]), float(values[row])) for row in rows]


@dataclass
class StageTimes:
    """Cumulative wall seconds per stage and counts, since the pipeline was made."""

    videos: int = 0
    windows: int = 0
    video_batches: int = 0
    window_batches: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("video_model", "candidates", "pack", "segment_model", "fusion"), 0.0))

    def to_json(self) -> dict:
        return {"videos": self.videos, "windows": self.windows, "video_batches": self.video_batches,
                "window_batches": self.window_batches,
                "seconds": {name: round(value, 6) for name, value in self.seconds.items()}}


class Pipeline:
    """Stages 1–3 for batches of videos; one caller at a time (the batcher serializes).

    Args:
        video_model: scores whole videos (candidates and their video scores).
        segment_model: scores 5-frame windows; may be the video model's twin.
        config: batching and fusion settings.
    """

    def __init__(self, video_model: ScoringModel, segment_model: ScoringModel,
                 config: PipelineConfig = PipelineConfig()):
        self.video_model = video_model
        self.segment_model = segment_model
        self.config = config
        self.segment_space = ClassSpace(segment_model.class_ids)
        self.video_class_ids = np.asarray(video_model.class_ids, dtype=np.int64)
        self.video_class_ids.setflags(write=False)
        self.times = StageTimes()
        if video_model.fixed_frames is not None and video_model.fixed_frames < config.max_frames:
            raise ValueError(f"{video_model.name} pads to {video_model.fixed_frames} frames, fewer "
                             f"than max_frames={config.max_frames}")

    def localize(self, videos: Sequence[Video]) -> list[VideoLocalization]:
        """Localize ``videos`` (each at least one frame); results in the same order."""
        if not videos:
            return []
        for video in videos:
            check_video(video)
        fusion = self.config.fusion
        started = time.perf_counter()
        video_scores = self._score_videos(videos)
        self._lap("video_model", started)

        started = time.perf_counter()
        candidate_ids, candidate_scores = top_candidates(video_scores, self.video_model.class_ids,
                                                         fusion.top_n)
        self._lap("candidates", started)

        started = time.perf_counter()
        packed = pack_segment_windows(videos, max_frames=self.config.max_frames)
        self._lap("pack", started)

        started = time.perf_counter()
        window_scores = self._score_windows(packed.features, packed.num_frames)
        self._lap("segment_model", started)

        started = time.perf_counter()
        candidate_scores = candidate_scores.astype(np.float64)
        fused = self._fuse(candidate_ids, candidate_scores, window_scores,
                           np.diff(packed.offsets))
        results = [
            VideoLocalization(
                video_id=video.id, num_frames=min(len(video.features), self.config.max_frames),
                candidate_ids=candidate_ids[row],
                candidate_scores=candidate_scores[row],
                window_starts=packed.starts[packed.offsets[row]: packed.offsets[row + 1]],
                partial=packed.partial[packed.offsets[row]: packed.offsets[row + 1]],
                fused=fused[packed.offsets[row]: packed.offsets[row + 1]],
                video_scores=video_scores[row], video_class_ids=self.video_class_ids,
                audio_frames=video.audio_frames)
            for row, video in enumerate(videos)]
        self._lap("fusion", started)
        self.times.videos += len(videos)
        self.times.windows += len(packed)
        return results

    def candidates(self, videos: Sequence[Video]) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 alone: ``(V, n)`` candidate class ids and their video scores, as
        :meth:`localize` finds them (for what must know every video's candidates first:
        :mod:`modloc.engine.runtime.expansion`). Counted in the stage times, not in ``videos``."""
        for video in videos:
            check_video(video)
        started = time.perf_counter()
        video_scores = self._score_videos(videos)
        self._lap("video_model", started)
        started = time.perf_counter()
        found = top_candidates(video_scores, self.video_model.class_ids, self.config.fusion.top_n)
        self._lap("candidates", started)
        return found

    def _lap(self, stage: str, started: float) -> None:
        self.times.seconds[stage] += time.perf_counter() - started

    def _score_videos(self, videos: Sequence[Video]) -> np.ndarray:
        """``(V, C)`` video-model scores, in batches of similar lengths."""
        lengths = np.array([min(len(v.features), self.config.max_frames) for v in videos])
        order = np.argsort(lengths, kind="stable")
        scores = np.empty((len(videos), len(self.video_model.class_ids)), np.float32)
        size = self.config.video_batch_size
        for begin in range(0, len(order), size):
            rows = order[begin: begin + size]
            frames = self._padded_length(int(lengths[rows].max()))
            features = np.zeros((len(rows), frames, FEATURE_SIZE), np.uint8)
            for slot, row in enumerate(rows):
                features[slot, : lengths[row]] = videos[row].features[: lengths[row]]
            scores[rows] = self._checked(self.video_model, features,
                                         lengths[rows].astype(np.int32))
            self.times.video_batches += 1
        return scores

    def _padded_length(self, longest: int) -> int:
        if self.video_model.fixed_frames is not None:
            return self.video_model.fixed_frames
        bucket = self.config.frame_bucket
        return min(-(-longest // bucket) * bucket, self.config.max_frames)

    def _score_windows(self, features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        """``(W, C_seg)`` segment-model scores of ``(W, 5, 1152)`` windows."""
        scores = np.empty((len(features), self.segment_space.num_classes), np.float32)
        size = self.config.window_batch_size
        for begin in range(0, len(features), size):
            end = begin + size
            scores[begin:end] = self._checked(self.segment_model, features[begin:end],
                                              num_frames[begin:end])
            self.times.window_batches += 1
        return scores

    @staticmethod
    def _checked(model: ScoringModel, features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        rows = len(features)
        if rows == 1:  # never a one-row batch (module docstring: batch invariance)
            features, num_frames = np.concatenate([features] * 2), np.concatenate([num_frames] * 2)
        scores = np.asarray(model.score(features, num_frames))
        expected = (len(features), len(model.class_ids))
        if scores.shape != expected:
            raise RuntimeError(f"{model.name} returned scores of shape {scores.shape} for a batch "
                               f"of {len(features)}, expected {expected}")
        return scores[:rows]

    def _fuse(self, candidate_ids: np.ndarray, candidate_scores: np.ndarray,
              window_scores: np.ndarray, windows_per_video: np.ndarray) -> np.ndarray:
        return fuse_windows(candidate_ids, candidate_scores, window_scores, windows_per_video,
                            self.segment_space, self.config.fusion)


def fuse_windows(candidate_ids: np.ndarray, candidate_scores: np.ndarray, window_scores: np.ndarray,
                 windows_per_video: np.ndarray, segment_space: ClassSpace,
                 fusion: FusionConfig) -> np.ndarray:
    """``(W, n)`` fused values of every window with its video's candidates, NaN where the
    segment model does not score a candidate; one vectorized pass.

    Args:
        candidate_ids, candidate_scores: ``(V, n)`` each video's candidates, video scores.
        window_scores: ``(W, C_seg)`` the segment model's scores, the videos' windows in order.
        windows_per_video: ``(V,)`` how many of the rows are each video's.
        segment_space: the segment model's classes.
    """
    owner = np.repeat(np.arange(len(candidate_ids)), windows_per_video)
    columns = segment_space.positions(candidate_ids)  # (V, n), -1 where unscored
    window_columns = columns[owner]
    segment = np.take_along_axis(window_scores, np.maximum(window_columns, 0), axis=1)
    fused = fuse(candidate_scores[owner], segment, fusion.video_exponent, fusion.segment_exponent)
    fused[window_columns < 0] = np.nan
    return fused


__all__ = ["backend_scorer", "check_video", "fuse_windows", "Pipeline", "PipelineConfig", "ScoringModel", "Scorer", "StageTimes", "VideoLocalization"]
