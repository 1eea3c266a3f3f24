// Python bindings of engine._native. This file only converts between Python and the C++
// features, one .cpp each (decoder.cpp: frame-level record decoding).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "decoder.hpp"

namespace nb = nanobind;

namespace {

// A numpy array that takes over `buffer`: no copy, freed when the array is collected.
template <typename T>
nb::object to_numpy(modloc::Buffer<T>&& buffer, std::initializer_list<std::size_t> shape) {
  T* data = buffer.data();
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  buffer.release();  // the capsule owns it now
  return nb::cast(nb::ndarray<nb::numpy, T>(data, shape, owner));
}

nb::bytes to_bytes(std::string_view view) { return nb::bytes(view.data(), view.size()); }

const char* kind_name(modloc::ErrorKind kind) {
  switch (kind) {
    case modloc::ErrorKind::kCorrupt:
      return "corrupt";
    case modloc::ErrorKind::kBadUtf8:
      return "bad_utf8";
    case modloc::ErrorKind::kIdNotUtf8:
      return "id_not_utf8";
    case modloc::ErrorKind::kLayout:
      return "layout";
  }
  return "layout";
}

nb::tuple decode_frame_payloads(const std::vector<nb::bytes>& payloads) {
  // `payloads` holds a reference to every bytes object, so the views stay valid while the
  // GIL is released even if the caller's list changes meanwhile.
  std::vector<modloc::PayloadView> views;
  views.reserve(payloads.size());
  for (const nb::bytes& payload : payloads) {
    views.push_back({reinterpret_cast<const std::uint8_t*>(payload.c_str()), payload.size()});
  }
  modloc::FrameBatchData batch;
  {
    nb::gil_scoped_release release;
    batch = modloc::decode_frame_payloads(views);
  }

  const std::size_t n = batch.ids.size();
  const std::size_t frames = batch.features.size() / modloc::kFeatureSize;
  const std::size_t labels = batch.labels.size();
  const std::size_t segments = batch.segment_labels.size();
  const std::size_t segment_ends = batch.segment_end_times.size();
  nb::dict arrays;
  arrays["features"] = to_numpy(std::move(batch.features), {frames, modloc::kFeatureSize});
  arrays["frame_offsets"] = to_numpy(std::move(batch.frame_offsets), {n + 1});
  arrays["rgb_frames"] = to_numpy(std::move(batch.rgb_frames), {n});
  arrays["audio_frames"] = to_numpy(std::move(batch.audio_frames), {n});
  arrays["labels"] = to_numpy(std::move(batch.labels), {labels});
  arrays["label_offsets"] = to_numpy(std::move(batch.label_offsets), {n + 1});
  arrays["segment_labels"] = to_numpy(std::move(batch.segment_labels), {segments});
  arrays["segment_start_times"] = to_numpy(std::move(batch.segment_start_times), {segments});
  arrays["segment_scores"] = to_numpy(std::move(batch.segment_scores), {segments});
  arrays["segment_offsets"] = to_numpy(std::move(batch.segment_offsets), {n + 1});
  arrays["segment_end_times"] = to_numpy(std::move(batch.segment_end_times), {segment_ends});
  arrays["segment_end_offsets"] = to_numpy(std::move(batch.segment_end_offsets), {n + 1});

  nb::list ids;
  for (std::string_view id : batch.ids) ids.append(to_bytes(id));
  nb::list errors;
  for (const modloc::PayloadError& error : batch.errors) {
    nb::object id = error.id ? nb::object(to_bytes(*error.id)) : nb::none();
    errors.append(nb::make_tuple(error.position, kind_name(error.kind),
                                 nb::str(error.detail.data(), error.detail.size()), id));
  }
  return nb::make_tuple(arrays, ids, errors);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "modloc's native extension: frame-level record decoding into contiguous arrays.";
  m.def("decode_frame_payloads", &decode_frame_payloads, nb::arg("payloads"),
        "Decode frame-level SequenceExample payloads (a list of bytes).\n\n"
        "Returns (arrays, ids, errors): a dict of numpy arrays that own their memory (the\n"
        "fields of engine.io.native.FrameBatch), the raw ids of the good videos as bytes,\n"
        "and (position, kind, detail, id) for each payload left out, kind being 'corrupt',\n"
        "'bad_utf8', 'id_not_utf8' or 'layout'. The GIL is released while decoding.");
}
