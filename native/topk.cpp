// The per-class top-K accumulator (see topk.hpp), and its snapshot and log payloads.
//
// Payload formats, all little-endian (engine/topk.py frames each payload as a TFRecord,
// whose masked CRC32Cs are the checksums):
//
// snapshot header   "MLTKSNAP" | u32 version | u64 k | u64 slack | u64 pairs | u64 accepted
//                   | u64 rejected | u64 dropped | u32 C | i64 class_ids[C] | u64 V
// video table       V x (i64 order | u32 n | n bytes of UTF-8 id), by video index
// class c           u32 c | u32 n (<= k) | n x (f64 score | u32 video | u32 start), best first
//
// log header        "MLTK-LOG" | u32 version | u64 k | u32 C | i64 class_ids[C]
// log record        i64 order | u32 n | n bytes of id | m x (f64 score | u32 start | u32 class
//                   position), m from the remaining length

#include "topk.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the top-K snapshot and log payloads are written in the host's byte order: little-endian only"
#endif

namespace modloc {

namespace {

static_assert(sizeof(TopKEntry) == 16, "TopKEntry is written to snapshots as 16 bytes");

constexpr char kSnapshotMagic[8] = {'M', 'L', 'T', 'K', 'S', 'N', 'A', 'P'};
constexpr char kLogMagic[8] = {'M', 'L', 'T', 'K', '-', 'L', 'O', 'G'};
constexpr std::int64_t kStartLimit = std::int64_t{1} << 31;
constexpr std::size_t kPairBytes = 16;  // a log record's (score, start, position)
// Pairs staged per round of an insert: 512 KiB of staged entries, within L2.
constexpr std::size_t kChunk = std::size_t{1} << 15;
// Classes are ranked through a dense table indexed by class id; YouTube-8M ids are < 3862.
constexpr std::int64_t kMaxClassId = (std::int64_t{1} << 24) - 1;

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Reads a payload front to back; every read past the end is an error naming the field.
class Reader {
 public:
  Reader(std::string_view data, std::string what) : data_(data), what_(std::move(what)) {}

  template <typename T>
  T get(const char* field) {
    T value;
    std::memcpy(&value, take(sizeof(T), field).data(), sizeof(T));
    return value;
  }

  std::string_view take(std::size_t size, const char* field) {
    if (data_.size() - position_ < size) {
      throw std::invalid_argument(what_ + ": truncated at " + field + " (needs " +
                                  std::to_string(size) + " bytes at offset " +
                                  std::to_string(position_) + " of " +
                                  std::to_string(data_.size()) + ")");
    }
    std::string_view view = data_.substr(position_, size);
    position_ += size;
    return view;
  }

  std::size_t remaining() const { return data_.size() - position_; }

  void finish() const {
    if (remaining() != 0) {
      throw std::invalid_argument(what_ + ": " + std::to_string(remaining()) +
                                  " unexpected bytes at the end");
    }
  }

  const std::string& what() const { return what_; }

