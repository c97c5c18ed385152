// The floor under a single row's recurrent step on one core: the time to stream W_hh (G*H x H
// float32, too big for L1 at the overhead-bound configs) through the FMA pipes once, as a
// B = 1 step must, with nothing else in the loop. Each step of the forward streams it once and
// each step of the backward once more, so T steps of training cost at least 2 T of these.
//
//     g++ -O3 -march=native bench/l2_stream_bound.cpp -o /tmp/l2_stream_bound
//     /tmp/l2_stream_bound
//
// Prints, per size, the best pass time over many passes and the bandwidth it implies, then the
// floor for DESIGN.md's online-small and long-seq LSTM (T passes forward, 2 T training). Needs
// AVX-512 (the machine the recorded results come from); not part of the package or its tests.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// y = h W over a K x N weight laid out in panels of 128 columns (a unit block's 4 gates), k
// rows of a panel contiguous: the packed layout of the kernels' row step. 8 accumulators, two
// interleaved k-halves: enough chains to hide the FMA latency, so the loads set the pace.
double best_pass_ns(int K, int N, int passes) {
  constexpr int kPanel = 128, kVectors = kPanel / 16;
  float* w = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * K * N));
  for (long i = 0; i < long(K) * N; ++i) w[i] = float(i % 7) * 0.01f;
  std::vector<float> h(K, 0.5f), y(N);
  double best = 1e30;
  for (int rep = 0; rep < passes; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (int p = 0; p < N / kPanel; ++p) {
      const float* wp = w + long(p) * K * kPanel;
      __m512 acc[kVectors];
      for (int v = 0; v < kVectors; ++v) acc[v] = _mm512_setzero_ps();
      for (int k = 0; k < K; ++k) {
        const __m512 hk = _mm512_set1_ps(h[k]);
        for (int v = 0; v < kVectors; ++v)
          acc[v] = _mm512_fmadd_ps(hk, _mm512_load_ps(wp + long(k) * kPanel + 16 * v), acc[v]);
      }
      for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(&y[p * kPanel + 16 * v], acc[v]);
    }
    h[rep % K] += y[rep % N] * 1e-9f;  // the next pass depends on this one, as a step's does
    const double ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    if (ns < best) best = ns;
  }
  std::free(w);
  return best;
}

}  // namespace

int main() {
  struct Config {
    const char* name;
    int T, H;
  };
  const Config configs[] = {{"online-small LSTM", 100, 128}, {"long-seq LSTM", 1000, 64}};
  for (const Config& c : configs) {
    const int K = c.H, N = 4 * c.H;  // W_hh^T: H x 4H
    const double ns = best_pass_ns(K, N, 20000);
    const double kib = double(K) * N * sizeof(float) / 1024;
    std::printf("%-18s W_hh %5.0f KiB: %6.0f ns a pass (%.0f GB/s); floor %.3f ms inference "
                "(T = %d passes), %.3f ms training (2 T)\n",
                c.name, kib, ns, kib * 1024 / ns, ns * c.T * 1e-6, c.T, 2 * ns * c.T * 1e-6);
  }
  return 0;
}
