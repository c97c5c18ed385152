// Our packed GEMM: C(M,N) (+)= A(M,K) B(K,N). B is packed into NR-wide panels (K x NR each,
// zero padded; weights once, cached), A block by block into MR-row micro-panels (any strides, so
// a transposed A costs no extra copy). Blocking: each MR-row micro-panel of a packed MC x KC
// block of A stays in L1 while the KC x NR slices of NC columns of B stream past it from L2.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "gemm/microkernel.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename T> inline int64_t packed_b_size(int64_t K, int64_t N) {
  return ceil_div<int64_t>(N, Tile<T>::NR) * K * Tile<T>::NR;
}

// Row k of panel p (columns p*NR .. p*NR + NR of B, zero past N) into d[0..NR).
template <typename T>
inline void pack_b_row(int64_t k, int64_t p, int64_t N, const T* B, int64_t b_rs, int64_t b_cs,
                       T* d) {
  constexpr int NR = Tile<T>::NR;
  const int64_t n0 = p * NR, nv = imin<int64_t>(NR, N - n0);
  const T* src = B + k * b_rs + n0 * b_cs;
  if (b_cs == 1 && nv == NR) {  // a row of B in place (x, the states): one fixed-size copy
    std::memcpy(d, src, sizeof(T) * NR);
    return;
  }
  for (int64_t j = 0; j < nv; ++j) d[j] = src[j * b_cs];
  for (int64_t j = nv; j < NR; ++j) d[j] = T(0);
}

// Rows [k0, k1) of panel p into d, row k at d + (k - k0) * NR. Where B is a weight matrix
// transposed (b_rs == 1: B(k, n) = W[n][k], the forward's W_ih^T and W_hh^T) and the ISA has
// transpose_block for T, whole W x W blocks go through it (a training call packs its weights
// every call). C++ loop, one 4H x H weight, 1 thread, AVX-512: H = 128 18.5 -> 8.3 us, H = 256
// 86 -> 47-53, H = 1024 1830 -> 1350.
template <typename T>
inline void pack_b_rows(int64_t k0, int64_t k1, int64_t p, int64_t N, const T* B, int64_t b_rs,
                        int64_t b_cs, T* d) {
  constexpr int NR = Tile<T>::NR, W = Vec<T>::W;
  int64_t k = k0;
  if constexpr (HasTransposeBlock<T>::value) {
    if (b_rs == 1 && b_cs != 1 && N - p * NR >= NR)
      for (; k + W <= k1; k += W)
        for (int v = 0; v < NR / W; ++v)
          transpose_block(B + k + (p * NR + v * W) * b_cs, b_cs, d + (k - k0) * NR + v * W, NR);
  }
  for (; k < k1; ++k) pack_b_row(k, p, N, B, b_rs, b_cs, d + (k - k0) * NR);
}

// Values of B from which pack_b and pack_b_gemm share their panels among the threads. A
// training call packs its weights every call, and packs of 2^16-2^18 values (online-small's and
// stacked's W_ih and W_hh, 8-50 us each) ran on the calling thread alone, the other idle; a
// parallel loop costs ~1-2 us here. In-process A/B (bench/ab_builds.py), 2 threads, training,
// medians, 2^18 -> 2^15: stacked LSTM 14.32 -> 14.16 ms, GRU 10.70 -> 10.44, online-small LSTM
// 0.681 -> 0.661, GRU 0.640 either way (2^14 alike: 16.45 -> 15.99, 11.02 -> 10.79, 0.679 ->
// 0.660); frozen inference packs once and does not change.
constexpr int64_t kParallelPackValues = int64_t(1) << 15;

// Panel layout, for the fused step's micro-kernels (each walks one panel over all of K):
// ceil(N/NR) panels back to back, panel p holds B(k, p*NR + j) at out[p*K*NR + k*NR + j], zero
// padded (several matrices' panels interleaved: layout.h's pack_gates).
template <typename T>
void pack_b(int64_t K, int64_t N, const T* B, int64_t b_rs, int64_t b_cs, T* out, int nthreads) {
  constexpr int NR = Tile<T>::NR;
  const int64_t panels = ceil_div<int64_t>(N, NR);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && K * N > kParallelPackValues)
  for (int64_t p = 0; p < panels; ++p) pack_b_rows(0, K, p, N, B, b_rs, b_cs, out + p * K * NR);
}

