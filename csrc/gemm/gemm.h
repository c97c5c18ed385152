// Our packed GEMM: C(M,N) (+)= A(M,K) B(K,N). B is packed into NR-wide panels (K x NR each,
// zero padded), A is read in place with row/column strides (rows of A contiguous in k is the
// fast case; a transposed A is copied into rows first). Blocking: a KC x NR slice of a B panel
// stays in L1 while it meets every MR-row tile of an MC-row block of A (L2).
#pragma once
#include <cstdint>
#include <cstring>
#include "gemm/microkernel.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename T> inline int64_t packed_b_size(int64_t K, int64_t N) {
  return ceil_div<int64_t>(N, Tile<T>::NR) * K * Tile<T>::NR;
}

// out: ceil(N/NR) panels, panel p holds B(k, p*NR + j) at out[(p*K + k)*NR + j], zero padded.
template <typename T>
void pack_b(int64_t K, int64_t N, const T* B, int64_t b_rs, int64_t b_cs, T* out, int nthreads) {
  constexpr int NR = Tile<T>::NR;
  const int64_t panels = ceil_div<int64_t>(N, NR);
  const bool rows_contiguous = b_cs == 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && K * N > (int64_t(1) << 18))
  for (int64_t p = 0; p < panels; ++p) {
    T* dst = out + p * K * NR;
    const int64_t n0 = p * NR, nv = imin<int64_t>(NR, N - n0);
    if (rows_contiguous) {
      for (int64_t k = 0; k < K; ++k) {
        const T* src = B + k * b_rs + n0;
        for (int64_t j = 0; j < nv; ++j) dst[k * NR + j] = src[j];
        for (int64_t j = nv; j < NR; ++j) dst[k * NR + j] = T(0);
      }
    } else {  // columns contiguous (a transposed weight): NR source streams, one write stream
      const T* src[NR];
      for (int64_t j = 0; j < NR; ++j) src[j] = B + (n0 + imin<int64_t>(j, nv - 1)) * b_cs;
      for (int64_t k = 0; k < K; ++k) {
        T* d = dst + k * NR;
        for (int64_t j = 0; j < NR; ++j) d[j] = src[j][k * b_rs];
        for (int64_t j = nv; j < NR; ++j) d[j] = T(0);
      }
    }
  }
}

// One MR x NR tile of C from rows of A and a packed panel slice; n_valid < NR goes through a
// small tile so C is never written past column N.
template <typename T>
inline void tile_to_c(int m, int n_valid, int64_t K, const T* a, int64_t a_rs, const T* b, T* c,
                      int64_t ldc, bool accumulate) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  if (n_valid == NR) {
    micro_kernel<T>(m, K, a, a_rs, b, c, ldc, accumulate);
    return;
  }
  alignas(64) T tmp[MR * NR];
  micro_kernel<T>(m, K, a, a_rs, b, tmp, NR, false);
  for (int r = 0; r < m; ++r)
    for (int j = 0; j < n_valid; ++j)
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + tmp[r * NR + j] : tmp[r * NR + j];
}

// C(M,N) (+)= A(M,K) * packed B. A rows contiguous in k (a_rs = row stride).
template <typename T>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, const T* Bp, T* C,
                 int64_t ldc, bool accumulate, int nthreads) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  constexpr int64_t KC = 256, MC = MR * 12, PANELS_PER_JOB = 4;
  const int64_t panels = ceil_div<int64_t>(N, NR);
  const int64_t m_blocks = ceil_div<int64_t>(M, MC);
  const int64_t p_groups = ceil_div<int64_t>(panels, PANELS_PER_JOB);
  const int64_t jobs = m_blocks * p_groups;
  const bool keep_a = M > N;
  // A parallel region costs a few microseconds idle and a scheduler time slice when another
  // process holds a core, so only GEMMs of over ~25 us of single-thread work are split.
  const bool parallel = nthreads > 1 && jobs > 1 && M * N * K >= (int64_t(1) << 20);
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    DenormalsFlushed ftz;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      // Consecutive jobs share the bigger operand's block, which stays in L2 while the smaller
      // operand streams past it (from L3: the bigger one may not fit there). M = 6400, N = 2048,
      // K = 512: 66 -> 72 GFLOP/s with A kept; M = 1600, N = 4096: keeping B is 74 vs 66.
      const int64_t mb = keep_a ? job / p_groups : job % m_blocks;
      const int64_t pg = keep_a ? job % p_groups : job / m_blocks;
      const int64_t m0 = mb * MC, m1 = imin(M, m0 + MC);
      const int64_t p0 = pg * PANELS_PER_JOB, p1 = imin(panels, p0 + PANELS_PER_JOB);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = imin(KC, K - k0);
        const bool acc = accumulate || k0 > 0;
        for (int64_t p = p0; p < p1; ++p) {
          const T* b = Bp + (p * K + k0) * NR;
          const int nv = static_cast<int>(imin<int64_t>(NR, N - p * NR));
          for (int64_t m = m0; m < m1; m += MR) {
            const int mr = static_cast<int>(imin<int64_t>(MR, m1 - m));
            tile_to_c<T>(mr, nv, kc, A + m * a_rs + k0, a_rs, b, C + m * ldc + p * NR, ldc, acc);
          }
        }
      }
    }
  }
}

// out (M x K, row-major) = A(m, k) read with strides, in 64 x 64 blocks so that both the
// strided reads and the row writes stay within L1 (a plain loop over a transposed A is ~10x
// slower: every read touches a new cache line).
template <typename T>
void gather_rows(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, T* out, int nthreads) {
  constexpr int64_t BLK = 64;
  const int64_t mb = ceil_div(M, BLK), kb = ceil_div(K, BLK);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * K > (int64_t(1) << 18))
  for (int64_t blk = 0; blk < mb * kb; ++blk) {
    const int64_t m0 = (blk / kb) * BLK, k0 = (blk % kb) * BLK;
    const int64_t m1 = imin(M, m0 + BLK), k1 = imin(K, k0 + BLK);
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t m = m0; m < m1; ++m) out[m * K + k] = A[m * a_rs + k * a_cs];
  }
}

// General entry: any strides for A and B. Packs B, and copies A into rows when it is transposed.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
          int64_t b_rs, int64_t b_cs, T* C, int64_t ldc, bool accumulate, int nthreads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::memset(C + m * ldc, 0, sizeof(T) * N);
    return;
  }
  Scratch<T> packed(packed_b_size<T>(K, N));
  pack_b<T>(K, N, B, b_rs, b_cs, packed.p, nthreads);
  if (a_cs == 1) {
    gemm_packed<T>(M, N, K, A, a_rs, packed.p, C, ldc, accumulate, nthreads);
    return;
  }
  // A transposed (the weight gradients' dG^T): gathered into rows a block of M at a time, so
  // the copy is a few MB, not a second dG (fastrnns LSTM training: 50 MB less at the peak).
  const int64_t block = imin<int64_t>(M, imax<int64_t>(512, ((int64_t(1) << 20) / imax<int64_t>(K, 1)) / 64 * 64));
  Scratch<T> rows(block * K);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t mb = imin(block, M - m0);
    gather_rows<T>(mb, K, A + m0 * a_rs, a_rs, a_cs, rows.p, nthreads);
    gemm_packed<T>(mb, N, K, rows.p, K, packed.p, C + m0 * ldc, ldc, accumulate, nthreads);
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
