// The per-class top-K accumulator of the engine's stage 4: for each ranked class, the k
// best (video, window start, score) pairs among everything inserted, kept exactly and in
// bounded memory. engine/topk.py reaches it through the bindings in module.cpp; this header
// is free of Python.
//
// Rank order (a strict total order on entries of one class): score descending, then the
// video's `order` ascending (a caller-given 64-bit tie key, by default the registration
// order), then the window start ascending. Two different videos with the same order are
// told apart by their ids (byte order), so the order is total and shard-independent.
//
// Each class holds an unordered buffer of at most k + slack entries that always contains
// the class's exact top k. When the buffer fills it is cut back to the k best, and the k-th
// best entry becomes the class's threshold: from then on a pair that does not beat the
// threshold is turned away in O(1) (one scored below the threshold's score without even
// taking the class lock). A cut is one pass over the buffer: a histogram of the entries'
// scores, kept up to date as they enter, tells which score bucket holds the k-th best, so
// only that bucket's entries are ordered by the full rank order. Memory: 16 bytes x
// classes x (k + slack) for the buffers, plus the video table (the id and an 8-byte order
// per video).
//
// Thread safety: every public member may be called from several threads at once. Each
// class has its own mutex, held while pairs are appended to it; the video table has one.
// A thread never holds two of these locks except in the members that take every lock in a
// fixed order (classes by position, then the video table): merge and encode_snapshot.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace modloc {

// A kept pair: 16 bytes, so a class of k = 100,000 holds 1.6 MB.
struct TopKEntry {
  double score;
  std::uint32_t video;  // index into the accumulator's video table
  std::uint32_t start;  // window start frame, < 2^31
};

static_assert(std::is_trivially_copyable_v<TopKEntry>, "EntryBuffer grows with realloc");

// A class's entries: a growable array grown with realloc, which moves a large block by
// remapping its pages rather than copying it. Filling 1000 interleaved buffers to 2 MB
// each this way took about half the time std::vector's copying growth did.
class EntryBuffer {
 public:
  EntryBuffer() = default;
  EntryBuffer(const EntryBuffer&) = delete;
  EntryBuffer& operator=(const EntryBuffer&) = delete;
  ~EntryBuffer() { std::free(data_); }

  TopKEntry* begin() { return data_; }
  TopKEntry* end() { return data_ + size_; }
  const TopKEntry* begin() const { return data_; }
  const TopKEntry* end() const { return data_ + size_; }
  TopKEntry& operator[](std::size_t i) { return data_[i]; }
  const TopKEntry& operator[](std::size_t i) const { return data_[i]; }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }

  // Room for `capacity` entries in all (never shrinks).
  void reserve(std::size_t capacity) {
    if (capacity <= capacity_) return;
    void* grown = std::realloc(data_, capacity * sizeof(TopKEntry));
    if (grown == nullptr) throw std::bad_alloc();
    data_ = static_cast<TopKEntry*>(grown);
    capacity_ = capacity;
  }
  // Appends `count` entries (any alignment) within the capacity reserved.
  void append(const void* entries, std::size_t count) {
    if (count == 0) return;  // data_ may still be null: memcpy must not see it (UB, found by fuzzing)
    std::memcpy(data_ + size_, entries, count * sizeof(TopKEntry));
    size_ += count;
  }
  void truncate(std::size_t size) { size_ = std::min(size, size_); }
  void assign(const void* entries, std::size_t count) {
    size_ = 0;
    reserve(count);
    append(entries, count);
  }

 private:
  TopKEntry* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

struct TopKStats {
  std::uint64_t videos = 0;
  std::uint64_t kept = 0;      // entries the rankings hold now: sum over classes of min(k, buffered)
  std::uint64_t buffered = 0;  // entries held in the buffers (memory)
  std::uint64_t pairs = 0;     // pairs given to add/insert
  std::uint64_t accepted = 0;  // pairs that entered a class buffer
  std::uint64_t rejected = 0;  // pairs turned away by a class threshold
  std::uint64_t dropped = 0;   // pairs of a class not ranked, or with a score <= 0
};

// The pairs of one insert call, n of each; `videos` null means they all belong to `video`.
struct PairsView {
  const std::int64_t* videos = nullptr;
  std::uint32_t video = 0;
  const std::int64_t* starts = nullptr;
  const std::int64_t* class_ids = nullptr;
  const double* scores = nullptr;
  std::size_t size = 0;
};

