// float32 products on AMX tiles (the "amx" build: AVX-512 kernels plus this), exact to float32's
// rounding: each float is split into three bfloat16 parts, x = hi + mid + lo exactly (8 + 8 + 8
// significant bits, each rounded to nearest), and a product a*b is the six part products whose
// weight reaches float32's (hi*hi, mid*hi, lo*hi, hi*mid, mid*mid, hi*lo), each exact in float32
// and summed in the tiles' float32 accumulators; the three dropped terms are below 2^-24 of
// a*b. C++ loop, 1 thread, K = 1024: max error 5.8e-7 of the largest result against 6.7e-7 for
// one FMA chain. Rates (C++ loop, 1 thread, this Xeon, our AVX-512 GEMM 157-166 GFLOP/s in the
// same minutes): 1024^3 230-250 float32-equivalent GFLOP/s; a step's 16-row tiles against 2 gate
// panels from L2 206-242 (12-row tiles, the FMA kernels' MR, 195-210).
//
// Tiles: C 0-3 (16 rows of 16 floats), A 4-6 (hi, mid, lo: 16 rows of 32 k), B 7 (16 k pairs of
// 16 columns, VNNI: k and k + 1 side by side). A split A row tile: per block of 32 k, the three
// parts' 16 x 32 values (rows past the tile's and k past K zero); a split B panel (32 columns,
// as Tile<float>::NR): per block of 32 k, per part, per 16-column half, 16 x 32 values.
//
// Non-finite values do not split (inf - inf), nor do ones past 2^63 (a product's part products
// could overflow to opposite infinities) or nonzero ones under 2^-100 (denormal low parts):
// callers take this path only for operands that split (amx_all_splits), whose products then
// match the FMA kernels' to float32 rounding.
#pragma once
#if defined(FUSEDRNN_AMX)
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include "common.h"
#include "gemm/microkernel.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

using bf16_t = uint16_t;
constexpr int kAmxRows = 16;               // an A or C tile's rows
constexpr int64_t kAmxK = 32;              // k in one tile row
static_assert(Tile<float>::NR == 32, "a B panel is two 16-column tiles");

inline int64_t amx_kblocks(int64_t K) { return ceil_div<int64_t>(K, kAmxK); }
// bf16 elements of one split A row tile over K, and of one split 32-column B panel.
inline int64_t amx_a_tile_size(int64_t K) { return amx_kblocks(K) * 3 * kAmxRows * kAmxK; }
inline int64_t amx_b_panel_size(int64_t K) { return amx_kblocks(K) * 3 * 2 * 16 * kAmxK; }

// Loads this file's tile configuration into the calling thread's tiles unless they hold it
// already. The tile state is per thread and other libraries in the process configure it too
// (oneDNN in torch, ONNX Runtime's MLAS), so the tiles are read back (STTILECFG) rather than
// trusted to a flag of ours; called before every product, it costs a 64-byte store and compare.
inline void amx_configure() {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };
  static const Config ours = [] {
    Config c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = t == 7 ? 16 : kAmxRows;  // (B: 16 k pairs)
    }
    return c;
  }();
  Config now;
  _tile_storeconfig(&now);
  if (std::memcmp(&now, &ours, sizeof(Config)) != 0) _tile_loadconfig(&ours);
}

