"""Run torch.nn.RNN / LSTM / GRU as a single-layer, single-direction oracle.

``run_torch`` takes the same arguments as ``fusedrnn.reference.forward`` (minus
``linear_before_reset``, which torch only has as True) plus the upstream gradients, and returns
NumPy outputs and gradients named as ``reference.backward`` names them.

The reverse direction is taken from a bidirectional torch layer: its ``*_reverse`` parameters get
our weights, the forward direction gets unrelated weights and zero upstream gradient, so only the
reverse half of the output reaches the loss. Lengths go through
``pack_padded_sequence(enforce_sorted=False)`` and ``pad_packed_sequence(total_length=T)``, which is
exactly the semantics DESIGN.md promises.
"""
import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def make_torch_layer(cell, input_size, hidden_size, proj_size, bias, bidirectional, dtype):
    kw = dict(bias=bias, bidirectional=bidirectional, dtype=_TORCH_DTYPE[np.dtype(dtype)])
    if cell == "lstm":
        return torch.nn.LSTM(input_size, hidden_size, proj_size=proj_size, **kw)
    if cell == "gru":
        return torch.nn.GRU(input_size, hidden_size, **kw)
    return torch.nn.RNN(input_size, hidden_size, nonlinearity=cell[4:], **kw)


def run_torch(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=None, lengths=None, reverse=False,
              dy=None, dhn=None, dcn=None):
    """Returns (y, hn, cn, dx, dh0, dc0, grads) as NumPy arrays (dh0/dc0 None when h0/c0 None)."""
    dtype = np.dtype(x.dtype)
    tdt = _TORCH_DTYPE[dtype]
    T, B, I = x.shape
    H = w_ih.shape[0] // {"lstm": 4, "gru": 3}.get(cell, 1)
    H_out = w_hh.shape[1]
    proj = w_hr.shape[0] if w_hr is not None else 0
    bias = b_ih is not None
    assert (b_hh is not None) == bias, "torch has one bias switch for both biases"
    D = 2 if reverse else 1
    layer = make_torch_layer(cell, I, H, proj, bias, reverse, dtype)
    sfx = "_reverse" if reverse else ""
    ours = {"weight_ih": w_ih, "weight_hh": w_hh, "bias_ih": b_ih, "bias_hh": b_hh,
            "weight_hr": w_hr}
    with torch.no_grad():
        for name, value in ours.items():
            if value is not None:
                getattr(layer, f"{name}_l0{sfx}").copy_(torch.tensor(value))

    def state(ours_state, width):
        # (D, B, width): the forward direction of a bidirectional layer gets zeros.
        full = np.zeros((D, B, width), dtype)
        if ours_state is not None:
            full[D - 1] = ours_state
        return torch.tensor(full, dtype=tdt, requires_grad=True)

    xt = torch.tensor(x, dtype=tdt, requires_grad=True)
    h0t = state(h0, H_out) if h0 is not None else None
    c0t = state(c0, H) if cell == "lstm" and c0 is not None else None
    if cell == "lstm":
        if h0t is None and c0t is None:
            hx = None
        else:   # torch needs both or neither
            hx = (h0t if h0t is not None else state(None, H_out),
                  c0t if c0t is not None else state(None, H))
    else:
        hx = h0t

    inp = xt
    if lengths is not None:
        inp = pack_padded_sequence(xt, torch.as_tensor(np.asarray(lengths), dtype=torch.int64),
                                   enforce_sorted=False)
    out, hn_all = layer(inp, hx)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=T)
    if cell == "lstm":
        hn_all, cn_all = hn_all
    y = out[..., (D - 1) * H_out:]
    hn = hn_all[D - 1]
    cn = cn_all[D - 1] if cell == "lstm" else None

    loss = (y * torch.tensor(dy, dtype=tdt)).sum()
    if dhn is not None:
        loss = loss + (hn * torch.tensor(dhn, dtype=tdt)).sum()
    if cn is not None and dcn is not None:
        loss = loss + (cn * torch.tensor(dcn, dtype=tdt)).sum()
    loss.backward()

    def np_(t):
        return None if t is None else t.detach().numpy().copy()

    grads = {name: np_(getattr(layer, f"{name}_l0{sfx}").grad)
             for name, value in ours.items() if value is not None}
    return (np_(y), np_(hn), np_(cn), np_(xt.grad),
            None if h0t is None else np_(h0t.grad[D - 1]),
            None if c0t is None else np_(c0t.grad[D - 1]),
            grads)
