// csrc/cuda/device_table_cache.h against a simulated GPU (tests/tooling/test_table_cache.py compiles and runs this): streams
// are ints, a copy is "done" when the test says so, and every table records whether it was freed while a
// stream or a captured graph could still read it. Prints one line per check; exits 1 on the first failure.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "cuda/device_table_cache.h"

namespace {

struct Buffer {  // a device table: freed when the last owner (cache entry, caller) lets it go
  std::vector<int64_t> key;
  std::set<int> used_by;  // streams recorded on it (recordStream)
  bool* freed_flag = nullptr;
  ~Buffer() {
    if (freed_flag) *freed_flag = true;
  }
};

struct Sim {
  using Table = std::shared_ptr<Buffer>;
  struct Event {
    int id;
  };
  using Stream = int;

  std::vector<bool> copy_done;     // per event: the copy before it has landed
  std::vector<std::string> calls;  // what the cache asked for, in order
  std::vector<bool*> freed;        // per upload
  int uploads = 0;

  Table upload(int device, const std::vector<int64_t>& key, Stream s) {
    auto t = std::make_shared<Buffer>();
    t->key = key;
    t->freed_flag = new bool(false);
    freed.push_back(t->freed_flag);
    ++uploads;
    calls.push_back("upload d" + std::to_string(device) + " s" + std::to_string(s));
    return t;
  }
  Event record(Stream s) {
    copy_done.push_back(false);
    calls.push_back("record s" + std::to_string(s));
    return Event{static_cast<int>(copy_done.size()) - 1};
  }
  bool done(Event& e) {
    calls.push_back("query e" + std::to_string(e.id));
    return copy_done[e.id];
  }
  void wait(Stream s, Event& e) { calls.push_back("wait s" + std::to_string(s) + " e" + std::to_string(e.id)); }
  void sync_under_capture(Event& e) {
    calls.push_back("sync e" + std::to_string(e.id));
    copy_done[e.id] = true;
  }
  void record_stream(Table& t, Stream s) {
    t->used_by.insert(s);
    calls.push_back("record_stream s" + std::to_string(s));
  }
  bool called(const std::string& what) const {
    for (const auto& c : calls)
      if (c == what) return true;
    return false;
  }
};

int failures = 0;
void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
  if (!ok) ++failures;
}

std::vector<int64_t> key(int i) { return {i, 4096, 7}; }

}  // namespace

int main() {
  using Cache = fusedclip::DeviceTableCache<Sim>;
  {  // a hit from another stream before the copy is done waits on the copy's event, and records that stream
    Sim sim;
    Cache cache(8);
    auto a = cache.get(sim, 0, key(1), /*stream=*/1, false);
    check(a.has_value() && sim.uploads == 1 && sim.called("upload d0 s1") && sim.called("record s1"),
          "miss: one upload on the calling stream, then an event on it");
    sim.calls.clear();
    auto b = cache.get(sim, 0, key(1), 1, false);
    check(b.has_value() && *b == *a && sim.uploads == 1 && !sim.called("wait s1 e0"),
          "hit from the copying stream: no copy, no wait (stream order)");
    sim.calls.clear();
    auto c = cache.get(sim, 0, key(1), 2, false);
    check(c.has_value() && *c == *a && sim.called("wait s2 e0"), "hit from another stream, copy pending: waits");
    check(sim.called("record_stream s2") && (*a)->used_by.count(2), "hit from another stream: recordStream");
    sim.copy_done[0] = true;
    sim.calls.clear();
    cache.get(sim, 0, key(1), 3, false);
    check(!sim.called("wait s3 e0") && sim.called("query e0"), "hit after the copy is done: no wait");
    sim.calls.clear();
    cache.get(sim, 0, key(1), 4, false);
    check(!sim.called("query e0") && !sim.called("wait s4 e0"), "once known done: neither query nor wait");
    auto d = cache.get(sim, 1, key(1), 1, false);
    check(sim.uploads == 2 && *d != *a, "same key on another device: its own table");
  }
  {  // under capture: a cached table whose copy may be pending is waited for on the host, once; a miss refused
    Sim sim;
    Cache cache(8);
    cache.get(sim, 0, key(1), 1, false);
    sim.calls.clear();
    auto t = cache.get(sim, 0, key(1), 2, true);
    check(t.has_value() && sim.called("sync e0") && !sim.called("wait s2 e0") && !sim.called("query e0"),
          "capture, copy pending: a host wait (relaxed), no event in the graph, no query under capture");
    sim.calls.clear();
    cache.get(sim, 0, key(1), 2, true);
    check(!sim.called("sync e0"), "capture, copy known done: no wait");
    auto miss = cache.get(sim, 0, key(2), 2, true);
    check(!miss.has_value() && sim.uploads == 1, "capture, not cached: refused, nothing uploaded");
  }
  {  // eviction: least recently used first, never an entry a graph has used, never the newest
    Sim sim;
    Cache cache(8);
    cache.get(sim, 0, key(0), 1, false);
    cache.get(sim, 0, key(0), 1, true);  // captured into a graph
    for (int i = 1; i <= 40; ++i) cache.get(sim, 0, key(i), 1, false);
    check(!*sim.freed[0], "a table a captured graph reads survives 40 other tables");
    check(cache.size() == 8, "the cache holds 8 entries, the graph's among them");
    int freed = 0;
    for (size_t i = 1; i < sim.freed.size(); ++i) freed += *sim.freed[i];
    bool newest_kept = true;
    for (size_t i = sim.freed.size() - 7; i < sim.freed.size(); ++i) newest_kept = newest_kept && !*sim.freed[i];
    check(freed == 40 - 7 && newest_kept, "the others evicted, least recently used first");
    const int before = sim.uploads;
    cache.get(sim, 0, key(0), 1, true);
    check(sim.uploads == before, "the graph's table still a hit");
    cache.get(sim, 0, key(33), 1, false);
    for (int i = 41; i <= 46; ++i) cache.get(sim, 0, key(i), 1, false);
    const int uploads = sim.uploads;
    cache.get(sim, 0, key(33), 1, false);
    check(sim.uploads == uploads, "a recently used table is kept over older ones");
    cache.get(sim, 0, key(47), 1, false);
    cache.get(sim, 0, key(41), 1, false);
    check(sim.uploads == uploads + 2, "and the least recently used one goes");
  }
  {  // a cache of 1 with only graph entries keeps all of them and the newest
    Sim sim;
    Cache cache(1);
    for (int i = 0; i < 3; ++i) {
      cache.get(sim, 0, key(i), 1, false);
      cache.get(sim, 0, key(i), 1, true);
    }
    cache.get(sim, 0, key(9), 1, false);
    check(cache.size() == 4 && !*sim.freed[0] && !*sim.freed[3], "graph entries and the newest kept beyond max");
  }
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