// Whether every value of a rows x cols block (rows ld apart) splits exactly into bfloat16 parts
// whose products with another's cannot overflow: finite and at most 2^63 (kernel_api.h
// kAmxSplitMax), and zero or from 2^-100 up (below, the low part is a denormal, which the
// tiles take as 0: weights ~1e-33 against x ~1e33 lost 3 decimal digits).
inline __mmask16 amx_unsplittable(__m512 x) {
  const __m512 m = _mm512_abs_ps(x);
  return _mm512_cmp_ps_mask(m, _mm512_set1_ps(kAmxSplitMax), _CMP_NLE_UQ) |
         (_mm512_cmp_ps_mask(m, _mm512_set1_ps(kAmxSplitMin), _CMP_LT_OQ) &
          _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_NEQ_OQ));
}
inline bool amx_all_splits(const float* a, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = a + r * ld;
    int64_t c = 0;
    __mmask16 bad = 0;
    for (; c + 16 <= cols; c += 16) bad |= amx_unsplittable(_mm512_loadu_ps(row + c));
    if (c < cols) {   // the masked-off lanes load as 0, which splits
      const __mmask16 m = static_cast<__mmask16>((1u << (cols - c)) - 1);
      bad |= amx_unsplittable(_mm512_maskz_loadu_ps(m, row + c));
    }
    if (bad) return false;
  }
  return true;
}

// amx_all_splits on the threads for a block big enough to repay a parallel region: it is a
// pass over memory on the calling thread before the product's region opens (fastrnns LSTM
// training, 2 threads: 5.5% of the calling thread's time, with the other idle). Runs of rows;
// the answer is the same.
inline bool amx_all_splits(const float* a, int64_t rows, int64_t cols, int64_t ld, int nthreads) {
  constexpr int64_t kRunValues = int64_t(1) << 16;
  if (nthreads <= 1 || rows * cols < 8 * kRunValues) return amx_all_splits(a, rows, cols, ld);
  const int64_t per = imax<int64_t>(1, kRunValues / cols), runs = ceil_div<int64_t>(rows, per);
  bool ok = true;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(&& : ok)
  for (int64_t i = 0; i < runs; ++i)
    ok = ok && amx_all_splits(a + i * per * ld, imin(per, rows - i * per), cols, ld);
  return ok;
}

// x's bits rounded to bfloat16 (to nearest, ties to even), low 16 bits zero.
inline __m512i amx_bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u)));
}
// x = parts[0] + parts[1] + parts[2] exactly, each a bfloat16 in the high half of its lane.
// A NaN's high part is a NaN (bfloat16 0x7FC0), which makes every product it meets NaN:
// rounded as a number, a NaN whose payload fills the high mantissa bits carries into the
// exponent and the sign (0x7FFF8000 -> -0, 0xFFFFFFFF -> +0), and all three parts came out
// zero. The operands are scanned for NaNs (amx_all_splits), but a step's h is not: a NaN
// reaching it from x's projection or a bias dropped out of the next step's products (an Elman
// RNN's row came back finite where torch's stays NaN).
inline void amx_split(__m512 x, __m512i parts[3]) {
  parts[0] = _mm512_mask_mov_epi32(amx_bf16_bits(x), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                   _mm512_set1_epi32(0x7FC00000));
  const __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(parts[0]));
  parts[1] = amx_bf16_bits(r);
  parts[2] = amx_bf16_bits(_mm512_sub_ps(r, _mm512_castsi512_ps(parts[1])));
}

// The split A row tile of rows [0, mr) of a (rows lda apart, k contiguous) over K.
inline void amx_split_a(int mr, int64_t K, const float* a, int64_t lda, bf16_t* out) {
  const int64_t kbs = amx_kblocks(K);
  for (int64_t kb = 0; kb < kbs; ++kb) {
    bf16_t* block = out + kb * 3 * kAmxRows * kAmxK;
    for (int r = 0; r < kAmxRows; ++r)
      for (int half = 0; half < 2; ++half) {
        const int64_t k0 = kb * kAmxK + half * 16;
        const int64_t n = r < mr ? imin<int64_t>(16, K - k0) : 0;
        const __mmask16 m = n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
        __m512i parts[3];
        amx_split(_mm512_maskz_loadu_ps(m, a + r * lda + k0), parts);
        for (int q = 0; q < 3; ++q)
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(block + (q * kAmxRows + r) * kAmxK + half * 16),
              _mm512_cvtepi32_epi16(_mm512_srli_epi32(parts[q], 16)));
      }
  }
}