// One class's slice of its ranking, best first (parallel arrays).
struct RankedSlice {
  std::vector<std::uint32_t> videos;
  std::vector<std::int64_t> starts;
  std::vector<double> scores;
};

// The videos registered with an accumulator: id and order by index, index by id. Records
// never move once added (they live in chunks of doubling size), so a thread holding a class
// lock reads the order of any video its entries name without the table's mutex.
class VideoTable {
 public:
  struct Video {
    std::int64_t order = 0;
    std::string id;
  };

  VideoTable() = default;
  VideoTable(const VideoTable&) = delete;
  VideoTable& operator=(const VideoTable&) = delete;

  // Index of `id`, registering it with `order` (default: the current size) when new;
  // `.second` tells whether it was new. The caller holds mutex().
  std::pair<std::uint32_t, bool> add(std::string_view id, std::optional<std::int64_t> order);
  std::optional<std::uint32_t> find(std::string_view id) const;  // caller holds mutex()
  const Video& operator[](std::uint32_t index) const { return slot(index); }
  Video& operator[](std::uint32_t index) { return slot(index); }
  std::uint32_t size() const { return size_.load(std::memory_order_acquire); }
  std::mutex& mutex() const { return mutex_; }

 private:
  // Chunk c holds 64 << c records, so 27 chunks address 2^32 records.
  static constexpr unsigned kFirstChunkBits = 6;
  static constexpr std::size_t kChunks = 27;

  Video& slot(std::uint32_t index) const;

  std::array<std::unique_ptr<Video[]>, kChunks> chunks_;
  std::unordered_map<std::string_view, std::uint32_t> index_;  // views into the records
  std::atomic<std::uint32_t> size_{0};
  mutable std::mutex mutex_;
};

class TopK {
 public:
  static constexpr std::uint32_t kSnapshotVersion = 1;
  static constexpr std::uint32_t kLogVersion = 1;

  // `class_ids`: distinct non-negative ids, in the order positions refer to; k >= 1;
  // slack >= 1 entries buffered per class beyond k before a compaction.
  TopK(std::vector<std::int64_t> class_ids, std::uint64_t k, std::uint64_t slack);
  TopK(const TopK&) = delete;
  TopK& operator=(const TopK&) = delete;

  std::uint64_t k() const { return k_; }
  std::uint64_t slack() const { return slack_; }
  const std::vector<std::int64_t>& class_ids() const { return class_ids_; }
  // Position of a class id, -1 when the accumulator does not rank it.
  std::int64_t position(std::int64_t class_id) const;

  // Registers a video (see VideoTable::add); returns its index and whether it was new.
  std::pair<std::uint32_t, bool> add_video(std::string_view id, std::optional<std::int64_t> order);
  std::optional<std::uint32_t> find_video(std::string_view id) const;
  std::string video_id(std::uint32_t index) const;
  std::uint32_t num_videos() const { return videos_.size(); }

  // Inserts pairs after checking all of them (video index registered, 0 <= start < 2^31,
  // no NaN score); on a failed check std::invalid_argument and nothing is inserted. Pairs
  // of a class not ranked or with a score <= 0 are dropped.
  void insert(const PairsView& pairs);

  // Registers `id` and inserts its pairs (insert with one video). With `with_record`,
  // returns the log record of the call: the video, its order and the pairs that entered
  // a buffer, enough to rebuild the same top k on replay.
  std::string add(std::string_view id, std::optional<std::int64_t> order, const std::int64_t* starts,
                  const std::int64_t* class_ids, const double* scores, std::size_t size,
                  bool with_record);

  // Applies a log record written by add: false (and nothing done) if its video is
  // registered already. std::invalid_argument when the record is malformed.
  bool replay(std::string_view record);

  // Adds `other`'s state: afterwards this holds the exact top k of the union. Both must
  // have the same class ids and k. A video id present in both is one video with the
  // smaller order (exact when the video had that order wherever its pairs went).
  void merge(const TopK& other);

  // Class `position`'s entries ranked [offset, offset + limit), best first.
  RankedSlice ranking(std::size_t position, std::size_t offset, std::size_t limit);
  TopKStats stats() const;

  // Snapshot payloads: [header, video table, class 0, ..., class C-1] (formats in
  // topk.cpp). decode_snapshot takes the same list and checks every field.
  std::vector<std::string> encode_snapshot();
  static std::unique_ptr<TopK> decode_snapshot(const std::vector<std::string_view>& payloads,
                                               std::optional<std::uint64_t> slack);

