"""YouTube-8M records as Python objects: the protobuf reference decoder and the encoder.

Frame-level records are ``tf.train.SequenceExample`` (REFERENCE §1.2): context ``id``,
``labels`` and, on rated splits, the parallel lists ``segment_labels``,
``segment_start_times``, ``segment_end_times``, ``segment_scores``; feature lists ``rgb``
(1024 uint8 per frame) and ``audio`` (128 uint8 per frame). Video-level records are
``tf.train.Example`` with ``id`` (``video_id`` in the 2017 files), ``labels``,
``mean_rgb`` and ``mean_audio`` (REFERENCE §1.3).

Features stay uint8: a :class:`Video` holds one ``(M, 1152)`` array, RGB in columns
``[0, 1024)`` and audio in ``[1024, 1152)``. Like the reference reader, a video has
``M = min(rgb frames, audio frames)`` frames; both counts are kept as read, so a file whose
streams disagree is visible (``modloc inspect`` reports it) instead of silently trimmed.

This module is the reference: the native decoder (:mod:`modloc.engine.base.io.native`) must produce
exactly what it does on the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from modloc.engine._proto.modloc import yt8m_example_pb2 as pb
from modloc.engine.base.io.tfrecord import CorruptRecordError, Record

RGB_SIZE = 1024
AUDIO_SIZE = 128
FEATURE_SIZE = RGB_SIZE + AUDIO_SIZE

_EMPTY_INT = np.zeros(0, dtype=np.int64)
_EMPTY_FLOAT = np.zeros(0, dtype=np.float32)


class RecordFormatError(ValueError):
    """A record whose protobuf decodes but does not have the YouTube-8M layout."""


def _int_array(values=()) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _float_array(values=()) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1)


@dataclass(eq=False)
class Video:
    """One frame-level record.

    Attributes:
        id: video id (UTF-8).
        features: ``(M, 1152)`` uint8 quantized features, RGB then audio.
        labels: ``(L,)`` int64 video-level class ids (3862 vocabulary).
        segment_labels, segment_start_times, segment_end_times: ``(R,)`` int64, one entry
            per rated (segment, class) pair.
        segment_scores: ``(R,)`` float32 ratings, 0.0 or 1.0.
        rgb_frames, audio_frames: frames in each stream as stored (``M`` is the smaller).
    """

    id: str
    features: np.ndarray
    labels: np.ndarray = field(default_factory=lambda: _EMPTY_INT)
    segment_labels: np.ndarray = field(default_factory=lambda: _EMPTY_INT)
    segment_start_times: np.ndarray = field(default_factory=lambda: _EMPTY_INT)
    segment_end_times: np.ndarray = field(default_factory=lambda: _EMPTY_INT)
    segment_scores: np.ndarray = field(default_factory=lambda: _EMPTY_FLOAT)
    rgb_frames: int = -1
    audio_frames: int = -1

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.uint8).reshape(-1, FEATURE_SIZE)
        self.labels = _int_array(self.labels)
        self.segment_labels = _int_array(self.segment_labels)
        self.segment_start_times = _int_array(self.segment_start_times)
        self.segment_end_times = _int_array(self.segment_end_times)
        self.segment_scores = _float_array(self.segment_scores)
        if self.rgb_frames < 0:
            self.rgb_frames = len(self.features)
        if self.audio_frames < 0:
            self.audio_frames = len(self.features)
        rated = {
            "segment_labels": len(self.segment_labels),
            "segment_start_times": len(self.segment_start_times),
            "segment_scores": len(self.segment_scores),
        }
        if len(set(rated.values())) != 1:
            raise RecordFormatError(f"video {self.id!r}: segment lists differ in length: {rated}")
        if len(self.segment_end_times) not in (0, len(self.segment_labels)):
            raise RecordFormatError(
                f"video {self.id!r}: {len(self.segment_end_times)} segment_end_times "
                f"for {len(self.segment_labels)} rated segments"
            )

    @property
    def num_frames(self) -> int:
        return len(self.features)

    @property
    def rgb(self) -> np.ndarray:
        """``(M, 1024)`` uint8 view."""
        return self.features[:, :RGB_SIZE]

    @property
    def audio(self) -> np.ndarray:
        """``(M, 128)`` uint8 view."""
        return self.features[:, RGB_SIZE:]

    @property
    def num_rated_segments(self) -> int:
        """Unique rated segment start times (the segment-level training examples, §2)."""
        return len(np.unique(self.segment_start_times))

    def same_as(self, other: Video) -> bool:
        """Field-by-field equality (arrays compared by value and dtype)."""
        return (
            self.id == other.id
            and self.rgb_frames == other.rgb_frames
            and self.audio_frames == other.audio_frames
            and all(
                _same_array(getattr(self, name), getattr(other, name))
                for name in (
                    "features",
                    "labels",
                    "segment_labels",
                    "segment_start_times",
                    "segment_end_times",
                    "segment_scores",
                )
            )
        )


@dataclass(eq=False)
class VideoLevelRecord:
    """One video-level record: mean features as float32 (not quantized)."""

    id: str
    mean_rgb: np.ndarray
    mean_audio: np.ndarray
    labels: np.ndarray = field(default_factory=lambda: _EMPTY_INT)
    has_labels: bool = True

    def __post_init__(self) -> None:
        self.mean_rgb = _float_array(self.mean_rgb)
        self.mean_audio = _float_array(self.mean_audio)
        self.labels = _int_array(self.labels)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    # NaN ratings are legal float bytes: two decodes of the same NaN are the same video.
    equal_nan = np.issubdtype(a.dtype, np.floating)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=equal_nan)


# --- decoding -------------------------------------------------------------------------


def _id_of(features: pb.Features) -> str:
    for key in ("id", "video_id"):
        if key in features.feature:
            values = features.feature[key].bytes_list.value
            if len(values) != 1:
                raise RecordFormatError(f"context '{key}' has {len(values)} values, expected 1")
            try:
                return values[0].decode("utf-8")
            except UnicodeDecodeError as error:
                raise RecordFormatError(f"context '{key}' is not valid UTF-8: {values[0]!r}") from error
    raise RecordFormatError("no 'id' (or 'video_id') in the record")


def _ints(features: pb.Features, key: str) -> np.ndarray:
    if key not in features.feature:
        return _EMPTY_INT
    return _int_array(features.feature[key].int64_list.value)


def _floats(features: pb.Features, key: str) -> np.ndarray:
    if key not in features.feature:
        return _EMPTY_FLOAT
    return _float_array(features.feature[key].float_list.value)


def _frames(feature_lists: pb.FeatureLists, key: str, size: int) -> list[bytes]:
    if key not in feature_lists.feature_list:
        return []
    frames = []
    for position, feature in enumerate(feature_lists.feature_list[key].feature):
        values = feature.bytes_list.value
        if len(values) != 1 or len(values[0]) != size:
            got = f"{len(values)} values" if len(values) != 1 else f"{len(values[0])} bytes"
            raise RecordFormatError(f"frame {position} of '{key}' has {got}, expected one of {size} bytes")
        frames.append(values[0])
    return frames


def is_frame_level(payload: bytes) -> bool:
    """True for a SequenceExample with feature lists, False for a video-level Example.

    An ``Example`` parses as a ``SequenceExample`` (field 1 is ``Features`` in both), so the
    presence of feature lists, or of ``mean_rgb``, tells the two apart.
    """
    message = _parse(payload)
    if len(message.feature_lists.feature_list):
        return True
    return "mean_rgb" not in message.context.feature


def _parse(payload: bytes) -> pb.SequenceExample:
    try:
        return pb.SequenceExample.FromString(payload)
    except DecodeError as error:
        raise RecordFormatError(f"not a protobuf SequenceExample/Example: {error}") from error


def decode_video(payload: bytes) -> Video:
    """Decode a frame-level ``SequenceExample`` payload."""
    message = _parse(payload)
    context = message.context
    video_id = _id_of(context)
    try:
        rgb = _frames(message.feature_lists, "rgb", RGB_SIZE)
        audio = _frames(message.feature_lists, "audio", AUDIO_SIZE)
    except RecordFormatError as error:
        raise RecordFormatError(f"video {video_id!r}: {error}") from None
    num_frames = min(len(rgb), len(audio))
    features = np.empty((num_frames, FEATURE_SIZE), dtype=np.uint8)
    if num_frames:
        features[:, :RGB_SIZE] = np.frombuffer(b"".join(rgb[:num_frames]), np.uint8).reshape(-1, RGB_SIZE)
        features[:, RGB_SIZE:] = np.frombuffer(b"".join(audio[:num_frames]), np.uint8).reshape(-1, AUDIO_SIZE)
    return Video(
        id=video_id,
        features=features,
        labels=_ints(context, "labels"),
        segment_labels=_ints(context, "segment_labels"),
        segment_start_times=_ints(context, "segment_start_times"),
        segment_end_times=_ints(context, "segment_end_times"),
        segment_scores=_floats(context, "segment_scores"),
        rgb_frames=len(rgb),
        audio_frames=len(audio),
    )


def decode_video_level(payload: bytes) -> VideoLevelRecord:
    """Decode a video-level ``Example`` payload."""
    message = _parse(payload)
    features = message.context
    video_id = _id_of(features)
    mean_rgb = _floats(features, "mean_rgb")
    mean_audio = _floats(features, "mean_audio")
    if len(mean_rgb) != RGB_SIZE or len(mean_audio) != AUDIO_SIZE:
        raise RecordFormatError(
            f"video {video_id!r}: mean_rgb/mean_audio have {len(mean_rgb)}/{len(mean_audio)} "
            f"values, expected {RGB_SIZE}/{AUDIO_SIZE}"
        )
    return VideoLevelRecord(
        id=video_id,
        mean_rgb=mean_rgb,
        mean_audio=mean_audio,
        labels=_ints(features, "labels"),
        has_labels="labels" in features.feature,
    )


# --- encoding -------------------------------------------------------------------------


def _set_bytes(features: pb.Features, key: str, value: bytes) -> None:
    features.feature[key].bytes_list.value.append(value)


def encode_video(video: Video, include_labels: bool = True) -> bytes:
    """Serialize a :class:`Video` as a frame-level ``SequenceExample``.

    Segment fields are written only when the video has rated segments, as in the real
    files (the train split has none). ``include_labels=False`` drops ``labels`` and the
    segment fields (the unlabelled test layout).
    """
    message = pb.SequenceExample()
    context = message.context
    _set_bytes(context, "id", video.id.encode("utf-8"))
    if include_labels:
        context.feature["labels"].int64_list.value.extend(video.labels.tolist())
        if len(video.segment_labels):
            end_times = video.segment_end_times
            if not len(end_times):
                end_times = video.segment_start_times + 5
            context.feature["segment_labels"].int64_list.value.extend(video.segment_labels.tolist())
            context.feature["segment_start_times"].int64_list.value.extend(video.segment_start_times.tolist())
            context.feature["segment_end_times"].int64_list.value.extend(end_times.tolist())
            context.feature["segment_scores"].float_list.value.extend(video.segment_scores.tolist())
    rgb = message.feature_lists.feature_list["rgb"].feature
    audio = message.feature_lists.feature_list["audio"].feature
    for frame in video.features:
        rgb.add().bytes_list.value.append(frame[:RGB_SIZE].tobytes())
        audio.add().bytes_list.value.append(frame[RGB_SIZE:].tobytes())
    return message.SerializeToString()


def encode_truth(video: Video) -> bytes:
    """The segment truth of a video: the ``validate`` context keys, no features.

    Written for the synthetic ``test`` split, so that the same readers and ``modloc eval
    --labels`` read truth files and validate files alike.
    """
    return encode_video(Video(
        id=video.id,
        features=np.zeros((0, FEATURE_SIZE), np.uint8),
        labels=video.labels,
        segment_labels=video.segment_labels,
        segment_start_times=video.segment_start_times,
        segment_end_times=video.segment_end_times,
        segment_scores=video.segment_scores,
    ))


def encode_video_level(record: VideoLevelRecord, id_key: str = "id") -> bytes:
    """Serialize a :class:`VideoLevelRecord` as a video-level ``Example``."""
    message = pb.Example()
    features = message.features
    _set_bytes(features, id_key, record.id.encode("utf-8"))
    if record.has_labels:
        features.feature["labels"].int64_list.value.extend(record.labels.tolist())
    features.feature["mean_rgb"].float_list.value.extend(record.mean_rgb.tolist())
    features.feature["mean_audio"].float_list.value.extend(record.mean_audio.tolist())
    return message.SerializeToString()


class RecordKindError(CorruptRecordError):
    """A well-formed record that a frame-level reader cannot hand out: a video-level
    ``Example``, or a record without frames where the caller needs features.

    Raised even with ``skip_corrupt``: such a record means the wrong files were given
    (video-level shards, or ``test_truth/`` ratings where features are needed), and
    skipping them would silently read nothing.
    """


def frame_record_problem(
    record: Record, video_id: str, rgb_frames: int, audio_frames: int, require_frames: bool
) -> RecordKindError | None:
    """Why a decoded frame-level ``record`` must not be handed out, or None.

    Frame-level records without frames are legitimate: a ``test_truth`` file holds only
    ratings. They are refused only with ``require_frames`` (training and localization,
    which would otherwise run on all-padding inputs).
    """
    if not rgb_frames and not audio_frames and not is_frame_level(record.payload):
        # field 1 is Features in both messages: an Example decodes as a frameless video
        return RecordKindError(
            record.source, record.index, record.offset,
            f"video {video_id!r} is a video-level Example (mean_rgb/mean_audio, no frame "
            "features); this needs frame-level SequenceExample records",
        )
    if require_frames and not min(rgb_frames, audio_frames):
        return RecordKindError(
            record.source, record.index, record.offset,
            f"video {video_id!r} has no frames ({rgb_frames} rgb, {audio_frames} audio); "
            "this needs frame features, which a ratings-only record (a test_truth file) lacks",
        )
    return None
