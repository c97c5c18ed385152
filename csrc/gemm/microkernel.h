// The register-tiled micro-kernel: an MR x NR block of C from an A block read with strides and a
// packed B panel (K x NR, NR contiguous). Each C element is an FMA chain over k in order in each
// block of kSumBlock, the blocks added after, so the result never depends on how tiles are spread
// over threads.
#pragma once
#include <cstdint>
#include <type_traits>
#include "simd/vec.h"
#include "common.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Tile shape per ISA and dtype: NV vectors across, MR rows down, chosen so MR*NV accumulators,
// NV panel vectors and one broadcast fit the register file (16 on AVX2, 32 on AVX-512).
template <typename T> struct Tile {
  static constexpr int NV = 2;
  static constexpr int NR = NV * Vec<T>::W;
  static constexpr int LINES = (NR * int(sizeof(T)) + 63) / 64;  // 64-byte lines in NR values
#if defined(__AVX512F__)
  static constexpr int MR = 12;
  static constexpr int REGS = 32;
#elif defined(__AVX2__)
  static constexpr int MR = 6;
  static constexpr int REGS = 16;
#else
  static constexpr int MR = 4;
  static constexpr int REGS = 16;  // SSE2
#endif
};

// c[r*ldc + n] (+)= sum_k A(r, k) * b[k*NR + n] for r < M (M <= MR), n < NR, A(r, k) in one of
// the AForm layouts below (a transposed A reaches them packed: gemm.h's pack_a).
// With few rows there are too few independent FMA chains to hide the FMA latency (4 cycles,
// 2 pipes: 8 chains needed), so small M splits k over KS partial sums, added at the end. The
// order depends only on M, never on threads, so results stay bitwise reproducible.
// Every product sums k in blocks of kSumBlock terms: each block's chains start from zero and
// its sum is added to C after, as a BLAS's K blocks are (torch.nn's GEMM sums blocks of 192):
// one chain over K rounds each term at the running sum's scale, so its error grew with K (K =
// 1024: twice torch's). A multiple of every KSplit and of a vector's lanes, and a divisor of the
// GEMM's KC, so the blocks fall at the same k whichever kernel, K block or thread computes a
// product.
constexpr int64_t kSumBlock = 128;
// A k block's sum into C: stored as C's value (the first block of a product that does not
// accumulate) or added to it (onto), then the bias added where given (after the last block).
template <typename T>
inline void store_block_sum(Vec<T> sum, T* at, bool onto, const T* bias) {
  if (onto) sum = Vec<T>::add(Vec<T>::load(at), sum);
  if (bias) sum = Vec<T>::add(sum, Vec<T>::load(bias));
  sum.store(at);
}
template <int M> struct KSplit { static constexpr int value = M == 1 ? 4 : M <= 3 ? 2 : 1; };
// Split = false keeps one chain per element and k block for any M, k in order (then the bias): the
// input projection, whose rows a single-row step team gets from one GEMM and a lone thread from
// the riding tiles (forward.h), must give the same bits either way.

// Where A(r, k) of a tile lies:
//  Rows:    a[r*lda + k], rows of the matrix in place;
//  Panel:   a[k*MR + r], an MR-row micro-panel from pack_a: one contiguous stream instead of M
//           strided rows (lda unused);
//  Blocked: a[(k/W)*W*MR + r*W + k%W] (W = a vector's lanes): each row's next W values lie
//           side by side, so whoever computes a row writes it with whole-vector stores (the fused
//           step's epilogue packs the next step's A so; see forward.h). Every row of a k-block
//           is an immediate offset from one address, like the Panel form.
enum class AForm { Rows, Panel, Blocked };

