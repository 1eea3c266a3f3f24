"""Training/evaluation examples from frame-level TFRecords, batched as uint8 numpy arrays.

Pure numpy (no torch): :mod:`modloc.training.data` wraps these streams for a torch ``DataLoader``.

Two example layouts (REFERENCE §2):

- :class:`VideoLevelDataset`: one example per video, its first ``min(num_frames, 300)``
  frames, multi-hot labels, no label weights.
- :class:`SegmentDataset`: one example per unique rated ``segment_start_time`` of a video,
  the 5 frames ``[start, start + 5)``, labels = the rating scores at the rated classes and
  weights 1.0 exactly there (so BCE only sees rated (segment, class) pairs).

The batch contract (:class:`Batch`) that the models rely on: features stay uint8 end to end;
``num_frames[b]`` counts the valid frames of row ``b``; frames at index ``>= num_frames[b]``
are padding, stored as uint8 zeros. A padding frame means 0.0 *after dequantization*, which
no uint8 code produces, so the model replaces padding with
:func:`modloc.engine.base.features.masked_model_input` instead of dequantizing the zeros.

Reading order and sharding (REFERENCE §6 "shuffling"): each epoch shuffles the file order
with a generator seeded by ``(seed, epoch)``, identical in every shard, so shards agree on
the split; a shard then reads either every ``count``-th file of that order (when there are at
least as many files as shards) or, with fewer files than shards, every ``count``-th record of
the concatenated files, so that no shard sits idle. Either way every record is read by
exactly one shard per epoch. Examples then pass through a random-replacement shuffle buffer
(the counterpart of the reference's ``shuffle_batch_join`` queue, capacity ``5 * batch``)
seeded by ``(seed, epoch, shard)``: the stream is deterministic for a seed and a shard layout.
"""

from __future__ import annotations

import abc
import copy
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES, SEGMENT_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import decode_frame_records, read_videos
from modloc.engine.base.io.tfrecord import Patterns, ReadStats, expand_paths, iter_records
from modloc.engine.base.vocab import ClassSpace, as_class_space

PadTo = Literal["max_frames", "longest"]

# --- batches and counts ---------------------------------------------------------------


@dataclass(eq=False)
class Batch:
    """A batch of examples; features uint8, padding marked by ``num_frames``.

    Attributes:
        video_ids: ``B`` video ids (a video appears once per rated segment in segment mode).
        features: ``(B, M, 1152)`` uint8; rows are zero at frames ``>= num_frames[b]``.
        num_frames: ``(B,)`` int32 valid frames per row (0 <= num_frames <= M).
        labels: ``(B, C)`` float32 over the class space (multi-hot, or rating scores).
        label_weights: ``(B, C)`` float32 (1.0 at rated classes) in segment mode, else None.
        segment_starts: ``(B,)`` int64 first frame of each segment (segment mode), else None.
    """

    video_ids: list[str]
    features: np.ndarray
    num_frames: np.ndarray
    labels: np.ndarray
    label_weights: np.ndarray | None = None
    segment_starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.video_ids)


@dataclass
class DatasetStats:
    """What one shard read and produced in one epoch.

    Attributes:
        epoch: the epoch these counts belong to.
        files: files this shard opened (all of them when records are interleaved).
        videos: videos assigned to this shard.
        examples: examples produced (before ``drop_last``).
        dropped_labels: video labels outside the class space (video mode).
        dropped_ratings: segment ratings outside the class space (segment mode).
        invalid_ratings: ratings whose start is negative, not a multiple of the segment
            length, or ``>= max_frames`` (dropped; :class:`SegmentDataset` ``strict`` raises).
        empty_windows: segment examples whose window lies wholly past the video's end
            (kept, all padding, as the reference does).
        videos_without_examples: videos that produced no example.
        read: framing/CRC counts of the reader (in interleaved mode every shard counts
            every record of every file).
    """

    epoch: int = 0
    files: int = 0
    videos: int = 0
    examples: int = 0
    dropped_labels: int = 0
    dropped_ratings: int = 0
    invalid_ratings: int = 0
    empty_windows: int = 0
    videos_without_examples: int = 0
    read: ReadStats = field(default_factory=ReadStats)


class InvalidRatingError(ValueError):
    """A segment rating that cannot name a 5-frame window (strict :class:`SegmentDataset`)."""


