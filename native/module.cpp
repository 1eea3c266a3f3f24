// Python bindings of engine._native. This file only converts between Python and the C++
// features, one .cpp each (decoder.cpp: frame-level record decoding; topk.cpp: the
// per-class top-K accumulator).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "decoder.hpp"
#include "topk.hpp"

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

// --- the top-K accumulator ------------------------------------------------------------------

using Int64Array = nb::ndarray<const std::int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using DoubleArray = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A numpy array that takes over `values`: no copy, freed when the array is collected.
template <typename T>
nb::object vector_to_numpy(std::vector<T>&& values) {
  auto* owned = new std::vector<T>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(owned->data(), {owned->size()}, owner));
}

void check_lengths(std::size_t starts, std::size_t class_ids, std::size_t scores) {
  if (starts != class_ids || starts != scores) {
    throw std::invalid_argument("starts (" + std::to_string(starts) + "), class_ids (" +
                                std::to_string(class_ids) + ") and scores (" +
                                std::to_string(scores) + ") differ in length");
  }
}

nb::object topk_add(modloc::TopK& topk, const std::string& video_id,
                    std::optional<std::int64_t> order, Int64Array starts, Int64Array class_ids,
                    DoubleArray scores, bool record) {
  check_lengths(starts.shape(0), class_ids.shape(0), scores.shape(0));
  std::string log;
  {
    nb::gil_scoped_release release;
    log = topk.add(video_id, order, starts.data(), class_ids.data(), scores.data(),
                   starts.shape(0), record);
  }
  return record ? nb::object(to_bytes(log)) : nb::none();
}

void topk_insert(modloc::TopK& topk, Int64Array videos, Int64Array starts, Int64Array class_ids,
                 DoubleArray scores) {
  check_lengths(starts.shape(0), class_ids.shape(0), scores.shape(0));
  if (videos.shape(0) != starts.shape(0)) {
    throw std::invalid_argument("videos (" + std::to_string(videos.shape(0)) + ") and starts (" +
                                std::to_string(starts.shape(0)) + ") differ in length");
  }
  modloc::PairsView pairs;
  pairs.videos = videos.data();
  pairs.starts = starts.data();
  pairs.class_ids = class_ids.data();
  pairs.scores = scores.data();
  pairs.size = starts.shape(0);
  nb::gil_scoped_release release;
  topk.insert(pairs);
}

nb::tuple topk_ranking(modloc::TopK& topk, std::size_t position, std::size_t offset,
                       std::size_t limit) {
  modloc::RankedSlice slice;
  {
    nb::gil_scoped_release release;
    slice = topk.ranking(position, offset, limit);
  }
  return nb::make_tuple(vector_to_numpy(std::move(slice.videos)),
                        vector_to_numpy(std::move(slice.starts)),
                        vector_to_numpy(std::move(slice.scores)));
}

nb::dict topk_stats(const modloc::TopK& topk) {
  modloc::TopKStats stats;
  {
    nb::gil_scoped_release release;
    stats = topk.stats();
  }
  nb::dict result;
  result["videos"] = stats.videos;
  result["kept"] = stats.kept;
  result["buffered"] = stats.buffered;
  result["pairs"] = stats.pairs;
  result["accepted"] = stats.accepted;
  result["rejected"] = stats.rejected;
  result["dropped"] = stats.dropped;
  return result;
}

nb::list topk_video_ids(const modloc::TopK& topk) {
  nb::list ids;
  const std::uint32_t count = topk.num_videos();
  for (std::uint32_t index = 0; index < count; ++index) {
    const std::string id = topk.video_id(index);
    ids.append(nb::str(id.data(), id.size()));
  }
  return ids;
}

nb::list topk_encode_snapshot(modloc::TopK& topk) {
  std::vector<std::string> payloads;
  {
    nb::gil_scoped_release release;
    payloads = topk.encode_snapshot();
  }
  nb::list result;
  for (std::string& payload : payloads) {
    result.append(to_bytes(payload));
    std::string().swap(payload);  // frees each payload once copied: peak ~ one snapshot more
  }
  return result;
}

std::unique_ptr<modloc::TopK> topk_decode_snapshot(const std::vector<nb::bytes>& payloads,
                                                   std::optional<std::uint64_t> slack) {
  std::vector<std::string_view> views;
  views.reserve(payloads.size());
  for (const nb::bytes& payload : payloads) views.emplace_back(payload.c_str(), payload.size());
  nb::gil_scoped_release release;
  return modloc::TopK::decode_snapshot(views, slack);
}

