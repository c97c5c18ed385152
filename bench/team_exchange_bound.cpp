// The floor under a step team's meeting on two cores: what a single row's team (forward.h's
// hidden-unit split, backward.h's halves) pays every step to hand each member the other's half
// of the new state, with no arithmetic at all. Three ways, each over many rounds:
//   barrier:     StepBarrier's one-line barrier (an arrival count and a generation), empty;
//   own flags:   each member stores a count on a line of its own and spins on the other's;
//   barrier + data: each member writes its 32 floats (128 bytes, long-seq's half of h), meets
//                at the barrier, then reads the other's 32 (what a team step does);
//   data + seq:  each 64-byte line holds 15 floats and a step count that its writer stores
//                last (release); the reader spins on the counts, so no barrier line moves.
// The way with the fewest lines crossing per round is not the fastest here: on this KVM guest
// (Zen 4) a line of one's own per member ran slower than the shared one (see bench/HOSTS.md).
//
//     g++ -O2 -std=c++17 -pthread bench/team_exchange_bound.cpp -o /tmp/team_exchange_bound
//     /tmp/team_exchange_bound
//
// Prints ns per round (member 0's wall time / rounds), four runs each. Threads are not pinned:
// the OS places them as it places the package's OpenMP team. Not part of the package or tests.
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

namespace {

constexpr int kValues = 32;  // one member's half of the state (long-seq LSTM: H = 64)
constexpr int kRounds = 200000;
volatile float g_sink;

struct Barrier {  // StepBarrier's spin path, without the sleep
  std::atomic<int> arrived{0};
  std::atomic<unsigned> generation{0};
  void wait() {
    const unsigned gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == 2) {
      arrived.store(0, std::memory_order_relaxed);
      generation.store(gen + 1, std::memory_order_seq_cst);
      return;
    }
    while (generation.load(std::memory_order_acquire) == gen) _mm_pause();
  }
};

struct alignas(64) Count {
  std::atomic<unsigned> value{0};
};

struct alignas(64) SeqLine {
  float values[15];
  std::atomic<unsigned> seq{0};
};
constexpr int kSeqLines = (kValues + 14) / 15;

// Runs body(member, round) on two threads; ns per round on member 0.
template <typename Body>
double ns_per_round(Body body) {
  double ns = 0;
  auto member = [&](int m) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < kRounds; ++i) body(m, i);
    if (m == 0)
      ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start)
               .count() / kRounds;
  };
  std::thread other(member, 1);
  member(0);
  other.join();
  return ns;
}

double barrier_only() {
  Barrier b;
  return ns_per_round([&](int, int) { b.wait(); });
}

double own_flags() {
  Count counts[2];
  return ns_per_round([&](int m, int i) {
    counts[m].value.store(unsigned(i + 1), std::memory_order_release);
    while (counts[1 - m].value.load(std::memory_order_acquire) < unsigned(i + 1)) _mm_pause();
  });
}

double barrier_and_data() {
  Barrier b;
  alignas(64) static float halves[2][2][kValues];  // [round parity][member]
  float sums[2] = {0, 0};
  const double ns = ns_per_round([&](int m, int i) {
    float* mine = halves[i & 1][m];
    for (int k = 0; k < kValues; ++k) mine[k] = float(i + k);
    b.wait();
    const float* other = halves[i & 1][1 - m];
    for (int k = 0; k < kValues; ++k) sums[m] += other[k];
  });
  g_sink = sums[0] + sums[1];  // keeps the reads
  return ns;
}

double data_with_seq() {
  static SeqLine lines[2][2][kSeqLines];  // [round parity][member][line]
  for (auto& parity : lines)
    for (auto& member : parity)
      for (SeqLine& line : member) line.seq.store(0);  // (a run before left its counts)
  float sums[2] = {0, 0};
  const double ns = ns_per_round([&](int m, int i) {
    SeqLine* mine = lines[i & 1][m];
    for (int k = 0; k < kValues; ++k) mine[k / 15].values[k % 15] = float(i + k);
    for (int l = 0; l < kSeqLines; ++l) mine[l].seq.store(unsigned(i + 1), std::memory_order_release);
    const SeqLine* other = lines[i & 1][1 - m];
    for (int l = 0; l < kSeqLines; ++l)
      while (other[l].seq.load(std::memory_order_acquire) < unsigned(i + 1)) _mm_pause();
    for (int k = 0; k < kValues; ++k) sums[m] += other[k / 15].values[k % 15];
  });
  g_sink = sums[0] + sums[1];
  return ns;
}

}  // namespace

int main() {
  std::printf("ns per round, 2 threads (%d values a member)\n", kValues);
  std::printf("%10s %10s %15s %12s\n", "barrier", "own flags", "barrier + data", "data + seq");
  for (int run = 0; run < 4; ++run)
    std::printf("%10.1f %10.1f %15.1f %12.1f\n", barrier_only(), own_flags(), barrier_and_data(),
                data_with_seq());
}
