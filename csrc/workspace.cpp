// Aligned scratch memory for the kernels, in a portable unit so no ISA build owns it.
//
// Large blocks are kept for reuse: every kernel call needs the same few big buffers (the input
// projection, dG, packed weights), and fresh pages from the OS cost a page fault and a zeroing
// per 4 KiB -- measured at ~10% of an LSTM training step. A small cache of freed blocks,
// matched by size class, removes that. The cache is bounded and thread-safe.
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>
#include "kernel_api.h"

namespace fusedrnn {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kMinCached = 1 << 16;          // below this malloc is fast enough
constexpr size_t kMaxCachedTotal = size_t(1) << 30;  // never hold more than 1 GiB idle

struct Header {  // sits in the 64 bytes before the block handed out
  size_t capacity;
};

struct Cache {
  std::mutex mu;
  std::vector<void*> blocks;  // raw allocations, each starting with a Header
  size_t total = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed during interpreter exit
  return *c;
}

// Size classes: powers of two over 2^k and three quarters between, so reuse wastes < 33%.
size_t size_class(size_t bytes) {
  size_t p = kMinCached;
  while (p < bytes) {
    if (p + p / 2 >= bytes) return p + p / 2;
    p *= 2;
  }
  return p;
}

}  // namespace

void* aligned_alloc_bytes(size_t bytes) {
  if (bytes < kMinCached) {
    void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign + kAlign);
    if (!p) throw std::bad_alloc();
    static_cast<Header*>(p)->capacity = 0;
    return static_cast<char*>(p) + kAlign;
  }
  const size_t cls = size_class(bytes);
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    for (size_t i = 0; i < c.blocks.size(); ++i) {
      Header* h = static_cast<Header*>(c.blocks[i]);
      if (h->capacity == cls) {
        c.blocks[i] = c.blocks.back();
        c.blocks.pop_back();
        c.total -= cls;
        return reinterpret_cast<char*>(h) + kAlign;
      }
    }
  }
  void* p = std::aligned_alloc(kAlign, cls + kAlign);
  if (!p) throw std::bad_alloc();
  static_cast<Header*>(p)->capacity = cls;
  return static_cast<char*>(p) + kAlign;
}

void aligned_free_bytes(void* ptr) {
  if (!ptr) return;
  void* raw = static_cast<char*>(ptr) - kAlign;
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

}  // namespace fusedrnn

// ---- Packed-weight cache -------------------------------------------------------------------
// Packing reorders a weight matrix into GEMM panels; for a small layer it costs more than the
// whole recurrence (LSTM, I = H = 128, T = 1: ~70% of the call). Each thread keeps the packed
// forms of the weights it saw last, with one copy of each weight's bytes however many forms
// it has (W_hh: the forward's gate panels and the backward's GEMM panels): a call whose weights
// compare equal byte for byte (memcmp, ~3x cheaper than packing) reuses the panels, so weights
// edited in place by an optimiser are always repacked. One copy, not one per form: training
// peak of deepbench LSTM 16 MiB lower, and a weight compared once a call, not once a form.
// Thread-local, so concurrent calls never share one.
#include <cstdint>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>