// The split B panel of a K x 32 float panel (row k at b + k * 32, as pack_b / the packed gates
// lay a panel out): k pairs side by side in each 32-bit lane (VNNI), k past K zero.
inline void amx_split_b(int64_t K, const float* b, bf16_t* out) {
  const int64_t kbs = amx_kblocks(K);
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t kb = 0; kb < kbs; ++kb)
    for (int p = 0; p < 16; ++p) {
      const int64_t k0 = kb * kAmxK + 2 * p;
      for (int half = 0; half < 2; ++half) {
        __m512i even[3], odd[3];
        const __m512 zero = _mm512_setzero_ps();
        amx_split(k0 < K ? _mm512_loadu_ps(b + k0 * 32 + half * 16) : zero, even);
        amx_split(k0 + 1 < K ? _mm512_loadu_ps(b + (k0 + 1) * 32 + half * 16) : zero, odd);
        for (int q = 0; q < 3; ++q) {
          const __m512i pair = _mm512_or_si512(_mm512_and_si512(odd[q], high),
                                               _mm512_srli_epi32(even[q], 16));
          _mm512_storeu_si512(out + ((kb * 3 + q) * 2 + half) * 512 + p * 32, pair);
        }
      }
    }
}

// The C tiles' part of a product: tiles 0 .. 2 NP - 1 hold a kAmxRows x 32 NP block of C.
// amx_tiles_zero clears them; amx_tiles_product adds A (a split A tile) B (NP split panels
// b[0..NP)) over k blocks [kb0, kb1) to them, per element in a fixed order (k blocks in order, the six part
// products in the order above), so results do not depend on how tiles are spread over threads;
// amx_tiles_store writes them to c (rows ldc apart), all kAmxRows rows.
template <int NP>
inline void amx_tiles_zero() {
  static_assert(NP == 1 || NP == 2, "one or two panels (two or four C tiles)");
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NP == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
}
template <int NP>
inline void amx_tiles_product(int64_t kb0, int64_t kb1, const bf16_t* a,
                              const bf16_t* const* b) {
  constexpr int64_t kPart = kAmxRows * kAmxK, kHalf = 16 * kAmxK;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const bf16_t* ak = a + kb * 3 * kPart;
    _tile_loadd(4, ak, 64);
    _tile_loadd(5, ak + kPart, 64);
    _tile_loadd(6, ak + 2 * kPart, 64);
    // C tile t: panel t / 2, half t % 2; B's hi meets A's hi, mid and lo, its mid A's hi and
    // mid, its lo A's hi.
#define FUSEDRNN_AMX_TILE(t)                                            \
  {                                                                     \
    const bf16_t* bk = b[(t) / 2] + kb * 6 * kHalf + ((t) % 2) * kHalf; \
    _tile_loadd(7, bk, 64);                                             \
    _tile_dpbf16ps(t, 4, 7);                                            \
    _tile_dpbf16ps(t, 5, 7);                                            \
    _tile_dpbf16ps(t, 6, 7);                                            \
    _tile_loadd(7, bk + 2 * kHalf, 64);                                 \
    _tile_dpbf16ps(t, 4, 7);                                            \
    _tile_dpbf16ps(t, 5, 7);                                            \
    _tile_loadd(7, bk + 4 * kHalf, 64);                                 \
    _tile_dpbf16ps(t, 4, 7);                                            \
  }
    FUSEDRNN_AMX_TILE(0)
    FUSEDRNN_AMX_TILE(1)
    if constexpr (NP == 2) {
      FUSEDRNN_AMX_TILE(2)
      FUSEDRNN_AMX_TILE(3)
    }
#undef FUSEDRNN_AMX_TILE
  }
}
template <int NP>
inline void amx_tiles_store(float* c, int64_t ldc) {
  const int64_t stride = ldc * int64_t(sizeof(float));
  _tile_stored(0, c, stride);
  _tile_stored(1, c + 16, stride);
  if constexpr (NP == 2) {
    _tile_stored(2, c + 32, stride);
    _tile_stored(3, c + 48, stride);
  }
}