// Blocking: an MC x KC block of A is packed once and meets every KC x NR slice of the packed B
// panels, NC columns of them at a time (see NC_PANELS).
// KC: 512 where a k-step of B is two lines (AVX-512): C is loaded and stored half as often, and
// an MC x KC block of A is 576 KB, within the L2 of AVX-512 cores (1 MB and up). 1 thread, in
// process A/B: 6400x2048x512 GEMM 94 -> 101 GFLOP/s, fastrnns LSTM 265 -> 258 ms, deepbench LSTM
// training 817 -> 799 ms; KC 128, to keep B's slice in L1, was slower (1024^3: 98 -> 94).
// NC: the panels of one pass over a packed A block, 256 columns (512 KB of B on AVX-512, 256 KB
// on AVX2) kept in L2 while each MR-row micro-panel of A (12-24 KB) stays in L1 and meets them
// in turn, its B slices streaming from L2 in order. The other order (a B slice held in L1 for
// every row tile) lost: at KC = 512 on AVX-512 a slice is 64 KB, twice L1, and even at K = 256
// it fills L1 whole. 1 thread, C++ loop, AVX-512: 800x1024x256 108 -> 114 GFLOP/s, 1024^3 105
// -> 108, 3200x2048x512 108 -> 113; AVX2 (on the same Zen 4): 1024^3 99 -> 109.
template <typename T> struct GemmBlocking {
  static constexpr int64_t KC = Tile<T>::NR * sizeof(T) > 64 ? 512 : 256;
  static constexpr int64_t MC = Tile<T>::MR * 24;  // 144 rows on AVX2: 144 KB of A in L2
  static constexpr int64_t NC_PANELS = 256 / Tile<T>::NR > 0 ? 256 / Tile<T>::NR : 1;
};

// K-blocked layout, for gemm_packed: the KC x NR slices of every panel for one block of K lie
// back to back, so a pass over one K block reads B as one sequential stream. Slice (k0, p) starts
// at out + k0*panels*NR + p*kc*NR (kc = that block's length); same size as the panel layout.
template <typename T>
inline const T* gemm_b_slice(const T* Bp, int64_t panels, int64_t K, int64_t k0, int64_t p) {
  const int64_t kc = imin(GemmBlocking<T>::KC, K - k0);
  return Bp + (k0 * panels + p * kc) * Tile<T>::NR;
}

template <typename T>
void pack_b_gemm(int64_t K, int64_t N, const T* B, int64_t b_rs, int64_t b_cs, T* out, int nthreads) {
  constexpr int NR = Tile<T>::NR;
  constexpr int64_t KC = GemmBlocking<T>::KC;
  const int64_t panels = ceil_div<int64_t>(N, NR), kblocks = ceil_div<int64_t>(K, KC);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && K * N > kParallelPackValues)
  for (int64_t job = 0; job < kblocks * panels; ++job) {
    const int64_t k0 = (job / panels) * KC, p = job % panels, k1 = imin(K, k0 + KC);
    pack_b_rows(k0, k1, p, N, B, b_rs, b_cs, const_cast<T*>(gemm_b_slice<T>(out, panels, K, k0, p)));
  }
}