namespace fusedrnn {
namespace {

using RawKey = std::pair<const void*, size_t>;  // src, bytes

struct RawCopy {
  std::vector<char> bytes;    // the source's bytes when last compared
  uint64_t version = 0;       // bumped whenever they changed
  uint64_t checked_call = 0;  // the call that last compared them with the source
  uint64_t frozen = 0;        // the frozen id (ForwardArgs::frozen) they were last compared under
  int forms = 0;              // packed forms built from it
};

struct PackEntry {
  RawKey raw;         // the copy holding the source's bytes: its own, or a wider one around it
  size_t offset = 0;  // where the source's bytes start in that copy
  void* packed = nullptr;
  size_t packed_bytes = 0;
  uint64_t version = 0;  // the RawCopy version the panels were packed from (0: none yet)
  uint64_t last_call = 0;
};

using PackKey = std::tuple<const void*, size_t, size_t, int64_t, int64_t, int64_t>;  // src, raw, packed, tag, rows, cols
constexpr size_t kPackCacheBudget = size_t(256) << 20;  // bytes of panels + copies per thread

struct PackCache {
  std::map<PackKey, PackEntry> entries;
  std::map<RawKey, RawCopy> raws;
  size_t total = 0;
  uint64_t call = 1;
  ~PackCache() {
    for (auto& kv : entries) aligned_free_bytes(kv.second.packed);
  }
  void erase(std::map<PackKey, PackEntry>::iterator it) {
    total -= it->second.packed_bytes;
    aligned_free_bytes(it->second.packed);
    auto raw = raws.find(it->second.raw);
    if (--raw->second.forms == 0) {
      total -= raw->second.bytes.size();
      raws.erase(raw);
    }
    entries.erase(it);
  }
  // Drops forms not used by the current call, oldest first (and copies no form uses), until
  // `need` more bytes fit.
  void make_room(size_t need) {
    while (total + need > kPackCacheBudget) {
      auto victim = entries.end();
      for (auto it = entries.begin(); it != entries.end(); ++it)
        if (it->second.last_call != call && (victim == entries.end() || it->second.last_call < victim->second.last_call))
          victim = it;
      if (victim == entries.end()) return;
      erase(victim);
    }
  }
};

thread_local PackCache t_pack_cache;

// The copy that holds src's bytes: src's own, or one of a wider range around them. The GRU's
// backward packs row ranges of W_hh, which its forward packed whole: they share its copy (deepbench
// GRU training: 12 MB less). Only src's own bytes are ever compared with the source, never the rest
// of the wider copy, so no form reads past the range its caller passed.
std::map<RawKey, RawCopy>::iterator copy_holding(PackCache& c, const void* src, size_t bytes) {
  auto own = c.raws.find({src, bytes});
  if (own != c.raws.end()) return own;
  const auto p = reinterpret_cast<uintptr_t>(src);
  for (auto it = c.raws.begin(); it != c.raws.end(); ++it) {
    const auto q = reinterpret_cast<uintptr_t>(it->first.first);
    if (q <= p && p + bytes <= q + it->first.second) return it;
  }
  return c.raws.end();
}

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

}  // namespace

void packed_cache_begin_call() { ++t_pack_cache.call; }

void* cached_packed(const void* src, size_t raw_bytes, size_t packed_bytes, int64_t tag, int64_t rows,
                    int64_t cols, bool* valid, int nthreads, uint64_t frozen) {
  PackCache& c = t_pack_cache;
  const PackKey key{src, raw_bytes, packed_bytes, tag, rows, cols};
  const RawKey raw_key{src, raw_bytes};
  auto it = c.entries.find(key);
  if (it == c.entries.end()) {
    *valid = false;
    if (raw_bytes + packed_bytes > kPackCacheBudget) return nullptr;  // too big to keep: caller packs
    const bool had_raw = copy_holding(c, src, raw_bytes) != c.raws.end();
    c.make_room(packed_bytes + (had_raw ? 0 : raw_bytes));
    auto raw = copy_holding(c, src, raw_bytes);
    if (had_raw && raw == c.raws.end()) c.make_room(packed_bytes + raw_bytes);  // it went too
    if (raw == c.raws.end()) {  // a new copy: it holds the source's bytes as of now
      raw = c.raws.emplace(raw_key, RawCopy{}).first;
      raw->second.bytes.assign(static_cast<const char*>(src), static_cast<const char*>(src) + raw_bytes);
      raw->second.version = 1;
      raw->second.checked_call = c.call;
      raw->second.frozen = frozen;
      c.total += raw_bytes;
    }
    ++raw->second.forms;
    it = c.entries.emplace(key, PackEntry{}).first;
    it->second.raw = raw->first;
    it->second.offset = static_cast<size_t>(reinterpret_cast<uintptr_t>(src) -
                                            reinterpret_cast<uintptr_t>(raw->first.first));
    it->second.packed = aligned_alloc_bytes(packed_bytes);
    it->second.packed_bytes = packed_bytes;
    c.total += packed_bytes;
  }
  PackEntry& e = it->second;
  RawCopy& raw = c.raws.find(e.raw)->second;
  // A copy compared whole in this call holds every range too; one compared under this frozen id
  // holds the bytes the id promises (a layer's read-only copies, which it keeps while frozen).
  const bool known = raw.checked_call == c.call || (frozen != 0 && raw.frozen == frozen);
  if (!known) {
    char* mine = raw.bytes.data() + e.offset;
    if (!same_bytes(mine, static_cast<const char*>(src), raw_bytes, nthreads)) {
      std::memcpy(mine, src, raw_bytes);
      ++raw.version;  // every form of the copy repacks, the wider ones and the other ranges too
    }
    if (raw_bytes == raw.bytes.size()) {
      raw.checked_call = c.call;
      raw.frozen = frozen;
    }
  }
  *valid = e.version == raw.version;
  e.version = raw.version;  // the caller packs now when it was not
  e.last_call = c.call;
  return e.packed;
}

void packed_cache_clear() {
  PackCache& c = t_pack_cache;
  while (!c.entries.empty()) c.erase(c.entries.begin());
}

void packed_cache_stats(size_t* forms, size_t* copies, size_t* bytes) {
  *forms = t_pack_cache.entries.size();
  *copies = t_pack_cache.raws.size();
  *bytes = t_pack_cache.total;
}

}  // namespace fusedrnn
