// Adaptive threads. A layer call on two threads meets its teammate at a barrier every step (and
// at the end of every parallel GEMM), so it is only as fast as the slower core's turn: when
// another process holds one core, or this VM moves its two vCPUs apart, such a call can run far
// slower than on one thread. Long-seq LSTM, 2 threads: 0.65 ms on a quiet machine, 1.27 ms in
// this VM's slow phase, and beside a busy process a 0.65 ms median but a 6.2 ms mean (some calls
// wait a time slice or more), against 0.96 ms on one thread. With the adaptive mode on (it is
// off by default: kernel_api.h, set_team_mode), every call asked to run on several threads
// reports its time per step here, and the policy (team_policy.h) decides, per shape, whether the
// next call of that shape uses them. Results do not depend on it: every output is the same FMA
// chain for any number of threads.
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <tuple>
#include "kernel_api.h"
#include "team_policy.h"

namespace fusedrnn {
namespace {

using Key = std::tuple<const char*, int, int, bool, int64_t, int64_t, int64_t, int64_t, int, int>;

struct Policies {
  std::mutex mu;
  std::map<Key, TeamPolicyState> states;
  std::atomic<int> mode{kTeamFixed};  // see kernel_api.h, set_team_mode
  std::atomic<int64_t> calls[2] = {{0}, {0}};  // adaptive calls run alone, on the threads
};

Policies& policies() {
  static Policies* p = new Policies();  // never destroyed: calls may run during interpreter exit
  return *p;
}

Key key_of(const TeamKey& k) {
  return Key{k.isa, k.dtype_bytes, k.cell, k.backward, k.B, k.I, k.H, k.Hout, k.nthreads,
             step_count_bucket(k.T)};
}

}  // namespace

bool team_policy_choose(const TeamKey& key) {
  Policies& p = policies();
  const int mode = p.mode.load(std::memory_order_relaxed);
  if (mode != kTeamAdaptive) return mode == kTeamFixed;
  std::lock_guard<std::mutex> lock(p.mu);
  if (p.states.size() > 4096) p.states.clear();  // bounded: shapes come and go
  return p.states[key_of(key)].choose_team();
}

void team_policy_report(const TeamKey& key, bool used_team, double ns_per_step) {
  Policies& p = policies();
  if (p.mode.load(std::memory_order_relaxed) != kTeamAdaptive) return;
  p.calls[used_team ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(p.mu);
  p.states[key_of(key)].report(used_team, ns_per_step);
}

void set_team_mode(int mode) {
  Policies& p = policies();
  p.mode.store(mode, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(p.mu);
  p.states.clear();
}

int team_mode() { return policies().mode.load(std::memory_order_relaxed); }

int64_t team_policy_calls(bool team) {
  return policies().calls[team ? 1 : 0].load(std::memory_order_relaxed);
}

// Stacked forwards (sequence/layer_pipeline.h), by how they ran.
namespace {
std::atomic<int64_t> g_stack_calls[2] = {{0}, {0}};
}  // namespace

void stack_count(bool pipelined) { g_stack_calls[pipelined].fetch_add(1, std::memory_order_relaxed); }
int64_t stack_calls(bool pipelined) { return g_stack_calls[pipelined].load(std::memory_order_relaxed); }

// Bidirectional layers' forwards and backwards (sequence/direction_pair.h), by how they ran.
namespace {
std::atomic<int64_t> g_direction_calls[2] = {{0}, {0}};
}  // namespace

void direction_count(bool side_by_side) {
  g_direction_calls[side_by_side].fetch_add(1, std::memory_order_relaxed);
}
int64_t direction_calls(bool side_by_side) {
  return g_direction_calls[side_by_side].load(std::memory_order_relaxed);
}

// Calls whose single row walked on one thread while another took work beside it: the backward's
// products chunk by chunk (after the walk, or beside it) and the forward's projection.
namespace {
std::atomic<int64_t> g_beside_walk[3] = {{0}, {0}, {0}};
}  // namespace

void beside_walk_count(BesideWalk way) {
  g_beside_walk[int(way)].fetch_add(1, std::memory_order_relaxed);
}
int64_t beside_walk_calls(BesideWalk way) {
  return g_beside_walk[int(way)].load(std::memory_order_relaxed);
}

namespace {
std::atomic<int64_t> g_gathered_chunks{0};
}  // namespace
void gathered_chunks_count() { g_gathered_chunks.fetch_add(1, std::memory_order_relaxed); }
int64_t gathered_chunks() { return g_gathered_chunks.load(std::memory_order_relaxed); }

// The step teams' in-call probe (sequence/team_probe.h): its counts, the tests' override, and
// its verdicts remembered. A probe times some steps alone and some as a team, and the loser's
// steps cost: online-small RNN inference on 2 threads with the cores far apart, 0.093 ms a call
// against 0.083 on one thread. This VM keeps the cores apart or close for minutes, and a shape's
// verdict held in every call (online-small, 200 calls: RNN alone in 199, GRU and LSTM the team
// in 198 and 199), so after a probe that found the cores far apart, the next kRecallCalls calls
// of the shape within kRecallMs take its verdict without probing. Cores found close are not
// remembered: that check is four empty meetings, nearly free.
namespace {
std::atomic<int64_t> g_probe_calls[5] = {{0}, {0}, {0}, {0}, {0}};
std::atomic<int> g_probe_override{-1};

constexpr int kRecallCalls = 15;
constexpr int kRecallMs = 500;
std::atomic<int> g_recall_ms{kRecallMs};  // kRecallMs, or what a test set (set_probe_recall_ms)

struct ProbeMemo {
  int verdict;
  int calls_left;
  std::chrono::steady_clock::time_point until;
};

struct ProbeMemory {
  std::mutex mu;
  std::map<Key, ProbeMemo> memos;
};

ProbeMemory& probe_memory() {
  static ProbeMemory* m = new ProbeMemory();  // never destroyed, as policies()
  return *m;
}
}  // namespace

void probe_count(int verdict) { g_probe_calls[verdict].fetch_add(1, std::memory_order_relaxed); }
int64_t probe_calls(int verdict) { return g_probe_calls[verdict].load(std::memory_order_relaxed); }
void set_probe_override(int verdict) {
  g_probe_override.store(verdict, std::memory_order_relaxed);
  ProbeMemory& m = probe_memory();
  std::lock_guard<std::mutex> lock(m.mu);
  m.memos.clear();
}
int probe_override() { return g_probe_override.load(std::memory_order_relaxed); }

int probe_recall(const TeamKey& key) {
  ProbeMemory& m = probe_memory();
  std::lock_guard<std::mutex> lock(m.mu);
  const auto it = m.memos.find(key_of(key));
  if (it == m.memos.end()) return kProbeNone;
  ProbeMemo& memo = it->second;
  if (memo.calls_left <= 0 || std::chrono::steady_clock::now() > memo.until) {
    m.memos.erase(it);
    return kProbeNone;
  }
  --memo.calls_left;
  return memo.verdict;
}

void probe_remember(const TeamKey& key, int verdict) {
  ProbeMemory& m = probe_memory();
  std::lock_guard<std::mutex> lock(m.mu);
  if (verdict != kProbeFarTeam && verdict != kProbeFarAlone) {
    m.memos.erase(key_of(key));
    return;
  }
  if (m.memos.size() > 4096) m.memos.clear();  // bounded: shapes come and go
  const std::chrono::milliseconds recall{g_recall_ms.load(std::memory_order_relaxed)};
  m.memos[key_of(key)] = ProbeMemo{verdict, kRecallCalls, std::chrono::steady_clock::now() + recall};
}

int set_probe_recall_ms(int ms) {
  return g_recall_ms.exchange(ms < 0 ? kRecallMs : ms, std::memory_order_relaxed);
}

// The shared unit blocks of large team steps (sequence/block_queue.h): counts and the tests' lag.
namespace {
std::atomic<int64_t> g_team_blocks[2] = {{0}, {0}};
std::atomic<int> g_team_lag_us{0};
}  // namespace

void team_blocks_count(bool taken_over, int64_t n) {
  g_team_blocks[taken_over].fetch_add(n, std::memory_order_relaxed);
}
int64_t team_blocks(bool taken_over) { return g_team_blocks[taken_over].load(std::memory_order_relaxed); }
void set_team_lag_us(int us) { g_team_lag_us.store(us, std::memory_order_relaxed); }
int team_lag_us() { return g_team_lag_us.load(std::memory_order_relaxed); }

}  // namespace fusedrnn
