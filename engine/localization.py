"""The offline localization loop of REFERENCE §7 over any scorer, and its MAP@K.

A scorer maps a uint8 batch to probabilities, ``(features (B, M, 1152), num_frames (B,))
→ (B, C) float32``: a PyTorch model (:mod:`training.evaluate`), an ONNX Runtime or
TensorRT backend (:mod:`export.evaluation`). :func:`localize_split` runs the pipeline on a
test split with a video-level and a segment-level scorer (top-N candidates, every 5-frame
window scored, ``P_vid^a · P_seg^b`` fusion, per-class top-K) and scores it, and the dummy
prediction, with the Kaggle segment MAP@K; every runtime shares it, so their numbers
compare directly.

Videos are capped at 300 frames and a video-level batch is padded to 300 frames, as the
reference's reader does (a tree's gates average over padded frames too).

Pure numpy: no torch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.datasets import ClassSpace, pack_segment_windows
from engine.features import FEATURE_SIZE, MAX_FRAMES
from engine.fusion import FusionConfig, SegmentRanker, dummy_pairs, fused_pairs, top_candidates
from engine.io.examples import Video
from engine.io.readers import Patterns, read_videos
from engine.metrics import SegmentTruth, segment_map
from engine.submission import write_submission
from engine.vocab import default_segment_class_ids

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
MultiScorer = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]
VideoBatch = tuple[list[Video], np.ndarray, np.ndarray]


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


def localize_split(
    video: Scorer,
    video_classes: Sequence[int],
    segment: Scorer,
    segment_classes: Sequence[int],
    batches: Iterable[VideoBatch],
    truth: Patterns,
    class_ids: Sequence[int] | None = None,
    fusion: FusionConfig | None = None,
    window_batch_size: int = 1024,
    submissions: str | os.PathLike | None = None,
    progress: bool | None = False,
) -> dict:
    """Segment MAP@K of the fused system and of the dummy prediction on a test split.

    Args:
        video: video-level scorer (candidates, and the dummy's scores) with output classes
            ``video_classes``; segment: segment-level scorer with ``segment_classes``.
        batches: ``(videos, features, num_frames)`` of the test split
            (:func:`video_batches`).
        truth: the split's segment ratings (e.g. ``test_truth/``).
        class_ids: the classes ranked (submission rows); default the 1000 segment classes.
        fusion: candidates, exponents, partial windows and ``k`` (default: the reference's).
        window_batch_size: windows per segment-scorer call.
        submissions: a directory to write ``fused.csv`` and ``dummy.csv`` (Kaggle format).
        progress: a progress bar on stderr (None: only on a terminal).

    Returns:
        ``{"fused": {...}, "dummy": {...}, "videos", "windows", "k", "seconds"}``; each
        system holds ``map``, ``classes`` (scored), ``ranked_segments`` and, with
        ``submissions``, its ``submission`` path.
    """
    started = time.perf_counter()
    fusion = fusion or FusionConfig()
    targets = [int(c) for c in (default_segment_class_ids() if class_ids is None else class_ids)]
    segment_space = ClassSpace(segment_classes)
    rankers = {"fused": SegmentRanker(targets, fusion.k), "dummy": SegmentRanker(targets, fusion.k)}
    videos = windows = 0
    with tqdm(batches, desc="localize", unit="batch", disable=None if progress is None else not progress,
              file=sys.stderr) as bar:
        for batch, features, num_frames in bar:
            candidate_ids, candidate_scores = top_candidates(video(features, num_frames),
                                                             video_classes, fusion.top_n)
            packed = pack_segment_windows(batch, max_frames=MAX_FRAMES)
            window_scores = score_windows(lambda f, n: {"segment": segment(f, n)}, packed.features,
                                          packed.num_frames, window_batch_size)["segment"]
            for row, item in enumerate(batch):
                own = packed.windows(row)
                rankers["fused"].add(item.id, *fused_pairs(
                    own.starts, own.partial, candidate_ids[row], candidate_scores[row],
                    window_scores[packed.offsets[row]: packed.offsets[row + 1]], segment_space,
                    fusion))
                rankers["dummy"].add(item.id, *dummy_pairs(
                    int(num_frames[row]), candidate_ids[row], candidate_scores[row],
                    fusion.include_partial))
            videos += len(batch)
            windows += len(packed)
            bar.set_postfix(videos=videos, windows=windows)
    if not videos:
        raise ValueError("no test video to localize")
    ratings = SegmentTruth.from_videos(read_videos(truth))
    result: dict = {"videos": videos, "windows": windows, "k": fusion.k}
    for name, ranker in rankers.items():
        rankings = ranker.rankings()
        scores = segment_map(rankings, ratings, k=fusion.k)
        result[name] = {"map": scores.map, "classes": scores.classes,
                        "ranked_segments": sum(map(len, rankings.values()))}
        if submissions is not None:
            path = Path(submissions) / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_submission(path, rankings, class_ids=targets, max_segments=fusion.k)
            result[name]["submission"] = str(path)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


__all__ = ["MultiScorer", "Scorer", "VideoBatch", "localize_split", "score_windows", "video_batches"]
