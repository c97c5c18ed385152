"""Peer: torch.nn.RNN / LSTM / GRU on the CPU.

Inference runs under ``torch.inference_mode()``; training is forward plus
``torch.autograd.backward(y, dy)`` with every parameter, the input and the initial states
requiring grad (gradients are reset to None before each run, as ``optimizer.zero_grad()`` does).
The work is fusedrnn's: its backward takes dy itself (no loss tensor, whose product and sum
cost torch 0.4-2% of a call and one or two T x B x H tensors of memory) and always returns
dh0 (and dc0), which torch skips unless h0 (c0) requires grad.
"""
import numpy as np

from ..cases import torch_names


class TorchPeer:
    name = "torch"
    modes = ("infer", "train")

    def __init__(self):
        import torch          # ImportError here means: skip this peer
        self.torch = torch
        self.version = torch.__version__

    def set_threads(self, n):
        self.torch.set_num_threads(n)

    def skip_reason(self, case):
        return None

    def prepare(self, problem, mode):
        return TorchRunner(self.torch, problem, mode)


def make_module(torch, problem):
    T, B, I, H, L = problem.shape
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(problem.cell)
    kwargs = {"num_layers": L, "bidirectional": problem.D == 2}
    if cls is None:
        nonlinearity = "relu" if problem.cell == "rnn_relu" else "tanh"
        module = torch.nn.RNN(I, H, nonlinearity=nonlinearity, **kwargs)
    else:
        module = cls(I, H, **kwargs)
    module.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(w))
                            for name, w in torch_names(problem).items()})
    return module.float()


class TorchRunner:
    def __init__(self, torch, problem, mode):
        self.torch, self.train = torch, mode == "train"
        self.module = make_module(torch, problem)
        self.module.train(self.train)
        self.x = torch.from_numpy(problem.x)
        self.states = [torch.from_numpy(problem.h0)]
        if problem.c0 is not None:
            self.states.append(torch.from_numpy(problem.c0))
        self.hx = self.states[0] if problem.c0 is None else tuple(self.states)
        self.dy = torch.from_numpy(problem.dy)
        if self.train:
            for t in (self.x, *self.states):
                t.requires_grad_(True)
        else:
            for p in self.module.parameters():
                p.requires_grad_(False)

    def __call__(self):
        torch = self.torch
        if not self.train:
            with torch.inference_mode():
                return self.module(self.x, self.hx)
        self.drop_gradients()
        y, hn = self.module(self.x, self.hx)
        torch.autograd.backward(y, self.dy)
        return y, hn

    def drop_gradients(self):
        """Every gradient to None (optimizer.zero_grad()'s default)."""
        for t in (self.x, *self.states, *self.module.parameters()):
            t.grad = None

    def outputs(self, result):
        y, hn = result
        out = {"y": y.detach().numpy()}
        if isinstance(hn, tuple):
            out["hn"], out["cn"] = hn[0].detach().numpy(), hn[1].detach().numpy()
        else:
            out["hn"] = hn.detach().numpy()
        if self.train:  # (a gradient autograd did not need is None: bench/adapter_vs_torch.py)
            grads = {"dx": self.x.grad, **dict(zip(("dh0", "dc0"), (t.grad for t in self.states))),
                     **{name: p.grad for name, p in self.module.named_parameters()}}
            out.update({key: g.numpy() for key, g in grads.items() if g is not None})
        return out
