"""YouTube-8M data layer: TFRecord framing, record decoding (protobuf and native), readers."""

from modloc.engine.base.io.examples import (
    AUDIO_SIZE,
    FEATURE_SIZE,
    RGB_SIZE,
    RecordFormatError,
    RecordKindError,
    Video,
    VideoLevelRecord,
    decode_video,
    decode_video_level,
    encode_truth,
    encode_video,
    encode_video_level,
    is_frame_level,
)
from modloc.engine.base.io.readers import read_video_level, read_videos
from modloc.engine.base.io.tfrecord import (
    CorruptRecordError,
    NotTFRecordError,
    ReadStats,
    Record,
    TFRecordWriter,
    encode_record,
    expand_paths,
    iter_all_records,
    iter_buffer_records,
    iter_records,
    masked_crc32c,
    write_records,
)

__all__ = [
    "AUDIO_SIZE", "FEATURE_SIZE", "RGB_SIZE", "CorruptRecordError", "NotTFRecordError", "ReadStats", "Record",
    "RecordFormatError", "RecordKindError", "TFRecordWriter", "Video", "VideoLevelRecord",
    "decode_video", "decode_video_level", "encode_record", "encode_truth", "encode_video",
    "encode_video_level",
    "expand_paths", "is_frame_level", "iter_all_records", "iter_buffer_records", "iter_records",
    "masked_crc32c", "read_video_level", "read_videos", "write_records",
]