 private:
  std::string_view data_;
  std::string what_;
  std::size_t position_ = 0;
};

void check_magic(Reader& reader, const char (&magic)[8], const char* kind) {
  std::string_view found = reader.remaining() >= 8 ? reader.take(8, "magic") : std::string_view();
  if (found != std::string_view(magic, 8)) {
    throw std::invalid_argument(std::string("not a top-K ") + kind + " (no " +
                                std::string(magic, 8) + " magic)");
  }
}

void check_version(std::uint32_t version, std::uint32_t supported, const char* kind) {
  if (version != supported) {
    throw std::invalid_argument(std::string(kind) + " format version " + std::to_string(version) +
                                " is not supported (this build reads version " +
                                std::to_string(supported) + ")");
  }
}

std::vector<std::int64_t> read_class_ids(Reader& reader) {
  const auto count = reader.get<std::uint32_t>("class count");
  if (count > reader.remaining() / sizeof(std::int64_t)) {
    throw std::invalid_argument(reader.what() + ": " + std::to_string(count) +
                                " class ids do not fit in the payload");
  }
  std::vector<std::int64_t> ids(count);
  for (std::int64_t& id : ids) id = reader.get<std::int64_t>("class ids");
  return ids;
}

std::string quoted(std::string_view id) { return "'" + std::string(id) + "'"; }

}  // namespace

// --- the video table ----------------------------------------------------------------------

VideoTable::Video& VideoTable::slot(std::uint32_t index) const {
  // Chunk c holds indices [64 (2^c - 1), 64 (2^(c+1) - 1)): shifting by 64 makes the chunk
  // the position of the highest set bit.
  const std::uint64_t shifted = std::uint64_t{index} + (std::uint64_t{1} << kFirstChunkBits);
  const unsigned chunk = 63 - static_cast<unsigned>(__builtin_clzll(shifted)) - kFirstChunkBits;
  return chunks_[chunk][shifted - (std::uint64_t{1} << (chunk + kFirstChunkBits))];
}

std::pair<std::uint32_t, bool> VideoTable::add(std::string_view id,
                                               std::optional<std::int64_t> order) {
  if (auto found = find(id)) return {*found, false};
  const std::uint32_t index = size_.load(std::memory_order_relaxed);
  if (index == UINT32_MAX) {
    throw std::invalid_argument("the top-K video table is full (2^32 - 1 videos)");
  }
  const std::uint64_t shifted = std::uint64_t{index} + (std::uint64_t{1} << kFirstChunkBits);
  const unsigned chunk = 63 - static_cast<unsigned>(__builtin_clzll(shifted)) - kFirstChunkBits;
  if (!chunks_[chunk]) {
    chunks_[chunk].reset(new Video[std::size_t{1} << (chunk + kFirstChunkBits)]);
  }
  Video& video = slot(index);
  video.order = order.value_or(index);
  video.id = std::string(id);
  index_.emplace(std::string_view(video.id), index);
  // Release: a thread that sees the new size sees the record.
  size_.store(index + 1, std::memory_order_release);
  return {index, true};
}

std::optional<std::uint32_t> VideoTable::find(std::string_view id) const {
  auto it = index_.find(id);
  if (it == index_.end()) return std::nullopt;
  return it->second;
}

// --- the accumulator ----------------------------------------------------------------------

TopK::TopK(std::vector<std::int64_t> class_ids, std::uint64_t k, std::uint64_t slack)
    : class_ids_(std::move(class_ids)), k_(k), slack_(slack) {
  if (k_ < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k_));
  if (slack_ < 1) throw std::invalid_argument("slack must be >= 1, got " + std::to_string(slack_));
  if (k_ > UINT32_MAX || slack_ > UINT32_MAX) {
    throw std::invalid_argument("k and slack must be below 2^32");
  }
  if (class_ids_.empty()) throw std::invalid_argument("a top-K needs at least one class");
  std::int64_t largest = 0;
  for (std::int64_t id : class_ids_) {
    if (id < 0 || id > kMaxClassId) {
      throw std::invalid_argument("class id " + std::to_string(id) + " is outside [0, " +
                                  std::to_string(kMaxClassId) + "]");
    }
    largest = std::max(largest, id);
  }
  lookup_.assign(static_cast<std::size_t>(largest) + 1, -1);
  for (std::size_t position = 0; position < class_ids_.size(); ++position) {
    std::int32_t& slot = lookup_[static_cast<std::size_t>(class_ids_[position])];
    if (slot >= 0) {
      throw std::invalid_argument("class id " + std::to_string(class_ids_[position]) +
                                  " is repeated");
    }
    slot = static_cast<std::int32_t>(position);
  }
  capacity_ = k_ + slack_;
  classes_.reset(new ClassBuffer[class_ids_.size()]);
  floors_.reset(new std::atomic<double>[class_ids_.size()]);
  for (std::size_t position = 0; position < class_ids_.size(); ++position) {
    floors_[position].store(0.0, std::memory_order_relaxed);
  }
}

std::int64_t TopK::position(std::int64_t class_id) const {
  if (class_id < 0 || static_cast<std::uint64_t>(class_id) >= lookup_.size()) return -1;
  return lookup_[static_cast<std::size_t>(class_id)];
}

std::pair<std::uint32_t, bool> TopK::add_video(std::string_view id,
                                               std::optional<std::int64_t> order) {
  std::lock_guard<std::mutex> lock(videos_.mutex());
  return videos_.add(id, order);
}

std::optional<std::uint32_t> TopK::find_video(std::string_view id) const {
  std::lock_guard<std::mutex> lock(videos_.mutex());
  return videos_.find(id);
}

