"""The offline localization loop of REFERENCE §7 on a test split, and its MAP@K.

:func:`localize_split` runs :class:`modloc.engine.runtime.pipeline.Pipeline` (top-N candidates, every
5-frame window scored, ``P_vid^a · P_seg^b`` fusion) over a test split with any two
scoring models, a PyTorch model (:mod:`modloc.training.evaluate`) or an ONNX Runtime, PyTorch or
TensorRT backend (:mod:`modloc.export.validation`), ranks the fused pairs and the dummy
prediction per class (:class:`modloc.engine.runtime.rankings.Rankings`), and scores both with the Kaggle segment
MAP@K: every runtime shares the serving engine's own code, so their numbers compare
directly. :func:`video_batches` and :func:`score_windows` are the plain batch loops the
export checks use.

Videos are capped at 300 frames (the reference reader's limit).

Pure numpy: no torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import Patterns, count_records, expand_paths
from modloc.engine.base.metrics import SegmentTruth, segment_map
from modloc.engine.base.progress import Progress
from modloc.engine.base.scoring import check_overlap
from modloc.engine.runtime.fusion import dummy_pairs
from modloc.engine.runtime.infer import ordered_chunks
from modloc.engine.runtime.pipeline import Pipeline, PipelineConfig, ScoringModel
from modloc.engine.runtime.rankings import Rankings

MultiScorer = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]


def video_batches(patterns: Patterns, batch_size: int,
                  max_frames: int = MAX_FRAMES) -> Iterator[tuple[list[Video], np.ndarray, np.ndarray]]:
    """``(videos, features, num_frames)``: videos capped at ``max_frames``, their frames
    zero-padded to ``max_frames`` in a ``(B, max_frames, 1152)`` uint8 batch. A record
    without frames raises, naming its file and record."""
    chunk: list[Video] = []
    for video in read_videos(patterns, require_frames=True):
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
    video: ScoringModel,
    segment: ScoringModel,
    test: Patterns,
    truth: Patterns,
    class_ids: Sequence[int] | None = None,
    config: PipelineConfig | None = None,
    submissions: str | os.PathLike | None = None,
    progress: bool | None = False,
    chunk_videos: int = 256,
    allow_low_overlap: bool = False,
) -> dict:
    """Segment MAP@K of the fused system and of the dummy prediction on a test split.

    Args:
        video: the video-level model (candidates, and the dummy's scores); segment: the
            segment-level model (:class:`~modloc.engine.runtime.pipeline.ScoringModel`).
        test: the split's frame-level TFRecords; truth: its segment ratings (e.g.
            ``test_truth/``).
        class_ids: the classes ranked (submission rows); default the 1000 segment classes.
        config: batching, candidates, exponents, partial windows and ``k`` (default: the
            reference's fusion).
        submissions: a directory to write ``fused.csv`` and ``dummy.csv`` (Kaggle format).
        progress: report progress on stderr (:class:`~modloc.engine.base.progress.Progress`;
            False: silent).
        chunk_videos: videos per pipeline call.
        allow_low_overlap: score truth files that rate few of the test videos (another
            split's, say) with a warning instead of refusing them
            (:func:`~modloc.engine.base.scoring.check_overlap`).

    Returns:
        ``{"fused": {...}, "dummy": {...}, "videos", "windows", "k", "seconds"}``; each
        system holds ``map``, ``ceiling`` (:func:`~modloc.engine.base.metrics.segment_map`: the MAP
        of its segments in the best order), ``classes`` (scored), ``found_positives`` (of
        ``positives``, the positive ratings), ``ranked_segments`` and, with
        ``submissions``, its ``submission`` path.
    """
    started = time.perf_counter()
    config = config or PipelineConfig()
    fusion = config.fusion
    pipeline = Pipeline(video, segment, config)
    systems = {name: Rankings(class_ids, fusion.k, include_partial=fusion.include_partial)
               for name in ("fused", "dummy")}
    files = expand_paths(test)
    localized: set[str] = set()
    with Progress("localize", count_records(files), "video", enabled=progress) as bar:
        for chunk, _ in ordered_chunks(list(enumerate(files)), chunk_videos):
            localized.update(video.id for video in chunk)
            for result in pipeline.localize(chunk):
                systems["fused"].add(result)
                systems["dummy"].add_pairs(result.video_id, *dummy_pairs(
                    result.num_frames, result.candidate_ids, result.candidate_scores,
                    fusion.include_partial))
            bar.update(len(chunk))
            bar.set_postfix(windows=pipeline.times.windows)
    if not pipeline.times.videos:
        raise ValueError(f"no test video in {test}")
    ratings = SegmentTruth.from_videos(read_videos(truth))
    check_overlap(localized, ratings.video_ids, f"the test split {_describe(test)}",
                  _describe(truth), allow_low_overlap)
    result: dict = {"videos": pipeline.times.videos, "windows": pipeline.times.windows, "k": fusion.k,
                    "positives": int(sum(ratings.num_positives.values()))}
    for name, rankings in systems.items():
        rows = rankings.rows()
        scores = segment_map(rows, ratings, k=fusion.k)
        result[name] = {"map": scores.map, "ceiling": scores.ceiling, "classes": scores.classes,
                        "found_positives": scores.found_positives,
                        "ranked_segments": sum(map(len, rows.values()))}
        if submissions is not None:
            path = Path(submissions) / f"{name}.csv"
            rankings.write_submission(path)
            result[name]["submission"] = str(path)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _describe(patterns: Patterns) -> str:
    return str(patterns) if isinstance(patterns, str | os.PathLike) else " ".join(map(str, patterns))


__all__ = ["MultiScorer", "localize_split", "score_windows", "video_batches"]