// Packs the mc x kc block of A at A (element (m, k) at A[m*a_rs + k*a_cs], any strides) into
// MR-row micro-panels: panel i holds A(i*MR + r, k) at out[i*MR*kc + k*MR + r]. The rows of a
// last partial panel past mc are left unwritten: the micro-kernel for mr rows never reads them.
template <typename T>
void pack_a(int64_t mc, int64_t kc, const T* A, int64_t a_rs, int64_t a_cs, T* out) {
  constexpr int MR = Tile<T>::MR;
  if (a_rs == 1) {  // columns contiguous (a transposed matrix, e.g. dG^T in the weight gradients)
    // 16 columns at a time (16 runs of mc values, in L1) go out to every micro-panel in turn. A
    // whole panel at a time read kc columns a_cs apart, a page each at a_cs = 1024 floats: C++
    // loop, 1 thread, 2048x512x6400 with A transposed 99 -> 104 GFLOP/s, 1024x256x800 105 -> 106.
    constexpr int64_t kChunk = 16;
    for (int64_t k0 = 0; k0 < kc; k0 += kChunk) {
      const int64_t k1 = imin(kc, k0 + kChunk);
      for (int64_t i = 0; i < mc; i += MR) {
        const int mr = static_cast<int>(imin<int64_t>(MR, mc - i));
        for (int64_t k = k0; k < k1; ++k) {
          const T* src = A + k * a_cs + i;
          T* dst = out + i * kc + k * MR;
          // A whole tile's MR values as one fixed-size copy (wide moves); copied value by value,
          // the pack was 2.6% of the weight gradients' GEMMs (1024x256x800, A = dG^T).
          if (mr == MR) std::memcpy(dst, src, sizeof(T) * MR);
          else for (int r = 0; r < mr; ++r) dst[r] = src[r];
        }
      }
    }
    return;
  }
  // Rows contiguous (or general): one row at a time, written MR apart.
  for (int64_t i = 0; i < mc; i += MR) {
    const int mr = static_cast<int>(imin<int64_t>(MR, mc - i));
    T* dst = out + i * kc;
    for (int r = 0; r < mr; ++r) {
      const T* src = A + (i + r) * a_rs;
      for (int64_t k = 0; k < kc; ++k) dst[k * MR + r] = src[k * a_cs];
    }
  }
}

// k rounded up to whole vectors: the length of a row in an AForm::Blocked panel.
template <typename T>
inline int64_t blocked_length(int64_t k) { return ceil_div<int64_t>(k, Vec<T>::W) * Vec<T>::W; }

// Elements of `rows` rows of k values packed by pack_a_blocked (whole MR-row panels).
template <typename T>
inline int64_t blocked_size(int64_t rows, int64_t k) {
  return ceil_div<int64_t>(rows, Tile<T>::MR) * Tile<T>::MR * blocked_length<T>(k);
}

// The mc x kc block of A at A (rows a_rs apart, each contiguous) in AForm::Blocked: the panel of
// rows i.. (i a multiple of MR) at out + i * blocked_length(kc), row r's values k0..k0 + W at
// (k0 / W) * W * MR + r * W. Rows past mc and values past kc stay unwritten: the micro-kernel
// never reads them. Needs room for MC x KC (KC is a multiple of W).
template <typename T>
void pack_a_blocked(int64_t mc, int64_t kc, const T* A, int64_t a_rs, T* out) {
  constexpr int MR = Tile<T>::MR;
  constexpr int64_t W = Vec<T>::W;
  const int64_t kc_blocked = blocked_length<T>(kc);
  for (int64_t i = 0; i < mc; i += MR) {
    const int mr = static_cast<int>(imin<int64_t>(MR, mc - i));
    T* panel = out + i * kc_blocked;
    for (int r = 0; r < mr; ++r) {
      const T* src = A + (i + r) * a_rs;
      for (int64_t k0 = 0; k0 < kc; k0 += W) {
        T* dst = panel + k0 * MR + r * W;
        if (k0 + W <= kc) Vec<T>::load(src + k0).store(dst);
        else for (int64_t k = k0; k < kc; ++k) dst[k - k0] = src[k];
      }
    }
  }
}