@dataclass(slots=True)
class _Example:
    video_id: str
    frames: np.ndarray  # (n, 1152) uint8, n valid frames
    positions: np.ndarray  # (k,) int64 class-space positions of the labels/ratings
    scores: np.ndarray | None  # (k,) float32 rating scores; None = multi-hot 1.0
    start: int = 0


# --- streaming datasets ---------------------------------------------------------------


class FrameDataset(abc.ABC):
    """Reading, sharding, shuffling and batching shared by the two datasets (abstract)."""

    def __init__(
        self,
        patterns: Patterns,
        class_ids: ClassSpace | Sequence[int] | np.ndarray | None,
        max_frames: int,
        shuffle: bool,
        shuffle_buffer: int | None,
        seed: int,
        shard: tuple[int, int],
        decoder: str,
        skip_corrupt: bool,
    ):
        # expanded once, eagerly: a glob that matches nothing fails here, not in a worker
        self.paths = expand_paths(patterns)
        self.class_space = as_class_space(class_ids)
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = int(max_frames)
        self.shuffle = shuffle
        if shuffle_buffer is not None and shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.seed = int(seed)
        index, count = (int(value) for value in shard)
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        self.shard = (index, count)
        if decoder not in ("native", "protobuf"):
            raise ValueError(f"unknown decoder {decoder!r}: expected 'native' or 'protobuf'")
        self.decoder = decoder
        self.skip_corrupt = skip_corrupt
        self.stats = DatasetStats()

    @property
    def num_classes(self) -> int:
        return self.class_space.num_classes

    def subshard(self, index: int, count: int) -> FrameDataset:
        """A copy that reads part ``index`` of ``count`` of this dataset's shard.

        Shard ``(i, n)`` split ``count`` ways becomes shard ``(i * count + index, n * count)``
        (e.g. distributed rank × DataLoader worker); the parts together read the shard once.
        """
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"subshard must be (index, count) with 0 <= index < count, got {(index, count)}")
        part = copy.copy(self)
        part.shard = (self.shard[0] * count + index, self.shard[1] * count)
        part.stats = DatasetStats()
        return part

    def batches(
        self,
        batch_size: int,
        drop_last: bool = False,
        epochs: int | None = 1,
        start_epoch: int = 0,
    ) -> Iterator[Batch]:
        """Batches of this shard for ``epochs`` epochs (None: forever), numbered from ``start_epoch``.

        Epochs do not mix: the shuffle buffer drains at the end of each epoch, so its last
        batch may be short (dropped with ``drop_last``). ``self.stats`` holds the counts of
        the epoch in progress, or of the last one after the stream ends. An epoch that
        yields no batch ends the stream (with ``epochs=None`` an empty shard would
        otherwise spin forever).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # the reference's shuffle_batch_join queue holds 5 batches
        capacity = self.shuffle_buffer if self.shuffle_buffer is not None else 5 * batch_size
        if self.shuffle and capacity < batch_size:
            raise ValueError(f"shuffle_buffer {capacity} is smaller than batch_size {batch_size}")
        numbers = itertools.count(start_epoch) if epochs is None else range(start_epoch, start_epoch + epochs)
        for epoch in numbers:
            self.stats = DatasetStats(epoch=epoch)
            examples = self._epoch_examples(epoch, self.stats)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, *self.shard])
                examples = _shuffle_buffer(examples, capacity, rng)
            yielded = False
            for chunk in _chunks(examples, batch_size):
                if drop_last and len(chunk) < batch_size:
                    break
                yielded = True
                yield self._collate(chunk)
            if not yielded:
                return

    def _epoch_paths(self, epoch: int) -> list[str]:
        if not self.shuffle:
            return list(self.paths)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        return [self.paths[i] for i in order]

    def _shard_videos(self, epoch: int, stats: DatasetStats) -> Iterator[tuple[str, Video]]:
        """``(path, video)`` for every video of this shard in the epoch's file order.

        A record without frames (or a video-level ``Example``) raises
        :class:`~modloc.engine.base.io.readers.RecordKindError` naming its file and record: an example
        of it would be all padding.
        """
        paths = self._epoch_paths(epoch)
        index, count = self.shard
        if len(paths) >= count:
            for path in paths[index::count]:
                stats.files += 1
                for video in read_videos(
                    path, self.skip_corrupt, stats.read, self.decoder, require_frames=True
                ):
                    yield path, video
            return
        # Fewer files than shards: shard i takes records i, i + count, ... of the
        # concatenated files, so every shard works and each record still has one reader.
        stats.files += len(paths)
        if self.decoder == "protobuf":
            # skip other shards' records before the (slow) protobuf parse
            records = itertools.chain.from_iterable(
                iter_records(path, self.skip_corrupt, stats.read) for path in paths
            )
            for record in itertools.islice(records, index, None, count):
                for video in decode_frame_records(
                    [record], self.skip_corrupt, stats.read, require_frames=True
                ):
                    yield record.source, video
        else:
            videos = (
                (path, video)
                for path in paths
                for video in read_videos(
                    path, self.skip_corrupt, stats.read, self.decoder, require_frames=True
                )
            )
            yield from itertools.islice(videos, index, None, count)

    def _epoch_examples(self, epoch: int, stats: DatasetStats) -> Iterator[_Example]:
        for path, video in self._shard_videos(epoch, stats):
            stats.videos += 1
            produced = 0
            for example in self._examples(path, video, stats):
                produced += 1
                yield example
            stats.examples += produced
            if not produced:
                stats.videos_without_examples += 1

    @abc.abstractmethod
    def _examples(self, path: str, video: Video, stats: DatasetStats) -> Iterator[_Example]:
        """The examples one video gives (one per video, or one per rated start)."""

    @abc.abstractmethod
    def _batch_frames(self, examples: list[_Example]) -> int:
        """Frames of the batch these examples make (padding included)."""

    def _collate(self, examples: list[_Example]) -> Batch:
        frames = self._batch_frames(examples)
        size = len(examples)
        # written once: valid frames copied, only the padding zeroed
        features = np.empty((size, frames, FEATURE_SIZE), dtype=np.uint8)
        num_frames = np.empty(size, dtype=np.int32)
        labels = np.zeros((size, self.num_classes), dtype=np.float32)
        for row, example in enumerate(examples):
            valid = len(example.frames)
            features[row, :valid] = example.frames
            features[row, valid:] = 0
            num_frames[row] = valid
            labels[row, example.positions] = 1.0 if example.scores is None else example.scores
        return Batch(
            video_ids=[example.video_id for example in examples],
            features=features,
            num_frames=num_frames,
            labels=labels,
        )


class VideoLevelDataset(FrameDataset):
    """One example per video: frames ``[0, min(num_frames, max_frames))``, multi-hot labels.

    ``pad_to="max_frames"`` pads every row to ``max_frames`` as the reference does (its
    padded frames enter the cluster BatchNorm statistics in training, and the gates' frame
    mean of a tree with the older ``"padded_mean"`` gates, so a faithful replica needs
    them); ``"longest"`` pads to the longest video of the batch, saving compute where that
    fidelity does not matter (a tree's ``"reference"`` gates read the same input either
    way). Batches carry no label weights.
    """

    def __init__(
        self,
        patterns: Patterns,
        class_ids: ClassSpace | Sequence[int] | np.ndarray | None = None,
        max_frames: int = MAX_FRAMES,
        pad_to: PadTo = "max_frames",
        shuffle: bool = True,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        decoder: str = "native",
        skip_corrupt: bool = False,
    ):
        super().__init__(
            patterns, class_ids, max_frames, shuffle, shuffle_buffer, seed, shard, decoder, skip_corrupt
        )
        if pad_to not in ("max_frames", "longest"):
            raise ValueError(f"pad_to must be 'max_frames' or 'longest', got {pad_to!r}")
        self.pad_to = pad_to

    def _examples(self, path: str, video: Video, stats: DatasetStats) -> Iterator[_Example]:
        positions = self.class_space.positions(video.labels)
        inside = positions >= 0
        stats.dropped_labels += int(np.count_nonzero(~inside))
        yield _Example(video.id, _unpinned(video.features[: self.max_frames]), positions[inside], None)

    def _batch_frames(self, examples: list[_Example]) -> int:
        if self.pad_to == "max_frames":
            return self.max_frames
        # never 0 (frame means would be NaN): the reader refuses videos without frames
        return max(len(example.frames) for example in examples)


class SegmentDataset(FrameDataset):
    """Segment mode (REFERENCE §2): one example per unique rated start of a video.

    Per video, starts are taken in first-occurrence order. The example of start ``s`` holds
    frames ``[s, s + segment_frames)`` of the video capped at ``max_frames`` and zero-padded
    (``num_frames`` = the valid frames of the window; a window past the video's end is all
    padding, as in the reference, and counted in ``stats.empty_windows``). Labels ``(C,)``
    are the rating scores at the rated classes of that start (a repeated (start, class) pair
    keeps its last score), weights 1.0 exactly there and 0.0 elsewhere.

    Decisions where the reference is silent:

    - a rating whose start is negative, not a multiple of ``segment_frames``, or
      ``>= max_frames`` names no window of the test-time grid; it is dropped and counted in
      ``stats.invalid_ratings``, or raises :class:`InvalidRatingError` with ``strict=True``;
    - ratings of classes outside the class space are dropped (``stats.dropped_ratings``); a
      start left with no rating in the class space yields no example, since it would carry
      no supervised signal.
    """

    def __init__(
        self,
        patterns: Patterns,
        class_ids: ClassSpace | Sequence[int] | np.ndarray | None = None,
        max_frames: int = MAX_FRAMES,
        segment_frames: int = SEGMENT_FRAMES,
        shuffle: bool = True,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        decoder: str = "native",
        skip_corrupt: bool = False,
        strict: bool = False,
    ):
        super().__init__(
            patterns, class_ids, max_frames, shuffle, shuffle_buffer, seed, shard, decoder, skip_corrupt
        )
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
        self.segment_frames = int(segment_frames)
        self.strict = strict

    def _examples(self, path: str, video: Video, stats: DatasetStats) -> Iterator[_Example]:
        starts = video.segment_start_times
        valid = (starts >= 0) & (starts % self.segment_frames == 0) & (starts < self.max_frames)
        if not valid.all():
            bad = starts[~valid]
            if self.strict:
                raise InvalidRatingError(
                    f"{path}: video {video.id!r}: rating start(s) {bad[:10].tolist()} are not "
                    f"multiples of {self.segment_frames} in [0, {self.max_frames})"
                )
            stats.invalid_ratings += len(bad)
        positions = self.class_space.positions(video.segment_labels)
        outside = valid & (positions < 0)
        stats.dropped_ratings += int(np.count_nonzero(outside))
        keep = valid & ~outside
        # the order is the record's, whatever the class space drops
        unique, first = np.unique(starts, return_index=True)
        length = min(video.num_frames, self.max_frames)
        for start in unique[np.argsort(first)].tolist():
            rated = keep & (starts == start)
            if not rated.any():
                continue
            frames = _unpinned(video.features[start : min(start + self.segment_frames, length)])
            if not len(frames):
                stats.empty_windows += 1
            yield _Example(video.id, frames, positions[rated], video.segment_scores[rated], start)

    def _batch_frames(self, examples: list[_Example]) -> int:
        return self.segment_frames

    def _collate(self, examples: list[_Example]) -> Batch:
        batch = super()._collate(examples)
        weights = np.zeros_like(batch.labels)
        for row, example in enumerate(examples):
            weights[row, example.positions] = 1.0
        batch.label_weights = weights
        batch.segment_starts = np.array([example.start for example in examples], dtype=np.int64)
        return batch


def _unpinned(frames: np.ndarray) -> np.ndarray:
    """``frames``, or a copy of it when it is a view into a larger buffer.

    Examples wait in the shuffle buffer, where a view would keep its whole owner alive: the
    rest of a long video, or a native decoder's buffer of many videos.
    """
    owner = frames.base
    if owner is None:
        return frames
    try:
        owner_bytes = memoryview(owner).nbytes
    except TypeError:  # an owner without the buffer protocol: its size is unknown
        owner_bytes = -1
    return frames if owner_bytes == frames.nbytes else frames.copy()


def _chunks(items: Iterable[_Example], size: int) -> Iterator[list[_Example]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _shuffle_buffer(items: Iterable[_Example], capacity: int, rng: np.random.Generator) -> Iterator[_Example]:
    """Random-replacement shuffle: once full, each new item evicts a random held one."""
    buffer: list[_Example] = []
    for item in items:
        if len(buffer) < capacity:
            buffer.append(item)
            continue
        slot = int(rng.integers(capacity))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


__all__ = [
    "Batch", "DatasetStats", "FrameDataset", "InvalidRatingError", "SegmentDataset",
    "VideoLevelDataset",
]
