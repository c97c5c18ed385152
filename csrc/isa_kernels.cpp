// Compiled once per ISA (CMakeLists.txt sets FUSEDRNN_ISA_NS and the target flags): the whole
// kernel stack below becomes fusedrnn::<isa>::..., and kernel_table() hands its entry points to
// dispatch.cpp.
#include <chrono>
#include "kernel_api.h"
#include "gemm/gemm.h"
#include "sequence/backward.h"
#include "sequence/direction_pair.h"
#include "sequence/forward.h"
#include "sequence/layer_pipeline.h"
#include "simd/math.h"
#include "simd/vec.h"
#include "weights_digest.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {
namespace {

template <typename T>
void math_impl(int func, const T* x, T* y, int64_t n) {
  using V = Vec<T>;
  auto apply = [func](V v) { return func == 0 ? vexp(v) : func == 1 ? vtanh(v) : vsigmoid(v); };
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) apply(V::load(x + i)).store(y + i);
  if (i < n) store_partial(y + i, apply(load_partial(x + i, static_cast<int>(n - i))), static_cast<int>(n - i));
}

void math_f32(int f, const float* x, float* y, int64_t n) { math_impl<float>(f, x, y, n); }
void math_f64(int f, const double* x, double* y, int64_t n) { math_impl<double>(f, x, y, n); }

template <typename T>
void gemm_entry(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
                int64_t b_rs, int64_t b_cs, T* C, int64_t ldc, bool accumulate, int nthreads) {
  DenormalsFlushed ftz;
  gemm<T>(M, N, K, A, a_rs, a_cs, B, b_rs, b_cs, C, ldc, accumulate, nthreads);
}

// A training forward's digests of the weights it read (ForwardArgs::weight_digests).
template <typename T>
void digest_weights(const ForwardArgs<T>* calls, int n) {
  for (const ForwardArgs<T>* a = calls; a != calls + n; ++a) {
    if (!a->weight_digests) continue;
    const LayerShape& s = a->s;
    const size_t gate_rows = size_t(gates_of(s.cell) * s.H);
    a->weight_digests[0] = weights_digest(a->w_ih, sizeof(T) * gate_rows * size_t(s.I));
    a->weight_digests[1] = weights_digest(a->w_hh, sizeof(T) * gate_rows * size_t(s.Hout));
    a->weight_digests[2] = a->w_hr ? weights_digest(a->w_hr, sizeof(T) * size_t(s.Hout * s.H)) : 0;
  }
}

template <typename T>
void forward_entry(const ForwardArgs<T>& a) {
  forward<T>(a);
  digest_weights(&a, 1);
}
template <typename T>
void forward_stack_entry(const ForwardArgs<T>* layers, int n) {
  forward_stack<T>(layers, n);
  digest_weights(layers, n);
}
template <typename T>
void forward_directions_entry(const ForwardArgs<T>* dirs) {
  forward_directions<T>(dirs);
  digest_weights(dirs, 2);
}

void forward_f32(const ForwardArgs<float>& a) { forward_entry<float>(a); }
void forward_f64(const ForwardArgs<double>& a) { forward_entry<double>(a); }
void forward_stack_f32(const ForwardArgs<float>* l, int n) { forward_stack_entry<float>(l, n); }
void forward_stack_f64(const ForwardArgs<double>* l, int n) { forward_stack_entry<double>(l, n); }
void forward_directions_f32(const ForwardArgs<float>* d) { forward_directions_entry<float>(d); }
void forward_directions_f64(const ForwardArgs<double>* d) { forward_directions_entry<double>(d); }
void backward_f32(const BackwardArgs<float>& a) { backward<float>(a); }
void backward_f64(const BackwardArgs<double>& a) { backward<double>(a); }
void backward_directions_f32(const BackwardArgs<float>* d) { backward_directions<float>(d); }
void backward_directions_f64(const BackwardArgs<double>* d) { backward_directions<double>(d); }
int step_split(int cell, bool f64, int64_t B, int64_t I, int64_t H, int64_t Hout, int nthreads,
               int query) {
  if (query == kSharedBlockRows)
    return int(f64 ? shared_block_rows<double>(cell, B, I, H, Hout, nthreads)
                   : shared_block_rows<float>(cell, B, I, H, Hout, nthreads));
  if (query == kSharedBlockVector)
    return int(f64 ? shared_block_vector<double>(cell, B, I, H, Hout, nthreads)
                   : shared_block_vector<float>(cell, B, I, H, Hout, nthreads));
  if (query == kBackwardSplit)
    return f64 ? backward_split_kind<double>(cell, B, I, H, Hout, nthreads)
               : backward_split_kind<float>(cell, B, I, H, Hout, nthreads);
  return f64 ? step_split_kind<double>(cell, B, I, H, Hout, nthreads)
             : step_split_kind<float>(cell, B, I, H, Hout, nthreads);
}

// projection_mode.h's choice for one shape (python's _C.projection_mode).
int projection_mode_of(int cell, bool f64, int64_t B, int64_t I, int64_t H, int64_t Hout,
                       bool lengths) {
  const LayerShape s = diagnostic_shape(cell, B, I, H, Hout);
  return f64 ? projection_mode<double>(s, lengths) : projection_mode<float>(s, lengths);
}

// The team and barrier of the step loops (step_barrier.h), meeting `rounds` times with no work
// in between: 25-60 ns a meeting with both cores close, 165-600 ns when this VM puts them far
// apart. Timed by member 0 after one untimed meeting, so every member is running.
double team_barrier_ns(int nthreads, int rounds) {
  double ns = 0;
  run_step_team(nthreads, [&](int member, int, StepBarrier* barrier) {
    if (!barrier || rounds <= 0) return;
    barrier->wait();
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < rounds; ++i) barrier->wait();
    using Ns = std::chrono::duration<double, std::nano>;
    if (member == 0) ns = Ns(std::chrono::steady_clock::now() - start).count() / rounds;
  });
  return ns;
}

int64_t cache_bytes(int level) { return level == 2 ? l2_cache_bytes() : l3_cache_bytes(); }

int64_t gemm_b_elems(int64_t K, int64_t N, bool f64) {
  return f64 ? packed_b_size<double>(K, N) : packed_b_size<float>(K, N);
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table{kIsaName,           static_cast<int>(sizeof(Vec<float>)),
                                 math_f32,           math_f64,
                                 gemm_entry<float>,  gemm_entry<double>,
                                 forward_f32,        forward_f64,
                                 forward_stack_f32,  forward_stack_f64,
                                 forward_directions_f32, forward_directions_f64,
                                 backward_f32,       backward_f64,
                                 backward_directions_f32, backward_directions_f64,
                                 step_split,         projection_mode_of,
                                 team_barrier_ns,    cache_bytes,
                                 prefetch_b_ahead,   gemm_b_elems,
                                 weights_digest};
  return table;
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
