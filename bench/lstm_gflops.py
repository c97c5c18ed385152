"""Quick single-thread LSTM throughput at DESIGN.md's fastrnns size (T=100, B=64, I=H=512),
float32, beside numpy's matmul on the same GEMM shapes. Not a test: run it and read it.

    python bench/lstm_gflops.py
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402

import fusedrnn  # noqa: E402
from fusedrnn import functional, reference  # noqa: E402

T, B, I, H, G = 100, 64, 512, 512, 4


def median_seconds(fn, reps=5):
    fn()  # warm-up: caches, packed weights, page faults
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    fusedrnn.set_num_threads(1)
    rng = np.random.default_rng(0)
    w = reference.init_weights("lstm", I, H, dtype=np.float32, rng=rng)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    args = ("lstm", x, h0, h0.copy(), w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    dy = np.ones((T, B, H), np.float32)

    def train():
        _, _, _, ctx = functional.forward(*args, training=True)
        functional.backward(ctx, dy, consume=True)

    flops = 2 * T * B * G * H * (I + H)
    t_inf = median_seconds(lambda: functional.forward(*args, training=False))
    t_train = median_seconds(train, reps=3)
    # numpy on the same GEMMs: the input projection and T recurrent products.
    hb = rng.standard_normal((B, H)).astype(np.float32)
    x2 = x.reshape(T * B, I)

    def numpy_forward_gemms():
        x2 @ w["w_ih"].T
        for _ in range(T):
            hb @ w["w_hh"].T

    t_np = median_seconds(numpy_forward_gemms)
    print(f"fusedrnn {fusedrnn.__version__}, isa {fusedrnn._C.isa()}, 1 thread, float32, "
          f"LSTM T={T} B={B} I={I} H={H}")
    print(f"  forward (inference):  {t_inf * 1e3:8.1f} ms  {flops / t_inf / 1e9:6.1f} GFLOP/s")
    print(f"  forward + backward:   {t_train * 1e3:8.1f} ms  {3 * flops / t_train / 1e9:6.1f} GFLOP/s")
    print(f"  numpy matmul, same forward GEMMs: {t_np * 1e3:8.1f} ms  {flops / t_np / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
