// Hand-written protobuf wire-format parser for SequenceExample payloads (the schema of
// proto/modloc/yt8m_example.proto), then the layout checks of engine/io/examples.py.
//
// Agreement with the reference is the whole point, so the parser reproduces what the
// protobuf python runtime (upb) does, including on odd or hostile input. Each rule below was
// checked against the runtime by experiment (tests/test_native_decoder.py keeps them):
//   * tags are varints of at most 5 bytes and at most UINT32_MAX; field number 0 is invalid,
//     except inside an unknown group, whose skipper does not check it;
//   * lengths are varints of at most 5 bytes below INT32_MAX; a field must end inside its
//     message, but upb reads the field before it notices an overrun (see WireReader);
//   * value varints have at most 10 bytes; bits past the 64th are dropped;
//   * wire types 6 and 7 are invalid, and so is an end-group tag outside a group or closing
//     a group of another field number;
//   * a known field met with another wire type is an unknown field, and unknown fields of
//     every wire type (groups included, nested) are skipped after validation;
//   * nesting depth (submessages and groups together) is limited to 100 below the top;
//   * repeated numbers are accepted packed and unpacked; a packed float run whose length
//     is not a multiple of 4, or a packed varint that runs past its run, is invalid;
//   * a singular message field that occurs again is merged into the first; in Feature's
//     oneof the same member merges, another member starts over empty;
//   * map keys are proto3 strings and must be UTF-8; a map entry without a key has key "",
//     without a value an empty value; a later entry replaces an earlier one with its key;
//     an entry that holds any unknown field is not put in the map at all (upb keeps it as
//     an unknown field of the map's message instead).
// Errors other than bad UTF-8 (depth included) all read "wire format was corrupt" in the
// runtime, so the first error in stream order decides only between those two.

#include "decoder.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

namespace modloc {
namespace {

static_assert(std::numeric_limits<float>::is_iec559, "float must be IEEE-754 binary32");

// upb's kUpb_WireFormat_DefaultDepthLimit, the limit the python runtime parses with.
constexpr int kMaxDepth = 100;

enum WireType : std::uint32_t {
  kVarint = 0,
  kFixed64 = 1,
  kDelimited = 2,
  kStartGroup = 3,
  kEndGroup = 4,
  kFixed32 = 5,
};

// Thrown inside one payload's parse and caught by the batch loop: malformed input is
// unusual, so the happy path pays nothing for error propagation.
struct WireError {
  ErrorKind kind;
};

[[noreturn]] void corrupt() { throw WireError{ErrorKind::kCorrupt}; }

struct Span {
  const std::uint8_t* data = nullptr;
  std::size_t size = 0;

  std::string_view view() const { return {reinterpret_cast<const char*>(data), size}; }
};

// --- wire primitives ----------------------------------------------------------------

// Well-formed UTF-8 (Unicode Table 3-7): what upb checks proto3 strings against and what
// Python's strict decoder accepts. No overlong forms, surrogates or code points > U+10FFFF.
bool is_utf8(Span s) {
  const std::uint8_t* p = s.data;
  const std::uint8_t* const end = p + s.size;
  while (p < end) {
    const std::uint8_t c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    std::size_t length;
    std::uint8_t low = 0x80;  // allowed range of the second byte
    std::uint8_t high = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      length = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      length = 3;
      if (c == 0xe0) low = 0xa0;
      if (c == 0xed) high = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      length = 4;
      if (c == 0xf0) low = 0x90;
      if (c == 0xf4) high = 0x8f;
    } else {
      return false;
    }
    if (static_cast<std::size_t>(end - p) < length) return false;
    if (p[1] < low || p[1] > high) return false;
    for (std::size_t i = 2; i < length; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
    }
    p += length;
  }
  return true;
}

// A varint that ends before `end` within `max_bytes` bytes, taken modulo 2^64.
inline std::uint64_t read_varint(const std::uint8_t*& p, const std::uint8_t* end,
                                 int max_bytes = 10) {
  if (p < end && *p < 0x80) return *p++;
  std::uint64_t value = 0;
  for (int i = 0; i < max_bytes; ++i) {
    if (p == end) corrupt();
    const std::uint8_t byte = *p++;
    value |= static_cast<std::uint64_t>(byte & 0x7f) << (7 * i);
    if (!(byte & 0x80)) return value;
  }
  corrupt();
}

// Reads the wire format of one payload.
//
// A field is read up to the end of the payload, not of its message, and the message then
// checks that the field ended inside it (parse_fields): upb does the same, and it shows
// when a map key runs past its entry, whose UTF-8 upb checks before the overrun. Only
// submessages and packed runs have their length checked against the message first.
class WireReader {
 public:
  explicit WireReader(Span payload) : end_(payload.data + payload.size) {}

