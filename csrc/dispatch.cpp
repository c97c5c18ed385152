// Picks the kernel build for this CPU: the widest FMA build it supports (avx512, avx2, generic),
// or the one FUSEDRNN_ISA names. The amx build (float32 products on AMX tiles) runs only when
// named, here or by a call's isa: the tiles are a unit that the two hyperthreads of a core
// share, and on a VM whose neighbours use them they lost to the AVX-512 build in most of the
// benchmark matrix (bench/ISA_AB.md: 25 minutes interleaved, the tiles slower than torch.nn in
// 14 of 72 cases, the AVX-512 build in none), winning x1.15-1.3 only in quiet minutes.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include "kernel_api.h"
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fusedrnn {
namespace {

#if defined(__x86_64__) && defined(__linux__)
// Linux hands out the AMX tile state only to processes that ask (arch_prctl, since 5.16); asked
// once, it holds for every thread of the process.
bool os_grants_amx() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}
#else
bool os_grants_amx() { return false; }
#endif

bool cpu_supports(const char* isa) {
  if (std::strcmp(isa, "generic") == 0) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512") == 0) return avx512;
  if (std::strcmp(isa, "amx") == 0)
    return avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           os_grants_amx();
#endif
  return false;
}

const KernelTable* built_table(const char* isa) {
#if defined(FUSEDRNN_HAVE_AMX)
  if (std::strcmp(isa, "amx") == 0) return &amx::kernel_table();
#endif
#if defined(FUSEDRNN_HAVE_AVX512)
  if (std::strcmp(isa, "avx512") == 0) return &avx512::kernel_table();
#endif
#if defined(FUSEDRNN_HAVE_AVX2)
  if (std::strcmp(isa, "avx2") == 0) return &avx2::kernel_table();
#endif
  if (std::strcmp(isa, "generic") == 0) return &generic::kernel_table();
  return nullptr;
}

const KernelTable* choose() {
  const char* forced = std::getenv("FUSEDRNN_ISA");
  if (forced && *forced) {
    const KernelTable* t = kernels_for(forced);
    const bool known = std::strcmp(forced, "generic") == 0 || std::strcmp(forced, "avx2") == 0 ||
                       std::strcmp(forced, "avx512") == 0 || std::strcmp(forced, "amx") == 0;
    if (!t)
      throw std::runtime_error(std::string("FUSEDRNN_ISA=") + forced +
                               (known ? " is not available here (this CPU, OS or build)"
                                      : " is not an ISA name (lower case: generic, avx2, avx512, "
                                        "amx)") +
                               "; this machine runs: " + "generic" +
                               (kernels_for("avx2") ? ", avx2" : "") +
                               (kernels_for("avx512") ? ", avx512" : "") +
                               (kernels_for("amx") ? ", amx" : ""));
    return t;
  }
  for (const char* isa : {"avx512", "avx2"})
    if (const KernelTable* t = kernels_for(isa)) return t;
  return &generic::kernel_table();  // every CPU runs it
}

}  // namespace

const KernelTable* kernels_for(const char* isa) {
  return cpu_supports(isa) ? built_table(isa) : nullptr;
}

const KernelTable& active_kernels() {
  static const KernelTable* table = choose();
  return *table;
}

const char* active_isa_name() { return active_kernels().isa; }

}  // namespace fusedrnn
