// Aligned scratch memory for the kernels, in a portable unit so no ISA build owns it.
//
// Large blocks are kept for reuse: every kernel call needs the same few big buffers (the input
// projection, dG, packed weights), and fresh pages from the OS cost a page fault and a zeroing
// per 4 KiB -- measured at ~10% of an LSTM training step. A small cache of freed blocks,
// matched by size class, removes that. The cache is bounded and thread-safe.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <new>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include "kernel_api.h"

namespace fusedrnn {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kMinCached = 1 << 16;          // below this malloc is fast enough
constexpr size_t kMaxCachedTotal = size_t(1) << 30;  // never hold more than 1 GiB idle

struct Header {  // sits in the 64 bytes before the block handed out
  size_t capacity;
  size_t requested;  // the bytes asked for (workspace_bytes)
};

// Bytes of the blocks handed out and not freed yet, as asked for (not their size classes), and
// their most at once since the last reset: what the kernels' scratch and new arrays hold together
// (workspace_bytes: tests and the accounting of bench/memory.py).
std::atomic<size_t> g_in_use{0}, g_peak{0};

void* handed_out(void* raw, size_t bytes) {
  static_cast<Header*>(raw)->requested = bytes;
  const size_t now = g_in_use += bytes;
  size_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
  return static_cast<char*>(raw) + kAlign;
}

void* given_back(void* ptr) {
  void* raw = static_cast<char*>(ptr) - kAlign;
  g_in_use -= static_cast<Header*>(raw)->requested;
  return raw;
}

struct Cache {
  std::mutex mu;
  std::vector<void*> blocks;  // raw allocations, each starting with a Header
  size_t total = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed during interpreter exit
  return *c;
}

// Size classes: powers of two over 2^k and three quarters between, so an exact class wastes
// < 33% (a larger block, taken when the class has none, up to half).
size_t size_class(size_t bytes) {
  size_t p = kMinCached;
  while (p < bytes) {
    if (p + p / 2 >= bytes) return p + p / 2;
    p *= 2;
  }
  return p;
}

// No allocation holds more than PTRDIFF_MAX bytes (malloc refuses them), and past 1.5 * 2^63
// size_class's doubling wrapped to 0 and never ended: a y of 2^61 float32 elements from an input
// of none hung the call. Such a request fails at once (the bindings' MemoryError).
void refuse_impossible(size_t bytes) {
  if (bytes > size_t(PTRDIFF_MAX) - 2 * kAlign) throw std::bad_alloc();
}

// fail_worker_allocations: the only way a test can make a worker's allocation fail for sure (an
// address-space limit hits whichever thread allocates next, usually the caller's).
std::atomic<int64_t> g_worker_allocations_to_fail{0};

void fail_if_asked_on_a_worker() {
  if (g_worker_allocations_to_fail.load(std::memory_order_relaxed) <= 0) return;
#if defined(_OPENMP)
  if (omp_get_thread_num() != 0 &&
      g_worker_allocations_to_fail.fetch_sub(1, std::memory_order_relaxed) > 0)
    throw std::bad_alloc();
#endif
}

}  // namespace

