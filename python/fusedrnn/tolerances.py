"""The one place where numerical tolerances live (see shared/DESIGN.md, "Tolerances").

Every comparison in tests and in the benchmark's pre-timing check uses these numbers, relative to
the largest magnitude of the reference result: ``max|got - want| <= tol * max(1, max|want|)``.
"""
import numpy as np

# float64 kernels against the float64 reference: the only differences are summation order
# (blocked GEMM, FMA contraction) and our vector exp/tanh, which keep full double precision.
# Forward errors stay near 1e-15 per step; BPTT sums T*B products, so gradients get more room.
FORWARD = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
# float32 kernels against the float64 reference: each step rounds gates and states to float32
# (~6e-8 relative) and our float32 exp/tanh/sigmoid are within 4 ulp; over T <= 100 steps the
# forward stays below 1e-5, and gradients, which sum over T*B terms, below 1e-4. That holds for
# the tests' unit-scale inputs and sizes; a pre-activation summing ~1000 inputs, or inputs of
# ~100, rounds more (torch float32 reaches 1.1-2.8e-5 there too): such cases are compared with
# torch float32's own error, not with these bounds. So do pre-activations far from unit scale
# from torch's init U(+-1/sqrt(H)) with H of 1-4 and I near 500 (a spread of ~13): there the
# kernels' float32 forward reached 1.7e-5 (14 of 160 fuzz cases over 1e-5, torch float32 1 of
# 160) while each element was one FMA chain over k; summed in blocks of 128 (microkernel.h), 160
# other such cases gave a median of 1.00x torch float32's error, a 95th percentile of 2.6x (one
# chain: 1.17x and 3.9x on the same cases). A fuzz of the layers against torch.nn in float64
# (2,400 random configurations of every cell and option, H and I up to 130, T up to 300, 1 and 2
# threads) stayed within 0.23 of the float32 forward bound and 0.06 of the gradient one; the
# float32 error was at a median 0.85-0.95x torch float32's own, a 95th percentile 1.4-2.8x, and
# single draws up to 12x at H = 1-3, where torch float32 happened to be exact (over 30 draws of
# those shapes: 1.3-2.2x).
GRADIENT = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}

# The weight and bias gradients sum over T*B rows. The kernels sum them in blocks (128 rows; the
# weights' blocks of each GEMM K block of 256-512 rows summed apart, the biases' in groups of 32),
# each from zero and added after, so the error grows with the blocks and their number, not with
# T*B. At T = 1000, B = 64 (I = 5, H = 16, every cell and ISA) they measured 1.8e-7 to 5.3e-7,
# torch.nn float32 4.4e-7; one chain over the 64000 rows gave 2.8e-6 to 1.2e-5, and the biases'
# 500 blocks added in turn 3.9e-7 to 1.2e-6. The bound sits below those.
LONG_SUM_GRADIENT_FLOAT32 = 8e-7

# The bias gradients sum dG over the T*B rows as a cascade (column_sums in backward_products.h):
# runs of 8 rows, 16 runs, 32 blocks, each from zero. Over 64-128 rows (T = 1, B = 128; T = 2,
# B = 64; T = 1, B = 64, H = 256; every cell and ISA, three seeds) they measured 1.1e-7 to
# 2.1e-7; blocks of 128 rows in one chain, as before, 2.6e-7 to 6.3e-7 (torch.nn float32
# 0.9e-7 to 3.1e-7 on such shapes: its sums cascade too). The bound sits between the two.
BIAS_GRADIENT_FLOAT32 = 2.4e-7

# The GRU's d h_prev starts as its z path (dh * z); each step's products dG W_hh are summed in
# blocks of 128 from zero and added to it after. At T = 1, B = 8, I = 8, H = 256 its dh0 measured
# 1.3e-7 to 2.6e-7 (every ISA, both GRU variants, three seeds; torch.nn float32 1.3e-7); a chain
# of the products' 3H FMAs from dh * z gave 8.7e-7 to 1.7e-6. The bound sits between the two.
GRU_STEP_GRADIENT_FLOAT32 = 4.5e-7

# The Elman RNN's and LSTM's per-step d h_prev = dG W_hh sums G*H products for each element, in
# blocks of 128 from zero, added after. At T = 1, B = 8, I = 8 its dh0 measured 2.2e-7 to 3.6e-7
# (LSTM H = 1024 and Elman RNN H = 2048, every ISA, three seeds; torch.nn float32 2.9e-7 to
# 7.4e-7); one chain over the G*H rows gave 1.3e-6 to 2.5e-6, blocks of 256-512 3.6e-7 to 7.4e-7.
# The bound sits below those.
STEP_PRODUCT_GRADIENT_FLOAT32 = 5e-7