std::string TopK::video_id(std::uint32_t index) const {
  if (index >= videos_.size()) {
    throw std::invalid_argument("no video of index " + std::to_string(index));
  }
  return videos_[index].id;
}

bool TopK::better(const TopKEntry& a, const TopKEntry& b) const {
  if (a.score != b.score) return a.score > b.score;
  if (a.video != b.video) {
    const VideoTable::Video& first = videos_[a.video];
    const VideoTable::Video& second = videos_[b.video];
    if (first.order != second.order) return first.order < second.order;
    return first.id < second.id;
  }
  return a.start < b.start;
}

std::optional<TopK::BadPair> TopK::first_bad_pair(const PairsView& pairs,
                                                  std::uint64_t registered) const {
  // One branch-free pass first: the common case is a call with nothing wrong.
  std::uint64_t bad = 0;
  for (std::size_t i = 0; i < pairs.size; ++i) {
    bad |= static_cast<std::uint64_t>(pairs.starts[i]) >> 31;  // negative or >= 2^31
    bad |= static_cast<std::uint64_t>(std::isnan(pairs.scores[i]));
    if (pairs.videos != nullptr) {
      bad |= static_cast<std::uint64_t>(static_cast<std::uint64_t>(pairs.videos[i]) >= registered);
    }
  }
  if (bad == 0) return std::nullopt;
  for (std::size_t i = 0; i < pairs.size; ++i) {
    if (pairs.videos != nullptr && static_cast<std::uint64_t>(pairs.videos[i]) >= registered) {
      return BadPair{i, "pair " + std::to_string(i) + " names video index " +
                            std::to_string(pairs.videos[i]) + ", but " +
                            std::to_string(registered) + " videos are registered"};
    }
    if (std::isnan(pairs.scores[i])) {
      return BadPair{i, "a score is NaN (pair " + std::to_string(i) + ")"};
    }
    if (pairs.starts[i] < 0 || pairs.starts[i] >= kStartLimit) {
      return BadPair{i, "window start " + std::to_string(pairs.starts[i]) + " (pair " +
                            std::to_string(i) + ") is outside [0, 2^31)"};
    }
  }
  return std::nullopt;  // unreachable: `bad` saw one of the above
}

void TopK::insert(const PairsView& pairs) {
  if (auto bad = first_bad_pair(pairs, videos_.size())) {
    const std::size_t i = bad->index;
    const bool named = pairs.videos == nullptr ||
                       static_cast<std::uint64_t>(pairs.videos[i]) < videos_.size();
    if (named) {
      const auto video = pairs.videos ? static_cast<std::uint32_t>(pairs.videos[i]) : pairs.video;
      throw std::invalid_argument("video " + quoted(videos_[video].id) + ": " + bad->reason);
    }
    throw std::invalid_argument(bad->reason);
  }
  insert_checked(pairs, nullptr);
}

std::string TopK::add(std::string_view id, std::optional<std::int64_t> order,
                      const std::int64_t* starts, const std::int64_t* class_ids,
                      const double* scores, std::size_t size, bool with_record) {
  PairsView pairs{nullptr, 0, starts, class_ids, scores, size};
  if (auto bad = first_bad_pair(pairs, 0)) {
    throw std::invalid_argument("video " + quoted(id) + ": " + bad->reason);
  }
  pairs.video = add_video(id, order).first;
  std::string record;
  if (with_record) {
    put(record, videos_[pairs.video].order);
    put(record, static_cast<std::uint32_t>(id.size()));
    record.append(id);
  }
  insert_checked(pairs, with_record ? &record : nullptr);
  return record;
}

