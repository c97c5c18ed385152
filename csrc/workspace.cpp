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
