// Vec<T> on AVX-512 (F, DQ): 16 floats or 8 doubles per register.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

#if defined(FUSEDRNN_AMX)
constexpr const char* kIsaName = "amx";  // this header's kernels, float32 products on AMX tiles
#else
constexpr const char* kIsaName = "avx512";
#endif

template <typename T> struct Vec;

template <>
struct Vec<float> {
  static constexpr int W = 16;
  using Mask = __mmask16;
  __m512 v;
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // The first n < W lanes (the rest zero / untouched), masked: no fault past them.
  static Vec load_first(const float* p, int n) { return {_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p)}; }
  void store_first(float* p, int n) const { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  static Vec sub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  static Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static Vec div(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  static Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
  static Vec neg(Vec a) {
    return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)))};
  }
  static Vec copysign(Vec a, Vec s) {
    __m512i sign = _mm512_set1_epi32(INT32_MIN);
    __m512i r = _mm512_ternarylogic_epi32(sign, _mm512_castps_si512(s.v), _mm512_castps_si512(a.v), 0xCA);
    return {_mm512_castsi512_ps(r)};  // 0xCA: bitwise sign ? s : a
  }
  static Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static Mask lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
  static Mask le(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ); }
  static Mask gt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
  static Vec select(Mask m, Vec if_true, Vec if_false) { return {_mm512_mask_blend_ps(m, if_false.v, if_true.v)}; }
  // a * 2^n for integer-valued n, rounded once (vscalefps): see math.h's HasScalef.
  static Vec scalef(Vec a, Vec n) { return {_mm512_scalef_ps(a.v, n.v)}; }
  static Vec pow2i(Vec n) {
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
  }
};

template <>
struct Vec<double> {
  static constexpr int W = 8;
  using Mask = __mmask8;
  __m512d v;
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  static Vec load_first(const double* p, int n) { return {_mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p)}; }
  void store_first(double* p, int n) const { _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), v); }
  static Vec set1(double x) { return {_mm512_set1_pd(x)}; }
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec add(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  static Vec sub(Vec a, Vec b) { return {_mm512_sub_pd(a.v, b.v)}; }
  static Vec mul(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  static Vec div(Vec a, Vec b) { return {_mm512_div_pd(a.v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  static Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_pd(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_pd(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_pd(a.v, b.v)}; }
  static Vec abs(Vec a) { return {_mm512_abs_pd(a.v)}; }
  static Vec neg(Vec a) {
    return {_mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MIN)))};
  }
  static Vec copysign(Vec a, Vec s) {
    __m512i sign = _mm512_set1_epi64(INT64_MIN);
    __m512i r = _mm512_ternarylogic_epi64(sign, _mm512_castpd_si512(s.v), _mm512_castpd_si512(a.v), 0xCA);
    return {_mm512_castsi512_pd(r)};  // as for float
  }
  static Vec round(Vec a) { return {_mm512_roundscale_pd(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static Mask lt(Vec a, Vec b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ); }
  static Mask le(Vec a, Vec b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_LE_OQ); }
  static Mask gt(Vec a, Vec b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_GT_OQ); }
  static Vec select(Mask m, Vec if_true, Vec if_false) { return {_mm512_mask_blend_pd(m, if_false.v, if_true.v)}; }
  static Vec scalef(Vec a, Vec n) { return {_mm512_scalef_pd(a.v, n.v)}; }
  static Vec pow2i(Vec n) {
    __m512i e = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(n.v)), _mm512_set1_epi64(1023));
    return {_mm512_castsi512_pd(_mm512_slli_epi64(e, 52))};
  }
};

// A 16 x 16 block of floats transposed: dst[i * ld_dst + j] = src[j * ld_src + i] (vec_avx2.h has
// the 8 x 8 one; vec.h's HasTransposeBlock says which builds have one). Rows in registers, then
// pairs, quads and 128-bit lanes interleaved: 64 shuffles for 256 values, where the
// element-by-element copy packed transposed weights at 12 GB/s (the training calls' W_ih^T and
// W_hh^T panels).
inline void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {  // lane L: rows 2i, 2i+1 at columns 4L, 4L+1 (lo), 4L+2, 4L+3 (hi)
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: column 4L + c of rows 4i .. 4i + 3
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i)  // row groups 2i, 2i+1: lanes 0 and 2 (0x88), 1 and 3 (0xDD)
    for (int c = 0; c < 4; ++c) {
      t[8 * i + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
      t[8 * i + 4 + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0xDD);
    }
  for (int c = 0; c < 8; ++c) {  // column c and c + 8: every row group's lane, in order
    _mm512_storeu_ps(dst + c * ld_dst, _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
    _mm512_storeu_ps(dst + (c + 8) * ld_dst, _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD));
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