// bias (NR values, or null): added to every row's sum once its chain is done, as a BLAS adds C
// to A B: a chain started from the bias rounds each of its terms at the bias's scale, which lost
// up to 20x torch's accuracy where the inputs are small beside the bias.
// Prefetch: whether B's panel is prefetched, `ahead` k-steps ahead (micro_kernel_rows below
// chooses).
// NVU: the vectors of the panel computed (1: its first only, micro_kernel's first_half, where a
// hidden layer's last unit block holds no more units than one vector; the other lanes of C are
// left as they are).
template <typename T, int M, AForm Form, bool Split, bool Prefetch, int NVU = Tile<T>::NV>
inline void micro_kernel_rows_prefetching(int64_t K, const T* a, int64_t lda, const T* b, T* c,
                                          int64_t ldc, bool accumulate, const T* bias,
                                          int64_t ahead = 0) {
  using V = Vec<T>;
  constexpr int NV = NVU;
  constexpr int NR = Tile<T>::NR;
  constexpr int MR = Tile<T>::MR;
  constexpr int KS = Split ? KSplit<M>::value : 1;
  // k in blocks of kSumBlock: each block's chains start from zero and the block's sum is added
  // to C (or is C, for the first block of a product that does not accumulate).
  V acc[KS][M][NV];
  // A(r, k): packed, one base pointer and immediate offsets r (M row pointers would not fit the
  // general registers with the loop's own: 12 rows on AVX-512 spilled a counter to the stack).
  const T* arow[M];
  for (int r = 0; r < M; ++r) arow[r] = a + r * lda;
  constexpr int64_t W = Vec<T>::W;
  auto a_at = [&](int r, int64_t k) {
    if constexpr (Form == AForm::Panel) return a[k * MR + r];
    else if constexpr (Form == AForm::Blocked) return a[(k / W) * (W * MR) + r * W + k % W];
    else return arow[r][k];
  };
  const T* b_ahead = b + ahead * NR;  // where the prefetches read (Prefetch)
  for (int64_t k = 0, k_block = 0; k_block == 0 || k < K; k_block += kSumBlock) {
    const int64_t k_end = imin(K, k_block + kSumBlock);
    for (int s = 0; s < KS; ++s)
      for (int r = 0; r < M; ++r)
        for (int v = 0; v < NV; ++v) acc[s][r][v] = V::zero();
    // B streams from L2 (or L3: wide's 16 MB W_hh) in the recurrent step, since the gate panels
    // of a unit block outgrow L1: where the core gains (prefetch_b_ahead: Intel's 16 k-steps
    // ahead, Zen 4's 24) prefetch it, and unroll so the loop's own instructions stay out of the
    // FMA pipes' way. Intel, 16 vs 4 ahead: wide LSTM step-only min 816-925 vs 880-960 ms; 32
    // ahead was no better.
    // A k-step of B is NR * sizeof(T) bytes: one 64-byte line on AVX2, two on AVX-512, and each
    // is prefetched (the first alone: wide LSTM on AVX-512 832 ms, 714 ms on AVX2). Under 4 rows
    // a k-step takes a few cycles, 16 of them are too close to hide anything, and the prefetches
    // were a third of the load slots of the B = 1 step (long-seq LSTM, AVX-512).
    constexpr bool prefetch = Prefetch && M >= 4;
    // Blocked A, whole vectors of k at a time: row r's next W values lie at one base + r * W + kk,
    // all immediate offsets once the kk loop unrolls. The general loop below recomputed
    // (k / W) * W * MR + r * W + k % W every k-step: 11 integer ops beside 20 vector ones, which
    // held the AVX2 6 x 16 tile on Zen 3 to 80% of its FMA rate. Same k order, same bits.
    // Unrolled 4 k-steps, not a whole vector's 16: unrolled 16, GCC kept the 24 accumulators of
    // the AVX-512 tile in no fixed registers and copied them around (214 vmovaps beside 552 FMAs
    // in the hot loop, perf annotate). In-process A/B, Zen 5, 1 thread, inference, 16 -> 4:
    // stacked LSTM 3.646 -> 3.564 ms, GRU 2.831 -> 2.754, fastrnns LSTM 109.5 -> 107.0, GRU
    // 86.7 -> 84.1, wide LSTM 241.2 -> 235.6, deepbench-train LSTM 115.3 -> 111.9 (every config
    // and cell faster, 1-4%); training 1-3% faster, 2 threads wide LSTM 127.0 -> 121.5.
    // With k split (KS > 1, under 4 rows) chain s takes the k-steps with k % KS == s, as in the
    // general loop below (k_block and W are multiples of KS here), so the bits are the same.
    // Before, only KS == 1 came here, and 2-3 rows paid the general loop's index arithmetic
    // (in-process A/B, 1 thread, T x B x I x H = 64x2x8x200: LSTM 0.642 -> 0.551 ms, GRU 0.508
    // -> 0.445; 3 rows 3-6%).
    if constexpr (Form == AForm::Blocked && W % KS == 0) {  // whole rounds of the chains a vector
      for (; k + W <= k_end; k += W) {
        const T* ak = a + k * MR;  // k is a multiple of W
#pragma GCC unroll 4
        for (int kk = 0; kk < W; kk += KS) {
          for (int s = 0; s < KS; ++s) {
            if constexpr (prefetch)
              for (int l = 0; l < Tile<T>::LINES; ++l)
                __builtin_prefetch(reinterpret_cast<const char*>(b_ahead + (k + kk + s) * NR) +
                                   64 * l);
            V bv[NV];
            for (int v = 0; v < NV; ++v) bv[v] = V::load(b + (k + kk + s) * NR + v * V::W);
            for (int r = 0; r < M; ++r) {
              V av = V::set1(ak[r * W + kk + s]);
              for (int v = 0; v < NV; ++v) acc[s][r][v] = V::fma(av, bv[v], acc[s][r][v]);
            }
          }
        }
      }
    }
#pragma GCC unroll 4
    for (; k + KS <= k_end; k += KS) {
      for (int s = 0; s < KS; ++s) {
        if constexpr (prefetch)  // a few rows go through B faster than a prefetch helps: see above
          for (int l = 0; l < Tile<T>::LINES; ++l)
            __builtin_prefetch(reinterpret_cast<const char*>(b_ahead + (k + s) * NR) + 64 * l);
        V bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = V::load(b + (k + s) * NR + v * V::W);
        for (int r = 0; r < M; ++r) {
          V av = V::set1(a_at(r, k + s));
          for (int v = 0; v < NV; ++v) acc[s][r][v] = V::fma(av, bv[v], acc[s][r][v]);
        }
      }
    }
    for (; k < k_end; ++k) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b + k * NR + v * V::W);
      for (int r = 0; r < M; ++r) {
        V av = V::set1(a_at(r, k));
        for (int v = 0; v < NV; ++v) acc[0][r][v] = V::fma(av, bv[v], acc[0][r][v]);
      }
    }
    for (int s = 1; s < KS; ++s)
      for (int r = 0; r < M; ++r)
        for (int v = 0; v < NV; ++v) acc[0][r][v] = V::add(acc[0][r][v], acc[s][r][v]);
    const bool onto_c = accumulate || k_block > 0;
    const bool last = k_end == K;
    for (int r = 0; r < M; ++r)
      for (int v = 0; v < NV; ++v)
        store_block_sum(acc[0][r][v], c + r * ldc + v * V::W, onto_c,
                        last && bias ? bias + v * V::W : nullptr);
  }
}