  std::uint64_t varint(const std::uint8_t*& p, int max_bytes = 10) const {
    return read_varint(p, end_, max_bytes);
  }

  std::uint32_t tag(const std::uint8_t*& p) const {
    const std::uint64_t tag = varint(p, 5);
    if (tag > UINT32_MAX) corrupt();
    return static_cast<std::uint32_t>(tag);
  }

  // The bytes of a length-delimited field that may run past its message.
  Span bytes(const std::uint8_t*& p) const {
    const std::uint64_t size = length(p);
    if (size > static_cast<std::uint64_t>(end_ - p)) corrupt();
    return take(p, static_cast<std::size_t>(size));
  }

  // The bytes of a length-delimited field that must end by `end`, its message's end.
  Span nested(const std::uint8_t*& p, const std::uint8_t* end) const {
    const std::uint64_t size = length(p);
    if (p > end || size > static_cast<std::uint64_t>(end - p)) corrupt();
    return take(p, static_cast<std::size_t>(size));
  }

  // A submessage, if the nesting budget `depth` of its parent allows one more level.
  Span submessage(const std::uint8_t*& p, const std::uint8_t* end, int depth) const {
    const Span message = nested(p, end);
    if (depth == 0) corrupt();
    return message;
  }

  void skip(const std::uint8_t*& p, std::size_t n) const {
    if (static_cast<std::size_t>(end_ - p) < n) corrupt();
    p += n;
  }

  // Validates and skips the value of an unknown field.
  void skip_value(std::uint32_t number, std::uint32_t wire, const std::uint8_t*& p,
                  int depth) const {
    switch (wire) {
      case kVarint:
        varint(p);
        return;
      case kFixed64:
        skip(p, 8);
        return;
      case kDelimited:
        bytes(p);
        return;
      case kStartGroup:
        skip_group(number, p, depth);
        return;
      case kFixed32:
        skip(p, 4);
        return;
      default:  // an end-group tag outside a group, or wire type 6 or 7
        corrupt();
    }
  }

  // Parses the fields of `message`: `on_field(number, wire, p, end, depth)` consumes a
  // field it knows and returns true, or returns false to have it skipped as unknown.
  // `depth` is the nesting budget left for the message's submessages and groups.
  template <typename OnField>
  void parse_fields(Span message, int depth, OnField&& on_field) const {
    const std::uint8_t* p = message.data;
    const std::uint8_t* const end = p + message.size;
    while (p < end) {
      const std::uint32_t tag_value = tag(p);
      const std::uint32_t number = tag_value >> 3;
      const std::uint32_t wire = tag_value & 7;
      if (!on_field(number, wire, p, end, depth)) {
        if (number == 0) corrupt();
        skip_value(number, wire, p, depth);
      }
      if (p > end) corrupt();  // the field ran past the end of its message
    }
  }

 private:
  // Lengths are varints of at most 5 bytes, below INT32_MAX.
  std::uint64_t length(const std::uint8_t*& p) const {
    const std::uint64_t size = varint(p, 5);
    if (size >= INT32_MAX) corrupt();
    return size;
  }

  static Span take(const std::uint8_t*& p, std::size_t size) {
    const Span span{p, size};
    p += size;
    return span;
  }

  // Skips the rest of a group opened by field `number`, up to its matching end tag.
  void skip_group(std::uint32_t number, const std::uint8_t*& p, int depth) const {
    if (depth == 0) corrupt();
    --depth;
    for (;;) {
      if (p == end_) corrupt();  // unterminated group
      const std::uint32_t tag_value = tag(p);
      const std::uint32_t field = tag_value >> 3;
      const std::uint32_t wire = tag_value & 7;
      if (wire == kEndGroup) {
        if (field != number) corrupt();
        return;
      }
      // No field-number-0 check inside a group: upb's group skipper has none.
      skip_value(field, wire, p, depth);
    }
  }

