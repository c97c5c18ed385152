// The floor under a single row's recurrent step on one core: the time to stream W_hh (G*H x H
// float32, too big for L1 at the overhead-bound configs) through the FMA pipes once, as a
// B = 1 step must, with nothing else in the loop. Each step of the forward streams it once and
// each step of the backward once more, so T steps of training cost at least 2 T of these.
//
//     g++ -O3 -march=native bench/l2_stream_bound.cpp -o /tmp/l2_stream_bound
//     /tmp/l2_stream_bound
//
// Prints, per size, the mean pass time (best of 20 runs of 1000) and the bandwidth it implies,
// then the floor for DESIGN.md's online-small and long-seq LSTM (T passes forward, 2 T
// training). Needs AVX-512 (the machine the recorded results come from); not part of the
// package or its tests.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// y = h W over a K x N weight laid out in panels of 128 columns (a unit block's 4 gates), k
// rows of a panel contiguous: the packed layout of the kernels' row step, walked from the last
// panel on odd passes as the kernels' steps do (the panels used last may still be in L1).
// 8 accumulators a panel: enough chains to hide the FMA latency, so the loads set the pace.
// Returns the mean time of a pass over runs of `passes` passes, the best run of `runs`.
double pass_ns(int K, int N, int passes, int runs) {
  constexpr int kPanel = 128, kVectors = kPanel / 16;
  const int panels = N / kPanel;
  float* w = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * K * N));
  for (long i = 0; i < long(K) * N; ++i) w[i] = float(i % 7) * 0.01f;
  std::vector<float> h(K, 0.5f), y(N);
  double best = 1e30;
  for (int run = 0; run < runs; ++run) {
    const auto start = std::chrono::steady_clock::now();
    for (int pass = 0; pass < passes; ++pass) {
      for (int i = 0; i < panels; ++i) {
        const int p = (pass & 1) ? panels - 1 - i : i;
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
      h[pass % K] += y[pass % N] * 1e-9f;  // the next pass depends on this one, as a step's does
    }
    const double ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    best = ns / passes < best ? ns / passes : best;
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
    const double ns = pass_ns(K, N, 1000, 20);
    const double kib = double(K) * N * sizeof(float) / 1024;
    std::printf("%-18s W_hh %5.0f KiB: %6.0f ns a pass (%.0f GB/s); floor %.3f ms inference "
                "(T = %d passes), %.3f ms training (2 T)\n",
                c.name, kib, ns, kib * 1024 / ns, ns * c.T * 1e-6, c.T, 2 * ns * c.T * 1e-6);
  }
  return 0;
}