// One MR x NR tile of C from A (in the given AForm: rows lda apart, or packed) and a
// packed B panel slice; n_valid < NR goes through a small tile so C is never written past
// column N (its sums are still added to C). `bias` (n_valid values, or null) is added to each
// element after its last k block (micro_kernel's), in the registers for full tiles: no pass over C.
// apart (with accumulate, no bias): the sum of this call's k blocks is made apart and then added
// to C, instead of each block being added to C in turn (see gemm_packed's k_blocks_apart).
template <typename T, AForm Form>
inline void tile_to_c(int m, int n_valid, int64_t K, const T* a, int64_t lda, const T* b, T* c,
                      int64_t ldc, bool accumulate, const T* bias, bool split_k = true,
                      bool apart = false) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  const bool full = n_valid == NR;
  alignas(64) T tmp[MR * NR];
  const bool half = n_valid <= Vec<T>::W;  // a last panel of one vector's columns or fewer
  if (accumulate && apart) {
    using V = Vec<T>;
    micro_kernel<T, Form>(m, K, a, lda, b, tmp, NR, false, nullptr, split_k, half);
    for (int r = 0; r < m; ++r) {
      if (full)
        for (int v = 0; v < Tile<T>::NV; ++v)
          V::add(V::load(c + r * ldc + v * V::W), V::load(tmp + r * NR + v * V::W))
              .store(c + r * ldc + v * V::W);
      else
        for (int j = 0; j < n_valid; ++j) c[r * ldc + j] += tmp[r * NR + j];
    }
    return;
  }
  if (full) return micro_kernel<T, Form>(m, K, a, lda, b, c, ldc, accumulate, bias, split_k);
  if (accumulate)
    for (int r = 0; r < m; ++r)
      for (int j = 0; j < n_valid; ++j) tmp[r * NR + j] = c[r * ldc + j];
  micro_kernel<T, Form>(m, K, a, lda, b, tmp, NR, accumulate, nullptr, split_k, half);
  for (int r = 0; r < m; ++r)
    for (int j = 0; j < n_valid; ++j)
      c[r * ldc + j] = bias ? tmp[r * NR + j] + bias[j] : tmp[r * NR + j];
}

// The calling thread's buffer for packed A blocks (MC x KC), allocated on its first GEMM and kept:
// the backward calls gemm_packed every step, which allocated one per call.
template <typename T>
T* a_pack_buffer() {
  struct Buffer {
    T* p = static_cast<T*>(aligned_alloc_bytes(sizeof(T) * GemmBlocking<T>::MC * GemmBlocking<T>::KC));
    ~Buffer() { aligned_free_bytes(p); }
  };
  thread_local Buffer buffer;
  return buffer.p;
}

// Rows [m0, m0 + mc) (mc <= MC) of C(M,N) (+)= A(M,K) * B for the panels [p0, p1) of B packed
// by pack_b_gemm, on the calling thread. a_pack: the thread's buffer, or null when A's row tile is
// read in place (see gemm_packed).
template <typename T>
void gemm_packed_block(int64_t m0, int64_t mc, int64_t p0, int64_t p1, int64_t N, int64_t K,
                       const T* A, int64_t a_rs, int64_t a_cs, const T* Bp, T* C, int64_t ldc,
                       bool accumulate, const T* bias, T* a_pack, bool descending = false,
                       bool split_k = true, bool k_blocks_apart = false) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  constexpr int64_t KC = GemmBlocking<T>::KC;
  const int64_t panels = ceil_div<int64_t>(N, NR);
  const bool apart = k_blocks_apart && !bias;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = imin(KC, K - k0);
    const bool acc = accumulate || k0 > 0;
    // The bias after the last K block: the blocks of all of K, then the bias, whatever KC is
    // (the riding tiles of forward.h sum so and must give the same bits).
    const T* bias_k = k0 + kc == K ? bias : nullptr;
    const T* a_block = A + m0 * a_rs + k0 * a_cs;
    // Rows of A contiguous: the Blocked form, whole-vector copies (pack_a's panels cost 3.4% of
    // the online-small LSTM's 100x512x128 input projection, written element by element).
    const bool blocked = a_pack && a_cs == 1;
    const int64_t kc_blocked = blocked_length<T>(kc);
    if (blocked) pack_a_blocked<T>(mc, kc, a_block, a_rs, a_pack);
    else if (a_pack) pack_a<T>(mc, kc, a_block, a_rs, a_cs, a_pack);
    // A single row read in place takes its full panels two at a time (micro_kernel_row_pair).
    const bool pairs = mc == 1 && !a_pack && !bias_k;
    // The pairs prefetch their panels where this K block of B outgrows L1 (the backward's
    // d h = dG W_hh of a single row, W_hh from L2), on AVX-512. In-process A/B (bench/ab_builds.py),
    // training, medians, 1 / 2 threads: long-seq LSTM (64 KB) 1.493 -> 1.417 / 1.007 -> 0.928
    // ms, online-small LSTM (256 KB) 0.687 -> 0.668 / 0.430 -> 0.424; GRUs (32 KB and 128 +
    // 64 KB) within noise. Every pair prefetching lost 3% where B sits in L1 (long-seq RNN, 16 KB);
    // the AVX2 kernels (a panel's k-step one line) lost 1-2% (online-small LSTM 0.919 -> 0.925,
    // GRU 0.691 -> 0.710). Same loads and FMAs, so the same bits.