  const std::uint8_t* end_;
};

// --- the schema ---------------------------------------------------------------------

// Feature.kind's members, numbered as their field numbers.
enum class Kind : std::uint8_t { kNone = 0, kBytes = 1, kFloat = 2, kInt64 = 3 };

// A parsed Feature: the case of its oneof and that member's values. Bytes values are kept
// as their count and first value (all the reference looks at); numbers as the runs of
// their encoding (a packed run, or one unpacked value), decoded once the record is known
// to be good.
struct FeatureValue {
  Kind kind = Kind::kNone;
  std::size_t count = 0;  // values of the current member
  Span first_bytes;
  std::vector<Span> runs;

  void select(Kind member) {
    if (kind == member) return;  // the same member merges
    kind = member;
    count = 0;
    first_bytes = {};
    runs.clear();
  }
};

// Context keys the reference reads.
enum ContextKey : std::size_t {
  kId,
  kVideoId,
  kLabels,
  kSegmentLabels,
  kSegmentStartTimes,
  kSegmentEndTimes,
  kSegmentScores,
  kNumContextKeys,
};

constexpr std::array<std::string_view, kNumContextKeys> kContextKeyNames = {
    "id", "video_id", "labels", "segment_labels", "segment_start_times", "segment_end_times",
    "segment_scores"};

// What the reference reads of a SequenceExample: a context key that is absent stays empty.
struct ParsedRecord {
  std::array<std::optional<FeatureValue>, kNumContextKeys> context;
  std::vector<FeatureValue> rgb;
  std::vector<FeatureValue> audio;
};

// Parses one SequenceExample payload into what the reference reads of it.
class RecordParser {
 public:
  explicit RecordParser(Span payload) : payload_(payload), in_(payload) {}

  ParsedRecord parse() {
    ParsedRecord record;
    in_.parse_fields(payload_, kMaxDepth, [&](std::uint32_t number, std::uint32_t wire,
                                              const std::uint8_t*& p, const std::uint8_t* end,
                                              int depth) {
      if (wire != kDelimited || (number != 1 && number != 2)) return false;
      const Span message = in_.submessage(p, end, depth);
      if (number == 1) {
        parse_context(message, depth - 1, record);
      } else {
        parse_feature_lists(message, depth - 1, record);
      }
      return true;
    });
    return record;
  }

