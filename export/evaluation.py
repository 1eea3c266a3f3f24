"""Segment MAP@K of exported models, computed from any scorer (ONNX Runtime, TensorRT, PyTorch).

A scorer maps a uint8 batch to probabilities: ``(features (B, M, 1152), num_frames (B,))
→ (B, C)``; a backend's ``run`` is one (:func:`backend_scorer`).

- :func:`validation_map`: the measure of the precision variants and of the leaf choice.
  Several scorers read the same batches of a rated split (the synthetic ``validate``
  split), and each one's rankings are scored with the Kaggle segment MAP@K against the
  split's own ratings. What a model ranks depends on its kind:

  - a **segment** model ranks every full 5-frame window of every video for each of its
    classes by its own window score (no video model, so the number measures the segment
    model alone);
  - a **video** model gives the dummy prediction: each full window gets its video's score
    for each of the video's top-N classes.

- :func:`fused_segment_map`: the inference pipeline of REFERENCE §7 on a test split with a
  video-level and a segment-level scorer (top-N candidates, ``P_vid^a · P_seg^b`` fusion),
  exactly as :func:`training.evaluate.evaluate_segments` runs it with PyTorch, so the two
  MAP@K values compare directly.

Videos are capped at 300 frames and a video-level batch is padded to 300 frames, as the
reference's reader does (a tree's gates average over padded frames too).

Pure numpy: the engine's fusion, ranking and metric code, no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.backends import Backend
from engine.datasets import ClassSpace, pack_segment_windows
from engine.features import FEATURE_SIZE, MAX_FRAMES
from engine.fusion import FusionConfig, SegmentRanker, dummy_pairs, fused_pairs, top_candidates
from engine.io.examples import Video
from engine.io.readers import Patterns, read_videos
from engine.metrics import MAX_SEGMENTS_PER_CLASS, SegmentTruth, segment_map
from engine.vocab import default_segment_class_ids

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
MultiScorer = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]


def backend_scorer(backend: Backend) -> Scorer:
    """``backend.run`` as a scorer."""
    return lambda features, num_frames: backend.run(features, num_frames=num_frames)


@dataclass(frozen=True)
class _Ratings:
    """The ratings of a video without its frames (what :class:`SegmentTruth` reads)."""

    id: str
    segment_labels: np.ndarray
    segment_start_times: np.ndarray
    segment_scores: np.ndarray


def video_batches(patterns: Patterns, batch_size: int,
                  max_frames: int = MAX_FRAMES) -> Iterator[tuple[list[Video], np.ndarray, np.ndarray]]:
    """``(videos, features, num_frames)``: videos capped at ``max_frames``, their frames
    zero-padded to ``max_frames`` in a ``(B, max_frames, 1152)`` uint8 batch."""
    chunk: list[Video] = []
    for video in read_videos(patterns):
        chunk.append(video)
        if len(chunk) == batch_size:
            yield _padded(chunk, max_frames)
            chunk = []
    if chunk:
        yield _padded(chunk, max_frames)


def _padded(videos: list[Video], max_frames: int) -> tuple[list[Video], np.ndarray, np.ndarray]:
    features = np.zeros((len(videos), max_frames, FEATURE_SIZE), np.uint8)
    num_frames = np.zeros(len(videos), np.int32)
    for row, video in enumerate(videos):
        frames = video.features[:max_frames]
        features[row, : len(frames)] = frames
        num_frames[row] = len(frames)
    return videos, features, num_frames


def score_windows(score: MultiScorer, features: np.ndarray, num_frames: np.ndarray,
                  batch_size: int) -> dict[str, np.ndarray]:
    """``score`` over ``(W, 5, 1152)`` windows in batches of ``batch_size``, concatenated."""
    parts: dict[str, list[np.ndarray]] = {}
    for begin in range(0, len(features), batch_size):
        end = begin + batch_size
        for name, probabilities in score(features[begin:end], num_frames[begin:end]).items():
            parts.setdefault(name, []).append(np.asarray(probabilities))
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def validation_map(
    score: MultiScorer,
    kind: str,
    class_ids: Sequence[int],
    patterns: Patterns,
    k: int = MAX_SEGMENTS_PER_CLASS,
    top_n: int = 20,
    batch_size: int = 32,
    window_batch_size: int = 1024,
) -> dict[str, float]:
    """Segment MAP@K of every output of ``score`` on a rated split (module doc).

    Args:
        score: ``(features, num_frames) → {name: (B, C) probabilities}``.
        kind: ``"video"`` (dummy prediction from the video scores) or ``"segment"``
            (windows ranked by their own scores).
        class_ids: vocabulary ids of the columns.
        patterns: frame-level TFRecords with segment ratings (a validate split).
        k: MAP@K's K; top_n: candidate classes per video (video kind).

    Returns:
        ``{name: MAP@K}``.
    """
    if kind not in ("video", "segment"):
        raise ValueError(f"kind must be 'video' or 'segment', got {kind!r}")
    ids = np.asarray(class_ids, dtype=np.int64)
    rankers: dict[str, SegmentRanker] = {}
    ratings: list[_Ratings] = []
    for videos, features, num_frames in video_batches(patterns, batch_size):
        ratings.extend(_Ratings(v.id, v.segment_labels, v.segment_start_times, v.segment_scores)
                       for v in videos)
        if kind == "video":
            for name, probabilities in score(features, num_frames).items():
                ranker = rankers.setdefault(name, SegmentRanker(ids, k))
                candidate_ids, candidate_scores = top_candidates(probabilities, ids, top_n)
                for row, video in enumerate(videos):
                    ranker.add(video.id, *dummy_pairs(int(num_frames[row]), candidate_ids[row],
                                                      candidate_scores[row]))
            continue
        packed = pack_segment_windows(videos, max_frames=MAX_FRAMES)
        scores = score_windows(score, packed.features, packed.num_frames, window_batch_size)
        for name, probabilities in scores.items():
            ranker = rankers.setdefault(name, SegmentRanker(ids, k))
            for row, video in enumerate(videos):
                own = packed.windows(row)
                full = np.flatnonzero(~own.partial)
                window_scores = probabilities[packed.offsets[row]: packed.offsets[row + 1]]
                ranker.add(video.id, np.repeat(own.starts[full], len(ids)), np.tile(ids, len(full)),
                           window_scores[full].ravel())
    if not ratings:
        raise ValueError(f"no video in {patterns}")
    truth = SegmentTruth.from_videos(ratings)
    return {name: segment_map(ranker.rankings(), truth, k=k).map for name, ranker in rankers.items()}


def fused_segment_map(
    video: Scorer,
    video_classes: Sequence[int],
    segment: Scorer,
    segment_classes: Sequence[int],
    test: Patterns,
    truth: Patterns,
    class_ids: Sequence[int] | None = None,
    fusion: FusionConfig | None = None,
    batch_size: int = 32,
    window_batch_size: int = 1024,
) -> dict:
    """Segment MAP@K of the fused system and of the dummy prediction on a test split.

    The scorers' counterpart of :func:`training.evaluate.evaluate_segments` (same
    candidates, windows, fusion, ranking and metric); returns the same layout:
    ``{"fused": {"map", "classes", "ranked_segments"}, "dummy": {...}, "videos",
    "windows", "k", "seconds"}``.
    """
    started = time.perf_counter()
    fusion = fusion or FusionConfig()
    targets = [int(c) for c in (default_segment_class_ids() if class_ids is None else class_ids)]
    segment_space = ClassSpace(segment_classes)
    rankers = {"fused": SegmentRanker(targets, fusion.k), "dummy": SegmentRanker(targets, fusion.k)}
    videos = windows = 0
    for batch, features, num_frames in video_batches(test, batch_size):
        candidate_ids, candidate_scores = top_candidates(video(features, num_frames),
                                                         video_classes, fusion.top_n)
        packed = pack_segment_windows(batch, max_frames=MAX_FRAMES)
        window_scores = score_windows(lambda f, n: {"segment": segment(f, n)}, packed.features,
                                      packed.num_frames, window_batch_size)["segment"]
        for row, item in enumerate(batch):
            own = packed.windows(row)
            rankers["fused"].add(item.id, *fused_pairs(
                own.starts, own.partial, candidate_ids[row], candidate_scores[row],
                window_scores[packed.offsets[row]: packed.offsets[row + 1]], segment_space, fusion))
            rankers["dummy"].add(item.id, *dummy_pairs(
                int(num_frames[row]), candidate_ids[row], candidate_scores[row],
                fusion.include_partial))
        videos += len(batch)
        windows += len(packed)
    if not videos:
        raise ValueError(f"no test video in {test}")
    ratings = SegmentTruth.from_videos(read_videos(truth))
    result: dict = {"videos": videos, "windows": windows, "k": fusion.k}
    for name, ranker in rankers.items():
        rankings = ranker.rankings()
        scores = segment_map(rankings, ratings, k=fusion.k)
        result[name] = {"map": scores.map, "classes": scores.classes,
                        "ranked_segments": sum(map(len, rankings.values()))}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


__all__ = ["MultiScorer", "Scorer", "backend_scorer", "fused_segment_map", "score_windows",
           "validation_map", "video_batches"]
