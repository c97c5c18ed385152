// Aligned scratch memory for the kernels, in a portable unit so no ISA build owns it.
#include <cstdlib>
#include <new>
#include "kernel_api.h"

namespace fusedrnn {

void* aligned_alloc_bytes(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (!p) throw std::bad_alloc();
  return p;
}

void aligned_free_bytes(void* p) { std::free(p); }

}  // namespace fusedrnn