 private:
  void parse_bytes_list(Span message, int depth, FeatureValue& value) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t*, int) {
      if (number != 1 || wire != kDelimited) return false;
      const Span bytes = in_.bytes(p);
      if (value.count++ == 0) value.first_bytes = bytes;
      return true;
    });
  }

  void parse_float_list(Span message, int depth, FeatureValue& value) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t* end, int) {
      if (number != 1) return false;
      if (wire == kFixed32) {
        const std::uint8_t* start = p;
        in_.skip(p, 4);
        value.runs.push_back({start, 4});
        value.count += 1;
        return true;
      }
      if (wire == kDelimited) {
        const Span run = in_.nested(p, end);
        if (run.size % 4 != 0) corrupt();
        if (run.size) value.runs.push_back(run);
        value.count += run.size / 4;
        return true;
      }
      return false;
    });
  }

  void parse_int64_list(Span message, int depth, FeatureValue& value) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t* end, int) {
      if (number != 1) return false;
      if (wire == kVarint) {
        const std::uint8_t* start = p;
        in_.varint(p);
        value.runs.push_back({start, static_cast<std::size_t>(p - start)});
        value.count += 1;
        return true;
      }
      if (wire == kDelimited) {
        const Span run = in_.nested(p, end);
        const std::uint8_t* q = run.data;
        const std::uint8_t* const run_end = q + run.size;
        while (q < run_end) {
          read_varint(q, run_end);  // a varint may not run past its packed run
          ++value.count;
        }
        if (run.size) value.runs.push_back(run);
        return true;
      }
      return false;
    });
  }

  void parse_feature(Span message, int depth, FeatureValue& value) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t* end,
                                         int budget) {
      if (wire != kDelimited || number < 1 || number > 3) return false;
      const Span list = in_.submessage(p, end, budget);
      value.select(static_cast<Kind>(number));
      switch (value.kind) {
        case Kind::kBytes:
          parse_bytes_list(list, budget - 1, value);
          break;
        case Kind::kFloat:
          parse_float_list(list, budget - 1, value);
          break;
        default:
          parse_int64_list(list, budget - 1, value);
          break;
      }
      return true;
    });
  }

  // A map entry (key = 1, value = 2). `parse_value(span, depth)` merges one occurrence of
  // the value. Returns the key, or nothing when the entry does not go into the map.
  template <typename ParseValue>
  std::optional<std::string_view> parse_map_entry(Span entry, int depth,
                                                  ParseValue&& parse_value) const {
    Span key;
    bool has_unknown = false;
    in_.parse_fields(entry, depth, [&](std::uint32_t number, std::uint32_t wire,
                                       const std::uint8_t*& p, const std::uint8_t* end,
                                       int budget) {
      if (wire == kDelimited && number == 1) {
        key = in_.bytes(p);
        if (!is_utf8(key)) throw WireError{ErrorKind::kBadUtf8};
        return true;
      }
      if (wire == kDelimited && number == 2) {
        const Span value = in_.submessage(p, end, budget);
        parse_value(value, budget - 1);
        return true;
      }
      has_unknown = true;
      return false;
    });
    if (has_unknown) return std::nullopt;
    return key.view();
  }

  void parse_context(Span message, int depth, ParsedRecord& record) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t* end,
                                         int budget) {
      if (number != 1 || wire != kDelimited) return false;
      const Span entry = in_.submessage(p, end, budget);
      FeatureValue value;
      const auto key = parse_map_entry(entry, budget - 1, [&](Span feature, int value_depth) {
        parse_feature(feature, value_depth, value);
      });
      if (!key) return true;
      const auto* found = std::find(kContextKeyNames.begin(), kContextKeyNames.end(), *key);
      if (found != kContextKeyNames.end()) {
        record.context[found - kContextKeyNames.begin()] = std::move(value);
      }
      return true;
    });
  }

  void parse_feature_list(Span message, int depth, std::vector<FeatureValue>& frames) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t* end,
                                         int budget) {
      if (number != 1 || wire != kDelimited) return false;
      const Span feature = in_.submessage(p, end, budget);
      frames.emplace_back();
      parse_feature(feature, budget - 1, frames.back());
      return true;
    });
  }

  void parse_feature_lists(Span message, int depth, ParsedRecord& record) const {
    in_.parse_fields(message, depth, [&](std::uint32_t number, std::uint32_t wire,
                                         const std::uint8_t*& p, const std::uint8_t* end,
                                         int budget) {
      if (number != 1 || wire != kDelimited) return false;
      const Span entry = in_.submessage(p, end, budget);
      std::vector<FeatureValue> frames;
      const auto key = parse_map_entry(entry, budget - 1, [&](Span list, int value_depth) {
        parse_feature_list(list, value_depth, frames);
      });
      if (key == "rgb") {
        record.rgb = std::move(frames);
      } else if (key == "audio") {
        record.audio = std::move(frames);
      }
      return true;
    });
  }

  Span payload_;
  WireReader in_;
};

// --- the YouTube-8M layout (engine/io/examples.py::decode_video and Video) -----------

// A video that passed every check, ready to be copied out.
struct GoodVideo {
  std::string_view id;
  ParsedRecord record;
  std::size_t frames;  // M = min(rgb frames, audio frames)
};

std::size_t count_of(const std::optional<FeatureValue>& value, Kind kind) {
  return value && value->kind == kind ? value->count : 0;
}