bool topk_replay(modloc::TopK& topk, const nb::bytes& record) {
  std::string_view view(record.c_str(), record.size());
  nb::gil_scoped_release release;
  return topk.replay(view);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "modloc's native extension: frame-level record decoding into contiguous arrays, "
            "and the per-class top-K accumulator.";
  m.def("decode_frame_payloads", &decode_frame_payloads, nb::arg("payloads"),
        "Decode frame-level SequenceExample payloads (a list of bytes).\n\n"
        "Returns (arrays, ids, errors): a dict of numpy arrays that own their memory (the\n"
        "fields of engine.io.native.FrameBatch), the raw ids of the good videos as bytes,\n"
        "and (position, kind, detail, id) for each payload left out, kind being 'corrupt',\n"
        "'bad_utf8', 'id_not_utf8' or 'layout'. The GIL is released while decoding.");

  nb::class_<modloc::TopK>(
      m, "TopK",
      "The per-class top-K accumulator (native/topk.hpp); engine.topk.TopK wraps it.\n\n"
      "Arrays are 1-D C-contiguous int64 (videos, starts, class ids) and float64 (scores).\n"
      "Every method that works on pairs releases the GIL; all are thread-safe.")
      .def(
          "__init__",
          [](modloc::TopK* self, Int64Array class_ids, std::uint64_t k, std::uint64_t slack) {
            new (self) modloc::TopK(
                std::vector<std::int64_t>(class_ids.data(), class_ids.data() + class_ids.shape(0)),
                k, slack);
          },
          nb::arg("class_ids"), nb::arg("k"), nb::arg("slack"))
      .def_prop_ro("k", &modloc::TopK::k)
      .def_prop_ro("slack", &modloc::TopK::slack)
      .def_prop_ro("class_ids", [](const modloc::TopK& topk) {
        return vector_to_numpy(std::vector<std::int64_t>(topk.class_ids()));
      })
      .def_prop_ro("num_videos", &modloc::TopK::num_videos)
      .def("position", &modloc::TopK::position, nb::arg("class_id"),
           "Position of a class id, -1 when it is not ranked.")
      .def(
          "add_video",
          [](modloc::TopK& topk, const std::string& video_id, std::optional<std::int64_t> order) {
            return topk.add_video(video_id, order).first;
          },
          nb::arg("video_id"), nb::arg("order").none(),
          "Index of the video, registered with `order` (None: the registration count) if new.")
      .def(
          "find_video",
          [](const modloc::TopK& topk, const std::string& video_id) {
            return topk.find_video(video_id);
          },
          nb::arg("video_id"), "Index of a registered video, None if it is not.")
      .def("video_id", &modloc::TopK::video_id, nb::arg("index"))
      .def("video_ids", &topk_video_ids, "Every video id, by index.")
      .def("add", &topk_add, nb::arg("video_id"), nb::arg("order").none(), nb::arg("starts"),
           nb::arg("class_ids"), nb::arg("scores"), nb::arg("record"),
           "Register a video and insert its pairs; with record=True returns its log record.")
      .def("insert", &topk_insert, nb::arg("videos"), nb::arg("starts"), nb::arg("class_ids"),
           nb::arg("scores"), "Insert pairs of registered videos (by index).")
      .def("replay", &topk_replay, nb::arg("record"),
           "Apply a log record; False (nothing done) when its video is registered already.")
      .def(
          "merge",
          [](modloc::TopK& topk, const modloc::TopK& other) {
            nb::gil_scoped_release release;
            topk.merge(other);
          },
          nb::arg("other"))
      .def("ranking", &topk_ranking, nb::arg("position"), nb::arg("offset"), nb::arg("limit"),
           "(video indices uint32, starts int64, scores float64) of a class's ranks "
           "[offset, offset + limit), best first.")
      .def("stats", &topk_stats)
      .def("encode_snapshot", &topk_encode_snapshot,
           "Snapshot payloads: [header, video table, one per class].")
      .def_static("decode_snapshot", &topk_decode_snapshot, nb::arg("payloads"),
                  nb::arg("slack").none())
      .def("encode_log_header", [](const modloc::TopK& topk) {
        return to_bytes(topk.encode_log_header());
      })
      .def(
          "check_log_header",
          [](const modloc::TopK& topk, const nb::bytes& header) {
            topk.check_log_header(std::string_view(header.c_str(), header.size()));
          },
          nb::arg("header"));
}