// The kernel with B's prefetch where this CPU gains from it (prefetch_b_ahead). A template
// argument, not a flag in the loop: a flag tested every k-step cost wide LSTM 5% on Zen 5.
template <typename T, int M, AForm Form = AForm::Rows, bool Split = true, int NVU = Tile<T>::NV>
inline void micro_kernel_rows(int64_t K, const T* a, int64_t lda, const T* b, T* c, int64_t ldc,
                              bool accumulate, const T* bias = nullptr) {
  if (const int ahead = prefetch_b_ahead())
    micro_kernel_rows_prefetching<T, M, Form, Split, true, NVU>(K, a, lda, b, c, ldc, accumulate,
                                                                bias, ahead);
  else
    micro_kernel_rows_prefetching<T, M, Form, Split, false, NVU>(K, a, lda, b, c, ldc, accumulate,
                                                                 bias);
}

// A tile of a product riding along micro_kernel_row_gates: out(r, n) = sum over k < K of
// x[r*ldx + k] * w[k*NR + n], plus bias(n) unless it is null, for r < kRows and kVectors vectors
// of n (row stride ld_out): the chains of a micro_kernel of 4 rows or more (k in order in blocks
// of kSumBlock, then the bias). On AVX-512, 8 rows one vector wide: each panel line it loads
// serves twice the rows of a 4 x NR tile, in as many registers (online-small LSTM 0.358 ->
// 0.345 ms); with 16 registers, 4 rows two vectors wide: half the broadcasts a k-step (AVX2,
// online-small GRU: 0.309 ms against 0.345).
template <typename T>
struct RideTile {
#if defined(__AVX512F__)
  static constexpr int kRows = 8, kVectors = 1;
#else
  static constexpr int kRows = 4, kVectors = 2;
#endif
  int64_t K;
  const T* x;
  int64_t ldx;
  const T* w;
  T* out;
  int64_t ld_out;
  const T* bias;
};

