"""``modloc inspect``: what a set of YouTube-8M TFRecord files holds.

Files may be frame-level (``SequenceExample``, the features of the 2018/2019 data and of
the synthetic splits, or truth files without frames) or video-level (``Example``, mean
features). The kind is read from each file's first record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.io.examples import VideoLevelRecord
from modloc.engine.base.io.readers import read_any
from modloc.engine.base.io.tfrecord import Patterns, ReadStats, expand_paths
from modloc.engine.base.vocab import NUM_VIDEO_CLASSES


@dataclass
class InspectReport:
    """Counts summed over every file (the keys of ``modloc inspect --json``)."""

    files: int = 0
    bytes: int = 0
    records: int = 0
    corrupt_records: int = 0
    videos: int = 0  # frame-level records
    video_level_records: int = 0
    frames: int = 0
    min_frames: int = 0
    max_frames: int = 0
    labels: int = 0
    labelled_videos: int = 0
    distinct_classes: int = 0
    out_of_vocabulary_classes: int = 0  # distinct label ids outside the 3862 vocabulary
    rated_segments: int = 0  # rated (segment, class) pairs
    positive_segments: int = 0
    unique_rated_segments: int = 0  # distinct (video, start time)
    # rated pairs no submission can match: a start not a multiple of 5 (REFERENCE §1.2), or
    # one past the video's last frame (in records that carry frames)
    misaligned_segments: int = 0
    segments_past_the_end: int = 0
    stream_mismatches: int = 0  # videos whose rgb and audio frame counts differ
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def inspect(
    patterns: Patterns,
    skip_corrupt: bool = True,
    decoder: str = "native",
    on_file: Callable[[str], None] | None = None,
) -> InspectReport:
    """Summarize the files named by ``patterns``.

    With ``skip_corrupt`` (the default here: inspecting damaged files is a main use), corrupt
    records are counted and described in ``errors``; otherwise the first one raises.
    """
    report = InspectReport()
    stats = ReadStats()
    classes: set[int] = set()
    for path in expand_paths(patterns):
        report.files += 1
        for record in read_any(path, skip_corrupt=skip_corrupt, stats=stats, decoder=decoder):
            report.labels += len(record.labels)
            report.labelled_videos += bool(len(record.labels))
            classes.update(record.labels.tolist())
            if isinstance(record, VideoLevelRecord):
                report.video_level_records += 1
                continue
            report.videos += 1
            frames = record.num_frames
            report.frames += frames
            report.min_frames = frames if report.videos == 1 else min(report.min_frames, frames)
            report.max_frames = max(report.max_frames, frames)
            report.rated_segments += len(record.segment_labels)
            report.positive_segments += int(np.count_nonzero(record.segment_scores > 0.5))
            report.unique_rated_segments += record.num_rated_segments
            starts = record.segment_start_times
            report.misaligned_segments += int(np.count_nonzero(starts % SEGMENT_FRAMES))
            if frames:  # truth files carry ratings without frames
                report.segments_past_the_end += int(np.count_nonzero(starts >= frames))
            report.stream_mismatches += record.rgb_frames != record.audio_frames
        if on_file is not None:
            on_file(path)
    report.bytes = stats.bytes
    report.records = stats.records
    report.corrupt_records = stats.corrupt_records
    report.errors = stats.errors
    report.distinct_classes = len(classes)
    report.out_of_vocabulary_classes = sum(1 for c in classes if not 0 <= c < NUM_VIDEO_CLASSES)
    return report
