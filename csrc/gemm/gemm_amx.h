// gemm_packed on AMX tiles (gemm/amx.h) for float32 in the "amx" build: the whole-sequence
// products (the input projection before the loop, the backward's weight gradients and dX) and
// _C.gemm. B comes packed as pack_b_gemm lays it out, or as it lies (AmxB), and is split a chunk
// of panels and a K block at a time (the threads sharing the work), then every 16-row group of
// A, split, meets all of those panels; C carries each element's sum from one K block to the next
// exactly, so the blocks change no bit and nor do the threads (whole row groups, each
// element's order fixed).
#pragma once
#include <cstdint>
#include <cstring>
#include "common.h"
#include "gemm/amx.h"
#include "gemm/microkernel.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

#if defined(FUSEDRNN_AMX)
// Products from which gemm_packed takes AMX tiles: rows enough to repay splitting B (_C.gemm,
// N = 2048, K = 512, against the FMA build, 1 thread: M = 32 x0.69, 64 x0.83, 128 x1.01, 256
// x1.15), and columns and k enough to repay splitting A: each value of A is split once and
// meets N columns, where the FMA kernels only pack it. A stored by columns (the backward's
// dG^T) is gathered into rows first and needs twice the columns. _C.gemm against the FMA
// kernels, 1 thread, best of 5 (FMA time / tiles' time), M = 256, 1024, 6400, K = 1000: rows
// contiguous N = 64 x0.88-0.91, 96 x0.94-0.99, 128 x1.03-1.14, 256 x1.12-1.33; gathered N = 64
// x0.68-0.71, 128 x0.87-0.92, 192 x1.00-1.05, 256 x1.03-1.10; K = 32 (one k block a split) N
// = 256 x0.86-0.97, 1024 x0.76-0.85, K = 64 x1.00-1.17. On 2 threads the same within 0.1.
// Long-seq LSTM training's three backward products (N = 32 and 64) took 0.62 ms on tiles
// against 0.41 on the FMA kernels.
constexpr int64_t kAmxGemmMinRows = 128, kAmxGemmMinK = 64;
constexpr int64_t kAmxGemmMinCols = 128, kAmxGemmMinColsGathered = 256;
inline bool amx_gemm_shape_takes(int64_t M, int64_t N, int64_t K, bool a_gathered) {
  const int64_t min_cols = a_gathered ? kAmxGemmMinColsGathered : kAmxGemmMinCols;
  return M >= kAmxGemmMinRows && N >= min_cols && K >= kAmxGemmMinK;
}
// Blocking: per K block of kAmxGemmKC (Bp's own K blocks), every panel of a chunk
// (kAmxGemmChunkPanels, below) is split once (shared by the threads) and each block of
// kAmxGemmGroups 16-row groups of A, split (48 KiB a group, in L2), meets the panels a pair at a
// time, the pair (192 KiB) in L2 while the block's groups meet it. In-process A/B, 1 thread, against the FMA GEMM in the same minutes:
// with every group meeting all panels in turn, 1024^3 x0.85 (the C tiles reloaded from L3 held
// up each pair); groups of 2, 4, 8, 12, 16: 1024^3 x1.07, 1.25, 1.39, 1.40, 1.37, 6400x2048x512
// x1.08, 1.23, 1.29, 1.42, 1.44, 2048x512x6400 (A transposed) x1.07, 1.25, 1.26, 1.29, 1.29.
constexpr int64_t kAmxGemmKC = 512, kAmxGemmGroups = 16;
// Panels split at a time: wider products go a chunk of columns at a time, each chunk over all
// of K, so the split panels take at most 512 x 1024 x 6 bytes (3 MB; the input projection of
// deepbench's LSTM, N = 4096, had 12 MB in its training peak) for an A split 4 times over.
constexpr int64_t kAmxGemmChunkPanels = 32;