#if defined(__AVX512F__)
    const bool pairs_from_l2 = kc * ceil_div<int64_t>(N, NR) * NR * int64_t(sizeof(T)) > l1_cache_bytes();
#else
    const bool pairs_from_l2 = false;
#endif
    for (int64_t pb = p0; pb < p1; pb += GemmBlocking<T>::NC_PANELS) {
      const int64_t pe = imin(p1, pb + GemmBlocking<T>::NC_PANELS);
      for (int64_t m = 0; m < mc; m += MR) {
        const int mr = static_cast<int>(imin<int64_t>(MR, mc - m));
        for (int64_t j = pb; j < pe; ++j) {
          const int64_t p = descending ? p1 - 1 - (j - p0) : j;
          const T* b = gemm_b_slice<T>(Bp, panels, K, k0, p);
          const int nv = static_cast<int>(imin<int64_t>(NR, N - p * NR));
          T* c = C + (m0 + m) * ldc + p * NR;
          const T* bias_p = bias_k ? bias_k + p * NR : nullptr;
          const int64_t q = descending ? p - 1 : p + 1;  // the panel walked next
          if (pairs && j + 1 < pe && nv == NR && (q + 1) * NR <= N) {
            const T* bq = gemm_b_slice<T>(Bp, panels, K, k0, q);
            T* cq = C + m0 * ldc + q * NR;
            if (split_k && pairs_from_l2) micro_kernel_row_pair<T, true, true>(kc, a_block, b, bq, c, cq, acc, apart);
            else if (split_k) micro_kernel_row_pair<T, true>(kc, a_block, b, bq, c, cq, acc, apart);
            else micro_kernel_row_pair<T, false>(kc, a_block, b, bq, c, cq, acc, apart);
            ++j;
            continue;
          }
          if (blocked)
            tile_to_c<T, AForm::Blocked>(mr, nv, kc, a_pack + m * kc_blocked, 0, b, c, ldc, acc, bias_p, split_k, apart);
          else if (a_pack)
            tile_to_c<T, AForm::Panel>(mr, nv, kc, a_pack + m * kc, 0, b, c, ldc, acc, bias_p, split_k, apart);
          else
            tile_to_c<T, AForm::Rows>(mr, nv, kc, a_block + m * a_rs, a_rs, b, c, ldc, acc, bias_p, split_k, apart);
        }
      }
    }
  }
}

// A single row tile (the per-step products of the backward) is read in place when its rows are
// contiguous: packing it would cost as much as using it once.
template <typename T>
T* a_pack_for(int64_t M, int64_t a_cs) {
  return a_cs != 1 || M > Tile<T>::MR ? a_pack_buffer<T>() : nullptr;
}

