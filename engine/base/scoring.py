"""``modloc eval``: score a prediction file against the labels in TFRecord files.

- A Kaggle submission CSV is scored with the Kaggle segment MAP@K against the segment
  ratings of the label files (``validate`` records, or a ``test_truth`` split).
- A video-level prediction file (``VideoId,LabelConfidencePairs``) is scored with GAP@k,
  Hit@1, PERR and per-class MAP against the video labels of the label files (frame-level or
  video-level records). A labelled video without predictions is an all-zero row, as G's
  metrics would see it (its Hit@1 is G's argmax: class 0); predicted videos without labels
  are counted and left out, and a file predicting none of the labelled videos is refused.
"""

from __future__ import annotations

import numpy as np

from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_any
from modloc.engine.base.io.tfrecord import Patterns
from modloc.engine.base.metrics import SegmentTruth, VideoMetrics, segment_map
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS
from modloc.engine.base.submission import read_submission, read_video_predictions
from modloc.engine.base.vocab import NUM_VIDEO_CLASSES

_VIDEO_BATCH = 256


def evaluate_submission(submission: str, labels: Patterns, k: int = MAX_SEGMENTS_PER_CLASS) -> dict:
    """Segment MAP@k of a submission CSV; keys ``map``, ``classes`` and the bookkeeping."""
    rankings = read_submission(submission, strict=True)
    truth = SegmentTruth.from_videos(record for record in read_any(labels) if isinstance(record, Video))
    result = segment_map(rankings, truth, k=k)
    return {
        "map": result.map,
        "ceiling": result.ceiling,
        "classes": result.classes,
        "k": k,
        "ratings": len(truth),
        "positive_ratings": int(sum(truth.num_positives.values())),
        "found_positives": result.found_positives,
        "missing_classes": len(result.missing_classes),
        "ignored_classes": len(result.ignored_classes),
        "submitted": result.submitted,
        "truncated": result.truncated,
        "unrated": result.unrated,
        "duplicates": result.duplicates,
        "scored": result.scored,
        "class_ap": {str(c): ap for c, ap in result.class_ap.items()},
    }


def evaluate_video_predictions(predictions: str, labels: Patterns, top_k: int = 20) -> dict:
    """GAP@top_k, Hit@1, PERR and MAP of a video-level prediction file."""
    predicted = read_video_predictions(predictions)
    metrics = VideoMetrics(NUM_VIDEO_CLASSES, top_k=top_k)
    scores = np.zeros((_VIDEO_BATCH, NUM_VIDEO_CLASSES), np.float32)
    targets = np.zeros((_VIDEO_BATCH, NUM_VIDEO_CLASSES), np.float32)
    rows = videos = unpredicted = 0
    labelled_ids: set[str] = set()

    def flush() -> None:
        nonlocal rows
        if rows:
            metrics.accumulate(scores[:rows], targets[:rows])
            scores[:rows] = 0
            targets[:rows] = 0
            rows = 0

    for record in read_any(labels):
        labels_of_video = record.labels[(record.labels >= 0) & (record.labels < NUM_VIDEO_CLASSES)]
        if not len(labels_of_video):
            continue
        labelled_ids.add(record.id)
        videos += 1
        pairs = predicted.get(record.id)
        if pairs is None:
            unpredicted += 1
        else:
            for class_id, score in pairs:
                if 0 <= class_id < NUM_VIDEO_CLASSES:
                    scores[rows, class_id] = score
        targets[rows, labels_of_video] = 1.0
        rows += 1
        if rows == _VIDEO_BATCH:
            flush()
    flush()
    if not videos:
        raise ValueError("the label files hold no labelled video")
    if unpredicted == videos:
        raise ValueError(f"none of the {videos} labelled videos has a prediction in {predictions} "
                         f"({len(predicted)} videos predicted): are they of the same split?")
    result = metrics.get()
    return {
        "gap": result.gap,
        "hit_at_one": result.hit_at_one,
        "perr": result.perr,
        "map": result.map,
        "classes": int(np.count_nonzero(result.num_positives)),
        "top_k": top_k,
        "videos": videos,
        "videos_without_predictions": unpredicted,
        "predictions_without_labels": len(set(predicted) - labelled_ids),
    }


def evaluate(
    submission: str | None = None,
    predictions: str | None = None,
    labels: Patterns = (),
    k: int = MAX_SEGMENTS_PER_CLASS,
    top_k: int = 20,
) -> dict:
    """Score exactly one of ``submission`` (segment CSV) or ``predictions`` (video CSV)."""
    if (submission is None) == (predictions is None):
        raise ValueError("give exactly one of a submission CSV or a video prediction file")
    if submission is not None:
        return evaluate_submission(submission, labels, k)
    return evaluate_video_predictions(predictions, labels, top_k)