// The B of a product on tiles: packed by pack_b_gemm, or as it lies, B(k, n) at
// raw[k * rs + n * cs] with rows or columns contiguous. Raw, each K block of a panel goes
// through a float32 slice of its own (pack_b_rows) on its way to the split, so the product never
// holds B's float32 packed copy: the input projection's packed W_ih (deepbench GRU, 12 MiB) sat
// idle in the training peak, and gemm packed B 4 MiB at a time. Same values, same bits.
struct AmxB {
  const float* packed;
  const float* raw;
  int64_t rs, cs;
  bool known_to_split;  // the caller found every value splits (weight_splits)
  static AmxB of_packed(const float* Bp) { return AmxB{Bp, nullptr, 0, 0, false}; }
  static AmxB of_raw(const float* B, int64_t rs, int64_t cs, bool known_to_split = false) {
    return AmxB{nullptr, B, rs, cs, known_to_split};
  }
  bool splits(int64_t K, int64_t N, int nthreads) const {
    constexpr int NR = Tile<float>::NR;  // packed: rows of NR values, back to back
    if (known_to_split) return true;
    if (packed) return amx_all_splits(packed, packed_b_size<float>(K, N) / NR, NR, NR, nthreads);
    if (cs == 1) return amx_all_splits(raw, K, N, rs, nthreads);
    if (rs == 1) return amx_all_splits(raw, N, K, cs, nthreads);
    return false;
  }
  // Rows [k0, k0 + kc) of panel p split into out; tmp: room for a kc x NR float32 slice.
  void split_slice(int64_t K, int64_t N, int64_t k0, int64_t kc, int64_t p, float* tmp,
                   bf16_t* out) const {
    constexpr int64_t KC = GemmBlocking<float>::KC;  // packed's K blocks
    if (packed) {
      const int64_t bk0 = (k0 / KC) * KC;
      const int64_t panels = ceil_div<int64_t>(N, Tile<float>::NR);
      return amx_split_b(kc, gemm_b_slice<float>(packed, panels, K, bk0, p) +
                                 (k0 - bk0) * Tile<float>::NR, out);
    }
    pack_b_rows<float>(k0, k0 + kc, p, N, raw, rs, cs, tmp);
    amx_split_b(kc, tmp, out);
  }
};

// Whether this product runs on AMX tiles: shape (above), A's strides (rows or columns
// contiguous) and every operand splitting (amx_all_splits; a_splits: the caller found A's do,
// as the backward does once for the dG its three products read). Never depends on threads.
inline bool amx_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
                     const AmxB& b, int nthreads, bool a_splits) {
  if (a_cs != 1 && a_rs != 1) return false;
  if (!amx_gemm_shape_takes(M, N, K, a_cs != 1)) return false;
  if (!a_splits && !(a_cs == 1 ? amx_all_splits(A, M, K, a_rs, nthreads)
                               : amx_all_splits(A, K, M, a_cs, nthreads)))
    return false;
  return b.splits(K, N, nthreads);
}

// Rows [m0, m0 + mr) x k [k0, k0 + kc) of A split into one A tile; tmp: room for 16 x kc
// floats (A with contiguous columns is gathered into rows there first).
inline void amx_split_a_block(int mr, int64_t m0, int64_t k0, int64_t kc, const float* A,
                              int64_t a_rs, int64_t a_cs, float* tmp, bf16_t* out) {
  if (a_cs == 1) return amx_split_a(mr, kc, A + m0 * a_rs + k0, a_rs, out);
  const float* src = A + m0 + k0 * a_cs;  // a_rs == 1: column k holds the mr rows side by side
  int64_t k = 0;
  if (mr == 16)
    for (; k + 16 <= kc; k += 16) transpose_block(src + k * a_cs, a_cs, tmp + k, kc);
  for (; k < kc; ++k)
    for (int r = 0; r < mr; ++r) tmp[r * kc + k] = src[k * a_cs + r];
  amx_split_a(mr, kc, tmp, kc, out);
}

