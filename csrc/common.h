// Small helpers for the per-ISA units: scratch buffers, threading, denormal control.
// Everything here lives in the ISA namespace so each build has its own copy.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <mutex>
#include <string>
#include "kernel_api.h"
#if defined(__unix__)
#include <unistd.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <xmmintrin.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename I> inline I imin(I a, I b) { return a < b ? a : b; }
template <typename I> inline I imax(I a, I b) { return a > b ? a : b; }
template <typename I> inline I ceil_div(I a, I b) { return (a + b - 1) / b; }

// Splits [0, n) into nparts contiguous ranges; part i gets [begin, end).
inline void split_range(int64_t n, int nparts, int part, int64_t* begin, int64_t* end) {
  const int64_t base = n / nparts, extra = n % nparts;
  *begin = part * base + imin<int64_t>(part, extra);
  *end = *begin + base + (part < extra ? 1 : 0);
}

// Owns one aligned scratch allocation for the length of a kernel call.
template <typename T>
struct Scratch {
  T* p = nullptr;
  // A count whose bytes would wrap size_t asks for SIZE_MAX, which aligned_alloc_bytes refuses:
  // wrapped, it was a small block the kernel then wrote past.
  explicit Scratch(int64_t n) {
    const bool fits = static_cast<uint64_t>(n) <= SIZE_MAX / sizeof(T);
    if (n > 0) p = static_cast<T*>(aligned_alloc_bytes(fits ? sizeof(T) * size_t(n) : SIZE_MAX));
  }
  ~Scratch() { aligned_free_bytes(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// memcpy and memset that do nothing for 0 bytes: an empty Scratch's pointer is null (B = 0, or
// H = 0 through the functional API), and the C library's null with size 0 is undefined
// behaviour (UBSan), which lets the compiler drop later null checks.
inline void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
inline void set_bytes(void* dst, int value, size_t bytes) {
  if (bytes) std::memset(dst, value, bytes);
}

// Flush denormals to zero for the kernel's duration and restore the caller's mode after:
// denormal arithmetic is ~100x slower (a gradient decaying over a long sequence reaches them).
// Values under float's normal range (1.2e-38; 2.2e-308 in float64) count as 0, so an input or
// weight that small gives other results than torch's (README, "Denormals").
struct DenormalsFlushed {
#if defined(__SSE2__)
  unsigned int saved;
  DenormalsFlushed() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~DenormalsFlushed() { _mm_setcsr(saved); }
#endif
};

// One core's L1 data cache or L2 in bytes, as the OS reports it (32 KB and 512 KB where it does
// not say).
inline int64_t core_cache_bytes(int level) {
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  const long n = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
  if (n > 0) return int64_t(n);
#endif
  return int64_t(level == 1 ? 32 : 512) << 10;
}
inline int64_t l1_cache_bytes() {
  static const int64_t bytes = core_cache_bytes(1);
  return bytes;
}
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = core_cache_bytes(2);
  return bytes;
}

// The L3 in bytes that this CPU's cores share, as Linux's sysfs reports it (8 MB elsewhere).
// Not sysconf: under this VM glibc's _SC_LEVEL3_CACHE_SIZE says 320 MB where sysfs (and lscpu)
// say 32 MB.
inline int64_t l3_cache_bytes() {
  static const int64_t bytes = [] {
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level(dir + "level"), size(dir + "size");
      int l = 0;
      std::string text;
      if (!(level >> l) || l != 3 || !(size >> text)) continue;
      const int64_t n = std::atoll(text.c_str());
      const char unit = text.empty() ? ' ' : text.back();
      const int64_t scaled = unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : n;
      if (scaled > 0) return scaled;
    }
    return int64_t(8) << 20;
  }();
  return bytes;
}

// Prefetches p's line into L2 (prefetcht1), in a way the compiler keeps: GCC deletes a loop whose
// body is only __builtin_prefetch calls (no side effects), which silently removed the first
// ForwardLoop::prefetch_gx.
inline void prefetch_to_l2(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Prefetches p's line into L1 (prefetcht0), kept as prefetch_to_l2 is.
inline void prefetch_to_l1(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Prefetches every line of the n values at p into L1.
template <typename T>
inline void prefetch_values_to_l1(const T* p, int64_t n) {
  const char* end = reinterpret_cast<const char*>(p + n);
  for (const char* c = reinterpret_cast<const char*>(p); c < end; c += 64) prefetch_to_l1(c);
  if (n > 0) prefetch_to_l1(end - 1);  // (p not on a line: its last line)
}

// The CPU's family as cpuid leaf 1 gives it (base family, plus the extended family where the
// base is 15): AMD's Zen 4 is 25, Zen 5 26. 0 where unknown.
inline int cpu_family() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const int base = (eax >> 8) & 0xF;
  return base == 0xF ? base + int((eax >> 20) & 0xFF) : base;
#else
  return 0;
#endif
}

// How many k-steps ahead the micro-kernels prefetch B's panel (microkernel.h), 0 for none; it
// depends on the core. Intel: 16 (it paid: the wide LSTM's W_hh streaming from L3). AMD's Zen 5
// (family 26 on): none, its hardware prefetchers alone were faster: in-process A/B
// (bench/ab_builds.py), 1 thread, inference, prefetch 16 -> none: wide LSTM 252.9 -> 238.9 ms, GRU
// 197.1 -> 192.7, deepbench-train LSTM 114.1 -> 111.8, GRU 93.3 -> 89.0, fastrnns LSTM 110.9 ->
// 109.2; 2 threads wide LSTM 130.7 -> 127.0; training deepbench-train LSTM 353.4 -> 346.0, stacked
// 11.66 -> 11.47 (others within noise). Zen 4 (family 25; Zen 3, unmeasured, shares it): 24, as
// the step's weight panels stream from L3 there (wide's 16 MB, deepbench's 16 MB) at 94-99
// GFLOP/s without, 110-111 with (a C++ harness over these kernels, B = 32 or 64 rows, K = 1024;
// 16 ahead was no better than none, 32 like 24). In-process A/B, 1 thread, medians, none -> 24:
// inference wide LSTM 611.9 -> 578.1 ms, GRU 450.8 -> 422.3, deepbench-train LSTM 276.5 -> 270.5;
// training wide LSTM 1963.8 -> 1800.9, GRU 1376.1 -> 1304.6, deepbench-train LSTM 814.3 -> 797.6,
// GRU 620.6 -> 597.6, long-seq GRU 1.920 -> 1.837; 2 threads, inference, wide LSTM 328.9 ->
// 306.8; fastrnns, stacked, online-small within noise. 24 against 32, medians: wide LSTM 561.7
// against 570.9 (training 1769 against 1803), the others within 1%. Only the AVX-512 kernels:
// Zen 4's AVX2 ones (a k-step of the 6 x 16 tile is one line and half the cycles) lost 1-2% with
// it (inference, medians: wide LSTM 699.5 -> 710.4 ms, deepbench-train LSTM 278.8 -> 285.3), so
// on AMD the AVX2 and SSE2 builds leave it to the hardware, as before.
inline int prefetch_b_ahead() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const int ahead = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_is("amd")) return 16;
#if defined(__AVX512F__)
    return cpu_family() >= 26 ? 0 : 24;
#else
    return 0;
#endif
  }();
  return ahead;
#else
  return 16;
#endif
}

// Threads in the current parallel region (1 outside one, or without OpenMP).
inline int team_size() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The first exception thrown on a parallel region's threads, for the calling thread to throw
// after the region: one leaving the region ends the process (std::terminate), as a MemoryError
// in an OpenMP worker's first buffer did.
class RegionError {
 public:
  // Runs fn, keeping what it throws; whether it returned.
  template <typename Fn>
  bool run(Fn&& fn) noexcept {
    try {
      fn();
      return true;
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_release);
      return false;
    }
  }
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  void rethrow() const {
    if (failed()) std::rethrow_exception(error_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
