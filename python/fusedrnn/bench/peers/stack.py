"""Chain one-layer, one-direction ``forward``/``backward`` over the layers of a Problem.

``fn`` is a module with the functional API (fusedrnn.functional or fusedrnn.reference): this is
how a stacked (and bidirectional) model runs on that API, and the shape of the outputs every peer
reports: "y" (T, B, D*H), "hn" and "cn" (L*D, B, H), and for training "dx" (T, B, I), "dh0" and
"dc0" (L*D, B, H) and the weight gradients named as torch.nn names its parameters
("weight_ih_l0", "bias_hh_l1_reverse", ...).
"""
import numpy as np


def forward(fn, problem, training):
    """Returns (y, hn, cn, ctxs); cn is None unless LSTM, ctxs (per layer, per direction) empty
    unless training."""
    cell, D = problem.kernel_cell, problem.D
    inp, hn, cn, ctxs = problem.x, [], [], []
    for k in range(len(problem.layers)):
        ys, layer_ctxs = [], []
        for d, w in enumerate(problem.directions(k)):
            i = k * D + d
            c0 = None if problem.c0 is None else problem.c0[i]
            y, h, c, ctx = fn.forward(cell, inp, problem.h0[i], c0, w["w_ih"], w["w_hh"],
                                      w["b_ih"], w["b_hh"], reverse=bool(d), training=training)
            ys.append(y)
            hn.append(h)
            cn.append(c)
            layer_ctxs.append(ctx)
        inp = ys[0] if D == 1 else np.concatenate(ys, axis=-1)
        ctxs.append(layer_ctxs)
    return inp, np.stack(hn), (np.stack(cn) if problem.c0 is not None else None), ctxs


def backward(fn, ctxs, dy):
    """BPTT through the stack (the loss is (y * dy).sum()); returns (dx, dh0, dc0, grads), dh0
    and dc0 (L*D, B, H), dc0 None unless LSTM."""
    D = len(ctxs[0])
    grads, dh0, dc0 = {}, [None] * (len(ctxs) * D), [None] * (len(ctxs) * D)
    for k in reversed(range(len(ctxs))):
        H = dy.shape[-1] // D
        dx = None
        for d, ctx in enumerate(ctxs[k]):
            dx_d, dh0[k * D + d], dc0[k * D + d], g = fn.backward(
                ctx, np.ascontiguousarray(dy[..., d * H:(d + 1) * H]))
            dx = dx_d if dx is None else dx + dx_d
            for name, value in g.items():
                grads[f"{name}_l{k}{'_reverse' if d else ''}"] = value
        dy = dx
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