  // The first record of an insert log: magic, version, k and class ids.
  std::string encode_log_header() const;
  // std::invalid_argument saying what differs when `header` is not this accumulator's.
  void check_log_header(std::string_view header) const;

 private:
  // Counts of a class's entries by bucket(score) = clamp((score - low) * scale, 0,
  // kBuckets - 1), a non-decreasing map fixed between cuts: a cut reads the bucket of the
  // k-th best off the counts and sorts out only that bucket's entries.
  struct ScoreHistogram {
    static constexpr std::size_t kBuckets = 256;
    std::array<std::uint32_t, kBuckets> counts{};
    double low = 0.0;
    double scale = 0.0;

    std::size_t bucket(double score) const {
      // Clamped by value and converted through a signed integer: min/max and one
      // conversion instruction, where std::min/max and a conversion to unsigned compile to
      // branches (mispredicted half the time on random scores).
      double x = (score - low) * scale;
      x = x > 0.0 ? x : 0.0;
      x = x < static_cast<double>(kBuckets - 1) ? x : static_cast<double>(kBuckets - 1);
      return static_cast<std::size_t>(static_cast<std::int32_t>(x));
    }
    // Maps [low, high] onto the buckets (everything to bucket 0 when high <= low), no counts.
    void reset(double new_low, double high) {
      counts.fill(0);
      low = new_low;
      scale = high > low ? static_cast<double>(kBuckets) / (high - low) : 0.0;
    }
    // The lowest score of bucket `index`, or below it.
    double edge(std::size_t index) const {
      return scale > 0.0 ? low + static_cast<double>(index) / scale : low;
    }
  };

  struct alignas(64) ClassBuffer {
    std::mutex mutex;
    // An unordered superset of the class's top k, at most k + slack entries.
    EntryBuffer entries;
    // The k-th best of `entries` when `bounded`: nothing at or below it can enter.
    TopKEntry threshold{};
    bool bounded = false;
    // `entries` is exactly the top min(k, n), best first.
    bool sorted = false;
    // Kept up to date while bounded; `high` is the highest score then, for the next scale.
    ScoreHistogram histogram;
    double high = 0.0;
  };

  struct Counts {
    std::uint64_t accepted = 0;
    std::uint64_t rejected = 0;
  };
  // Why a pair of an insert call is refused, or "" when every pair passes.
  struct BadPair {
    std::size_t index = 0;
    std::string reason;
  };

  // Strictly better in rank order (the header's rule); reads the video table.
  bool better(const TopKEntry& a, const TopKEntry& b) const;
  // Appends `run` to a class whose lock the caller holds, turning away what cannot enter;
  // entries that enter are recorded with `position` when `record` is given.
  void append(ClassBuffer& buffer, const TopKEntry* run, std::size_t size, Counts& counts,
              std::string* record, std::uint32_t position);
  // Both take the class lock's holder's buffer and its position. compact: size > k, cut
  // back to the k best; finalize: exactly the top min(k, n), sorted best first.
  void compact(ClassBuffer& buffer, std::uint32_t position);
  void finalize(ClassBuffer& buffer, std::uint32_t position);
  // Makes the buffer bounded by `threshold` (at or below every entry): counts the
  // entries into a histogram over [threshold score, highest score] and raises the floor.
  void bound(ClassBuffer& buffer, std::uint32_t position, const TopKEntry& threshold);
  // The first pair failing insert's checks (video indices checked against `registered`).
  std::optional<BadPair> first_bad_pair(const PairsView& pairs, std::uint64_t registered) const;
  // Inserts pairs that passed first_bad_pair; appends the entered ones to `record`.
  void insert_checked(const PairsView& pairs, std::string* record);

  std::vector<std::int64_t> class_ids_;
  std::vector<std::int32_t> lookup_;  // class id -> position, -1 when not ranked
  std::uint64_t k_;
  std::uint64_t slack_;
  std::uint64_t capacity_;  // k + slack
  std::unique_ptr<ClassBuffer[]> classes_;
  // Per class: threshold.score once bounded, else 0 (scores <= 0 never enter). Read
  // without the class lock to turn away pairs scored below it; it only rises, so a stale
  // value is safe. Apart from the buffers so the hot loop reads one small array.
  std::unique_ptr<std::atomic<double>[]> floors_;
  VideoTable videos_;
  std::atomic<std::uint64_t> pairs_{0};
  std::atomic<std::uint64_t> accepted_{0};
  std::atomic<std::uint64_t> rejected_{0};
  std::atomic<std::uint64_t> dropped_{0};
};

}  // namespace modloc
