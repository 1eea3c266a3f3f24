// libFuzzer harness of the native SequenceExample decoder (native/decoder.cpp), built with
// clang's AddressSanitizer and UndefinedBehaviorSanitizer by tests/fuzz/build_native.sh.
//
// The input is split into payloads at each 0xFF 0xFE 0xFD 0xFC marker (none: one payload),
// so that the fuzzer also reaches a batch's bookkeeping across payloads. Every payload must
// decode or be reported in `errors`, never crash or read outside the input; the harness
// checks that the result's arrays agree with each other.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "decoder.hpp"

namespace {

constexpr std::uint8_t kMarker[4] = {0xFF, 0xFE, 0xFD, 0xFC};

void require(bool condition) {
  if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<modloc::PayloadView> payloads;
  std::size_t begin = 0;
  for (std::size_t i = 0; i + sizeof(kMarker) <= size; ++i) {
    if (std::memcmp(data + i, kMarker, sizeof(kMarker)) == 0) {
      payloads.push_back({data + begin, i - begin});
      begin = i + sizeof(kMarker);
      i = begin - 1;
    }
  }
  payloads.push_back({data + begin, size - begin});
  const modloc::FrameBatchData batch = modloc::decode_frame_payloads(payloads);
  const std::size_t videos = batch.ids.size();
  require(videos + batch.errors.size() == payloads.size());
  require(batch.frame_offsets.size() == videos + 1 && batch.label_offsets.size() == videos + 1);
  const std::uint8_t* first = data;
  const std::uint8_t* end = data + size;
  for (std::size_t v = 0; v < videos; ++v) {
    // ids point into the input, frame offsets never go back
    const auto* id = reinterpret_cast<const std::uint8_t*>(batch.ids[v].data());
    require(batch.ids[v].empty() || (id >= first && id + batch.ids[v].size() <= end));
    require(batch.frame_offsets.data()[v] <= batch.frame_offsets.data()[v + 1]);
  }
  return 0;
}