void TopK::insert_checked(const PairsView& pairs, std::string* record) {
  const std::size_t chunk = std::min(pairs.size, kChunk);
  // cursor[position]: pairs of the class in this round, then where its run is written.
  std::vector<std::uint32_t> cursor(class_ids_.size(), 0);
  std::vector<std::uint32_t> touched;  // classes with pairs this round, first-seen order
  std::vector<std::int32_t> where(chunk);
  std::vector<TopKEntry> staged(chunk);
  std::uint64_t dropped = 0;
  Counts counts;
  for (std::size_t begin = 0; begin < pairs.size; begin += chunk) {
    const std::size_t size = std::min(chunk, pairs.size - begin);
    // Class of each pair; what cannot enter is decided here without a lock.
    for (std::size_t i = 0; i < size; ++i) {
      const std::size_t j = begin + i;
      const std::int64_t position = this->position(pairs.class_ids[j]);
      const double score = pairs.scores[j];
      if (position < 0 || !(score > 0)) {
        ++dropped;
        where[i] = -1;
        continue;
      }
      if (score < floors_[position].load(std::memory_order_relaxed)) {
        ++counts.rejected;
        where[i] = -1;
        continue;
      }
      where[i] = static_cast<std::int32_t>(position);
      if (cursor[position]++ == 0) touched.push_back(static_cast<std::uint32_t>(position));
    }
    // Counting sort by class: each touched class gets one contiguous run of `staged`.
    std::uint32_t offset = 0;
    for (std::uint32_t position : touched) {
      const std::uint32_t count = cursor[position];
      cursor[position] = offset;
      offset += count;
    }
    for (std::size_t i = 0; i < size; ++i) {
      if (where[i] < 0) continue;
      const std::size_t j = begin + i;
      const std::uint32_t video =
          pairs.videos ? static_cast<std::uint32_t>(pairs.videos[j]) : pairs.video;
      staged[cursor[where[i]]++] = {pairs.scores[j], video, static_cast<std::uint32_t>(pairs.starts[j])};
    }
    // One lock per touched class; cursor now holds each run's end.
    std::uint32_t run_begin = 0;
    for (std::uint32_t position : touched) {
      const std::uint32_t run_end = cursor[position];
      {
        std::lock_guard<std::mutex> lock(classes_[position].mutex);
        append(classes_[position], staged.data() + run_begin, run_end - run_begin, counts, record,
               position);
      }
      run_begin = run_end;
      cursor[position] = 0;
    }
    touched.clear();
  }
  pairs_.fetch_add(pairs.size, std::memory_order_relaxed);
  dropped_.fetch_add(dropped, std::memory_order_relaxed);
  accepted_.fetch_add(counts.accepted, std::memory_order_relaxed);
  rejected_.fetch_add(counts.rejected, std::memory_order_relaxed);
}

void TopK::append(ClassBuffer& buffer, const TopKEntry* run, std::size_t size, Counts& counts,
                  std::string* record, std::uint32_t position) {
  EntryBuffer& entries = buffer.entries;
  auto reserve = [&](std::size_t needed) {
    // Doubling, but never past k + slack: the memory bound holds for the allocation too.
    if (needed > entries.capacity()) {
      entries.reserve(std::min<std::size_t>(capacity_, std::max<std::size_t>(
                                                           {needed, 2 * entries.capacity(), 64})));
    }
  };
  if (size == 0) return;
  buffer.sorted = false;
  if (!buffer.bounded && record == nullptr && entries.size() + size <= capacity_) {
    // Filling: no threshold yet and room for the whole run.
    reserve(entries.size() + size);
    entries.append(run, size);
    counts.accepted += size;
    return;
  }
  for (std::size_t i = 0; i < size; ++i) {
    const TopKEntry& entry = run[i];
    if (buffer.bounded && !better(entry, buffer.threshold)) {
      ++counts.rejected;
      continue;
    }
    if (entries.size() == capacity_) {
      compact(buffer, position);
      if (!better(entry, buffer.threshold)) {
        ++counts.rejected;
        continue;
      }
    }
    reserve(entries.size() + 1);
    entries.append(&entry, 1);
    if (buffer.bounded) {
      ++buffer.histogram.counts[buffer.histogram.bucket(entry.score)];
      buffer.high = std::max(buffer.high, entry.score);
    }
    ++counts.accepted;
    if (record != nullptr) {
      put(*record, entry.score);
      put(*record, entry.start);
      put(*record, position);
    }
  }
}

