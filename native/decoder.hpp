// Decoder of frame-level YouTube-8M records (tf.train.SequenceExample payloads) into
// contiguous arrays, without libprotobuf and without any Python object per frame.
//
// The decoder is the C++ twin of engine/io/examples.py::decode_video: on any input bytes it
// accepts exactly the payloads the reference accepts (with the protobuf python runtime, upb,
// doing the parsing there) and yields the same values, and it rejects the others with the
// same reason. This header is free of Python: engine/io/native.py reaches it through the
// bindings in module.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace modloc {

inline constexpr std::size_t kRgbSize = 1024;
inline constexpr std::size_t kAudioSize = 128;
inline constexpr std::size_t kFeatureSize = kRgbSize + kAudioSize;

// A heap array handed over to its final owner (a numpy array) without a copy. Unlike
// std::vector it leaves its elements uninitialised: every element is written exactly once.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size) : data_(new T[size]), size_(size) {}

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::size_t size() const { return size_; }
  T& operator[](std::size_t i) { return data_[i]; }

  // Gives up ownership; the caller must delete[] the pointer.
  T* release() { return data_.release(); }

 private:
  std::unique_ptr<T[]> data_;
  std::size_t size_ = 0;
};

// Why a payload was left out of a batch.
enum class ErrorKind {
  // Not a valid SequenceExample: the protobuf runtime's "wire format was corrupt".
  kCorrupt,
  // A map key (proto3 string) that is not UTF-8: the runtime's "bad UTF-8" error.
  kBadUtf8,
  // The id (bytes) is not UTF-8; `detail` is the context key ("id" or "video_id").
  kIdNotUtf8,
  // Valid protobuf without the YouTube-8M layout; `detail` is the reference's message,
  // to be prefixed with "video <id>: " when the error has an id.
  kLayout,
};

struct PayloadError {
  std::size_t position;                // index of the payload in the batch
  ErrorKind kind;
  std::string detail;                  // see ErrorKind; empty for the protobuf errors
  std::optional<std::string_view> id;  // raw id bytes, inside the payload
};

// The decoded videos of a batch, in payload order, without the rejected payloads. Arrays
// of per-video lists are flat with N+1 offsets: video i owns [offsets[i], offsets[i+1]).
struct FrameBatchData {
  std::vector<std::string_view> ids;  // raw UTF-8 ids, inside the payloads
  Buffer<std::uint8_t> features;      // (sum of M, kFeatureSize): RGB then audio
  Buffer<std::int64_t> frame_offsets;
  Buffer<std::int64_t> rgb_frames;
  Buffer<std::int64_t> audio_frames;
  Buffer<std::int64_t> labels;
  Buffer<std::int64_t> label_offsets;
  // segment_labels, segment_start_times and segment_scores have one length per video;
  // segment_end_times has either that length or none (files without end times).
  Buffer<std::int64_t> segment_labels;
  Buffer<std::int64_t> segment_start_times;
  Buffer<float> segment_scores;
  Buffer<std::int64_t> segment_offsets;
  Buffer<std::int64_t> segment_end_times;
  Buffer<std::int64_t> segment_end_offsets;
  std::vector<PayloadError> errors;  // in payload order
};

struct PayloadView {
  const std::uint8_t* data;
  std::size_t size;
};

// Decodes every payload; a bad payload is reported in `errors`, never thrown. The result
// points into the payloads (ids, error ids): they must outlive it. Touches no Python state,
// so callers may release the GIL around it.
FrameBatchData decode_frame_payloads(const std::vector<PayloadView>& payloads);

}  // namespace modloc