#if defined(FUSEDRNN_EXACT_ALLOC)
// Sanitizer builds: every block its exact size (no rounding to 64 bytes, no size classes, no
// reuse), so ASan sees any access past the bytes asked for and any use after free.
void* aligned_alloc_bytes(size_t bytes) {
  refuse_impossible(bytes);
  fail_if_asked_on_a_worker();
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, kAlign + bytes) != 0 || !p) throw std::bad_alloc();
  static_cast<Header*>(p)->capacity = 0;
  return handed_out(p, bytes);
}
void aligned_free_bytes(void* ptr) {
  if (ptr) std::free(given_back(ptr));
}
#else
void* aligned_alloc_bytes(size_t bytes) {
  refuse_impossible(bytes);
  fail_if_asked_on_a_worker();
  if (bytes < kMinCached) {
    void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign + kAlign);
    if (!p) throw std::bad_alloc();
    static_cast<Header*>(p)->capacity = 0;
    return handed_out(p, bytes);
  }
  const size_t cls = size_class(bytes);
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    // A block of the request's class, else the smallest of up to twice it. Exact classes alone
    // left blocks idle through a call that needed smaller ones: the amx forward's split weights
    // (6 bytes a weight, where the FMA kernels' 4-byte packed forms fit the backward's requests)
    // sat in the training peak. Training peak, first call in a fresh process (bench/memory):
    // deepbench LSTM 137.6 -> 121.4 MiB, RNN 61.9 -> 54.4, stacked LSTM 23.9 -> 22.1. Six calls
    // with a half-batch one among them, with gemm_amx.h's unpacked B too: deepbench LSTM 150 ->
    // 102 MiB resident, fastrnns GRU 199 -> 153.
    size_t best = c.blocks.size(), best_cap = 2 * cls + 1;
    for (size_t i = 0; i < c.blocks.size() && best_cap != cls; ++i) {
      const size_t cap = static_cast<Header*>(c.blocks[i])->capacity;
      if (cap >= cls && cap < best_cap) best = i, best_cap = cap;
    }
    if (best < c.blocks.size()) {
      void* raw = c.blocks[best];
      c.blocks[best] = c.blocks.back();
      c.blocks.pop_back();
      c.total -= best_cap;
      return handed_out(raw, bytes);
    }
  }
  void* p = std::aligned_alloc(kAlign, cls + kAlign);
  if (!p) throw std::bad_alloc();
  static_cast<Header*>(p)->capacity = cls;
  return handed_out(p, bytes);
}

void aligned_free_bytes(void* ptr) {
  if (!ptr) return;
  void* raw = given_back(ptr);
  const size_t cls = static_cast<Header*>(raw)->capacity;
  if (cls != 0) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.total + cls <= kMaxCachedTotal && c.blocks.size() < 64) {
      c.blocks.push_back(raw);
      c.total += cls;
      return;
    }
  }
  std::free(raw);
}
#endif

void fail_worker_allocations(int64_t n) {
  g_worker_allocations_to_fail.store(n, std::memory_order_relaxed);
}

void workspace_bytes(size_t* in_use, size_t* peak, size_t* idle, bool reset_peak) {
  if (reset_peak) g_peak = g_in_use.load();
  *in_use = g_in_use.load();
  *peak = g_peak.load();
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  *idle = c.total;
}

void free_idle_blocks() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (void* raw : c.blocks) std::free(raw);
  c.blocks.clear();
  c.total = 0;
#if defined(__GLIBC__)
  malloc_trim(0);  // glibc keeps freed heap pages (its mmap threshold grows with big frees)
#endif
}

}  // namespace fusedrnn

// ---- Packed-weight cache -------------------------------------------------------------------
// Packing reorders a weight matrix into GEMM panels; for a small layer it costs more than the
// whole recurrence (LSTM, I = H = 128, T = 1: ~70% of the call). Each thread keeps the packed
// forms of the weights its inference and frozen calls saw last (a training call's weights change
// between calls: it packs its own, PanelReuse in sequence/layout.h). An unfrozen call's weights
// are compared with a copy of their bytes (memcmp, ~3x cheaper than packing), one copy however
// many forms the weight has, so weights edited in place are always repacked. A frozen call's
// promise (ForwardArgs::frozen) replaces the comparison, so only its id is kept, not the bytes:
// an unfrozen call or another id meeting those forms packs them again, and takes the bytes.
// Thread-local, so concurrent calls never share one.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <tuple>
#include <utility>

