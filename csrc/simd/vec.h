// Vec<T>: the one SIMD abstraction every kernel is written against.
//
// This header is included only by translation units compiled once per ISA (csrc/isa_kernels.cpp),
// each inside its own namespace fusedrnn::FUSEDRNN_ISA_NS, so the same source becomes an AVX-512,
// an AVX2+FMA and a portable build. The compiler flags of that unit pick the implementation.
// Rule: no SIMD constants at namespace scope (they would run before dispatch and could fault).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include "simd/vec_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "simd/vec_avx2.h"
#else
#include "simd/vec_generic.h"
#endif

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Loads and stores of the first n < W lanes (tails), masked. Through a stack buffer and memcpy,
// as before, a layer whose H is no multiple of W paid a call to memcpy for every tail vector of
// every row and step: LSTM T = 500, B = 4, 1 thread, 0.14 ms at H = 16, 0.36 ms at H = 15.
template <typename T>
inline Vec<T> load_partial(const T* p, int n) { return Vec<T>::load_first(p, n); }
template <typename T>
inline void store_partial(T* p, Vec<T> v, int n) { v.store_first(p, n); }

// Whether this ISA's header has transpose_block(src, ld_src, dst, ld_dst) for T: a W x W block
// transposed in registers (AVX-512 and AVX2, floats). Elsewhere gemm.h's packing goes element
// by element, which was faster than a W x W block copied so.
template <typename T, typename = void>
struct HasTransposeBlock : std::false_type {};
template <typename T>
struct HasTransposeBlock<T, std::void_t<decltype(transpose_block(
                                static_cast<const T*>(nullptr), int64_t(0), static_cast<T*>(nullptr), int64_t(0)))>>
    : std::true_type {};

template <typename T> inline Vec<T> operator+(Vec<T> a, Vec<T> b) { return Vec<T>::add(a, b); }
template <typename T> inline Vec<T> operator-(Vec<T> a, Vec<T> b) { return Vec<T>::sub(a, b); }
template <typename T> inline Vec<T> operator*(Vec<T> a, Vec<T> b) { return Vec<T>::mul(a, b); }
template <typename T> inline Vec<T> operator/(Vec<T> a, Vec<T> b) { return Vec<T>::div(a, b); }

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
