// A digest of a weight's bytes, taken by a training forward and again by its backward: the
// backward reads the weights (W_ih, W_hh, W_hr) with the gates the forward saved, so weights
// changed in place between the two would give gradients of neither model (torch.nn's autograd
// refuses that by its version counters; NumPy arrays have none). Fletcher's two sums (each
// lane's sum and its sum of running sums, mod 2^64: the second sees values that only moved)
// over the 64-bit words in 16 lanes, each word entering as itself plus the product of its two
// halves after a key. Added as words alone, changes that add one constant to every word
// cancelled (float64 weights negated, 2^63 a word: gone where each lane holds a multiple of 4
// words; doubled, 2^52 a word: gone at 8192 words a lane, 1 MiB); the product makes each
// word's change depend on its other bits. A change the digest misses must keep all 32 sums, which no update
// of the weights (a step, a scale, a sign, a reload of other values) can be expected to do.
// Compiled per ISA, the lanes in vectors of its width: 512 KB (online-small's W_ih and W_hh)
// from L2 in 4.5 us on AVX-512, 6.9 on AVX2, 15.5 on the generic build's SSE2 (Zen 5, C++ loop,
// best of 200; 16 scalar lanes, which GCC left unvectorised, took 24 us without the products).
// A copy of the bytes to compare with would take as long and double the weights' memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// The build's vector width, in bytes.
#if defined(__AVX512F__)
constexpr size_t kDigestVectorBytes = 64;
#elif defined(__AVX2__)
constexpr size_t kDigestVectorBytes = 32;
#else
constexpr size_t kDigestVectorBytes = 16;
#endif

// uint64 lanes in one vector of the build (GCC's and Clang's vector extension).
typedef uint64_t DigestLanes __attribute__((vector_size(kDigestVectorBytes)));

// Each lane's low 32 bits times its high 32 bits, as 64 bits: one multiply instruction where
// the ISA has it (the plain expression became a full 64-bit product, 3 instructions on AVX2).
inline DigestLanes halves_product(DigestLanes m) {
#if defined(__AVX512F__)
  return (DigestLanes)_mm512_mul_epu32((__m512i)m, (__m512i)(m >> 32));
#elif defined(__AVX2__)
  return (DigestLanes)_mm256_mul_epu32((__m256i)m, (__m256i)(m >> 32));
#elif defined(__SSE2__)
  return (DigestLanes)_mm_mul_epu32((__m128i)m, (__m128i)(m >> 32));
#else
  return (m & 0xffffffffull) * (m >> 32);
#endif
}

inline uint64_t weights_digest(const void* data, size_t bytes) {
  typedef DigestLanes Lanes;
  constexpr size_t kRun = 128, kVectors = kRun / sizeof(Lanes), kPerVector = sizeof(Lanes) / 8;
  // A key per lane (odd halves, from a fixed sequence), so no word's halves multiply as zeros
  // by the weights' own structure (float64 values of float16's or bfloat16's precision: their
  // low halves are all 0).
  Lanes key[kVectors], sum[kVectors] = {}, sum_of_sums[kVectors] = {};
  uint64_t k = 0x9e3779b97f4a7c15ull;
  for (size_t v = 0; v < kVectors; ++v)
    for (size_t l = 0; l < kPerVector; ++l) {
      k = k * 6364136223846793005ull + 1442695040888963407ull;
      key[v][l] = k | 0x0000000100000001ull;
    }
  const unsigned char* p = static_cast<const unsigned char*>(data);
  auto add = [&](const unsigned char* run) {
    for (size_t v = 0; v < kVectors; ++v) {
      Lanes words;
      std::memcpy(&words, run + v * sizeof(Lanes), sizeof(Lanes));
      const Lanes mixed = words ^ key[v];
      // the product of the word's two halves (32 x 32 -> 64 bits): a change of either half
      // changes it by an amount that depends on the other, so changes that add a constant to
      // every word (a sign flipped, an exponent stepped) do not cancel in the sums
      sum[v] += halves_product(mixed) + words;
      sum_of_sums[v] += sum[v];
    }
  };
  size_t i = 0;
  for (; i + kRun <= bytes; i += kRun) add(p + i);
  if (i < bytes) {  // the last bytes, zero padded
    unsigned char rest[kRun] = {};
    std::memcpy(rest, p + i, bytes - i);
    add(rest);
  }
  // The 32 sums folded into one value by a multiply-xorshift mix (sums traded between lanes do
  // not cancel), the length last.
  uint64_t h = 0x9e3779b97f4a7c15ull;
  auto mix = [&h](uint64_t v) {
    h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
  };
  for (size_t v = 0; v < kVectors; ++v)
    for (size_t l = 0; l < kPerVector; ++l) {
      mix(sum[v][l]);
      mix(sum_of_sums[v][l]);
    }
  mix(bytes);
  return h;
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