// Whether a row of G gates and a RideTile keep their accumulators in registers, with room for a
// panel load and a broadcast. Spilling was slower than no ride: the LSTM on AVX2 (16 + 2 of 16
// registers), long-seq 0.949 -> 1.043 ms; the GRU's 14 + 2 gained there (0.883 -> 0.813).
template <typename T, int G>
constexpr bool ride_fits() {
  return G * Tile<T>::NV + RideTile<T>::kRows * RideTile<T>::kVectors + 2 <= Tile<T>::REGS;
}

// A single row against G gate panels lying panel_stride apart, in one pass over k: G * NV
// independent chains (8 for the LSTM) hide the FMA latency without splitting k, and each k-step
// broadcasts its A value once for every gate (the B = 1 step; micro_kernel_rows<1> per gate
// paid its set-up and k-split sums each time: long-seq LSTM, 1 thread, 1.106 -> 1.045 ms).
// c: gate g's NR values at c + g * NR. One FMA chain per element and k block, k in order; with
// KS > 1, KS chains, k-step k in chain k % KS, added in order at each block's end (one panel of
// one or two vectors, the compact tail of forward.h, whose one or two chains alone waited on the
// FMA latency).
// With `ride`, that tile's k-steps share the loop: the row streams its panels from L2 with the
// FMA pipes mostly idle, and the tile's FMAs, on one small panel, fill them (B = 1: the input
// projection of later steps; see forward.h, projection_rides). Its chains are RideTile's.
// NV: the vectors of each panel computed (1: its first only, for a unit block that holds no more
// units than one vector; gate g's other lanes of c are left as they are).
template <typename T, int G, int NV = Tile<T>::NV, int KS = 1>
inline void micro_kernel_row_gates(int64_t K, const T* a, const T* b, int64_t panel_stride, T* c,
                                   const RideTile<T>* ride = nullptr) {
  using V = Vec<T>;
  constexpr int NR = Tile<T>::NR;
  constexpr int R = RideTile<T>::kRows;
  constexpr int RV = RideTile<T>::kVectors;
  static_assert(kSumBlock % KS == 0, "each k block starts at chain 0");
  V acc[KS][G][NV], racc[R][RV];
  for (int s = 0; s < KS; ++s)
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NV; ++v) acc[s][g][v] = V::zero();
  auto row_step = [&](int64_t k, int s) {
    const V av = V::set1(a[k]);
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NV; ++v)
        acc[s][g][v] =
            V::fma(av, V::load(b + g * panel_stride + k * NR + v * V::W), acc[s][g][v]);
  };
  // Each kSumBlock of k apart: at a block's end the row's sums go to c (the first block's) or
  // are added to it, and the ride's to its out (the bias after its last).
  auto fold_row = [&](bool first) {
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NV; ++v) {
        for (int s = 1; s < KS; ++s) acc[0][g][v] = V::add(acc[0][g][v], acc[s][g][v]);
        store_block_sum(acc[0][g][v], c + g * NR + v * V::W, !first, static_cast<const T*>(nullptr));
        for (int s = 0; s < KS; ++s) acc[s][g][v] = V::zero();
      }
  };
  // The row's k-steps [k, k1), k-step k in chain k % KS whether or not the ride shares them, and
  // the ride's k-steps beside them (`with`, or `alone`: none). Chain indices stay constants
  // (unrolled over s): indexed at run time, the chains would live in memory.
  auto alone = [](int64_t) {};
  auto row_steps = [&](int64_t k, int64_t k1, auto with) {
    auto both_steps = [&](int64_t kk, int s) {
      row_step(kk, s);
      with(kk);
    };
    for (int s = 1; s < KS; ++s)  // up to the next multiple of KS
      if (k % KS == s && k < k1) both_steps(k++, s);
    if constexpr (std::is_same_v<decltype(with), decltype(alone)>) {
#pragma GCC unroll 4
      for (; k + KS <= k1; k += KS)
        for (int s = 0; s < KS; ++s) both_steps(k + s, s);
    } else {
#pragma GCC unroll 2
      for (; k + KS <= k1; k += KS)
        for (int s = 0; s < KS; ++s) both_steps(k + s, s);
    }
    for (int s = 0; s < KS; ++s)
      if (k + s < k1) both_steps(k + s, s);
  };
  int64_t k = 0;
  if (ride) {
    const RideTile<T>& q = *ride;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < RV; ++v) racc[r][v] = V::zero();
    auto tile_step = [&](int64_t kt) {
      V bv[RV];
      for (int v = 0; v < RV; ++v) bv[v] = V::load(q.w + kt * NR + v * V::W);
      for (int r = 0; r < R; ++r) {
        const V xv = V::set1(q.x[r * q.ldx + kt]);
        for (int v = 0; v < RV; ++v) racc[r][v] = V::fma(xv, bv[v], racc[r][v]);
      }
    };
    auto fold_ride = [&](bool first, const T* bias) {
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < RV; ++v) {
          store_block_sum(racc[r][v], q.out + r * q.ld_out + v * V::W, !first,
                          bias ? bias + v * V::W : nullptr);
          racc[r][v] = V::zero();
        }
    };
    const int64_t both = imin(K, q.K);
    if (K <= kSumBlock && q.K <= kSumBlock) {  // one block each: no folds to look for
      row_steps(0, both, tile_step);
      for (int64_t kt = both; kt < q.K; ++kt) tile_step(kt);
      fold_ride(true, q.bias);
      row_steps(both, K, alone);
      return fold_row(true);
    }
    while (k < both) {
      if (k > 0 && k % kSumBlock == 0) fold_row(k == kSumBlock), fold_ride(k == kSumBlock, nullptr);
      const int64_t k1 = imin(both, (k / kSumBlock + 1) * kSumBlock);
      row_steps(k, k1, tile_step);
      k = k1;
    }
    for (int64_t kt = both; kt < q.K;) {
      if (kt > 0 && kt % kSumBlock == 0) fold_ride(kt == kSumBlock, nullptr);
      const int64_t k1 = imin(q.K, (kt / kSumBlock + 1) * kSumBlock);
      for (; kt < k1; ++kt) tile_step(kt);
    }
    fold_ride(q.K <= kSumBlock, q.bias);
  }
  if (!ride && K <= kSumBlock) {
    row_steps(0, K, alone);
    return fold_row(true);
  }
  while (k < K) {
    if (k > 0 && k % kSumBlock == 0) fold_row(k == kSumBlock);
    const int64_t k1 = imin(K, (k / kSumBlock + 1) * kSumBlock);
    row_steps(k, k1, alone);
    k = k1;
  }
  fold_row(K <= kSumBlock);
}

