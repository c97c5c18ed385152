// A digest of a weight's bytes, taken by a training forward and again by its backward: the
// backward reads the weights (W_ih, W_hh, W_hr) with the gates the forward saved, so weights
// changed in place between the two would give gradients of neither model (torch.nn's autograd
// refuses that by its version counters; NumPy arrays have none). Fletcher's sums over 64-bit
// words in kLanes lanes: each lane's sum and its sum of running sums, mod 2^64. Any change to
// one word changes both; a change the digest misses must keep every lane's two sums, which an
// update of the weights (by a step, a scale, a reload of other values) does not. Compiled per
// ISA, the lanes in vectors of its width: 512 KB (online-small's W_ih and W_hh) from L2 in 2.9 us
// on AVX-512, 3.7 on AVX2, 11 on the generic build's SSE2 (Zen 5; 16 scalar lanes that GCC left
// unvectorised took 24 us, a training call's 3-7%). A copy of the bytes to compare with would
// take as long and double the weights' memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

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

inline uint64_t weights_digest(const void* data, size_t bytes) {
  // 16 lanes of 64 bits in vectors of the build's width (GCC's and Clang's vector extension),
  // so that the adds are vector adds.
  typedef uint64_t Lanes __attribute__((vector_size(kDigestVectorBytes)));
  constexpr size_t kRun = 128, kVectors = kRun / sizeof(Lanes), kPerVector = sizeof(Lanes) / 8;
  Lanes sum[kVectors] = {}, sum_of_sums[kVectors] = {};
  const unsigned char* p = static_cast<const unsigned char*>(data);
  auto add = [&](const unsigned char* run) {
    for (size_t v = 0; v < kVectors; ++v) {
      Lanes words;
      std::memcpy(&words, run + v * sizeof(Lanes), sizeof(Lanes));
      sum[v] += words;
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
  // The lanes folded into one value (a multiply-xorshift mix between them, so that sums
  // traded between lanes do not cancel), the length last.
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
