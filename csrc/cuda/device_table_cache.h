// The device copies of the kernels' tables (csrc/cuda/clip_cuda.cu's gradient tables, csrc/cuda/agc_cuda.cu's AGC
// tables), keyed by their content (pointers, sizes, dtypes): the same gradients step after step cost no
// host-to-device copy, and a CUDA graph captured after a warm-up call contains no copy at all. One policy for
// both caches, with no CUDA in it, so that tests/tooling/test_table_cache.py compiles it on a CPU with a simulated
// GPU (tests/cpp/table_cache_test.cpp) and checks:
//   * an entry a captured graph has used is never evicted (the graph reads its table on every replay), however
//     many other tables come after it;
//   * the table's host-to-device copy is enqueued on the stream that first needed it; a call from another
//     stream waits on the event recorded after that copy until the copy is known to be done (without the wait
//     it could read the table before the copy lands), and the allocator is told that stream uses the table,
//     so an eviction frees it only after that stream's work (recordStream);
//   * a graph captured while the copy may still be pending waits for the copy on the host once, at capture
//     (a graph replayed later, on any stream, must not depend on an event outside it);
//   * a table asked for first under capture is refused (std::nullopt: the caller raises its own error).
// Ops supplies the device side (csrc/cuda/device_table_cuda.h CudaTables):
//   Table upload(int device, const std::vector<int64_t>& key, Stream s)   the copy, enqueued on s
//   Event record(Stream s)                     an event recorded on s after the copy
//   bool done(Event&)                          the event has completed (never called under capture)
//   void wait(Stream s, Event&)                s waits on the event (stream-ordered, no host sync)
//   void sync_under_capture(Event&)            the host waits for the event (the capture's mode relaxed)
//   void record_stream(Table&, Stream s)       the allocator frees the table only after s's work
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace fusedclip {

template <typename Ops>
class DeviceTableCache {
 public:
  using Table = typename Ops::Table;
  using Event = typename Ops::Event;
  using Stream = typename Ops::Stream;

  explicit DeviceTableCache(size_t max_entries) : max_entries_(max_entries) {}

  // The table for `key` on `device`, to be read by work enqueued on `stream`; std::nullopt when it is not
  // cached and `capturing` (a copy cannot be captured: the graph would copy from a host buffer that is gone).
  std::optional<Table> get(Ops& ops, int device, const std::vector<int64_t>& key, Stream stream, bool capturing) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device != device || it->key != key) continue;
      entries_.splice(entries_.begin(), entries_, it);
      Entry& e = entries_.front();
      const bool other_stream = !(e.copy_stream == stream);
      if (!e.copied) {
        if (capturing) {
          ops.sync_under_capture(e.event);
          e.copied = true;
        } else if (ops.done(e.event)) {
          e.copied = true;
        } else if (other_stream) {
          ops.wait(stream, e.event);
        }
      }
      e.used_by_graph = e.used_by_graph || capturing;
      if (other_stream) ops.record_stream(e.table, stream);
      return e.table;
    }
    if (capturing) return std::nullopt;
    Table table = ops.upload(device, key, stream);
    Event event = ops.record(stream);
    entries_.push_front(Entry{device, key, table, std::move(event), stream, false, false});
    // Evict the least recently used entries that no graph depends on (the newest one never).
    for (auto it = std::prev(entries_.end()); entries_.size() > max_entries_ && it != entries_.begin();) {
      const auto older = it;
      it = std::prev(it);
      if (!older->used_by_graph) entries_.erase(older);
    }
    return table;
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return entries_.size();
  }

 private:
  struct Entry {
    int device;
    std::vector<int64_t> key;
    Table table;
    Event event;         // recorded on copy_stream after the copy
    Stream copy_stream;  // the stream the copy was enqueued on
    bool copied;         // the copy is known to be done: no more waits
    bool used_by_graph;  // a captured graph reads the table: never evicted
  };
  std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  size_t max_entries_;
};

}  // namespace fusedclip