# A pre-activation whose inputs are small beside its bias (x ~ 1e-4, I = 1000, biases 0.1-0.3,
# one step from h0 = 0): each gate sums its I products from zero and adds the bias after, as a
# BLAS adds C to A B. Measured 2.1e-8 to 8.0e-8 (every cell and ISA; 1, 3, 9 and 16 rows, so the
# riding, whole-sequence and in-step projections and partial tiles; four seeds); a chain started
# from the bias, as before, rounded each term at the bias's scale: 1.5e-7 to 9.8e-7. The bound
# sits between the two.
SMALL_INPUT_FORWARD_FLOAT32 = 1.2e-7

# A product over a long k (I = 2048, or H = 1024-2048 in the step; relu RNN, two steps, unit-scale
# inputs): the kernels sum k in blocks of 128 terms, each block from zero and added after, as
# torch.nn's GEMM sums blocks of 192. Measured up to 4.3e-7 (every ISA, 1-16 rows, two
# seeds); one chain over k, as before, gave 6.5e-7 to 1.3e-6 (twice torch's error at K = 1024).
# The bound sits between the two.
LONG_PRODUCT_FORWARD_FLOAT32 = 5.5e-7

# fusedrnn.torch in bfloat16 or float16 (such a module, or CPU autocast) runs the float32 kernels
# on the tensors' values and rounds each output once to that dtype: against torch.nn in float32
# on the same values, half an ulp of the dtype (its unit roundoff, relative to each element and
# so to the largest) comes on top of float32's own tolerance. torch.nn's own low-precision
# modules round every step and are not this accurate, so they are not the reference. Under
# autocast the gradients of float32 tensors are not rounded, but the upstream gradient reaching
# a low-precision output is (once): BPTT carries that relative error on linearly, so one
# rounding bounds them where the backward does not amplify it, as in the tests' and the
# benchmark's unit-scale cases (measured 1.7e-3 to 2.6e-3 against bfloat16's 4.0e-3 on random
# LSTMs). The tests use loss weights exact in the low dtype, so no such rounding enters there.
LOW_PRECISION_ROUNDING = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def low_precision_tolerance(dtype_name, kind="forward", roundings=1):
    """The bound for a low-precision output against float32 (see LOW_PRECISION_ROUNDING), or,
    with roundings=2, against another float32 computation rounded once to the same dtype."""
    table = FORWARD if kind == "forward" else GRADIENT
    return roundings * LOW_PRECISION_ROUNDING[dtype_name] + table[np.dtype(np.float32)]


# Our GEMM against float64 numpy: a dot product of K terms rounds once per term (FMA), so the
# error bound grows linearly with K: per-term unit roundoff (2^-24, 2^-53) with a small margin.
GEMM_PER_TERM = {np.dtype(np.float64): 1e-15, np.dtype(np.float32): 1e-6}

# Vector exp/tanh/sigmoid in float32: at most this many ulp over the whole input range
# (the bound Highway documents for its own); float64 keeps full double precision.
MATH_ULP_FLOAT32 = 4
# Vector exp/tanh/sigmoid in float64: at most this many ulp over the whole range (measured <= 1.81,
# the generic build's sigmoid), i.e. full double precision up to the last bit or so.
MATH_ULP_FLOAT64 = 2


def max_scaled_error(got, want):
    """max|got - want| divided by max(1, max|want|), computed in float64, over want's finite
    values: got's NaNs and infinities must lie where want's do (an infinity of the same sign),
    or the error is infinite. (inf - inf is NaN: an overflow both sides give failed every
    comparison, and one infinity in want made the scale infinite.)"""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != expected {want.shape}")
    if want.size == 0:
        return 0.0
    finite = np.isfinite(want)
    nan_mismatch = np.isnan(got) != np.isnan(want)
    inf_mismatch = np.isinf(want) & (got != want)
    if nan_mismatch.any() or inf_mismatch.any() or np.isinf(got[finite]).any():
        return float("inf")
    diff = np.abs(got[finite] - want[finite]).max(initial=0.0)
    finite_scale = np.abs(want[finite]).max(initial=0.0)   # an all-NaN want has none
    return float(diff / max(1.0, float(finite_scale)))


def assert_close(got, want, dtype, kind="forward", what="result"):
    """Assert ``got`` matches ``want`` within the tolerance for ``dtype`` and ``kind``."""
    table = FORWARD if kind == "forward" else GRADIENT
    tol = table[np.dtype(dtype)]
    err = max_scaled_error(got, want)
    if not err <= tol:
        raise AssertionError(f"{what}: scaled error {err:.3g} exceeds {kind} tolerance {tol:g} "
                             f"for {np.dtype(dtype).name}")
    return err