// examples._id_of: "id" first, then "video_id"; exactly one bytes value, UTF-8.
std::optional<PayloadError> check_id(const ParsedRecord& record, std::size_t position,
                                     std::string_view& id) {
  for (const ContextKey key : {kId, kVideoId}) {
    const auto& value = record.context[key];
    if (!value) continue;
    const std::string name(kContextKeyNames[key]);
    const std::size_t count = count_of(value, Kind::kBytes);
    if (count != 1) {
      return PayloadError{position, ErrorKind::kLayout,
                          "context '" + name + "' has " + std::to_string(count) +
                              " values, expected 1",
                          std::nullopt};
    }
    if (!is_utf8(value->first_bytes)) {
      return PayloadError{position, ErrorKind::kIdNotUtf8, name, value->first_bytes.view()};
    }
    id = value->first_bytes.view();
    return std::nullopt;
  }
  return PayloadError{position, ErrorKind::kLayout, "no 'id' (or 'video_id') in the record",
                      std::nullopt};
}

// examples._frames: every frame one bytes value of `size` bytes; the first bad one is named.
std::optional<std::string> check_frames(const std::vector<FeatureValue>& frames,
                                        const char* key, std::size_t size) {
  for (std::size_t i = 0; i < frames.size(); ++i) {
    const std::size_t count = frames[i].kind == Kind::kBytes ? frames[i].count : 0;
    if (count == 1 && frames[i].first_bytes.size == size) continue;
    const std::string got = count != 1
                                ? std::to_string(count) + " values"
                                : std::to_string(frames[i].first_bytes.size) + " bytes";
    return "frame " + std::to_string(i) + " of '" + key + "' has " + got +
           ", expected one of " + std::to_string(size) + " bytes";
  }
  return std::nullopt;
}

// Video.__post_init__: the rated-segment lists must be parallel.
std::optional<std::string> check_segments(const ParsedRecord& record) {
  const std::size_t labels = count_of(record.context[kSegmentLabels], Kind::kInt64);
  const std::size_t starts = count_of(record.context[kSegmentStartTimes], Kind::kInt64);
  const std::size_t scores = count_of(record.context[kSegmentScores], Kind::kFloat);
  if (labels != starts || labels != scores) {
    return "segment lists differ in length: {'segment_labels': " + std::to_string(labels) +
           ", 'segment_start_times': " + std::to_string(starts) +
           ", 'segment_scores': " + std::to_string(scores) + "}";
  }
  const std::size_t ends = count_of(record.context[kSegmentEndTimes], Kind::kInt64);
  if (ends != 0 && ends != labels) {
    return std::to_string(ends) + " segment_end_times for " + std::to_string(labels) +
           " rated segments";
  }
  return std::nullopt;
}

// Parses and checks one payload: a good video, or the reason it is left out.
std::optional<PayloadError> decode_one(PayloadView payload, std::size_t position,
                                       std::vector<GoodVideo>& good) {
  ParsedRecord record;
  try {
    record = RecordParser({payload.data, payload.size}).parse();
  } catch (const WireError& error) {
    return PayloadError{position, error.kind, {}, std::nullopt};
  }
  std::string_view id;
  if (auto error = check_id(record, position, id)) return error;
  std::optional<std::string> problem = check_frames(record.rgb, "rgb", kRgbSize);
  if (!problem) problem = check_frames(record.audio, "audio", kAudioSize);
  if (!problem) problem = check_segments(record);
  if (problem) return PayloadError{position, ErrorKind::kLayout, std::move(*problem), id};
  const std::size_t frames = std::min(record.rgb.size(), record.audio.size());
  good.push_back({id, std::move(record), frames});
  return std::nullopt;
}

// Appends the int64 values of `value` (when it holds an int64_list) at `out`.
std::int64_t* copy_int64s(const std::optional<FeatureValue>& value, std::int64_t* out) {
  if (!value || value->kind != Kind::kInt64) return out;
  for (const Span& run : value->runs) {
    const std::uint8_t* p = run.data;
    const std::uint8_t* const end = p + run.size;
    while (p < end) *out++ = static_cast<std::int64_t>(read_varint(p, end));
  }
  return out;
}

// Appends the float values of `value` (when it holds a float_list) at `out`, bit for bit
// (NaN payloads included, as the reference keeps them).
float* copy_floats(const std::optional<FeatureValue>& value, float* out) {
  if (!value || value->kind != Kind::kFloat) return out;
  for (const Span& run : value->runs) {
    for (const std::uint8_t* p = run.data; p < run.data + run.size; p += 4) {
      const std::uint32_t bits = std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8 |
                                 std::uint32_t{p[2]} << 16 | std::uint32_t{p[3]} << 24;
      std::memcpy(out++, &bits, sizeof bits);  // wire floats are little-endian
    }
  }
  return out;
}

}  // namespace