// C (kAmxRows x 32 NP floats, rows ldc apart) = A B, or C + A B (onto), then + bias (bias[i]:
// panel i's 32 values; null for none), with k summed in blocks of kAmxSumBlock (8 k blocks of
// the tiles), as the FMA kernels sum k in blocks (microkernel.h): each block's sum from zero in
// the tiles, added to C after it; `apart` (with onto): added to the blocks' own sum, which is
// added to C at the end (gemm.h's k_blocks_apart). The tiles carrying one sum over all of K
// (three additions into it per k, against the FMA chain's one) gave _C.gemm an RMS error
// against float64 of 1.2x the FMA kernels' at K = 1024, 1.9x at 3000, 2.2x at 4096; in blocks
// of 256, 0.67-0.70x at K = 512-4096 (25 draws each). Blocks of kSumBlock (128), 0.54-0.64x,
// cost 5-7% of the GEMM's speed (in-process A/B, 1 thread, 1024^3, 6400x2048x512), 256 about 1%.
// A block's sum goes through `sums` (two buffers, one a block) and is added to C while the
// tiles compute the next block: the vector adds of block j - 1 come after block j's tile
// products in program order, so they overlap them. The same adds in the same order.
constexpr int64_t kAmxSumBlock = 2 * kSumBlock;
template <int NP>
inline void amx_panels_summed(int64_t kbs, const bf16_t* a, const bf16_t* const* b, float* c,
                              int64_t ldc, bool onto, bool apart, const float* const* bias) {
  constexpr int64_t kBlockKbs = kAmxSumBlock / kAmxK;
  static_assert(kAmxSumBlock % kAmxK == 0, "a sum block is whole tile k blocks");
  constexpr int kCols = NP * 32, W = Vec<float>::W;
  amx_configure();
  bool has_bias = false;
  for (int i = 0; i < NP; ++i) has_bias = has_bias || (bias && bias[i]);
  if (kbs <= kBlockKbs && !onto && !has_bias) {  // one block into C as it is
    amx_tiles_zero<NP>();
    amx_tiles_product<NP>(0, kbs, a, b);
    return amx_tiles_store<NP>(c, ldc);
  }
  alignas(64) float sums[2][kAmxRows * kCols];
  alignas(64) float total[kAmxRows * kCols];
  apart = apart && onto && kbs > kBlockKbs;
  auto bias_at = [bias](int j) -> const float* {  // vector j's bias
    return bias && bias[j * W / 32] ? bias[j * W / 32] + (j * W) % 32 : nullptr;
  };
  float* into = apart ? total : c;
  const int64_t ld_into = apart ? kCols : ldc;
  const int64_t blocks = ceil_div(kbs, kBlockKbs);
  // A sum (kCols wide) stored into or added onto dst (rows ld apart), then the bias if asked.
  auto fold = [&](const float* sum, float* dst, int64_t ld, bool onto_dst, bool with_bias) {
    for (int r = 0; r < kAmxRows; ++r)
      for (int v = 0; v < kCols / W; ++v)
        store_block_sum(Vec<float>::load(sum + r * kCols + v * W), dst + r * ld + v * W,
                        onto_dst, with_bias ? bias_at(v) : nullptr);
  };
  auto add_block = [&](int64_t j) {  // block j's sum, in sums[j % 2], onto C (or total)
    fold(sums[j % 2], into, ld_into, j > 0 || (onto && !apart), j + 1 == blocks && !apart);
  };
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t kb = j * kBlockKbs;
    amx_tiles_zero<NP>();
    amx_tiles_product<NP>(kb, imin(kbs, kb + kBlockKbs), a, b);
    if (j > 0) add_block(j - 1);
    amx_tiles_store<NP>(sums[j % 2], kCols);
  }
  add_block(blocks - 1);
  if (apart) fold(total, c, ldc, true, true);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
#endif  // FUSEDRNN_AMX
