// The contract between the pybind11 layer (compiled once, portable) and the kernels (compiled
// once per ISA, see isa_kernels.cpp). Plain structs and declarations: an inline function in a
// header shared by differently-compiled units could be linked from the wrong ISA's object. The
// two inline helpers here (gate_count, step_count_bucket) are for the portable units only; the
// kernels have their own gates_of (sequence/layout.h).
//
// Time is walked in "steps": step s of row b consumes time t = s (forward direction) or
// t = len_b - 1 - s (reverse direction), and is active while s < len_b. Saved training buffers
// are indexed by step; inputs, outputs and dGx by time.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fusedrnn {

enum class Cell : int { RnnTanh = 0, RnnRelu = 1, Lstm = 2, Gru = 3 };

inline int gate_count(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

// The values the AMX kernels' exact split into three bfloat16 parts takes (gemm/amx.h,
// amx_unsplittable): finite and at most kAmxSplitMax in magnitude, and zero or from
// kAmxSplitMin up (below, the low part is a denormal, which the tiles take as 0). The parts of
// a value may differ in sign (3e38 = 3.004e38 - 4.05e35 - ...), so where a product passed
// float32's largest by 2^8 its high and middle part products overflowed to opposite infinities
// and summed to NaN (the FMA kernels and torch: the infinity). Under 2^63, no part product of
// two values reaches 2^126 (1 + 2^-8)^2, below float32's largest. The bindings keep padding
// outside them (arrays.h).
constexpr float kAmxSplitMax = 0x1p63f;
constexpr float kAmxSplitMin = 0x1p-100f;

struct LayerShape {
  int64_t T, B, I, H, Hout;  // steps, batch, input, hidden, output (= proj size or H)
  Cell cell;
  bool linear_before_reset;  // GRU only
  bool reverse;
  bool has_bias;
  bool has_proj;
};
// The one-step shape the diagnostics (step_split, projection_mode) ask the rules about: GRU
// with linear_before_reset, forward in time, with biases, a projection where Hout != H.
inline LayerShape diagnostic_shape(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout) {
  return LayerShape{1, B, I, H, Hout, static_cast<Cell>(cell), true, false, true, Hout != H};
}

// ONNX's activation functions (its RNN, LSTM and GRU operators' `activations`), each with the
// alpha and beta that some take: Affine a*x + b, LeakyRelu x < 0 ? a*x : x, ThresholdedRelu
// x <= a ? 0 : x, ScaledTanh a*tanh(b*x), HardSigmoid min(max(a*x + b, 0), 1), Elu x < 0 ?
// a*(e^x - 1) : x, Softsign x/(1 + |x|), Softplus log(1 + e^x).
enum class Activation : int { Sigmoid = 0, Tanh, Relu, Affine, LeakyRelu, ThresholdedRelu,
                              ScaledTanh, HardSigmoid, Elu, Softsign, Softplus };
template <typename T>
struct ActivationFn {
  Activation kind;
  T alpha, beta;
};

// ONNX's options for a cell beyond torch.nn's (fusedrnn.onnx_ops; inference only): the
// activation functions f, g, h (LSTM: gates i, f, o; the cell input; the new cell state before
// o. GRU: gates r, z; the new candidate n. RNN: f alone), clip of every activation's input, and
// the LSTM's peepholes and coupled input and forget gates. The gates' inputs are those of
// torch's cells (biases included); only the functions applied to them change.
template <typename T>
struct OnnxCell {
  ActivationFn<T> f, g, h;
  T clip;               // an activation's input is clamped to [-clip, clip]; +infinity: none
  bool input_forget;    // LSTM: f = 1 - i (the forget gate's weights unused)
  const T* peepholes;   // LSTM: (3, H), gates i, f, o, or null (zeros)
};

// What a training forward keeps for BPTT; all buffers owned by the caller.
template <typename T>
struct SavedState {
  T* gates;     // (T, B, G*H) activated gates, by step (unused for RNN: h itself suffices)
  T* h;         // (T+1, B, Hout) states by step, h[0] = h0
  T* c;         // (T+1, B, H) LSTM cell states by step, c[0] = c0; else null
  T* hfull;     // (T, B, H) LSTM o*tanh(c) before the projection; else null
  T* gru_extra; // (T, B, H) GRU: W_hn h + b_hn (linear_before_reset) or r*h (not); else null
};

// A step team's in-call probe (sequence/team_probe.h) across calls of one shape: the verdict an
// earlier call's probe found, for this call to take without probing (kProbeNone: probe), and
// what this call's probe found (kProbeNone: it did not probe). run_threads_or_alone fills it.
enum ProbeVerdict : int { kProbeNone = -1, kProbeClose = 0, kProbeFarTeam = 1, kProbeFarAlone = 2,
                          kProbeRecalledTeam = 3, kProbeRecalledAlone = 4 };
struct ProbeNote {
  int recalled = kProbeNone;
  int verdict = kProbeNone;
};

template <typename T>
struct ForwardArgs {
  LayerShape s;
  T* y;               // (T, B, Hout) output, zero past each row's length
  T* hn;              // (B, Hout) final state
  T* cn;              // (B, H) LSTM final cell state, else null
  const T* x;         // (T, B, I) input
  const T* h0;        // (B, Hout) initial state
  const T* c0;        // (B, H) LSTM initial cell state, else null
  const T* w_ih;      // (G*H, I)
  const T* w_hh;      // (G*H, Hout)
  const T* b_ih;      // (G*H) or null
  const T* b_hh;      // (G*H) or null
  const T* w_hr;      // (Hout, H) projection, or null
  const int64_t* lengths;  // (B) in 1..T, or null (all T)
  SavedState<T> saved;     // all null in inference
  // Inference (nothing saved) that takes a training call's ways, so its outputs have that call's
  // bits: a stack's layer below the lowest one a backward runs through (the torch adapter's
  // save_from), whose output the trained layers above read.
  bool training_bits = false;
  int num_threads;
  // Nonzero: the weights hold the same bytes as in every earlier call that passed this id (a
  // layer's freeze(): read-only copies of its own); their cached packed forms are then used
  // without comparing the weights with the copies of their bytes (cached_packed).
  uint64_t frozen = 0;
  // False: the weights are copies made for this call alone (fusedrnn.onnx_ops's gates in
  // torch's order, a bfloat16 module's float32 casts), freed after it and never met again: the
  // call packs them into buffers of its own and keeps no forms in the packed-weight cache, which
  // such calls filled with dead forms up to its budget (PanelReuse).
  bool keep_packed = true;
  // Training: where x goes packed as the backward's dW_ih = dG^T X takes it (pack_b_gemm,
  // KernelTable::gemm_b_elems long), so that a context which must not keep the caller's x (who
  // may reuse its buffer) keeps this instead of a copy that the backward would pack again; or
  // null (the context keeps x itself, or a plain copy: a single row's, whose backward may slice
  // it by time, or where packing pads x's rows much; bindings/forward.cpp).
  T* x_packed = nullptr;
  ProbeNote* probe_note = nullptr;  // see ProbeNote, or null: every call probes
  // ONNX's cell options, or null (torch.nn's cells). Inference only, and no projection.
  const OnnxCell<T>* onnx = nullptr;
  // Training: where the digests of w_ih, w_hh and w_hr (0 for none) go, taken after the steps
  // (the weights are then in this core's caches), for the backward to check the weights it reads
  // against (weights_digest.h); or null.
  uint64_t* weight_digests = nullptr;
};

template <typename T>
struct BackwardArgs {
  LayerShape s;
  T* dx;              // (T, B, I), or null: the caller needs no input gradient
  T* dh0;             // (B, Hout)
  T* dc0;             // (B, H) LSTM, else null
  // The weight and bias gradients: all null where the caller needs none (a frozen layer).
  T* dw_ih;           // (G*H, I)      overwritten, or added into (accumulate)
  T* dw_hh;           // (G*H, Hout)   the same
  T* db_ih;           // (G*H) or null the same
  T* db_hh;           // (G*H) or null the same
  T* dw_hr;           // (Hout, H) or null the same
  const T* dy;        // (T, B, Hout) upstream gradient of y
  const T* dhn;       // (B, Hout) or null
  const T* dcn;       // (B, H) or null
  const T* x;         // forward inputs, as in ForwardArgs
  const T* w_ih;
  const T* w_hh;
  const T* w_hr;
  const int64_t* lengths;
  SavedState<T> saved;
  int num_threads;
  uint64_t frozen = 0;  // as ForwardArgs::frozen
  const T* x_packed = nullptr;  // ForwardArgs::x_packed, filled; or null: x is packed here
  // The states dW_hh's product reads, (T + 1, B, Hout) as saved.h: saved.h where null, else a
  // copy whose rows past each row's length are zeros (bindings/backward.cpp: a finished row's
  // carried state is not finite there, and 0 * inf in the product would be NaN).
  const T* h_prev_products = nullptr;
  // Add the weight and bias gradients into dw_* and db_* (a layer's gradients, accumulated as
  // torch's are) instead of overwriting them: no array of their own and no pass to add it.
  bool accumulate = false;
  // The caller never runs backward on this saved state again (the layers forget it after their
  // backward): the pre-activation gradients may then overwrite the saved gates, step by step as
  // each step's gates are read (backward.h), instead of taking a buffer of their own.
  bool gates_consumed;
  ProbeNote* probe_note = nullptr;  // as ForwardArgs::probe_note
};

// What KernelTable::step_split tells.
constexpr int kForwardSplit = 0, kBackwardSplit = 1, kSharedBlockRows = 2, kSharedBlockVector = 3;

// Entry points of one ISA build. func codes for math: 0 exp, 1 tanh, 2 sigmoid.
struct KernelTable {
  const char* isa;
  int vector_bytes;
  void (*math_f32)(int func, const float* x, float* y, int64_t n);
  void (*math_f64)(int func, const double* x, double* y, int64_t n);
  // C(M,N) = A(M,K) B(K,N) (+ C if accumulate); element strides given for A and B.
  void (*gemm_f32)(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
                   const float* B, int64_t b_rs, int64_t b_cs, float* C, int64_t ldc, bool accumulate,
                   int num_threads);
  void (*gemm_f64)(int64_t M, int64_t N, int64_t K, const double* A, int64_t a_rs, int64_t a_cs,
                   const double* B, int64_t b_rs, int64_t b_cs, double* C, int64_t ldc,
                   bool accumulate, int num_threads);
  void (*forward_f32)(const ForwardArgs<float>& a);
  void (*forward_f64)(const ForwardArgs<double>& a);
  // n layers bottom to top, layer k's x being layer k - 1's y (sequence/layer_pipeline.h).
  void (*forward_stack_f32)(const ForwardArgs<float>* layers, int n);
  void (*forward_stack_f64)(const ForwardArgs<double>* layers, int n);
  // A bidirectional layer's two directions, dirs[0] forward, dirs[1] reverse, on one x
  // (sequence/direction_pair.h).
  void (*forward_directions_f32)(const ForwardArgs<float>* dirs);
  void (*forward_directions_f64)(const ForwardArgs<double>* dirs);
  void (*backward_f32)(const BackwardArgs<float>& a);
  void (*backward_f64)(const BackwardArgs<double>& a);
  void (*backward_directions_f32)(const BackwardArgs<float>* dirs);
  void (*backward_directions_f64)(const BackwardArgs<double>* dirs);
  // How the forward spreads a step over threads: 0 one thread, 1 batch rows, 2 hidden units;
  // with query kBackwardSplit, how the backward does without lengths: 0 one thread, 1 a team
  // whose members walk their own rows and never meet (backward.h, backward_rows_apart), 3 a team
  // (rows and column panels), 4 the two halves of a single row's units (k_split_backward); with
  // kSharedBlockRows, the row from which member 1 of a team split by hidden units takes member
  // 0's last unit block (share_boundary_block), or 0; with kSharedBlockVector, 1 where member 1
  // takes the second vector of member 0's last unit block instead (share_boundary_vector).
  int (*step_split)(int cell, bool f64, int64_t B, int64_t I, int64_t H, int64_t Hout,
                    int num_threads, int query);
  // How the forward computes x_t W_ih^T: one GEMM before the loop (0), inside each step's tiles
  // (1), or riding along the steps of a single row (2); sequence/projection_mode.h.
  int (*projection_mode)(int cell, bool f64, int64_t B, int64_t I, int64_t H, int64_t Hout,
                         bool lengths);
  // ns per empty meeting of a step team of num_threads (0 for one thread): how far apart the
  // cores are right now (the benchmark records it beside every 2-thread case).
  double (*team_barrier_ns)(int num_threads, int rounds);
  // The cache sizes the kernels plan for (common.h): one core's L2 (level 2) and the shared L3.
  int64_t (*cache_bytes)(int level);
  // How many k-steps ahead the micro-kernels prefetch their weight panels on this CPU, 0 for
  // none (common.h, prefetch_b_ahead).
  int (*prefetch_ahead)();
  // Elements of a K x N operand packed for the GEMM (pack_b_gemm): ForwardArgs::x_packed's size.
  int64_t (*gemm_b_elems)(int64_t K, int64_t N, bool f64);
  // A digest of `bytes` bytes (weights_digest.h): a training forward's weights, checked again by
  // its backward.
  uint64_t (*digest)(const void* data, size_t bytes);
};

// Defined in workspace.cpp (portable unit): 64-byte aligned scratch memory.
void* aligned_alloc_bytes(size_t bytes);
void aligned_free_bytes(void* p);
// Gives the idle blocks kept for reuse back to the system (fusedrnn.empty_cache).
void free_idle_blocks();
// Bytes of the blocks handed out and not freed (as asked for), their most at once since the last
// reset_peak (which sets it to the bytes in use), and the bytes of the idle blocks kept for reuse.
void workspace_bytes(size_t* in_use, size_t* peak, size_t* idle, bool reset_peak);
// Tests: the next n block allocations made on OpenMP worker threads (not a region's first
// thread) throw std::bad_alloc, as a worker running out of memory does; 0 (the default) none.
void fail_worker_allocations(int64_t n);

// Packed-weight cache (workspace.cpp), per calling thread. cached_packed returns the buffer
// for the packed form of src (raw_bytes long) under tag, and sets *valid when it was packed from
// bytes identical to src's current ones; otherwise the caller packs into it. rows x cols is the
// source's shape (part of the key with the tag). Null means "too big to cache: pack into your own
// buffer". Buffers stay valid until the next packed_cache_begin_call. nthreads: threads for the
// comparison. *pack_from: what to pack from when not valid (the copy of the bytes compared, else
// src). frozen (nonzero): src's bytes are those of the last call with this id (ForwardArgs::frozen):
// no comparison now, and no copy of the bytes kept for one.
void packed_cache_begin_call();
void* cached_packed(const void* src, size_t raw_bytes, size_t packed_bytes, int64_t tag, int64_t rows,
                    int64_t cols, bool* valid, const void** pack_from, int nthreads,
                    uint64_t frozen = 0);
// What the calling thread's cache holds: packed forms, copies of weights' bytes, and bytes of both.
void packed_cache_stats(size_t* forms, size_t* copies, size_t* bytes);
// Empties the calling thread's cache (the next calls pack again).
void packed_cache_clear();
// Empties it and those of the calling thread's OpenMP workers that a pipelined stack ran layers
// on (layer_pipeline.h), or a bidirectional layer its reverse direction (direction_pair.h),
// which live as long as the workers do: empty_cache().
void packed_cache_clear_team();
// A pipelined stack (or a direction pair) is about to run on n threads of the calling thread's
// team.
void note_pipeline_team(int n);
// Packed forms the caches of all threads hold together.
int64_t packed_forms_all_threads();

// Adaptive threads (team_policy.cpp): whether a layer call asked to run on nthreads threads does
// so this time or runs on one, and how long the call then took per step. One policy per key.
// The per-shape policies' bucket of a call's step count: its log2 (the fixed cost of a call
// weighs more in short ones).
inline int step_count_bucket(int64_t T) {
  int bucket = 0;
  for (int64_t t = T; t > 1; t >>= 1) ++bucket;
  return bucket;
}

struct TeamKey {
  const char* isa;
  int dtype_bytes;
  int cell;
  bool backward;
  int64_t T, B, I, H, Hout;
  int nthreads;
};
bool team_policy_choose(const TeamKey& key);
void team_policy_report(const TeamKey& key, bool used_team, double ns_per_step);
// How layer calls use their threads: adaptive, always the threads asked for (the default), or
// always one thread (tests). Setting it forgets every measurement. Adaptive is not the default: in the benchmark, where
// ONNX Runtime's pool still spins as each block of our calls starts, it ran shapes alone where
// the threads were faster (stacked GRU, 2 threads: 12.5-12.9 ms against 6.6-7.6 ms fixed).
enum TeamMode : int { kTeamAdaptive = 0, kTeamFixed = 1, kTeamAlone = 2 };
void set_team_mode(int mode);
int team_mode();
int64_t team_policy_calls(bool team);  // adaptive calls so far on the threads / alone

// Riding or one GEMM (ride_policy.cpp): whether a single row's forward on one thread, whose
// input projection can ride along its steps (projection_mode.h), rides this call, and how long
// the call then took per step. The first calls of each shape take turns; then the faster way.
struct RideKey {
  const char* isa;
  int dtype_bytes;
  int cell;
  bool training;
  int64_t T, I, H, Hout;
  bool team;  // the steps on a team (each member riding for its own units), or on one thread
};
bool ride_policy_choose(const RideKey& key);
void ride_policy_report(const RideKey& key, bool rode, double ns_per_step);
int64_t ride_policy_calls(bool rode);  // calls so far that rode / ran one GEMM
// The shapes' trials still on trial and decided, each [0] on one thread, [1] on a team (tests).
void ride_policy_trials(int64_t* on_trial, int64_t* decided);
// For tests: -1 measure (the default), 0 always one GEMM, 1 always ride. Forgets every trial.
void set_ride_override(int way);

// Stacked forwards (forward_stack): how many ran pipelined (one thread a layer) or layer by layer.
void stack_count(bool pipelined);
int64_t stack_calls(bool pipelined);
// Bidirectional layers' forward and backward calls: how many ran their directions side by side
// (one thread each) or in turn.
void direction_count(bool side_by_side);
int64_t direction_calls(bool side_by_side);

// Calls of a single row's long sequence by the work a second thread took beside the walk: the
// backward's products chunk by chunk of steps, after the walk (one thread) or beside it
// (sequence/backward_products.h); the forward's input projection (forward.h
// projection_beside_walk).
enum class BesideWalk { ProductsAfter = 0, ProductsBeside = 1, Projection = 2 };
void beside_walk_count(BesideWalk way);
int64_t beside_walk_calls(BesideWalk way);

// Chunks of gathered rows the backward's products ran on (sequence/live_products.h).
void gathered_chunks_count();
int64_t gathered_chunks();

// Blocks of large team steps, the forward's unit blocks and the backward's column panels of
// dG W_hh (sequence/block_queue.h): how many ran on the member that owns them and how many another
// member took over, and, for tests, a lag in us that every member but the first waits at the
// start of each such step, so that the first takes over.
void team_blocks_count(bool taken_over, int64_t n);
int64_t team_blocks(bool taken_over);
void set_team_lag_us(int us);
int team_lag_us();

// The in-call probe of a step team (forward or backward) with small steps (team_probe.h): how its
// calls went, counted by ProbeVerdict (close: the team ran; far, the team was faster; far, one
// thread was faster; or one of the last two recalled from an earlier call), and, for tests, a
// verdict to take instead of the measured one (-1: none; 1 or 2: as if far, and then that way;
// the probe itself still runs). Setting it forgets the verdicts remembered.
void probe_count(int verdict);
int64_t probe_calls(int verdict);
void set_probe_override(int verdict);
int probe_override();
// The verdicts remembered per shape (team_policy.cpp): what the next call of key may take
// without probing (kProbeNone: probe), and what a call's probe found.
int probe_recall(const TeamKey& key);
void probe_remember(const TeamKey& key, int verdict);
// Tests: how long a verdict remembered from now on lasts, in ms (negative: the default); returns
// the previous setting. A loaded machine can take the default's 500 ms for a test's 15 calls.
int set_probe_recall_ms(int ms);

// Defined in dispatch.cpp.
const KernelTable& active_kernels();
const KernelTable* kernels_for(const char* isa);  // null when not built or not supported
const char* active_isa_name();

// Each ISA build exposes its table under its own namespace.
namespace generic { const KernelTable& kernel_table(); }
namespace avx2 { const KernelTable& kernel_table(); }
namespace avx512 { const KernelTable& kernel_table(); }
namespace amx { const KernelTable& kernel_table(); }

}  // namespace fusedrnn