// Every row of C for the panels [p0, p1) only, on the calling thread: one member's share of a
// product that a step team (backward.h) splits by columns. `descending` walks the panels from
// the last (see ForwardLoop::cell_phase on alternating directions); results do not change.
// split_k: see KSplit.
template <typename T>
void gemm_packed_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                        const T* Bp, T* C, int64_t ldc, bool accumulate, int64_t p0, int64_t p1,
                        bool descending = false, bool split_k = true) {
  constexpr int64_t MC = GemmBlocking<T>::MC;
  if (M <= 0 || K <= 0 || p0 >= p1) return;
  T* a_pack = a_pack_for<T>(M, a_cs);
  for (int64_t m0 = 0; m0 < M; m0 += MC)
    gemm_packed_block<T>(m0, imin(MC, M - m0), p0, p1, N, K, A, a_rs, a_cs, Bp, C, ldc,
                         accumulate, nullptr, a_pack, descending, split_k);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
#include "gemm/gemm_amx.h"  // (needs the packed layout above)
namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// C(M,N) (+)= A(M,K) * B packed by pack_b_gemm, A(m, k) at A[m*a_rs + k*a_cs] (any strides: A is
// packed); with `bias` (N values, only when !accumulate) C = bias + A B. split_k: see KSplit.
// Threads take panel ranges (see `ranges`). Every C element sums k in blocks of kSumBlock (each
// from zero, added to C after; microkernel.h). k_blocks_apart: the blocks of each KC values of k
// are summed apart and that sum added to C (or to the previous KC blocks' sum) after it, so a very
// long K's rounding error grows with kSumBlock, KC / kSumBlock and K / KC, not with K / kSumBlock
// additions into C (the weight gradients, K = T*B: one chain over T = 1000, B = 64 was 9-19x
// torch.nn's error, whose BLAS blocks K). The blocks are fixed by K alone: the same bits whatever
// the threads.
// In the amx build, float products that amx_gemm takes run on AMX tiles (gemm_amx.h) unless !amx_ok
// (a caller whose bits must match the FMA kernels' elsewhere).
template <typename T>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                 const T* Bp, T* C, int64_t ldc, bool accumulate, int nthreads,
                 const T* bias = nullptr, bool split_k = true, bool amx_ok = true,
                 bool a_splits = false, bool k_blocks_apart = false) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  constexpr int64_t MC = GemmBlocking<T>::MC;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: C = bias (or zero), or C unchanged when accumulating
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = bias ? bias[n] : T(0);
    return;
  }
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>)
    if (amx_ok && amx_gemm(M, N, K, A, a_rs, a_cs, AmxB::of_packed(Bp), nthreads, a_splits))
      return gemm_amx(M, N, K, A, a_rs, a_cs, AmxB::of_packed(Bp), C, ldc, accumulate, nthreads,
                      bias, k_blocks_apart);
#else
  (void)amx_ok, (void)a_splits;
