// libFuzzer harness of the native top-K's readers of bytes from disk (native/topk.cpp): the
// snapshot decoder, the insert log's header check and its record replay. Built with clang's
// AddressSanitizer and UndefinedBehaviorSanitizer by tests/fuzz/build_native.sh.
//
// Input: one selector byte, then the bytes of the target. The snapshot's records come as a
// sequence of (uint32 little-endian length, bytes) pairs, what the TFRecord framing hands
// over in Python. Every input must be accepted or refused with std::invalid_argument; an
// accepted snapshot is encoded again and must decode to the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "topk.hpp"

namespace {

void require(bool condition) {
  if (!condition) std::abort();
}

// The accumulator the log targets replay into (fresh per input): the classes and k that
// tests/fuzz/seeds.py writes logs for.
std::unique_ptr<modloc::TopK> log_target() {
  return std::make_unique<modloc::TopK>(std::vector<std::int64_t>{3, 7, 11, 42}, 6, 1);
}

void snapshot(std::string_view input) {
  std::vector<std::string_view> payloads;
  while (input.size() >= 4 && payloads.size() < 4096) {
    std::uint32_t length;
    std::memcpy(&length, input.data(), 4);
    input.remove_prefix(4);
    if (length > input.size()) length = static_cast<std::uint32_t>(input.size());
    payloads.push_back(input.substr(0, length));
    input.remove_prefix(length);
  }
  std::unique_ptr<modloc::TopK> topk;
  try {
    topk = modloc::TopK::decode_snapshot(payloads, std::nullopt);
  } catch (const std::invalid_argument&) {
    return;
  }
  // a snapshot that loads is a state: it ranks, and it encodes to what decodes the same
  for (std::size_t c = 0; c < topk->class_ids().size(); ++c) topk->ranking(c, 0, topk->k());
  const std::vector<std::string> again = topk->encode_snapshot();
  std::vector<std::string_view> views(again.begin(), again.end());
  const std::unique_ptr<modloc::TopK> copy = modloc::TopK::decode_snapshot(views, std::nullopt);
  require(copy->encode_snapshot() == again);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 3) {
    case 0:
      snapshot(input);
      break;
    case 1:
      try {
        log_target()->check_log_header(input);
      } catch (const std::invalid_argument&) {
      }
      break;
    default:
      try {
        const auto topk = log_target();
        if (topk->replay(input)) require(!topk->replay(input));  // a second replay is a no-op
      } catch (const std::invalid_argument&) {
      }
      break;
  }
  return 0;
}
