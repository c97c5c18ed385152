"""The measured package: fusedrnn on its C++ kernels.

Models (one layer or stacked) run through the torch.nn-shaped layers (``fusedrnn.LSTM`` etc.),
as a user would; where the package has no such class this peer chains ``fusedrnn.functional``
per layer itself (peers/stack.py), which is what those layers do. Inference runs the layer
frozen (``freeze()``: read-only weights, reused packed without a per-call comparison), as ONNX
Runtime's session holds its weights as constants; training runs it as a training loop does, its
weights writable (the kernels pack them every training call, as an optimiser changes them between
calls, so repeating a call with the same weights gains nothing here). Each record says which
path ran ("fusedrnn_path").
"""
import fusedrnn
from ... import functional
from ..cases import torch_names
from . import stack

LAYER_CLASS = {"rnn": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "gru": "GRU"}


class FusedrnnPeer:
    name = "fusedrnn"
    modes = ("infer", "train")

    def __init__(self):
        self.version = fusedrnn.__version__

    def set_threads(self, n):
        fusedrnn.set_num_threads(n)

    def skip_reason(self, case):
        return None

    @staticmethod
    def uses_layers(problem):
        return hasattr(fusedrnn, LAYER_CLASS[problem.cell])

    def path(self, problem, mode):
        """What a case runs: "layers" (frozen in inference) or "functional"."""
        if not self.uses_layers(problem):
            return "functional"
        return "layers, frozen" if mode == "infer" else "layers"

    def prepare(self, problem, mode):
        if self.uses_layers(problem):
            return LayerRunner(problem, mode)
        return stack.StackRunner(functional, problem, mode)


class LayerRunner:
    """fusedrnn.RNN / LSTM / GRU: forward, and in training zero_grad + forward + backward(dy).
    zero_grad(set_to_none=True), as torch's peer sets its gradients to None (optimizer.zero_grad()'s
    default): the backward writes the gradients over the last call's arrays, no pass of zeros."""

    def __init__(self, problem, mode):
        import numpy as np
        T, B, I, H, L = problem.shape
        cls = getattr(fusedrnn, LAYER_CLASS[problem.cell])
        kwargs = {"num_layers": L, "dtype": np.float32, "seed": 0,
                  "bidirectional": problem.D == 2}
        if problem.cell in ("rnn", "rnn_relu"):
            kwargs["nonlinearity"] = "relu" if problem.cell == "rnn_relu" else "tanh"
        self.module = cls(I, H, **kwargs)
        self.module.load_state_dict(torch_names(problem))
        self.train = mode == "train"
        self.module.train(self.train)
        if not self.train:
            self.module.freeze()
        self.problem = problem
        self.hx = problem.h0 if problem.c0 is None else (problem.h0, problem.c0)

    def drop_gradients(self):
        """No gradient arrays at all, spare ones included: the next backward makes new ones
        (np.empty: pages the OS maps on first write), so its gradients count in its memory as
        torch's do after ``.grad = None`` (bench/memory.py)."""
        self.module.zero_grad(set_to_none=True)
        self.module._spare_grads.clear()

    def __call__(self):
        if not self.train:
            return self.module(self.problem.x, self.hx), None
        self.module.zero_grad(set_to_none=True)
        out = self.module(self.problem.x, self.hx)
        return out, self.module.backward(self.problem.dy)

    def outputs(self, result):
        (y, hn), back = result
        out = {"y": y}
        if isinstance(hn, tuple):
            out["hn"], out["cn"] = hn
        else:
            out["hn"] = hn
        if self.train:
            out["dx"], dh0 = back
            if isinstance(dh0, tuple):
                out["dh0"], out["dc0"] = dh0
            else:
                out["dh0"] = dh0
            out.update({name: g.copy() for name, g in self.module.grads.items()})
        return out
