// What every kernel call from Python shares: the kernel table (by ISA name), the number of
// threads (with OpenMP's workers started outside any kernel) and the GIL, released and counted.
#pragma once
#include <pybind11/pybind11.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "kernel_api.h"

namespace fusedrnn::bindings {

namespace py = pybind11;

// The most threads a call may ask for. Where the system cannot start as many as asked, GNU
// OpenMP ends the process (exit 1) at the next parallel region, so an absurd count is refused up
// front; 1024 is more than the logical CPUs of any machine this runs on.
constexpr int kMaxThreads = 1024;

// The threads a kernel call runs on: set_num_threads's count, else OpenMP's default.
int num_threads();
// num_threads() for a call about to run kernels on them: its workers started first.
int threads_for_call();
void set_num_threads(int n);  // 1..kMaxThreads, else ValueError

// The kernels built for `isa` (none: those in use); ValueError where this CPU cannot run them.
const KernelTable& kernels(const std::optional<std::string>& isa);
std::vector<std::string> available_isas();  // those built in that this CPU can run

// A kernel call's part without the GIL, counted for tests (_C.calls_without_gil) from before
// the release to after the GIL is back: Python in another thread sees the count from the moment
// it can run, and only while the GIL is away (a call that held it would never show).
extern std::atomic<int> g_calls_without_gil;
class WithoutGil {
  struct Counted {
    Counted() { g_calls_without_gil.fetch_add(1, std::memory_order_relaxed); }
    ~Counted() { g_calls_without_gil.fetch_sub(1, std::memory_order_relaxed); }
  } counted_;  // (members: made in order, ended in reverse)
  py::gil_scoped_release released_;
};

}  // namespace fusedrnn::bindings
