"""``modloc eval``: score a prediction file against the labels in TFRecord files.

- A Kaggle submission CSV is scored with the Kaggle segment MAP@K against the segment
  ratings of the label files (``validate`` records, or a ``test_truth`` split), over the
  class space of those labels: the classes with a positive rating are averaged (one
  without a row scores 0), rows of other classes are counted and left out. The file's
  format is checked in full; with ``kaggle_rows`` it must also hold the Kaggle file's
  1,000 rows, one per class of ``segment_label_ids.csv`` (a real submission).
- A video-level prediction file (``VideoId,LabelConfidencePairs``) is scored with GAP@k,
  Hit@1, PERR and per-class MAP against the video labels of the label files (frame-level or
  video-level records). A labelled video without predictions is an all-zero row, as G's
  metrics would see it (its Hit@1 is G's argmax: class 0); predicted videos without labels
  are counted and left out.

Both refuse labels that share few videos with the file (:func:`check_overlap`: fewer than
half of the labelled videos predicted), which would otherwise give a number near 0 that
means nothing; ``allow_low_overlap`` scores it anyway, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np

from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_any
from modloc.engine.base.io.tfrecord import Patterns
from modloc.engine.base.metrics import SegmentTruth, VideoMetrics, segment_map
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS
from modloc.engine.base.submission import ProblemKind, read_submission, read_video_predictions
from modloc.engine.base.vocab import NUM_VIDEO_CLASSES

log = logging.getLogger(__name__)

_VIDEO_BATCH = 256
MIN_OVERLAP = 0.5
"""The least share of the labelled videos a prediction file must cover to be scored."""


def check_overlap(predicted: Collection[str], labelled: Collection[str], predictions: str,
                  labels: str, allow_low_overlap: bool = False) -> int:
    """The number of labelled videos among the ``predicted`` ones; refuses fewer than
    :data:`MIN_OVERLAP` of them (a file scored against another split's labels), or warns
    with the counts when ``allow_low_overlap``.

    Raises:
        ValueError: naming both sides and the counts.
    """
    if not labelled:
        raise ValueError(f"the labels {labels} hold no labelled video")
    shared = len(set(predicted) & set(labelled))
    if shared >= MIN_OVERLAP * len(labelled):
        return shared
    message = (f"{predictions} covers {shared} of the {len(labelled)} labelled videos of "
               f"{labels} ({len(predicted)} videos predicted): are they of the same split?")
    if not allow_low_overlap:
        raise ValueError(f"{message} (at least {MIN_OVERLAP:.0%} must be covered; "
                         "--allow-low-overlap scores it anyway)")
    log.warning("%s Scoring it anyway (--allow-low-overlap): the number says little.", message)
    return shared


def _describe(patterns: Patterns) -> str:
    return patterns if isinstance(patterns, str) else " ".join(map(str, patterns))


def evaluate_submission(submission: str, labels: Patterns, k: int = MAX_SEGMENTS_PER_CLASS,
                        kaggle_rows: bool = False, allow_low_overlap: bool = False) -> dict:
    """Segment MAP@k of a submission CSV over the labels' class space (module doc); keys
    ``map``, ``classes`` and the bookkeeping. ``kaggle_rows`` requires the 1,000 rows of
    a Kaggle submission."""
    allow = () if kaggle_rows else (ProblemKind.MISSING_CLASS, ProblemKind.UNKNOWN_CLASS)
    rankings = read_submission(submission, strict=True, allow=allow)
    truth = SegmentTruth.from_videos(record for record in read_any(labels) if isinstance(record, Video))
    submitted = {segment.rpartition(":")[0] for row in rankings.values() for segment in row}
    shared = check_overlap(submitted, truth.video_ids, submission, _describe(labels), allow_low_overlap)
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
        "class_space": "Kaggle: the 1000 segment classes" if kaggle_rows else "the labels' rated classes",
        "rated_videos": len(truth.video_ids),
        "rated_videos_submitted": shared,
        "class_ap": {str(c): ap for c, ap in result.class_ap.items()},
    }


def evaluate_video_predictions(predictions: str, labels: Patterns, top_k: int = 20,
                               allow_low_overlap: bool = False) -> dict:
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
    check_overlap(predicted, labelled_ids, predictions, _describe(labels), allow_low_overlap)
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
    kaggle_rows: bool = False,
    allow_low_overlap: bool = False,
) -> dict:
    """Score exactly one of ``submission`` (segment CSV) or ``predictions`` (video CSV)."""
    if (submission is None) == (predictions is None):
        raise ValueError("give exactly one of a submission CSV or a video prediction file")
    if submission is not None:
        return evaluate_submission(submission, labels, k, kaggle_rows, allow_low_overlap)
    return evaluate_video_predictions(predictions, labels, top_k, allow_low_overlap)