// A short tile against P panels at once (panel p at b + p * panel_stride, its C block at
// c + p * c_panel_stride, its bias at bias + p * bias_panel_stride), A blocked (AForm::Blocked):
// a tile of 4 rows keeps only 8 chains on one panel, the least that hides the FMA latency on
// two pipes, and its B lines serve 4 rows where a full tile's serve 12; with two panels the
// chains double and each broadcast serves both. The chains are micro_kernel_rows' for M >= 4
// (KS = 1: from zero, k in order, then the bias), so the results are the same bits.
template <typename T, int M, int P, int NVU = Tile<T>::NV>
constexpr bool panels_fit() {
  return M >= 4 && P * M * NVU + P * NVU + 1 <= Tile<T>::REGS;
}
// NVU: as micro_kernel_rows_prefetching's.
template <typename T, int M, int P, int NVU = Tile<T>::NV>
inline void micro_kernel_panels(int64_t K, const T* a, const T* b, int64_t panel_stride, T* c,
                                int64_t ldc, int64_t c_panel_stride, const T* bias = nullptr,
                                int64_t bias_panel_stride = 0) {
  static_assert(panels_fit<T, M, P, NVU>(), "accumulators must fit the registers");
  using V = Vec<T>;
  constexpr int NV = NVU;
  constexpr int NR = Tile<T>::NR;
  constexpr int MR = Tile<T>::MR;
  constexpr int64_t W = Vec<T>::W;
  V acc[P][M][NV];
  auto k_step = [&](int64_t k, auto a_of_row) {
    V bv[P][NV];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) bv[p][v] = V::load(b + p * panel_stride + k * NR + v * V::W);
    for (int r = 0; r < M; ++r) {
      const V av = V::set1(a_of_row(r));
      for (int p = 0; p < P; ++p)
        for (int v = 0; v < NV; ++v) acc[p][r][v] = V::fma(av, bv[p][v], acc[p][r][v]);
    }
  };
  for (int64_t k = 0, k_block = 0; k_block == 0 || k < K; k_block += kSumBlock) {
    const int64_t k_end = imin(K, k_block + kSumBlock);
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < M; ++r)
        for (int v = 0; v < NV; ++v) acc[p][r][v] = V::zero();
    for (; k + W <= k_end; k += W) {
      const T* ak = a + k * MR;
#pragma GCC unroll 4  // (as micro_kernel_rows_prefetching's: see there)
      for (int kk = 0; kk < W; ++kk) k_step(k + kk, [&](int r) { return ak[r * W + kk]; });
    }
    for (; k < k_end; ++k) k_step(k, [&](int r) { return a[(k / W) * (W * MR) + r * W + k % W]; });
    const bool last = k_end == K;
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < M; ++r)
        for (int v = 0; v < NV; ++v)
          store_block_sum(acc[p][r][v], c + p * c_panel_stride + r * ldc + v * V::W, k_block > 0,
                          last && bias ? bias + p * bias_panel_stride + v * V::W : nullptr);
  }
}

