"""Chain one-layer, one-direction ``forward``/``backward`` over the layers of a Problem.

``fn`` is a module with the functional API (fusedrnn.functional or fusedrnn.reference): this is
how a stacked model runs on that API, and the shape of the outputs every peer reports:
"y" (T, B, H), "hn" and "cn" (L, B, H), and for training "dx" (T, B, I), "dh0" and "dc0"
(L, B, H) and the weight gradients named as torch.nn names its parameters ("weight_ih_l0",
"bias_hh_l1", ...).
"""
import numpy as np


def forward(fn, problem, training):
    """Returns (y, hn, cn, ctxs); cn is None unless LSTM, ctxs empty unless training."""
    cell = problem.kernel_cell
    inp, hn, cn, ctxs = problem.x, [], [], []
    for k, w in enumerate(problem.layers):
        c0 = None if problem.c0 is None else problem.c0[k]
        inp, h, c, ctx = fn.forward(cell, inp, problem.h0[k], c0, w["w_ih"], w["w_hh"],
                                    w["b_ih"], w["b_hh"], training=training)
        hn.append(h)
        cn.append(c)
        ctxs.append(ctx)
    return inp, np.stack(hn), (np.stack(cn) if problem.c0 is not None else None), ctxs


def backward(fn, ctxs, dy):
    """BPTT through the stack (the loss is (y * dy).sum()); returns (dx, dh0, dc0, grads), dh0
    and dc0 (L, B, H), dc0 None unless LSTM."""
    grads, dh0, dc0 = {}, [None] * len(ctxs), [None] * len(ctxs)
    for k in reversed(range(len(ctxs))):
        dy, dh0[k], dc0[k], g = fn.backward(ctxs[k], dy)
        for name, value in g.items():
            grads[f"{name}_l{k}"] = value
    return dy, np.stack(dh0), (None if dc0[0] is None else np.stack(dc0)), grads


def outputs(y, hn, cn, dx=None, dh0=None, dc0=None, grads=None):
    out = {"y": y, "hn": hn}
    if cn is not None:
        out["cn"] = cn
    if dx is not None:
        out["dx"], out["dh0"] = dx, dh0
        if dc0 is not None:
            out["dc0"] = dc0
        out.update(grads)
    return out


class StackRunner:
    """Times stack.forward (+ backward in training) of ``fn`` on one Problem."""

    def __init__(self, fn, problem, mode):
        self.fn, self.problem, self.train = fn, problem, mode == "train"

    def __call__(self):
        y, hn, cn, ctxs = forward(self.fn, self.problem, self.train)
        if not self.train:
            return y, hn, cn
        return (y, hn, cn, *backward(self.fn, ctxs, self.problem.dy))

    def outputs(self, result):
        return outputs(*result)
