// Threads, the kernel table by ISA name and the GIL counter of the bindings (see runtime.h).
#include "bindings/runtime.h"

#include <algorithm>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fusedrnn::bindings {

std::atomic<int> g_calls_without_gil{0};

namespace {

std::atomic<int> g_num_threads{0};  // 0: not set, use OpenMP's default (OMP_NUM_THREADS)

// Starts this thread's OpenMP workers, if it has fewer than n, outside any kernel: a worker
// copies its creator's floating-point mode, and one born inside a kernel's DenormalsFlushed
// would flush denormals for good, in torch's parallel work too (the same libgomp). Each takes
// its block of this module's thread-local data now: glibc allocates it at a thread's first use
// and ends the process where it cannot ("cannot allocate memory for thread-local data"), as a
// worker's first kernel did under a memory limit, where a MemoryError was due.
void start_workers_with_the_callers_mode(int n) {
#if defined(_OPENMP)
  thread_local int started = 1;
  if (n <= started) return;
  static thread_local volatile char tls_taken;  // (volatile: a store the compiler keeps)
#pragma omp parallel num_threads(n)
  tls_taken = 1;
  started = n;
#else
  (void)n;
#endif
}

}  // namespace

// Without OpenMP the kernels run on the caller's thread alone, whatever set_num_threads said.
int num_threads() {
#if defined(_OPENMP)
  int n = g_num_threads.load();
  if (n > 0) return n;
  return std::min(omp_get_max_threads(), kMaxThreads);
#else
  return 1;
#endif
}

int threads_for_call() {
  const int n = num_threads();
  start_workers_with_the_callers_mode(n);
  return n;
}

void set_num_threads(int n) {
  if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
  if (n > kMaxThreads)
    throw py::value_error("num_threads must be <= " + std::to_string(kMaxThreads) + ", got " +
                          std::to_string(n));
  g_num_threads.store(n);
}

const KernelTable& kernels(const std::optional<std::string>& isa) {
  if (!isa) return fusedrnn::active_kernels();
  const KernelTable* t = fusedrnn::kernels_for(isa->c_str());
  if (!t) throw py::value_error("isa '" + *isa + "' is not available on this machine");
  return *t;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"generic", "avx2", "avx512", "amx"})
    if (fusedrnn::kernels_for(isa)) out.push_back(isa);
  return out;
}

}  // namespace fusedrnn::bindings