void TopK::compact(ClassBuffer& buffer, std::uint32_t position) {
  EntryBuffer& entries = buffer.entries;
  ScoreHistogram& histogram = buffer.histogram;
  if (!buffer.bounded) {
    // The first cut (or the first after a merge changed the keys): no histogram yet. Its
    // range comes from a sample: the map only has to be non-decreasing, and scores outside
    // the range fall into the end buckets.
    const std::size_t step = std::max<std::size_t>(1, entries.size() / 1024);
    double low = entries[0].score;
    buffer.high = low;
    for (std::size_t i = 0; i < entries.size(); i += step) {
      low = std::min(low, entries[i].score);
      buffer.high = std::max(buffer.high, entries[i].score);
    }
    histogram.reset(low, buffer.high);
    for (const TopKEntry& entry : entries) ++histogram.counts[histogram.bucket(entry.score)];
  }
  // The bucket of the k-th best: the buckets above it hold fewer than k entries, which
  // all stay, and the best of its own entries fill the rest. One pass moves the entries
  // above it down, picks out its own, and counts the next histogram, over [its lower edge,
  // high].
  std::size_t cut = ScoreHistogram::kBuckets - 1;
  std::size_t above = 0;
  while (above + histogram.counts[cut] < k_) above += histogram.counts[cut--];
  ScoreHistogram next;
  next.reset(histogram.edge(cut), buffer.high);
  // The loop has no branch (on random scores they are mispredicted half the time) and no
  // call, and reads locals only (stores to the entries could alias the mappings' fields):
  // each entry is written as a candidate and kept as one when it is in the cut bucket.
  // The scratch array is per thread and as large as the largest buffer cut.
  thread_local std::vector<TopKEntry> tied;
  if (tied.size() < entries.size()) tied.resize(entries.size());
  TopKEntry* const candidates = tied.data();
  const ScoreHistogram from = histogram;
  TopKEntry* const data = entries.begin();
  const std::size_t size = entries.size();
  std::size_t kept = 0;
  std::size_t found = 0;
  for (std::size_t i = 0; i < size; ++i) {
    const TopKEntry entry = data[i];
    const std::size_t bucket = from.bucket(entry.score);
    const bool stays = bucket > cut;
    data[kept] = entry;
    kept += stays;
    next.counts[next.bucket(entry.score)] += stays;
    candidates[found] = entry;
    found += bucket == cut;
  }
  const std::size_t need = k_ - kept;  // >= 1: fewer than k entries lie above the cut
  TopKEntry* const last = candidates + (need - 1);
  std::nth_element(candidates, last, candidates + found,
                   [this](const TopKEntry& a, const TopKEntry& b) { return better(a, b); });
  for (TopKEntry* it = candidates; it <= last; ++it) {
    entries[kept++] = *it;
    ++next.counts[next.bucket(it->score)];
  }
  entries.truncate(k_);
  histogram = next;
  buffer.threshold = *last;
  buffer.bounded = true;
  buffer.sorted = false;
  floors_[position].store(buffer.threshold.score, std::memory_order_relaxed);
}

void TopK::bound(ClassBuffer& buffer, std::uint32_t position, const TopKEntry& threshold) {
  buffer.high = threshold.score;
  for (const TopKEntry& entry : buffer.entries) buffer.high = std::max(buffer.high, entry.score);
  buffer.histogram.reset(threshold.score, buffer.high);
  for (const TopKEntry& entry : buffer.entries) {
    ++buffer.histogram.counts[buffer.histogram.bucket(entry.score)];
  }
  buffer.threshold = threshold;
  buffer.bounded = true;
  floors_[position].store(threshold.score, std::memory_order_relaxed);
}

void TopK::finalize(ClassBuffer& buffer, std::uint32_t position) {
  if (buffer.sorted) return;
  EntryBuffer& entries = buffer.entries;
  if (entries.size() > k_) compact(buffer, position);
  std::sort(entries.begin(), entries.end(),
            [this](const TopKEntry& a, const TopKEntry& b) { return better(a, b); });
  if (entries.size() == k_ && !buffer.bounded) bound(buffer, position, entries[k_ - 1]);
  buffer.sorted = true;
}