FrameBatchData decode_frame_payloads(const std::vector<PayloadView>& payloads) {
  FrameBatchData out;
  std::vector<GoodVideo> good;
  good.reserve(payloads.size());
  for (std::size_t i = 0; i < payloads.size(); ++i) {
    if (auto error = decode_one(payloads[i], i, good)) out.errors.push_back(std::move(*error));
  }

  const std::size_t n = good.size();
  std::size_t total_frames = 0, total_labels = 0, total_segments = 0, total_ends = 0;
  for (const GoodVideo& video : good) {
    const auto& context = video.record.context;
    total_frames += video.frames;
    total_labels += count_of(context[kLabels], Kind::kInt64);
    total_segments += count_of(context[kSegmentLabels], Kind::kInt64);
    total_ends += count_of(context[kSegmentEndTimes], Kind::kInt64);
  }

  out.ids.reserve(n);
  out.features = Buffer<std::uint8_t>(total_frames * kFeatureSize);
  out.frame_offsets = Buffer<std::int64_t>(n + 1);
  out.rgb_frames = Buffer<std::int64_t>(n);
  out.audio_frames = Buffer<std::int64_t>(n);
  out.labels = Buffer<std::int64_t>(total_labels);
  out.label_offsets = Buffer<std::int64_t>(n + 1);
  out.segment_labels = Buffer<std::int64_t>(total_segments);
  out.segment_start_times = Buffer<std::int64_t>(total_segments);
  out.segment_scores = Buffer<float>(total_segments);
  out.segment_offsets = Buffer<std::int64_t>(n + 1);
  out.segment_end_times = Buffer<std::int64_t>(total_ends);
  out.segment_end_offsets = Buffer<std::int64_t>(n + 1);

  std::uint8_t* features = out.features.data();
  std::int64_t* labels = out.labels.data();
  std::int64_t* segment_labels = out.segment_labels.data();
  std::int64_t* segment_starts = out.segment_start_times.data();
  float* segment_scores = out.segment_scores.data();
  std::int64_t* segment_ends = out.segment_end_times.data();
  out.frame_offsets[0] = out.label_offsets[0] = out.segment_offsets[0] =
      out.segment_end_offsets[0] = 0;
  for (std::size_t v = 0; v < n; ++v) {
    const GoodVideo& video = good[v];
    const ParsedRecord& record = video.record;
    out.ids.push_back(video.id);
    for (std::size_t f = 0; f < video.frames; ++f) {
      // The sizes are the validated kRgbSize and kAudioSize, passed as runtime values: GCC
      // inlines a copy of constant size 1024 as `rep movsl`, slower than its `rep movsb`.
      const Span rgb = record.rgb[f].first_bytes;
      const Span audio = record.audio[f].first_bytes;
      std::memcpy(features, rgb.data, rgb.size);
      std::memcpy(features + kRgbSize, audio.data, audio.size);
      features += kFeatureSize;
    }
    out.rgb_frames[v] = static_cast<std::int64_t>(record.rgb.size());
    out.audio_frames[v] = static_cast<std::int64_t>(record.audio.size());
    out.frame_offsets[v + 1] = out.frame_offsets[v] + static_cast<std::int64_t>(video.frames);
    labels = copy_int64s(record.context[kLabels], labels);
    segment_labels = copy_int64s(record.context[kSegmentLabels], segment_labels);
    segment_starts = copy_int64s(record.context[kSegmentStartTimes], segment_starts);
    segment_scores = copy_floats(record.context[kSegmentScores], segment_scores);
    segment_ends = copy_int64s(record.context[kSegmentEndTimes], segment_ends);
    out.label_offsets[v + 1] = labels - out.labels.data();
    out.segment_offsets[v + 1] = segment_labels - out.segment_labels.data();
    out.segment_end_offsets[v + 1] = segment_ends - out.segment_end_times.data();
  }
  return out;
}

}  // namespace modloc