// M rows, k split as KSplit says, or not at all without split_k.
template <typename T, int M, AForm Form, int NVU = Tile<T>::NV>
inline void micro_kernel_m(int64_t K, const T* a, int64_t lda, const T* b, T* c, int64_t ldc,
                           bool accumulate, const T* bias, bool split_k) {
  if constexpr (KSplit<M>::value > 1) {
    if (!split_k)
      return micro_kernel_rows<T, M, Form, false, NVU>(K, a, lda, b, c, ldc, accumulate, bias);
  }
  micro_kernel_rows<T, M, Form, true, NVU>(K, a, lda, b, c, ldc, accumulate, bias);
}

// A single row (A's one row read in place, AForm::Rows) against two full panels of B at once:
// c0 and c1 (NR values each) (+)= a b0 and a b1, every element the very chains of
// micro_kernel_rows<T, 1, AForm::Rows, Split> (k split over KS partial sums, added in order), so
// pairing never changes a bit. Why: the backward's per-step d h = dG W_hh of a single row
// streams W_hh from L2, and one panel at a time spends a broadcast of A on every two panel
// loads; two panels share it (C++ loop, 512 x 128 panels from L2: 1.9 -> 1.6 us a product).
// Prefetch: whether the panels are prefetched 32 k-steps ahead, for panels from L2.
// apart (with accumulate): the blocks' sum is made apart and added to C at the end (gemm.h's
// k_blocks_apart), instead of each block being added to C in turn.
// The k loop unrolled 8 times, not 4 as the other kernels': on the Zen 5 host a product took
// 1.82-1.95 us at 512 x 128 (256 KB from L2) and 0.37-0.42 at 256 x 64 unrolled 4, 1.53-1.63
// and 0.31-0.32 unrolled 8 (a C++ loop over this function; not unrolled 1.55-1.79 / 0.32-0.33).
// In-process A/B, training, medians, 1 / 2 threads: online-small LSTM 0.665 -> 0.640 / 0.412 ->
// 0.398 ms, GRU 0.505 -> 0.497 / 0.329 -> 0.317, long-seq LSTM 1.382 -> 1.339 / 0.916 -> 0.881;
// the AVX2 build's within 1-2% either way. The same chains: the same bits.
template <typename T, bool Split = true, bool Prefetch = false>
inline void micro_kernel_row_pair(int64_t K, const T* a, const T* b0, const T* b1, T* c0, T* c1,
                                  bool accumulate, bool apart = false) {
  using V = Vec<T>;
  constexpr int NV = Tile<T>::NV;
  constexpr int NR = Tile<T>::NR;
  constexpr int KS = Split ? KSplit<1>::value : 1;
  const T* b[2] = {b0, b1};
  alignas(64) T sum_apart[2][NR];
  const bool to_c = !(accumulate && apart);
  T* c[2] = {to_c ? c0 : sum_apart[0], to_c ? c1 : sum_apart[1]};
  V acc[KS][2][NV];
  auto k_step = [&](int s, int64_t k) {
    const V av = V::set1(a[k]);
    for (int p = 0; p < 2; ++p)
      for (int v = 0; v < NV; ++v)
        acc[s][p][v] = V::fma(av, V::load(b[p] + k * NR + v * V::W), acc[s][p][v]);
  };
  for (int64_t k = 0, k_block = 0; k_block == 0 || k < K; k_block += kSumBlock) {
    const int64_t k_end = imin(K, k_block + kSumBlock);
    for (int s = 0; s < KS; ++s)
      for (int p = 0; p < 2; ++p)
        for (int v = 0; v < NV; ++v) acc[s][p][v] = V::zero();
#pragma GCC unroll 8
    for (; k + KS <= k_end; k += KS) {
      if constexpr (Prefetch)
        for (int p = 0; p < 2; ++p)
          for (int l = 0; l < KS * Tile<T>::LINES; ++l)
            __builtin_prefetch(reinterpret_cast<const char*>(b[p] + (k + 32) * NR) + 64 * l);
      for (int s = 0; s < KS; ++s) k_step(s, k + s);
    }
    for (; k < k_end; ++k) k_step(0, k);
    for (int s = 1; s < KS; ++s)
      for (int p = 0; p < 2; ++p)
        for (int v = 0; v < NV; ++v) acc[0][p][v] = V::add(acc[0][p][v], acc[s][p][v]);
    const bool onto_c = (accumulate && to_c) || k_block > 0;
    for (int p = 0; p < 2; ++p)
      for (int v = 0; v < NV; ++v)
        store_block_sum(acc[0][p][v], c[p] + v * V::W, onto_c, static_cast<const T*>(nullptr));
  }
  if (!to_c) {
    T* out[2] = {c0, c1};
    for (int p = 0; p < 2; ++p)
      for (int v = 0; v < NV; ++v)
        V::add(V::load(out[p] + v * V::W), V::load(c[p] + v * V::W)).store(out[p] + v * V::W);
  }
}