#endif
  const int64_t panels = ceil_div<int64_t>(N, NR);
  const int64_t m_blocks = ceil_div<int64_t>(M, MC);
  // A parallel region costs a few microseconds idle and a scheduler time slice when another
  // process holds a core, so only GEMMs of over ~25 us of single-thread work are split.
  const bool parallel = nthreads > 1 && M * N * K >= (int64_t(1) << 20);
  // Tall products (8 row tiles a thread or more: the whole-sequence GEMMs) split their rows, in
  // equal runs of row tiles, so each thread packs only its own A blocks: split by panels, every
  // thread packed all of A (fastrnns LSTM training, 2 threads: pack_a was 8% of the call; stacked
  // LSTM, 2 threads, 800 rows, which the old rule of two MC blocks a thread left to panels: 5.32
  // -> 5.04 ms a layer). Row tiles start at multiples of MR either way: results do not change.
  // The row runs go to whichever thread is free (schedule dynamic), at least two a thread: this
  // VM's cores often run at different speeds for seconds (another tenant on one), and a fixed
  // half waited for the slower core. The runs are a multiple of the threads in number and equal
  // to a row tile: runs of MC rows and a short last one left one thread three full runs against
  // the other's two and the short one (1600 rows, 2 threads: 864 rows against 736). In-process
  // A/B, 2 threads, medians: 1600x4096x1024 GEMM 292 -> 310 GFLOP/s; deepbench LSTM 92.0 -> 86.7
  // ms (training 275 -> 266), GRU 70.2 -> 68.5 (206 -> 201). Runs are whole row tiles from row 0
  // and at most MC rows: the same tiles as on one thread, the same bits.
  const int64_t row_tiles = ceil_div<int64_t>(M, MR);
  if (parallel && row_tiles >= 8 * int64_t(nthreads)) {
    const int64_t runs =
        ceil_div(imax(ceil_div(row_tiles, MC / MR), 2 * int64_t(nthreads)), int64_t(nthreads)) *
        nthreads;
    RegionError error;  // (a worker's first GEMM allocates its a_pack buffer)
#pragma omp parallel num_threads(nthreads)
    {
      DenormalsFlushed ftz;
      T* a_pack = nullptr;
      const bool packs = error.run([&] { a_pack = a_pack_for<T>(M, a_cs); });
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < runs; ++i) {
        if (!packs) continue;  // (the call throws)
        int64_t t0 = 0, t1 = 0;
        split_range(row_tiles, static_cast<int>(runs), static_cast<int>(i), &t0, &t1);
        const int64_t m0 = t0 * MR, m1 = imin(M, t1 * MR);
        gemm_packed_block<T>(m0, m1 - m0, 0, panels, N, K, A, a_rs, a_cs, Bp, C, ldc, accumulate,
                             bias, a_pack, false, split_k, k_blocks_apart);
      }
    }
    error.rethrow();
    return;
  }
  // Otherwise threads split the panels (each takes whole panel ranges across every row block,
  // so the shares differ by at most a panel per range, whatever M); a single row block gets 4
  // ranges per thread for balance, and each thread packs its own copy of the A blocks.
  const int64_t ranges =
      parallel ? imin<int64_t>(panels, int64_t(nthreads) * (m_blocks == 1 ? 4 : 1)) : 1;
  const int64_t jobs = m_blocks * ranges;
  auto run_job = [&](int64_t job, T* a_pack) {
    const int64_t mb = job % m_blocks;  // range-major: a thread's jobs share its panel range
    int64_t p0 = 0, p1 = panels;
    split_range(panels, static_cast<int>(ranges), static_cast<int>(job / m_blocks), &p0, &p1);
    const int64_t m0 = mb * MC;
    gemm_packed_block<T>(m0, imin(MC, M - m0), p0, p1, N, K, A, a_rs, a_cs, Bp, C, ldc,
                         accumulate, bias, a_pack, false, split_k, k_blocks_apart);
  };
  if (!parallel || jobs <= 1) {
    // Not even an inactive parallel region: libgomp makes a futex call per region, ~1 us, which
    // was a fifth of the per-step backward at B = 1 (long-seq LSTM training).
    T* a_pack = a_pack_for<T>(M, a_cs);
    for (int64_t job = 0; job < jobs; ++job) run_job(job, a_pack);
    return;
  }
  RegionError error;
#pragma omp parallel num_threads(nthreads)
  {
    DenormalsFlushed ftz;
    T* a_pack = nullptr;
    const bool packs = error.run([&] { a_pack = a_pack_for<T>(M, a_cs); });
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job)
      if (packs) run_job(job, a_pack);
  }
  error.rethrow();
}

// Whether products of T may run on AMX tiles in this build (float32 in the amx build).
template <typename T>
constexpr bool amx_build_for() {
#if defined(FUSEDRNN_AMX)
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}

// Whether every value of the rows x cols block at a (rows ld apart) splits for AMX tiles
// (amx_all_splits; an empty block does), for a caller that passes it to several products as
// their a_splits; false in builds without tiles and for float64, whose products never take
// them.
template <typename T>
bool amx_operand_splits(const T* a, int64_t rows, int64_t cols, int64_t ld, int nthreads) {
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>) return amx_all_splits(a, rows, cols, ld, nthreads);
#endif
  (void)a, (void)rows, (void)cols, (void)ld, (void)nthreads;
  return false;
}

// Whether a product of this shape is one the amx build's tiles take (given operands that
// split), A's rows contiguous or A gathered from columns; false in other builds and for float64.
template <typename T>
bool amx_gemm_shape(int64_t M, int64_t N, int64_t K, bool a_gathered = false) {
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>) return amx_gemm_shape_takes(M, N, K, a_gathered);
#endif
  (void)M, (void)N, (void)K, (void)a_gathered;
  return false;
}