namespace fusedrnn {
namespace {

using RawKey = std::pair<const void*, size_t>;  // src, bytes

struct RawCopy {
  std::vector<char> bytes;    // the source's bytes when last compared; empty when only frozen calls saw them
  uint64_t version = 0;       // bumped whenever the forms must be packed again
  uint64_t checked_call = 0;  // the call that last compared them with the source
  uint64_t frozen = 0;        // the frozen id (ForwardArgs::frozen) they were last compared under
  int forms = 0;              // packed forms built from it
};

using PackKey = std::tuple<const void*, size_t, size_t, int64_t, int64_t, int64_t>;  // src, raw, packed, tag, rows, cols

struct PackEntry {
  RawKey raw;  // the source's copy (RawCopy)
  void* packed = nullptr;
  size_t packed_bytes = 0;
  uint64_t version = 0;  // the RawCopy version the panels were packed from (0: none yet)
  uint64_t last_call = 0;
  std::list<PackKey>::iterator lru;  // its place in PackCache::lru
};

constexpr size_t kPackCacheBudget = size_t(256) << 20;  // bytes of panels + copies per thread
// Forms per thread. The byte budget alone let a process that meets many small weights (layers
// made and dropped, weights of a few KB) keep tens of thousands of forms, whose map nodes and
// block headers the budget does not count (~500 bytes a form beside the panels). 4096 forms are
// over a thousand layers' directions (2-3 forms each).
constexpr size_t kPackCacheMaxForms = 4096;

// Packed forms kept by every thread's cache (tests: none may sit where no empty_cache() reaches).
std::atomic<int64_t> g_forms_all_threads{0};

struct PackCache {
  std::map<PackKey, PackEntry> entries;
  std::map<RawKey, RawCopy> raws;
  // Keys of `entries`, least recently used first (each use moves its key to the back). Eviction
  // takes the front: it scanned every entry for the oldest, and with the cache full of small
  // forms (36,000) that scan made each call meeting a new weight ~12x slower (0.07 -> 0.9 ms).
  std::list<PackKey> lru;
  size_t total = 0;
  uint64_t call = 1;
  ~PackCache() {
    for (auto& kv : entries) aligned_free_bytes(kv.second.packed);
    g_forms_all_threads -= int64_t(entries.size());
  }
  void erase(std::map<PackKey, PackEntry>::iterator it) {
    total -= it->second.packed_bytes;
    aligned_free_bytes(it->second.packed);
    auto raw = raws.find(it->second.raw);
    if (--raw->second.forms == 0) {
      total -= raw->second.bytes.size();
      raws.erase(raw);
    }
    lru.erase(it->second.lru);
    entries.erase(it);
    --g_forms_all_threads;
  }
  // Drops forms not used by the current call, least recently used first (and copies no form
  // uses), until `need` more bytes and one more form fit.
  void make_room(size_t need) {
    while (total + need > kPackCacheBudget || entries.size() >= kPackCacheMaxForms) {
      if (lru.empty()) return;  // (cannot be: with no form both fit; a too-big one is refused)
      auto victim = entries.find(lru.front());
      if (victim->second.last_call == call) return;  // then every form is this call's
      erase(victim);
    }
  }
  // Brings raw up to date with src for this call: compares (or, under frozen, trusts) and bumps
  // the version when the forms must be packed again.
  void check(RawCopy& raw, const void* src, size_t n, int nthreads, uint64_t frozen);
};

thread_local PackCache t_pack_cache;

// Whether a and b hold the same n bytes. Big weights are compared by the call's threads, in
// equal slices: one thread alone kept the other waiting before every 2-thread layer (stacked
// LSTM, 2 threads: 1 MB W_ih and W_hh a layer).
bool same_bytes(const char* a, const char* b, size_t n, int nthreads) {
#if defined(FUSEDRNN_HAVE_OPENMP)
  if (nthreads > 1 && n >= (size_t(256) << 10)) {
    int differ = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : differ)
    for (int i = 0; i < nthreads; ++i) {
      const size_t begin = n * i / nthreads, end = n * (i + 1) / nthreads;
      differ |= std::memcmp(a + begin, b + begin, end - begin) != 0;
    }
    return !differ;
  }
#endif
  (void)nthreads;
  return std::memcmp(a, b, n) == 0;
}

void PackCache::check(RawCopy& raw, const void* src, size_t n, int nthreads, uint64_t frozen) {
  // Compared whole in this call already, or under this frozen id (whose bytes it promises).
  if (raw.checked_call == call || (frozen != 0 && raw.frozen == frozen)) return;
  const char* now = static_cast<const char*>(src);
  if (raw.bytes.empty()) {  // only a frozen call saw them: nothing to compare with
    ++raw.version;
    if (frozen == 0) {
      raw.bytes.assign(now, now + n);
      total += n;
    }
  } else if (!same_bytes(raw.bytes.data(), now, n, nthreads)) {
    std::memcpy(raw.bytes.data(), now, n);
    ++raw.version;  // every form of the copy repacks
  }
  raw.checked_call = call;
  raw.frozen = frozen;
}

}  // namespace

