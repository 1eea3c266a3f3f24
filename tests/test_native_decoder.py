"""The native frame-level decoder against the protobuf reference, on real and hostile bytes.

Every check compares :func:`modloc.engine.base.io.native.decode_payloads` with
:func:`modloc.engine.base.io.examples.decode_video` (the protobuf python runtime, upb, underneath) on the
same payload: both accept it and yield identical videos, or both reject it with the same
reason. Odd encodings are written byte by byte from the wire-format rules; the cases named
"upb: ..." pin behaviours of that runtime which the C++ parser reproduces on purpose.
"""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modloc.engine.base.io import (
    CorruptRecordError,
    ReadStats,
    RecordFormatError,
    RecordKindError,
    Video,
    VideoLevelRecord,
    decode_video,
    encode_record,
    encode_truth,
    encode_video,
    encode_video_level,
    iter_records,
    read_videos,
    write_records,
)
from modloc.engine.base.io.native import (
    FrameBatch,
    decode_payloads,
    read_frame_batches,
)

# --- wire-format helpers --------------------------------------------------------------


def varint(value: int, pad: int = 0) -> bytes:
    """Varint of ``value`` modulo 2**64, made ``pad`` bytes longer than needed."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    out[:-1] = bytes(b | 0x80 for b in out[:-1])
    if pad:
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, data: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(data)) + data


def entry(key: bytes, value: bytes) -> bytes:
    """A map entry field (of Features or FeatureLists)."""
    return ld(1, ld(1, key) + ld(2, value))


def bytes_feature(*values: bytes) -> bytes:
    return ld(1, b"".join(ld(1, v) for v in values))


def int64_feature(*values: int, packed: bool = True) -> bytes:
    if packed:
        return ld(3, ld(1, b"".join(varint(v) for v in values)))
    return ld(3, b"".join(tag(1, 0) + varint(v) for v in values))


def float_feature(*values: float, packed: bool = True) -> bytes:
    if packed:
        return ld(2, ld(1, struct.pack(f"<{len(values)}f", *values)))
    return ld(2, b"".join(tag(1, 5) + struct.pack("<f", v) for v in values))


def frames(count: int, size: int, fill: int = 7) -> bytes:
    """A FeatureList of ``count`` frames of ``size`` bytes."""
    return b"".join(ld(1, bytes_feature(bytes([fill + i]) * size)) for i in range(count))


def sequence_example(context: bytes = b"", lists: bytes = b"") -> bytes:
    return ld(1, context) + ld(2, lists)


def record(
    video_id: bytes = b"abcd", rgb: int = 2, audio: int = 2, extra_context: bytes = b""
) -> bytes:
    """A frame-level payload written by hand."""
    context = entry(b"id", bytes_feature(video_id)) + extra_context
    lists = entry(b"rgb", frames(rgb, 1024)) + entry(b"audio", frames(audio, 128, fill=100))
    return sequence_example(context, lists)


def group(number: int, content: bytes = b"") -> bytes:
    return tag(number, 3) + content + tag(number, 4)


def nested_groups(count: int) -> bytes:
    return tag(7, 3) * count + tag(7, 4) * count


def video(
    frame_count: int, seed: int = 0, rated: int = 0, end_times: bool = True, **fields
) -> Video:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 60, rated) * 5
    return Video(
        id=fields.pop("id", f"v{seed}"),
        features=rng.integers(0, 256, (frame_count, 1152), dtype=np.uint8),
        labels=fields.pop("labels", rng.integers(0, 3862, rng.integers(0, 4))),
        segment_labels=rng.integers(0, 3862, rated),
        segment_start_times=starts,
        segment_end_times=starts + 5 if end_times else np.zeros(0, np.int64),
        segment_scores=rng.integers(0, 2, rated).astype(np.float32),
        **fields,
    )


# --- comparison ------------------------------------------------------------------------


def reference(payload: bytes) -> Video | str:
    try:
        return decode_video(payload)
    except RecordFormatError as error:
        return str(error)


def identical(a: Video, b: Video) -> bool:
    """Field-by-field and bit-for-bit: ``Video.same_as``, which also holds for NaN scores."""
    fields = ("features", "labels", "segment_labels", "segment_start_times",
              "segment_end_times", "segment_scores")
    bitwise = all(
        getattr(a, f).dtype == getattr(b, f).dtype
        and getattr(a, f).shape == getattr(b, f).shape
        and getattr(a, f).tobytes() == getattr(b, f).tobytes()
        for f in fields
    )
    same = a.same_as(b) or bool(np.isnan(a.segment_scores).any())
    return bitwise and same and (a.id, a.rgb_frames, a.audio_frames) == (
        b.id, b.rgb_frames, b.audio_frames)


def assert_agree(payloads: list[bytes]) -> list[Video | str]:
    """Decode ``payloads`` both ways and require the same outcome for each; returns them."""
    batch, errors = decode_payloads(payloads)
    reasons = dict(errors)
    assert len(reasons) == len(errors) and [p for p, _ in errors] == sorted(reasons)
    good = batch.videos()
    outcomes = []
    for position, payload in enumerate(payloads):
        expected = reference(payload)
        if isinstance(expected, str):
            assert reasons.get(position) == expected, payload.hex()
        else:
            assert position not in reasons, (reasons[position], payload.hex())
            assert identical(next(good), expected), payload.hex()
        outcomes.append(expected)
    assert next(good, None) is None
    return outcomes


def agree(payload: bytes) -> Video | str:
    return assert_agree([payload])[0]


# --- real records ------------------------------------------------------------------------


def test_real_frame_level_records(real_data):
    files = sorted((real_data / "frame_level_extractor").glob("*.tfrecord"))
    assert len(files) == 2
    for path in files:
        native = [v for batch in read_frame_batches(path) for v in batch.videos()]
        protobuf = list(read_videos(path, decoder="protobuf"))
        assert len(native) == len(protobuf) == 1
        assert identical(native[0], protobuf[0])
        assert native[0].features.shape[1] == 1152 and len(native[0].features) > 100
        assert_agree([Path(path).read_bytes()[12:-4]])  # the one payload of the file


# --- hand-built edge cases -----------------------------------------------------------------

VALID = {
    "no frames": encode_video(video(0)),
    "one frame": encode_video(video(1)),
    "301 frames": encode_video(video(301, seed=3)),
    "rated segments": encode_video(video(10, seed=4, rated=3)),
    "empty labels": encode_video(video(2, labels=[])),
    "test layout, no labels": encode_video(video(2), include_labels=False),
    "unicode id": encode_video(video(2, id="vidéo ☃ 𝄞 'q\"")),
    "negative and extreme labels": encode_video(video(1, labels=[-1, 2**63 - 1, -(2**63), 0])),
    "missing audio": record(rgb=3, audio=0),
    "rgb and audio counts differ": record(rgb=5, audio=2),
    "more audio than rgb": record(rgb=1, audio=4),
    "video_id key": sequence_example(entry(b"video_id", bytes_feature(b"xyz")),
                                     entry(b"rgb", frames(1, 1024))),
    "id wins over video_id": record(extra_context=entry(b"video_id", bytes_feature(b"other"))),
    "segments without end times": record(extra_context=(
        entry(b"segment_labels", int64_feature(4, 5))
        + entry(b"segment_start_times", int64_feature(0, 5))
        + entry(b"segment_scores", float_feature(1.0, 0.0)))),
    "unpacked int64 and float": record(extra_context=(
        entry(b"labels", int64_feature(3, -7, 2**40, packed=False))
        + entry(b"segment_labels", int64_feature(4, packed=False))
        + entry(b"segment_start_times", int64_feature(5) + int64_feature(packed=False))
        + entry(b"segment_end_times", int64_feature(10, packed=False))
        + entry(b"segment_scores", float_feature(0.5, packed=False)))),
    "packed and unpacked mixed": record(extra_context=entry(
        b"labels", ld(3, ld(1, varint(1) + varint(2)) + tag(1, 0) + varint(3) + ld(1, b"")))),
    "context twice, merged": record() + ld(1, entry(b"labels", int64_feature(9))),
    "feature_lists twice, merged": record(rgb=1, audio=0) + ld(2, entry(b"audio", frames(1, 128))),
    "key twice: last entry wins": record(extra_context=(
        entry(b"labels", int64_feature(1, 2)) + entry(b"labels", int64_feature(3)))),
    "rgb twice: last entry wins": record(rgb=4) + ld(2, entry(b"rgb", frames(1, 1024, fill=50))),
    "value twice in an entry: merged": record(extra_context=ld(1, (
        ld(1, b"labels") + ld(2, int64_feature(1)) + ld(2, int64_feature(2))))),
    "feature list twice in an entry: merged": sequence_example(
        entry(b"id", bytes_feature(b"m")),
        ld(1, ld(1, b"rgb") + ld(2, frames(1, 1024)) + ld(2, frames(2, 1024, fill=9)))
        + entry(b"audio", frames(3, 128))),
    "key after value": sequence_example(
        ld(1, ld(2, bytes_feature(b"late")) + ld(1, b"id")), entry(b"rgb", frames(1, 1024))),
    "oneof, same member twice: lists concatenated": record(extra_context=entry(
        b"labels", int64_feature(1) + int64_feature(2, 3))),
    "oneof switched: last member wins": record(extra_context=entry(
        b"labels", int64_feature(1) + float_feature(2.0) + int64_feature(3))),
    "oneof switched away: empty": record(extra_context=entry(
        b"labels", int64_feature(1) + bytes_feature(b"x"))),
    "map entry without key: key ''": record(extra_context=ld(1, ld(2, int64_feature(5)))),
    "unknown fields everywhere, a group among them": (
        group(15, tag(1, 0) + varint(1) + group(16) + ld(2, b"zz"))
        + ld(1, entry(b"id", bytes_feature(b"u") + tag(9, 5) + b"abcd") + tag(5, 1) + b"\0" * 8)
        + ld(2, entry(b"rgb", frames(1, 1024) + tag(4, 0) + varint(2**64 - 1)))
        + tag(2**29 - 1, 0) + b"\x01"),
    "known fields with another wire type: unknown": record(extra_context=(
        tag(1, 0) + b"\x01"
        + entry(b"labels", int64_feature(4) + tag(3, 0) + b"\x05" + group(1))
        + ld(1, ld(1, b"segment_scores") + ld(2, ld(2, tag(1, 0) + b"\x01"))))),
    "upb: map entry holding an unknown field is dropped": record(extra_context=(
        entry(b"labels", int64_feature(1))
        + ld(1, ld(1, b"labels") + ld(2, int64_feature(2)) + tag(3, 0) + b"\x00"))),
    "upb: map entry holding a group is dropped": record(extra_context=ld(
        1, ld(1, b"labels") + ld(2, int64_feature(2)) + group(9))),
    "upb: field number 0 inside a group": record() + group(3, tag(0, 0) + b"\x01" + group(0)),
    "10-byte varints, bits past 64 dropped": record(extra_context=entry(
        b"labels", ld(3, ld(1, b"\xff" * 9 + b"\x7f" + b"\x80" * 9 + b"\x01")))),
    "padded tags and lengths (5 bytes)": ld(1, entry(b"id", bytes_feature(b"p")))
    + varint(2 << 3 | 2, pad=4) + varint(0, pad=4),
    "100 nested groups at the top": record() + nested_groups(100),
    "95 nested groups inside a frame's BytesList": sequence_example(
        entry(b"id", bytes_feature(b"d")),
        entry(b"rgb", ld(1, ld(1, ld(1, b"\x07" * 1024) + nested_groups(95))))),
    "signalling NaN and -0.0 scores, bits kept": record(extra_context=(
        entry(b"segment_labels", int64_feature(1, 2, 3))
        + entry(b"segment_start_times", int64_feature(0, 5, 10))
        + entry(b"segment_scores", ld(2, ld(1, struct.pack("<3I", 0x7F800001, 0xFFC00123,
                                                           0x80000000)))))),
}

INVALID = {
    "empty payload: no id": b"",
    "id with two values": sequence_example(entry(b"id", bytes_feature(b"a", b"b"))),
    "id with no values": sequence_example(entry(b"id", bytes_feature())),
    "id of int64 kind": sequence_example(entry(b"id", int64_feature(1))),
    "id entry without value": sequence_example(ld(1, ld(1, b"id"))),
    "id not UTF-8": record(video_id=b"ab\xff'\x00\n"),
    "video_id not UTF-8": sequence_example(entry(b"video_id", bytes_feature(b'\xed\xa0\x80"'))),
    "frame of the wrong size": record() + ld(2, entry(
        b"rgb", frames(2, 1024) + ld(1, bytes_feature(b"x" * 1023)))),
    "frame with two values": record() + ld(2, entry(b"audio", ld(1, bytes_feature(
        b"a" * 128, b"b" * 128)))),
    "frame of float kind": record() + ld(2, entry(b"rgb", ld(1, float_feature(1.0)))),
    "bad audio frame after bad rgb frame": record() + ld(2, entry(
        b"audio", ld(1, b""))) + ld(2, entry(b"rgb", frames(1, 1024) + ld(1, b""))),
    "segment lists differ": record(extra_context=(
        entry(b"segment_labels", int64_feature(1, 2))
        + entry(b"segment_start_times", int64_feature(0))
        + entry(b"segment_scores", float_feature(1.0, 0.0)))),
    "end times of another length": record(extra_context=(
        entry(b"segment_labels", int64_feature(1))
        + entry(b"segment_start_times", int64_feature(0))
        + entry(b"segment_end_times", int64_feature(5, 10))
        + entry(b"segment_scores", float_feature(1.0)))),
    "truncated": record()[:-3],
    "truncated varint": record() + tag(9, 0) + b"\x80",
    "11-byte varint": record() + tag(9, 0) + b"\x80" * 10 + b"\x00",
    "6-byte tag": record() + varint(9 << 3, pad=5) + b"\x00",
    "tag above 2**32": record() + b"\x80\x80\x80\x80\x10\x00",
    "6-byte length": record() + tag(9, 2) + varint(0, pad=5),
    "length past the end": record() + tag(9, 2) + varint(5) + b"abc",
    "field number 0": record() + tag(0, 0) + b"\x00",
    "wire type 6": record() + b"\x0e",
    "wire type 7": record() + b"\x0f",
    "end group outside a group": record() + tag(3, 4),
    "group closed by another number": record() + tag(3, 3) + tag(4, 4),
    "unterminated group": record() + tag(3, 3) + tag(1, 0) + b"\x01",
    "submessage past its parent": ld(1, b"\x0a\x05\x0a\x03id") + b"\x00\x00",
    "packed floats of 3 bytes": record(extra_context=entry(b"labels", ld(2, ld(1, b"abc")))),
    "packed varint past its run": record(extra_context=entry(
        b"labels", ld(3, ld(1, b"\x80") + b"\x01"))),
    "101 nested groups at the top": record() + nested_groups(101),
    "96 nested groups inside a frame's BytesList": sequence_example(
        entry(b"id", bytes_feature(b"d")),
        entry(b"rgb", ld(1, ld(1, ld(1, b"\x07" * 1024) + nested_groups(96))))),
    "map key not UTF-8": record(extra_context=entry(b"\xc0\x80", int64_feature(1))),
    "feature list key not UTF-8": record() + ld(2, entry(b"rgb\xff", b"")),
    "upb: key checked for UTF-8 before its overrun of the entry": ld(
        1, ld(1, b"\x0a\x05ab") + b"\xff\xff\xff"),
    "upb: key overrunning the entry, valid UTF-8": ld(1, ld(1, b"\x0a\x05ab") + b"cdef"),
    "upb: key tag and length read past the entry": ld(1, ld(1, b"\x0a") + b"\x04\xff\xff\xff\xff"),
    "upb: key past the payload end": ld(1, ld(1, b"\x0a\x09ab")) + b"\xff\xff",
}


@pytest.mark.parametrize("name", VALID)
def test_valid_edge_cases(name):
    assert isinstance(agree(VALID[name]), Video), f"{name}: the reference rejects it"


@pytest.mark.parametrize("name", INVALID)
def test_invalid_edge_cases(name):
    assert isinstance(agree(INVALID[name]), str), f"{name}: the reference accepts it"


def test_edge_cases_decode_as_expected():
    """A few of the cases above, checked for their values, not just for agreement."""
    (batch, errors) = decode_payloads([VALID[name] for name in VALID])
    assert errors == []
    videos = dict(zip(VALID, batch.videos(), strict=True))
    assert videos["301 frames"].num_frames == 301
    assert (videos["missing audio"].rgb_frames, videos["missing audio"].audio_frames) == (3, 0)
    assert videos["missing audio"].num_frames == 0
    assert videos["rgb and audio counts differ"].num_frames == 2
    assert videos["video_id key"].id == "xyz"
    assert videos["id wins over video_id"].id == "abcd"
    ends = videos["segments without end times"]
    assert ends.segment_labels.tolist() == [4, 5] and ends.segment_end_times.size == 0
    assert videos["unpacked int64 and float"].labels.tolist() == [3, -7, 2**40]
    assert videos["negative and extreme labels"].labels.tolist() == [-1, 2**63 - 1, -(2**63), 0]
    assert videos["context twice, merged"].labels.tolist() == [9]
    assert videos["key twice: last entry wins"].labels.tolist() == [3]
    assert videos["rgb twice: last entry wins"].rgb_frames == 1
    assert videos["value twice in an entry: merged"].labels.tolist() == [1, 2]
    assert videos["feature list twice in an entry: merged"].rgb_frames == 3
    assert videos["oneof switched: last member wins"].labels.tolist() == [3]
    assert videos["oneof switched away: empty"].labels.size == 0
    assert videos["upb: map entry holding an unknown field is dropped"].labels.tolist() == [1]
    assert videos["10-byte varints, bits past 64 dropped"].labels.tolist() == [-1, -(2**63)]
    scores = videos["signalling NaN and -0.0 scores, bits kept"].segment_scores
    assert scores.view(np.uint32).tolist() == [0x7F800001, 0xFFC00123, 0x80000000]
    assert videos["unicode id"].id == "vidéo ☃ 𝄞 'q\""


def test_reasons_match_the_reference_wording():
    _, errors = decode_payloads([INVALID["id not UTF-8"], INVALID["frame of the wrong size"],
                                 INVALID["wire type 6"], INVALID["map key not UTF-8"]])
    reasons = [reason for _, reason in errors]
    assert reasons[0] == "context 'id' is not valid UTF-8: b\"ab\\xff'\\x00\\n\""
    assert reasons[1] == (
        "video 'abcd': frame 2 of 'rgb' has 1023 bytes, expected one of 1024 bytes")
    assert reasons[2].startswith("not a protobuf SequenceExample/Example: ")
    assert "UTF-8" in reasons[3] and reasons[3] != reasons[2]


# --- fuzzing -------------------------------------------------------------------------------

SEEDS = [
    encode_video(video(0, seed=1)),
    encode_video(video(1, seed=2, rated=2)),
    encode_video(video(2, seed=5, rated=1, end_times=False)),
    encode_video(video(1, seed=6, id="é")),
    VALID["unpacked int64 and float"],
    VALID["unknown fields everywhere, a group among them"],
    VALID["oneof switched: last member wins"],
    sequence_example(entry(b"id", bytes_feature(b"t")) + entry(b"labels", int64_feature(1, -1)),
                     entry(b"rgb", frames(1, 1024)) + entry(b"audio", frames(1, 128))),
]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=6)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 8)),
)


def mutate(payload: bytes, ops) -> bytes:
    data = bytearray(payload)
    for op, position, *args in ops:
        position %= len(data) + 1
        if op == "insert":
            data[position:position] = args[0]
        elif op == "truncate":
            del data[position:]
        elif position < len(data):
            if op == "flip":
                data[position] ^= 1 << args[0]
            elif op == "set":
                data[position] = args[0]
            else:
                del data[position:position + args[0]]
    return bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds=st.lists(st.sampled_from(SEEDS), min_size=1, max_size=4),
       ops=st.lists(st.lists(mutation, min_size=1, max_size=3), min_size=4, max_size=4))
def test_fuzz_mutated_payloads(seeds, ops):
    """Random byte flips, truncations, insertions and deletions: both accept with identical
    videos or both reject with the same reason, several payloads per batch."""
    assert_agree([mutate(seed, op) for seed, op in zip(seeds, ops, strict=False)])


def random_message(rng: random.Random, kind: str, depth: int = 0) -> bytes:
    """Random fields for a message of the schema: known fields, known numbers with another
    wire type, unknown fields and groups, padded varints, odd map keys."""
    schema = {
        "seq": {1: "features", 2: "lists"}, "features": {1: "fentry"},
        "fentry": {1: "key", 2: "feature"}, "lists": {1: "lentry"},
        "lentry": {1: "key", 2: "list"}, "list": {1: "feature"},
        "feature": {1: "bytes_list", 2: "float_list", 3: "int64_list"},
        "bytes_list": {1: "bytes"}, "float_list": {1: "float"}, "int64_list": {1: "int64"},
    }[kind]
    keys = [b"id", b"video_id", b"labels", b"segment_labels", b"segment_start_times",
            b"segment_end_times", b"segment_scores", b"rgb", b"audio", b"", b"\xff", b"\xc3"]

    def pad() -> int:
        return rng.choice([0] * 12 + [1, 4])

    def field(number: int, wire: int, body: bytes = b"") -> bytes:
        head = varint(number << 3 | wire, pad=min(pad(), 4 - len(varint(number << 3 | wire))))
        if wire == 2:
            return head + varint(len(body) + rng.choice([0] * 40 + [-1, 1]), pad=pad()) + body
        return head + body

    out = b""
    for _ in range(rng.randint(0, 4 if depth < 4 else 1)):
        number = rng.choice(list(schema))
        sub = schema[number]
        roll = rng.random()
        if roll < 0.85:
            if sub == "key":
                out += field(1, 2, rng.choice(keys))
            elif sub == "bytes":
                out += field(1, 2, rng.randbytes(rng.choice([0, 1, 128, 1024])))
            elif sub == "float":
                out += (field(1, 5, rng.randbytes(4)) if rng.random() < 0.5
                        else field(1, 2, rng.randbytes(4 * rng.randint(0, 3))))
            elif sub == "int64":
                values = [varint(rng.getrandbits(64), pad=pad() % 2) for _ in range(3)]
                out += (field(1, 0, values[0]) if rng.random() < 0.5
                        else field(1, 2, b"".join(values[: rng.randint(0, 3)])))
            else:
                out += field(number, 2, random_message(rng, sub, depth + 1))
        elif roll < 0.92:
            out += field(number, rng.choice([0, 5]), b"\x01\x02\x03\x04")
        elif roll < 0.99:
            inner = field(rng.choice([0, 1, 20]), 0, b"\x05") if rng.random() < 0.5 else b""
            out += group(rng.choice([number, 9]), inner)
        else:
            out += rng.randbytes(rng.randint(1, 3))
    return out


@settings(max_examples=300, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_random_wire_messages(rng):
    """Schema-shaped random messages, half of them behind a valid id, some mutated."""
    payloads = []
    for _ in range(8):
        payload = random_message(rng, "seq")
        if rng.random() < 0.5:
            payload = ld(1, entry(b"id", bytes_feature(b"r"))) + payload
        if rng.random() < 0.3:
            payload = mutate(payload, [("set", rng.getrandbits(16), rng.getrandbits(8))])
        payloads.append(payload)
    assert_agree(payloads)


# --- FrameBatch ----------------------------------------------------------------------------


def test_frame_batch_views_and_ownership():
    payloads = [encode_video(video(n, seed=n, rated=n % 3)) for n in (3, 0, 5)]
    batch, errors = decode_payloads(payloads)
    del payloads
    assert errors == [] and len(batch) == 3 and isinstance(batch, FrameBatch)
    assert batch.features.shape == (8, 1152) and batch.frame_offsets.tolist() == [0, 3, 3, 8]
    last = batch.video(-1)
    assert last.id == "v5" and np.shares_memory(last.features, batch.features)
    assert last.features.base is not None and last.features.shape == (5, 1152)
    assert identical(last, decode_video(encode_video(video(5, seed=5, rated=2))))
    with pytest.raises(IndexError):
        batch.video(3)
    assert [v.id for v in batch.videos()] == ["v3", "v0", "v5"]
    head = batch.head(1)
    assert len(head) == 1 and head.features.shape == (3, 1152)
    for array in (batch.features, batch.labels, batch.segment_scores):
        assert array.base is not None  # owned by the extension's capsule, freed with it


def test_threads_decode_concurrently():
    payloads = [encode_video(video(20, seed=s)) for s in range(8)]
    expected = [decode_video(p) for p in payloads]
    results: list[list[Video]] = [[] for _ in range(4)]

    def work(slot: int) -> None:
        for _ in range(5):
            batch, _ = decode_payloads(payloads)
            results[slot] = list(batch.videos())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for videos in results:
        assert all(identical(a, b) for a, b in zip(videos, expected, strict=True))


def test_payloads_must_be_bytes():
    with pytest.raises(TypeError):
        decode_payloads(["not bytes"])


# --- files -------------------------------------------------------------------------------


@pytest.fixture
def corrupt_file(tmp_path) -> Path:
    """v0, v1, a record whose id has no value, v3, a record that is not protobuf, v5."""
    payloads = [encode_video(video(2, seed=s, id=f"v{s}")) for s in range(6)]
    payloads[2] = INVALID["id with no values"]
    payloads[4] = INVALID["wire type 6"]
    path = tmp_path / "corrupt.tfrecord"
    write_records(path, payloads)
    return path


@pytest.mark.parametrize("videos_per_batch", [1, 2, 64])
def test_corrupt_record_raises_like_the_reference(corrupt_file, videos_per_batch):
    def read(decoder):
        seen = []
        with pytest.raises(CorruptRecordError) as raised:
            if decoder == "native":
                for batch in read_frame_batches(corrupt_file, videos_per_batch=videos_per_batch):
                    seen += batch.videos()
            else:
                seen += read_videos(corrupt_file, decoder="protobuf")
        return seen, raised.value

    native, native_error = read("native")
    protobuf, protobuf_error = read("protobuf")
    assert [v.id for v in native] == [v.id for v in protobuf] == ["v0", "v1"]
    assert str(native_error) == str(protobuf_error)
    assert (native_error.source, native_error.index) == (str(corrupt_file), 2)
    assert native_error.offset == sum(len(encode_record(encode_video(video(2, seed=s))))
                                      for s in range(2))
    assert native_error.reason == "context 'id' has 0 values, expected 1"


@pytest.mark.parametrize("videos_per_batch", [1, 4, 64])
def test_skip_corrupt_counts_like_the_reference(corrupt_file, videos_per_batch):
    native_stats, protobuf_stats = ReadStats(), ReadStats()
    native = [v for batch in read_frame_batches(corrupt_file, skip_corrupt=True,
                                                stats=native_stats,
                                                videos_per_batch=videos_per_batch)
              for v in batch.videos()]
    protobuf = list(read_videos(corrupt_file, skip_corrupt=True, stats=protobuf_stats,
                                decoder="protobuf"))
    assert [v.id for v in native] == ["v0", "v1", "v3", "v5"]
    assert all(identical(a, b) for a, b in zip(native, protobuf, strict=True))
    assert native_stats == protobuf_stats
    assert native_stats.corrupt_records == 2 and native_stats.records == 4


@pytest.mark.parametrize("refused, require_frames, reason", [
    ("video-level", False, "'v3' is a video-level Example"),
    ("no frames", True, "'v3' has no frames"),
])
@pytest.mark.parametrize("videos_per_batch", [1, 4, 64])
def test_a_refused_record_after_a_skipped_one_raises_like_the_reference(
        corrupt_file, tmp_path, refused, require_frames, reason, videos_per_batch):
    records = [record.payload for record in iter_records(corrupt_file)]
    records[3] = (encode_video_level(VideoLevelRecord("v3", np.zeros(1024), np.zeros(128)))
                  if refused == "video-level" else encode_truth(video(2, seed=3, id="v3")))
    path = tmp_path / "refused.tfrecord"
    write_records(path, records)
    seen, stats = {}, {}
    for decoder in ("native", "protobuf"):
        seen[decoder], stats[decoder] = [], ReadStats()
        with pytest.raises(RecordKindError, match=rf"record 3 at byte offset \d+: video {reason}"):
            if decoder == "native":
                for batch in read_frame_batches(path, skip_corrupt=True, stats=stats[decoder],
                                                videos_per_batch=videos_per_batch,
                                                require_frames=require_frames):
                    seen[decoder] += [v.id for v in batch.videos()]
            else:
                seen[decoder].extend(v.id for v in read_videos(
                    path, skip_corrupt=True, stats=stats[decoder], decoder="protobuf",
                    require_frames=require_frames))
    # record 2 is skipped and counted; record 4, after the refused one, is never reached
    assert seen["native"] == seen["protobuf"] == ["v0", "v1"]
    assert stats["native"].errors == stats["protobuf"].errors and len(stats["native"].errors) == 1


def test_framing_error_after_the_videos_before_it(tmp_path):
    payloads = [encode_video(video(1, seed=s)) for s in range(3)]
    data = bytearray(b"".join(encode_record(p) for p in payloads))
    data[-1] ^= 0xFF  # data CRC of the last record
    path = tmp_path / "damaged.tfrecord"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match="data CRC mismatch") as raised:
        seen = []
        for batch in read_frame_batches(str(path), videos_per_batch=64):
            seen += [v.id for v in batch.videos()]
    assert seen == ["v0", "v1"] and raised.value.source == str(path)
    stats = ReadStats()
    batches = list(read_frame_batches(str(path), skip_corrupt=True, stats=stats))
    assert [v.id for b in batches for v in b.videos()] == ["v0", "v1"]
    assert (stats.records, stats.corrupt_records) == (2, 1)


def test_read_videos_native_is_the_reference(tmp_path):
    videos = [video(n, seed=n, rated=n % 4, end_times=n % 2 == 0) for n in range(0, 40, 3)]
    write_records(tmp_path / "a.tfrecord", [encode_video(v) for v in videos[:7]])
    write_records(tmp_path / "b.tfrecord", [encode_video(v) for v in videos[7:]])
    pattern = str(tmp_path / "*.tfrecord")
    native = list(read_videos(pattern, decoder="native"))
    protobuf = list(read_videos(pattern, decoder="protobuf"))
    assert len(native) == len(videos)
    assert all(identical(a, b) for a, b in zip(native, protobuf, strict=True))
    sizes = [len(b) for b in read_frame_batches(pattern, videos_per_batch=5)]
    assert sizes == [5, 5, 4]
    with pytest.raises(ValueError, match="videos_per_batch"):
        next(read_frame_batches(pattern, videos_per_batch=0))