bool TopK::replay(std::string_view record) {
  Reader reader(record, "top-K log record");
  const auto order = reader.get<std::int64_t>("order");
  const auto length = reader.get<std::uint32_t>("id length");
  const std::string_view id = reader.take(length, "id");
  if (reader.remaining() % kPairBytes != 0) {
    throw std::invalid_argument("top-K log record of video " + quoted(id) + ": " +
                                std::to_string(reader.remaining()) +
                                " bytes of pairs, not a multiple of 16");
  }
  const std::size_t size = reader.remaining() / kPairBytes;
  std::vector<std::int64_t> starts(size), class_ids(size);
  std::vector<double> scores(size);
  for (std::size_t i = 0; i < size; ++i) {
    scores[i] = reader.get<double>("score");
    starts[i] = reader.get<std::uint32_t>("start");
    const auto position = reader.get<std::uint32_t>("class position");
    // A logged pair entered a buffer once: ranked class, positive score.
    if (position >= class_ids_.size() || !(scores[i] > 0)) {
      throw std::invalid_argument("top-K log record of video " + quoted(id) + ": pair " +
                                  std::to_string(i) + " has class position " +
                                  std::to_string(position) + " and score " +
                                  std::to_string(scores[i]));
    }
    class_ids[i] = class_ids_[position];
  }
  PairsView pairs{nullptr, 0, starts.data(), class_ids.data(), scores.data(), size};
  if (auto bad = first_bad_pair(pairs, 0)) {
    throw std::invalid_argument("top-K log record of video " + quoted(id) + ": " + bad->reason);
  }
  const auto [index, is_new] = add_video(id, order);
  if (!is_new) return false;
  pairs.video = index;
  insert_checked(pairs, nullptr);
  return true;
}

void TopK::merge(const TopK& other) {
  if (&other == this) throw std::invalid_argument("cannot merge a top-K accumulator into itself");
  if (other.k_ != k_) {
    throw std::invalid_argument("cannot merge a top-K of k=" + std::to_string(other.k_) +
                                " into one of k=" + std::to_string(k_));
  }
  if (other.class_ids_ != class_ids_) {
    throw std::invalid_argument("cannot merge top-K accumulators of different class ids (" +
                                std::to_string(other.class_ids_.size()) + " and " +
                                std::to_string(class_ids_.size()) +
                                " classes, not the same ids in the same order)");
  }
  const std::size_t classes = class_ids_.size();
  // A copy of the other's state under its locks, so that no thread ever holds the locks of
  // two accumulators (a.merge(b) and b.merge(a) at once cannot deadlock).
  std::vector<std::vector<TopKEntry>> theirs(classes);
  std::vector<VideoTable::Video> their_videos;
  {
    std::vector<std::unique_lock<std::mutex>> locks;
    locks.reserve(classes);
    for (std::size_t c = 0; c < classes; ++c) locks.emplace_back(other.classes_[c].mutex);
    std::lock_guard<std::mutex> videos_lock(other.videos_.mutex());
    const auto ranked_first = [&other](const TopKEntry& a, const TopKEntry& b) {
      return other.better(a, b);
    };
    for (std::size_t c = 0; c < classes; ++c) {
      theirs[c].assign(other.classes_[c].entries.begin(), other.classes_[c].entries.end());
      if (theirs[c].size() > k_) {
        std::nth_element(theirs[c].begin(), theirs[c].begin() + static_cast<std::ptrdiff_t>(k_ - 1),
                         theirs[c].end(), ranked_first);
        theirs[c].resize(k_);
      }
    }
    their_videos.resize(other.videos_.size());
    for (std::uint32_t v = 0; v < their_videos.size(); ++v) {
      their_videos[v].order = other.videos_[v].order;
      their_videos[v].id = other.videos_[v].id;
    }
  }
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(classes);
  for (std::size_t c = 0; c < classes; ++c) locks.emplace_back(classes_[c].mutex);
  std::lock_guard<std::mutex> videos_lock(videos_.mutex());
  std::vector<std::uint32_t> index(their_videos.size());
  bool lowered = false;
  for (std::size_t v = 0; v < their_videos.size(); ++v) {
    const auto [mine, is_new] = videos_.add(their_videos[v].id, their_videos[v].order);
    index[v] = mine;
    if (!is_new && their_videos[v].order < videos_[mine].order) {
      videos_[mine].order = their_videos[v].order;
      lowered = true;
    }
  }
  if (lowered) {
    // Keys changed, so every threshold entry may be out of place; the floors (scores) stay
    // valid, the thresholds come back at the next compaction.
    for (std::size_t c = 0; c < classes; ++c) {
      classes_[c].bounded = false;
      classes_[c].sorted = false;
    }
  }
  Counts ignored;  // the counters add the other's instead: they count inputs, not merges
  for (std::size_t c = 0; c < classes; ++c) {
    for (TopKEntry& entry : theirs[c]) entry.video = index[entry.video];
    append(classes_[c], theirs[c].data(), theirs[c].size(), ignored, nullptr,
           static_cast<std::uint32_t>(c));
  }
  pairs_.fetch_add(other.pairs_.load(), std::memory_order_relaxed);
  accepted_.fetch_add(other.accepted_.load(), std::memory_order_relaxed);
  rejected_.fetch_add(other.rejected_.load(), std::memory_order_relaxed);
  dropped_.fetch_add(other.dropped_.load(), std::memory_order_relaxed);
}