void packed_cache_begin_call() { ++t_pack_cache.call; }

void* cached_packed(const void* src, size_t raw_bytes, size_t packed_bytes, int64_t tag, int64_t rows,
                    int64_t cols, bool* valid, const void** pack_from, int nthreads, uint64_t frozen) {
  PackCache& c = t_pack_cache;
  const PackKey key{src, raw_bytes, packed_bytes, tag, rows, cols};
  const RawKey raw_key{src, raw_bytes};
  auto it = c.entries.find(key);
  if (it == c.entries.end()) {
    *valid = false;
    if (raw_bytes + packed_bytes > kPackCacheBudget) return nullptr;  // too big to keep: caller packs
    const bool had_raw = c.raws.count(raw_key) != 0;
    const size_t copy_bytes = frozen ? 0 : raw_bytes;
    c.make_room(packed_bytes + (had_raw ? 0 : copy_bytes));
    auto raw = c.raws.find(raw_key);
    if (had_raw && raw == c.raws.end()) c.make_room(packed_bytes + copy_bytes);  // it went too
    // The panels' memory before any entry: an allocation that failed (MemoryError) left an
    // entry with none, and every later call with that weight packed for itself beside it.
    void* packed = aligned_alloc_bytes(packed_bytes);
    // A new copy starts empty: check() below takes the source's bytes (unless frozen) and
    // bumps its version, so the new form packs.
    if (raw == c.raws.end()) raw = c.raws.emplace(raw_key, RawCopy{}).first;
    ++raw->second.forms;
    it = c.entries.emplace(key, PackEntry{}).first;
    ++g_forms_all_threads;
    it->second.raw = raw_key;
    it->second.lru = c.lru.insert(c.lru.end(), key);
    it->second.packed = packed;
    it->second.packed_bytes = packed_bytes;
    c.total += packed_bytes;
  }
  PackEntry& e = it->second;
  RawCopy& raw = c.raws.find(e.raw)->second;
  c.check(raw, src, raw_bytes, nthreads, frozen);
  *valid = e.version == raw.version;
  e.version = raw.version;  // the caller packs now when it was not
  // From the bytes just compared, not from src: a thread writing src meanwhile, then putting the
  // old bytes back, would leave panels of other weights that the copy vouches for.
  *pack_from = raw.bytes.empty() ? src : raw.bytes.data();
  e.last_call = c.call;
  c.lru.splice(c.lru.end(), c.lru, e.lru);  // the most recently used now
  return e.packed;
}

void packed_cache_clear() {
  PackCache& c = t_pack_cache;
  while (!c.entries.empty()) c.erase(c.entries.begin());
}

// The widest pipelined team the calling thread has run (1: none). Its workers are the OpenMP
// pool's first threads, which any region as wide takes again, each member on its own thread.
thread_local int t_widest_pipeline = 1;

void note_pipeline_team(int n) { t_widest_pipeline = std::max(t_widest_pipeline, n); }

void packed_cache_clear_team() {
#if defined(FUSEDRNN_HAVE_OPENMP)
  if (t_widest_pipeline > 1) {
#pragma omp parallel num_threads(t_widest_pipeline)
    packed_cache_clear();
    return;
  }
#endif
  packed_cache_clear();
}

void packed_cache_stats(size_t* forms, size_t* copies, size_t* bytes) {
  *forms = t_pack_cache.entries.size();
  *copies = 0;
  for (const auto& kv : t_pack_cache.raws) *copies += !kv.second.bytes.empty();
  *bytes = t_pack_cache.total;
}

int64_t packed_forms_all_threads() { return g_forms_all_threads.load(std::memory_order_relaxed); }

}  // namespace fusedrnn