// Any M in 1..MR: picks the instantiation with that many rows (split_k: see KSplit).
template <typename T, AForm Form, int NVU>
inline void micro_kernel_nvu(int M, int64_t K, const T* a, int64_t lda, const T* b, T* c,
                             int64_t ldc, bool accumulate, const T* bias, bool split_k) {
  switch (M) {
#define FUSEDRNN_CASE(m) \
  case m: if (m <= Tile<T>::MR) micro_kernel_m<T, (m <= Tile<T>::MR ? m : 1), Form, NVU>(K, a, lda, b, c, ldc, accumulate, bias, split_k); break;
    FUSEDRNN_CASE(1) FUSEDRNN_CASE(2) FUSEDRNN_CASE(3) FUSEDRNN_CASE(4) FUSEDRNN_CASE(5)
    FUSEDRNN_CASE(6) FUSEDRNN_CASE(7) FUSEDRNN_CASE(8) FUSEDRNN_CASE(9) FUSEDRNN_CASE(10)
    FUSEDRNN_CASE(11) FUSEDRNN_CASE(12)
#undef FUSEDRNN_CASE
    default: break;
  }
}
// first_half: the panel's first vector only (NVU = 1), for a last unit block (or panel) of no
// more units (columns) than one vector. Each lane's chains are its own, so the lanes computed
// keep their bits.
template <typename T, AForm Form = AForm::Rows>
inline void micro_kernel(int M, int64_t K, const T* a, int64_t lda, const T* b, T* c, int64_t ldc,
                         bool accumulate, const T* bias = nullptr, bool split_k = true,
                         bool first_half = false) {
  if constexpr (Tile<T>::NV > 1)
    if (first_half)
      return micro_kernel_nvu<T, Form, 1>(M, K, a, lda, b, c, ldc, accumulate, bias, split_k);
  micro_kernel_nvu<T, Form, Tile<T>::NV>(M, K, a, lda, b, c, ldc, accumulate, bias, split_k);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