RankedSlice TopK::ranking(std::size_t position, std::size_t offset, std::size_t limit) {
  if (position >= class_ids_.size()) {
    throw std::invalid_argument("class position " + std::to_string(position) + " is outside [0, " +
                                std::to_string(class_ids_.size()) + ")");
  }
  ClassBuffer& buffer = classes_[position];
  std::lock_guard<std::mutex> lock(buffer.mutex);
  finalize(buffer, static_cast<std::uint32_t>(position));
  const std::size_t begin = std::min(offset, buffer.entries.size());
  const std::size_t end = begin + std::min(limit, buffer.entries.size() - begin);
  RankedSlice slice;
  slice.videos.reserve(end - begin);
  slice.starts.reserve(end - begin);
  slice.scores.reserve(end - begin);
  for (std::size_t i = begin; i < end; ++i) {
    slice.videos.push_back(buffer.entries[i].video);
    slice.starts.push_back(buffer.entries[i].start);
    slice.scores.push_back(buffer.entries[i].score);
  }
  return slice;
}

TopKStats TopK::stats() const {
  TopKStats stats;
  for (std::size_t c = 0; c < class_ids_.size(); ++c) {
    std::lock_guard<std::mutex> lock(classes_[c].mutex);
    // The buffer holds the whole top k, or (never cut back yet) every pair that entered.
    stats.buffered += classes_[c].entries.size();
    stats.kept += std::min<std::uint64_t>(k_, classes_[c].entries.size());
  }
  stats.videos = videos_.size();
  stats.pairs = pairs_.load();
  stats.accepted = accepted_.load();
  stats.rejected = rejected_.load();
  stats.dropped = dropped_.load();
  return stats;
}

// --- snapshots and logs -------------------------------------------------------------------

std::vector<std::string> TopK::encode_snapshot() {
  const std::size_t classes = class_ids_.size();
  // Every lock, so the snapshot is one consistent state even while other threads insert.
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(classes);
  for (std::size_t c = 0; c < classes; ++c) locks.emplace_back(classes_[c].mutex);
  std::lock_guard<std::mutex> videos_lock(videos_.mutex());
  std::vector<std::string> payloads;
  payloads.reserve(2 + classes);

  std::string header(kSnapshotMagic, 8);
  put(header, kSnapshotVersion);
  put(header, k_);
  put(header, slack_);
  put(header, pairs_.load());
  put(header, accepted_.load());
  put(header, rejected_.load());
  put(header, dropped_.load());
  put(header, static_cast<std::uint32_t>(classes));
  for (std::int64_t id : class_ids_) put(header, id);
  const std::uint32_t videos = videos_.size();
  put(header, std::uint64_t{videos});
  payloads.push_back(std::move(header));

  std::string table;
  for (std::uint32_t v = 0; v < videos; ++v) {
    put(table, videos_[v].order);
    put(table, static_cast<std::uint32_t>(videos_[v].id.size()));
    table.append(videos_[v].id);
  }
  payloads.push_back(std::move(table));

  for (std::size_t c = 0; c < classes; ++c) {
    finalize(classes_[c], static_cast<std::uint32_t>(c));
    const EntryBuffer& entries = classes_[c].entries;
    std::string payload;
    payload.reserve(8 + entries.size() * sizeof(TopKEntry));
    put(payload, static_cast<std::uint32_t>(c));
    put(payload, static_cast<std::uint32_t>(entries.size()));
    payload.append(reinterpret_cast<const char*>(entries.begin()), entries.size() * sizeof(TopKEntry));
    payloads.push_back(std::move(payload));
  }
  return payloads;
}

