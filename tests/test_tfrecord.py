"""TFRecord framing and protobuf encoding checked against bytes built independently.

The CRC32C here is a bitwise textbook implementation and the protobuf bytes are written by
hand from the wire-format rules, so the project's code is not checked against itself.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from modloc.engine.base.io import (
    CorruptRecordError,
    ReadStats,
    RecordKindError,
    Video,
    VideoLevelRecord,
    decode_video,
    encode_record,
    encode_truth,
    encode_video,
    encode_video_level,
    iter_buffer_records,
    iter_records,
    masked_crc32c,
    read_videos,
    write_records,
)


def reference_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def reference_frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", reference_mask(reference_crc32c(length))) + payload
            + struct.pack("<I", reference_mask(reference_crc32c(payload))))


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def feature_entry(key: str, feature: bytes) -> bytes:
    # map<string, Feature> entry: key = 1, value = 2
    return field_bytes(1, field_bytes(1, key.encode()) + field_bytes(2, feature))


def bytes_feature(*values: bytes) -> bytes:
    return field_bytes(1, b"".join(field_bytes(1, v) for v in values))


def int64_feature(*values: int) -> bytes:
    return field_bytes(3, field_bytes(1, b"".join(varint(v) for v in values)))


def float_feature(*values: float) -> bytes:
    return field_bytes(2, field_bytes(1, struct.pack(f"<{len(values)}f", *values)))


def hand_built_sequence_example(video_id: str, labels, rgb_frames, audio_frames, ratings=()) -> bytes:
    context = feature_entry("id", bytes_feature(video_id.encode())) + feature_entry(
        "labels", int64_feature(*labels))
    if ratings:
        classes, starts, scores = zip(*ratings, strict=True)
        context += feature_entry("segment_labels", int64_feature(*classes))
        context += feature_entry("segment_start_times", int64_feature(*starts))
        context += feature_entry("segment_end_times", int64_feature(*(s + 5 for s in starts)))
        context += feature_entry("segment_scores", float_feature(*scores))
    rgb_list = b"".join(field_bytes(1, bytes_feature(frame)) for frame in rgb_frames)
    audio_list = b"".join(field_bytes(1, bytes_feature(frame)) for frame in audio_frames)
    feature_lists = field_bytes(1, field_bytes(1, b"rgb") + field_bytes(2, rgb_list)) + field_bytes(
        1, field_bytes(1, b"audio") + field_bytes(2, audio_list))
    return field_bytes(1, context) + field_bytes(2, feature_lists)


def test_crc_matches_the_published_check_value():
    # CRC-32C check value of "123456789" (RFC 3720, B.4).
    assert reference_crc32c(b"123456789") == 0xE3069283
    assert masked_crc32c(b"123456789") == reference_mask(0xE3069283)
    for payload in (b"", b"\x00", bytes(range(256)) * 7):
        assert masked_crc32c(payload) == reference_mask(reference_crc32c(payload))


def test_writer_output_equals_independent_framing(tmp_path):
    payloads = [b"", b"a", bytes(range(256)), b"\xff" * 1000]
    path = tmp_path / "x.tfrecord"
    assert write_records(path, payloads) == 4
    assert path.read_bytes() == b"".join(reference_frame(p) for p in payloads)
    assert [r.payload for r in iter_records(path)] == payloads
    assert [r.offset for r in iter_records(path)] == [0, 16, 33, 305]


def test_reads_hand_built_record(tmp_path):
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, 1024, dtype=np.uint8).tobytes() for _ in range(3)]
    audio = [rng.integers(0, 256, 128, dtype=np.uint8).tobytes() for _ in range(3)]
    payload = hand_built_sequence_example("vid€", [5, 3861, 0], rgb, audio,
                                          ratings=[(5, 0, 1.0), (5, 10, 0.0)])
    path = tmp_path / "hand.tfrecord"
    path.write_bytes(reference_frame(payload))
    (video,) = read_videos(path, decoder="protobuf")
    assert video.id == "vid€"
    assert video.labels.tolist() == [5, 3861, 0]
    assert video.features.shape == (3, 1152)
    assert video.rgb.tobytes() == b"".join(rgb)
    assert video.audio.tobytes() == b"".join(audio)
    assert video.segment_labels.tolist() == [5, 5]
    assert video.segment_start_times.tolist() == [0, 10]
    assert video.segment_end_times.tolist() == [5, 15]
    assert video.segment_scores.tolist() == [1.0, 0.0]
    # Our encoder's bytes decode to the same video (field order may differ from the hand-built).
    assert decode_video(encode_video(video)).same_as(video)


def _three_record_file(tmp_path):
    videos = [Video(id=f"v{i}", features=np.full((i + 1, 1152), i, np.uint8), labels=[i]) for i in range(3)]
    path = tmp_path / "three.tfrecord"
    write_records(path, [encode_video(v) for v in videos])
    return path


def test_data_crc_error_names_file_record_and_offset(tmp_path):
    path = _three_record_file(tmp_path)
    records = list(iter_records(path))
    raw = bytearray(path.read_bytes())
    raw[records[1].offset + 12 + 20] ^= 0x01  # a byte inside record 1's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecordError) as info:
        list(iter_records(path))
    assert info.value.index == 1 and info.value.offset == records[1].offset
    assert str(path) in str(info.value) and "data CRC" in str(info.value)
    # skip_corrupt: the data CRC error costs one record; the rest is read.
    stats = ReadStats()
    assert [v.id for v in read_videos(path, skip_corrupt=True, stats=stats, decoder="protobuf")] == ["v0", "v2"]
    assert (stats.records, stats.corrupt_records) == (2, 1)


def test_length_crc_error_and_truncation_stop_the_file(tmp_path):
    path = _three_record_file(tmp_path)
    records = list(iter_records(path))
    raw = path.read_bytes()
    bad_length = bytearray(raw)
    bad_length[records[2].offset + 8] ^= 0xFF
    path.write_bytes(bytes(bad_length))
    with pytest.raises(CorruptRecordError, match="record 2 at byte offset .*length CRC"):
        list(iter_records(path))
    stats = ReadStats()
    assert len(list(iter_records(path, skip_corrupt=True, stats=stats))) == 2
    assert stats.corrupt_records == 1

    for cut, reason in ((records[2].offset + 5, "truncated header"), (len(raw) - 1, "truncated record")):
        path.write_bytes(raw[:cut])
        with pytest.raises(CorruptRecordError, match=reason) as info:
            list(iter_records(path))
        assert info.value.index == 2


def test_undecodable_payload_is_located(tmp_path):
    path = tmp_path / "junk.tfrecord"
    good = encode_video(Video(id="ok", features=np.zeros((1, 1152), np.uint8)))
    write_records(path, [good, b"\xff\xff\xff", good])
    with pytest.raises(CorruptRecordError, match=r"record 1 at byte offset \d+: not a protobuf"):
        list(read_videos(path, decoder="protobuf"))
    stats = ReadStats()
    assert len(list(read_videos(path, skip_corrupt=True, stats=stats, decoder="protobuf"))) == 2
    assert (stats.records, stats.corrupt_records) == (2, 1)


def test_wrong_frame_size_is_a_format_error(tmp_path):
    payload = hand_built_sequence_example("x", [], [b"\x00" * 1000], [b"\x00" * 128])
    with pytest.raises(ValueError, match="frame 0 of 'rgb' has 1000 bytes, expected one of 1024"):
        decode_video(payload)


def _video_level_payload(video_id: str) -> bytes:
    return encode_video_level(VideoLevelRecord(video_id, np.zeros(1024), np.zeros(128), labels=[3]))


@pytest.mark.parametrize("decoder", ["protobuf", "native"])
@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_a_video_level_example_is_refused_by_the_frame_level_reader(tmp_path, decoder, skip_corrupt):
    # An Example parses as a SequenceExample (field 1 is Features in both): unchecked, it
    # would be read as a video with no frames.
    path = tmp_path / "mixed.tfrecord"
    good = [encode_video(Video(id=f"v{i}", features=np.full((2, 1152), i, np.uint8))) for i in range(2)]
    write_records(path, [*good, _video_level_payload("02aa"), good[0]])
    seen = []
    with pytest.raises(RecordKindError) as info:
        seen.extend(read_videos(path, skip_corrupt=skip_corrupt, decoder=decoder))
    assert [v.id for v in seen] == ["v0", "v1"]  # the records before it are handed out
    assert info.value.source == str(path) and info.value.index == 2
    assert f"{path}: record 2 at byte offset" in str(info.value)
    assert "'02aa' is a video-level Example" in str(info.value)
    assert "needs frame-level SequenceExample records" in str(info.value)


@pytest.mark.parametrize("decoder", ["protobuf", "native"])
def test_frameless_records_are_read_but_refused_where_frames_are_needed(tmp_path, decoder):
    path = tmp_path / "truth.tfrecord"
    rated = Video(id="t1", features=np.zeros((10, 1152), np.uint8), segment_labels=[4],
                  segment_start_times=[5], segment_scores=[1.0])
    with_frames = Video(id="f0", features=np.ones((3, 1152), np.uint8))
    write_records(path, [encode_video(with_frames), encode_truth(rated)])
    # a test_truth record: ratings without frames, legitimately read
    (_, truth) = read_videos(path, decoder=decoder)
    assert truth.num_frames == 0 and truth.segment_labels.tolist() == [4]
    seen = []
    with pytest.raises(RecordKindError, match=rf"{path}: record 1 at byte offset \d+: video 't1' "
                       r"has no frames \(0 rgb, 0 audio\)"):
        seen.extend(read_videos(path, decoder=decoder, skip_corrupt=True, require_frames=True))
    assert [v.id for v in seen] == ["f0"]


def test_buffer_reader_matches_file_reader(tmp_path):
    path = _three_record_file(tmp_path)
    assert [r.payload for r in iter_buffer_records(path.read_bytes())] == [
        r.payload for r in iter_records(path)]


def test_encode_record_is_the_framing():
    assert encode_record(b"abc") == reference_frame(b"abc")


def test_oversized_length_is_refused_before_reading(tmp_path):
    from modloc.engine.base.io.tfrecord import MAX_RECORD_BYTES

    length = struct.pack("<Q", MAX_RECORD_BYTES + 1)
    path = tmp_path / "huge.tfrecord"
    path.write_bytes(length + struct.pack("<I", reference_mask(reference_crc32c(length))) + b"x" * 8)
    with pytest.raises(CorruptRecordError, match="exceeds"):
        list(iter_records(path))
    at_limit = struct.pack("<Q", MAX_RECORD_BYTES)
    path.write_bytes(at_limit + struct.pack("<I", reference_mask(reference_crc32c(at_limit))) + b"x" * 8)
    with pytest.raises(CorruptRecordError, match="truncated record"):
        list(iter_records(path))