// C(M,N) (+)= A(M,K) B, or bias + A B, on AMX tiles; see gemm_packed.
inline void gemm_amx(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
                     const AmxB& b, float* C, int64_t ldc, bool accumulate, int nthreads,
                     const float* bias, bool k_blocks_apart) {
  constexpr int NR = Tile<float>::NR;
  static_assert(GemmBlocking<float>::KC % kAmxGemmKC == 0,
                "a K block lies within one of a packed B's slices");
  const int64_t panels = ceil_div<int64_t>(N, NR), groups = ceil_div<int64_t>(M, 16);
  const bool parallel = nthreads > 1 && M * N * K >= (int64_t(1) << 22);
  // Blocks of up to kAmxGemmGroups row groups, and at least 4 a thread where the groups allow:
  // a product of few rows (the stacked layer's projection, 50 groups) left one thread 32
  // groups against the other's 18. The blocks share B's split panels; no element's sum changes.
  const int64_t least_blocks = parallel ? imin<int64_t>(groups, 4 * int64_t(nthreads)) : 1;
  const int64_t per_block =
      ceil_div(groups, imax(ceil_div<int64_t>(groups, kAmxGemmGroups), least_blocks));
  const int64_t blocks = ceil_div(groups, per_block);
  const int64_t kc_max = imin(kAmxGemmKC, K);
  const int64_t panel_size = amx_b_panel_size(kc_max);
  Scratch<bf16_t> b_split(imin(panels, kAmxGemmChunkPanels) * panel_size);
  // The bias in whole panels (the tiles read 32 values a panel): a zero-padded copy once a
  // call where N ends in a short panel.
  Scratch<float> bias_padded(bias && N % NR ? panels * NR : 0);
  if (bias_padded.p) {
    std::memset(bias_padded.p, 0, sizeof(float) * panels * NR);
    std::memcpy(bias_padded.p, bias, sizeof(float) * N);
  }
  const float* bias_whole = bias_padded.p ? bias_padded.p : bias;
  // Every thread's buffers, allocated here: one failing inside the region (a MemoryError) would
  // end the process. Each thread's share starts on a 64-byte line, as a Scratch of its own did.
  const int64_t a_tile = amx_a_tile_size(kc_max), members = parallel ? nthreads : 1;
  const int64_t a_split_size = kAmxGemmGroups * a_tile, gather_size = a_cs == 1 ? 0 : 16 * kc_max;
  const int64_t b_slice_size = b.raw ? kc_max * NR : 0;
  Scratch<bf16_t> a_splits(members * a_split_size);
  Scratch<float> gathers(members * gather_size), b_slices(members * b_slice_size);
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    DenormalsFlushed ftz;
    bf16_t* const a_split = a_splits.p + thread_id() * a_split_size;
    float* const gather = gather_size ? gathers.p + thread_id() * gather_size : nullptr;
    float* const b_slice = b_slice_size ? b_slices.p + thread_id() * b_slice_size : nullptr;
    alignas(64) float edge[16 * 2 * NR];  // a group's tile pair where it passes M or N
    for (int64_t c0 = 0; c0 < panels; c0 += kAmxGemmChunkPanels) {  // chunks of panels
    for (int64_t k0 = 0; k0 < K; k0 += kAmxGemmKC) {
      const int64_t c1 = imin(panels, c0 + kAmxGemmChunkPanels);
      const int64_t kc = imin(kAmxGemmKC, K - k0), kbs = amx_kblocks(kc);
      // This K block of the chunk's panels, split.
#pragma omp for schedule(static)
      for (int64_t p = c0; p < c1; ++p)
        b.split_slice(K, N, k0, kc, p, b_slice, b_split.p + (p - c0) * panel_size);
      // As gemm_packed_block sums: onto C after the first K block, the bias after the last one,
      // k_blocks_apart's blocks of a K block summed apart where added onto C.
      const bool onto = accumulate || k0 > 0;
      const bool apart = k_blocks_apart && !bias;
      const float* bias_k = k0 + kc == K ? bias_whole : nullptr;
#pragma omp for schedule(dynamic, 1)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t g0 = blk * per_block, g1 = imin(groups, g0 + per_block);
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t m0 = g * 16;
          amx_split_a_block(static_cast<int>(imin<int64_t>(16, M - m0)), m0, k0, kc, A, a_rs,
                            a_cs, gather, a_split + (g - g0) * a_tile);
        }
        for (int64_t p = c0; p < c1; p += 2)
          for (int64_t g = g0; g < g1; ++g) {
            const int64_t m0 = g * 16;
            const int mr = static_cast<int>(imin<int64_t>(16, M - m0));
            const int np = static_cast<int>(imin<int64_t>(2, c1 - p));
            const int64_t n0 = p * NR, nv = imin<int64_t>(np * NR, N - n0);
            const bool whole = mr == 16 && nv == np * NR;
            float* c = whole ? C + m0 * ldc + n0 : edge;
            const int64_t ld = whole ? ldc : 2 * NR;
            if (!whole && onto)
              for (int r = 0; r < mr; ++r)
                std::memcpy(edge + r * ld, C + (m0 + r) * ldc + n0, sizeof(float) * nv);
            const float* bias_p = bias_k ? bias_k + n0 : nullptr;
            const bf16_t* b[2] = {b_split.p + (p - c0) * panel_size,
                                  b_split.p + (p + 1 - c0) * panel_size};
            const float* bs[2] = {bias_p, bias_p ? bias_p + NR : nullptr};
            const bf16_t* a = a_split + (g - g0) * a_tile;
            if (np == 2) amx_panels_summed<2>(kbs, a, b, c, ld, onto, apart, bs);
            else amx_panels_summed<1>(kbs, a, b, c, ld, onto, apart, bs);
            if (!whole)
              for (int r = 0; r < mr; ++r)
                std::memcpy(C + (m0 + r) * ldc + n0, edge + r * ld, sizeof(float) * nv);
          }
      }
    }
    }
  }
}
#endif  // FUSEDRNN_AMX

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