std::unique_ptr<TopK> TopK::decode_snapshot(const std::vector<std::string_view>& payloads,
                                            std::optional<std::uint64_t> slack) {
  if (payloads.empty()) throw std::invalid_argument("empty top-K snapshot");
  Reader header(payloads[0], "top-K snapshot header");
  check_magic(header, kSnapshotMagic, "snapshot");
  check_version(header.get<std::uint32_t>("version"), kSnapshotVersion, "top-K snapshot");
  const auto k = header.get<std::uint64_t>("k");
  const auto stored_slack = header.get<std::uint64_t>("slack");
  const auto pairs = header.get<std::uint64_t>("pairs");
  const auto accepted = header.get<std::uint64_t>("accepted");
  const auto rejected = header.get<std::uint64_t>("rejected");
  const auto dropped = header.get<std::uint64_t>("dropped");
  std::vector<std::int64_t> class_ids = read_class_ids(header);
  const auto videos = header.get<std::uint64_t>("video count");
  header.finish();
  if (payloads.size() != 2 + class_ids.size()) {
    throw std::invalid_argument("top-K snapshot: " + std::to_string(payloads.size()) +
                                " records, the header announces " +
                                std::to_string(2 + class_ids.size()) +
                                " (header, videos and one per class)");
  }
  const std::size_t classes = class_ids.size();
  auto topk = std::make_unique<TopK>(std::move(class_ids), k, slack.value_or(stored_slack));

  Reader table(payloads[1], "top-K snapshot video table");
  for (std::uint64_t v = 0; v < videos; ++v) {
    const auto order = table.get<std::int64_t>("video order");
    const std::string_view id = table.take(table.get<std::uint32_t>("id length"), "video id");
    if (!topk->videos_.add(id, order).second) {
      throw std::invalid_argument("top-K snapshot video table: video " + quoted(id) +
                                  " appears twice");
    }
  }
  table.finish();

  for (std::size_t c = 0; c < classes; ++c) {
    Reader reader(payloads[2 + c], "top-K snapshot class record " + std::to_string(c));
    const auto position = reader.get<std::uint32_t>("class position");
    const auto count = reader.get<std::uint32_t>("entry count");
    if (position != c || count > k) {
      throw std::invalid_argument(reader.what() + ": position " + std::to_string(position) +
                                  " with " + std::to_string(count) + " entries (k=" +
                                  std::to_string(k) + ")");
    }
    const std::string_view bytes = reader.take(std::size_t{count} * sizeof(TopKEntry), "entries");
    reader.finish();
    EntryBuffer& entries = topk->classes_[c].entries;
    entries.assign(bytes.data(), count);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const TopKEntry& entry = entries[i];
      // better() reads the video table: the index is checked before the order.
      if (entry.video >= videos || !(entry.score > 0) || entry.start >= kStartLimit ||
          (i > 0 && topk->better(entry, entries[i - 1]))) {
        throw std::invalid_argument(reader.what() + ": entry " + std::to_string(i) +
                                    " (video index " + std::to_string(entry.video) +
                                    ", start " + std::to_string(entry.start) + ", score " +
                                    std::to_string(entry.score) +
                                    ") is invalid or out of rank order");
      }
    }
    topk->classes_[c].sorted = true;
    if (entries.size() == k) topk->bound(topk->classes_[c], static_cast<std::uint32_t>(c), entries[k - 1]);
  }
  topk->pairs_ = pairs;
  topk->accepted_ = accepted;
  topk->rejected_ = rejected;
  topk->dropped_ = dropped;
  return topk;
}

std::string TopK::encode_log_header() const {
  std::string header(kLogMagic, 8);
  put(header, kLogVersion);
  put(header, k_);
  put(header, static_cast<std::uint32_t>(class_ids_.size()));
  for (std::int64_t id : class_ids_) put(header, id);
  return header;
}

void TopK::check_log_header(std::string_view payload) const {
  Reader header(payload, "top-K log header");
  check_magic(header, kLogMagic, "insert log");
  check_version(header.get<std::uint32_t>("version"), kLogVersion, "top-K log");
  const auto k = header.get<std::uint64_t>("k");
  const std::vector<std::int64_t> class_ids = read_class_ids(header);
  header.finish();
  if (k != k_) {
    throw std::invalid_argument("the log was written with k=" + std::to_string(k) +
                                ", this top-K has k=" + std::to_string(k_));
  }
  if (class_ids != class_ids_) {
    throw std::invalid_argument("the log was written for other class ids (" +
                                std::to_string(class_ids.size()) + " classes; this top-K has " +
                                std::to_string(class_ids_.size()) + ")");
  }
}

}  // namespace modloc