// C(M,N) (+)= A(M,K) B, or bias + A B, with B as it lies (B(k, n) at B[k*b_rs + n*b_cs]), on
// AMX tiles where the amx build takes the product (amx_gemm), splitting B with no float32
// packed copy (AmxB); false, having done nothing, where it does not (other builds, float64).
// b_splits: the caller found B's values split (weight_splits), as a_splits for A.
template <typename T>
bool gemm_raw_b_on_tiles(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                         const T* B, int64_t b_rs, int64_t b_cs, T* C, int64_t ldc,
                         bool accumulate, int nthreads, const T* bias = nullptr,
                         bool a_splits = false, bool b_splits = false,
                         bool k_blocks_apart = false) {
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>) {
    const AmxB b = AmxB::of_raw(B, b_rs, b_cs, b_splits);
    if (M <= 0 || N <= 0 || !amx_gemm(M, N, K, A, a_rs, a_cs, b, nthreads, a_splits))
      return false;
    gemm_amx(M, N, K, A, a_rs, a_cs, b, C, ldc, accumulate, nthreads, bias, k_blocks_apart);
    return true;
  }
#endif
  (void)M, (void)N, (void)K, (void)A, (void)a_rs, (void)a_cs, (void)B, (void)b_rs, (void)b_cs;
  (void)C, (void)ldc, (void)accumulate, (void)nthreads, (void)bias, (void)a_splits;
  (void)b_splits, (void)k_blocks_apart;
  return false;
}

// The most of B that gemm packs at once.
constexpr int64_t kGemmPackedBBytes = int64_t(4) << 20;

// General entry: any strides for A and B. Packs B (A is packed block by block), a chunk of K at
// a time: whole KC blocks, so every C tile meets the same blocks in the same order, the same
// chains and bits as B packed whole. The backward's whole-sequence products have K = T*B (its
// saved H, ~12 MiB in fastrnns), whose packed copy set its training peak. In the amx build a
// float product that tiles take splits B as it lies instead (gemm_raw_b_on_tiles); a_splits:
// see amx_gemm. A product the tiles declined as a whole (an operand that does not split) runs
// every chunk on the FMA kernels: left to itself, a chunk without the infinity would take the
// tiles, and the bits would depend on the chunk size. Only a B that the tiles cannot read as it
// lies (neither its rows nor its columns contiguous: _C.gemm's callers alone) is packed for the
// tiles chunk by chunk.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
          int64_t b_rs, int64_t b_cs, T* C, int64_t ldc, bool accumulate, int nthreads,
          bool a_splits = false, bool k_blocks_apart = false) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return gemm_packed<T>(M, N, K, A, a_rs, a_cs, nullptr, C, ldc, accumulate, nthreads);
  if (gemm_raw_b_on_tiles<T>(M, N, K, A, a_rs, a_cs, B, b_rs, b_cs, C, ldc, accumulate, nthreads,
                             nullptr, a_splits, false, k_blocks_apart))
    return;
  const bool tiles_declined = b_cs == 1 || b_rs == 1;  // they read this B as it lies, and declined
  constexpr int64_t KC = GemmBlocking<T>::KC;
  const int64_t row_bytes = packed_b_size<T>(1, N) * int64_t(sizeof(T));
  const int64_t chunk = imax<int64_t>(1, kGemmPackedBBytes / row_bytes / KC) * KC;
  Scratch<T> packed(packed_b_size<T>(imin(K, chunk), N));
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t kc = imin(chunk, K - k0);
    pack_b_gemm<T>(kc, N, B + k0 * b_rs, b_rs, b_cs, packed.p, nthreads);
    gemm_packed<T>(M, N, kc, A + k0 * a_cs, a_rs, a_cs, packed.p, C, ldc, accumulate || k0 > 0,
                   nthreads, nullptr, true, !tiles_declined, false, k_blocks_apart);
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
