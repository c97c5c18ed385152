"""The loss every torch-side comparison backpropagates: (y*dy) + (hn*dhn) [+ (cn*dcn)] summed,
and the NumPy (float64) copies of outputs and gradients that the tests compare."""
import torch


def backward_and_collect(m, cell, d, out, h, x, h0, c0):
    """out, h: the module's padded output and final state(s); x, h0, c0: the leaf tensors."""
    tdt = out.dtype
    hn, cn = h if cell == "lstm" else (h, None)
    loss = (out * torch.tensor(d["dy"], dtype=tdt)).sum()
    loss = loss + (hn * torch.tensor(d["dhn"], dtype=tdt)).sum()
    if cn is not None:
        loss = loss + (cn * torch.tensor(d["dcn"], dtype=tdt)).sum()
    loss.backward()

    def np_(t):
        return None if t is None else t.detach().double().numpy().copy()

    return {"y": np_(out), "hn": np_(hn), "cn": np_(cn), "dx": np_(x.grad),
            "dh0": None if h0 is None else np_(h0.grad),
            "dc0": None if c0 is None else np_(c0.grad),
            "grads": {n: np_(p.grad) for n, p in m.named_parameters()}}
