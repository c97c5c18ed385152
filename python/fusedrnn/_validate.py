"""Argument checks shared by the functional API and the layers: clear errors naming the
argument and the shape or dtype expected, before anything reaches C++."""
import numpy as np

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ShapeError(ValueError, RuntimeError):
    """A bad input or state shape: a ValueError, as fusedrnn raises for bad values, and a
    RuntimeError, as torch.nn's modules raise, so ``except RuntimeError`` written for those
    still catches it."""


class TorchValueTypeError(TypeError, ValueError):
    """An argument of the wrong type where torch.nn raises ValueError (a dropout that is not a
    number, a train() mode that is not a bool): a TypeError, as fusedrnn raises for a wrong
    type, and a ValueError, so code that catches torch's still does."""


class LengthsRangeError(ValueError, RuntimeError):
    """A length under 1 or past T: a ValueError, and the RuntimeError torch's
    pack_padded_sequence raises for a length of 0, so code written for that still catches it."""


class StateStructureError(TypeError, ValueError, RuntimeError):
    """hx (or dhn) of the wrong structure: a tuple where one array goes, or an LSTM state that is
    not a pair. One class for the NumPy layers and the torch adapter, caught as any of the errors
    either raised for it before (TypeError; ValueError for an LSTM tuple of another length) and as
    the RuntimeError torch.nn raises for an LSTM tuple of another length (for the other mistakes
    torch.nn fails with IndexError or AttributeError)."""


class DtypeError(TypeError, ValueError, RuntimeError):
    """An array or tensor of another dtype than the one it must have (never cast): a TypeError,
    and the ValueError torch.nn raises for an input of another dtype than its weights' and the
    RuntimeError it raises for such an hx, so code that catches torch's still does. One class
    for the NumPy layers and the torch adapter."""


def as_array(name, a):
    """``a`` as an ndarray (no copy when it is one), its conversion errors naming ``name``."""
    if not isinstance(a, np.ndarray):
        if hasattr(a, "batch_sizes") and hasattr(a, "data"):
            # torch's PackedSequence, which np.asarray reads as a ragged tuple ("setting an
            # array element with a sequence"): say what the NumPy layers take instead.
            raise TypeError(f"{name} is a torch PackedSequence: fusedrnn's NumPy layers take "
                            f"the padded array with lengths= (torch.nn.utils.rnn."
                            f"pad_packed_sequence gives both); fusedrnn.torch's modules take "
                            f"a PackedSequence")
        if getattr(a, "requires_grad", False) is True and hasattr(a, "detach"):
            # (torch's own refusal, "Can't call numpy() on Tensor that requires grad", names no
            # argument and no way on)
            raise TypeError(f"{name} is a torch tensor that requires grad: fusedrnn's NumPy "
                            f"layers take no part in autograd, so pass {name}.detach(), or use "
                            f"fusedrnn.torch's modules, which do")
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as e:  # NumPy's own message names no argument
            raise type(e)(f"{name} must be an array, got a {type(a).__name__} that NumPy cannot "
                          f"read as one: {e}") from e
    return a


def as_dtype_array(name, a, dtype, whose=""):
    """``a`` as an ndarray of exactly ``dtype``: no copy, and never a cast (a DtypeError instead).
    ``whose`` qualifies the dtype in the message, e.g. " (the layer's dtype)"."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    a = as_array(name, a)
    if a.dtype != dtype:
        if a.dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("="):
            raise DtypeError(f"{name} must be native-byte-order {np.dtype(dtype).name}{whose}, "
                             f"got {a.dtype.str}: pass {name}.astype({name}.dtype.newbyteorder("
                             f"'='))")
        raise DtypeError(f"{name} must have dtype {np.dtype(dtype).name}{whose}, "
                         f"got {a.dtype.name}")
    return a


def made_here(checked, given):
    """Whether ``checked``, what the checks made of the caller's ``given``, is memory of our own
    (a copy) that a training context may keep as it is: not ``given`` itself, nor a view of its
    memory, which np.ascontiguousarray gives back for an ndarray subclass (np.memmap) and
    np.asarray for an object's own array (``__array__``): the caller may overwrite those."""
    return checked is not given and not np.may_share_memory(checked, given)


def check_shape(name, a, shape):
    if a.shape != tuple(shape):
        raise ShapeError(f"{name} must have shape {tuple(shape)}, got {a.shape}")


def as_lengths(lengths, T, B, name="lengths", least=1):
    """lengths as int64 (B,) in least..T, or None. ``name``: the argument's name in errors."""
    if lengths is None:
        return None
    arr = as_array(name, lengths)
    if arr.size == 0:  # an empty list reads as float64; a batch of 0 has no lengths to check
        arr = arr.astype(np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype.name}")
    if arr.shape != (B,):
        raise ShapeError(f"{name} must have shape ({B},) (one per batch row), got {arr.shape}")
    if B and (arr.min() < least or arr.max() > T):
        raise LengthsRangeError(f"{name} must lie in {least}..{T} (the number of time steps), "
                                f"got min {arr.min()} and max {arr.max()}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
    """Validate one layer-direction call; returns the arrays ready for _C.forward."""
    if cell not in GATES:
        raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
    if x is None:
        raise TypeError("x must be an array (T, B, I) of float32 or float64, got None")
    x = as_array("x", x)
    if x.dtype.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(f"x must have dtype float32 or float64, got {x.dtype.name}")
    dtype = x.dtype.newbyteorder("=")
    x = as_dtype_array("x", x, dtype)
    if x.ndim != 3:
        raise ShapeError(f"x must be 3-d (T, B, I), got shape {x.shape}")
    T, B, I = x.shape
    if T < 1:
        raise ShapeError(f"x must have at least one time step, got shape {x.shape}")
    h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = check_layer_params(cell, dtype, B, I, h0, c0, w_ih,
                                                               w_hh, b_ih, b_hh, w_hr)
    lengths = as_lengths(lengths, T, B)
    # C order only now, every argument checked: a strided or broadcast x may be far larger as
    # a copy (a MemoryError, or gigabytes written) than the mistake the checks would name.
    return np.ascontiguousarray(x), h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths


_X_DTYPE = " (x's dtype)"  # a layer's states and weights take its input's dtype


def check_layer_params(cell, dtype, B, I, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
    """The states and weights of one layer-direction call whose input has ``B`` rows of ``I``
    values of ``dtype``; returns them ready for _C.forward (h0, c0, w_ih, w_hh, b_ih, b_hh,
    w_hr). Each is made C-contiguous only once its shape is checked: a broadcast array of the
    wrong shape may be far larger as a copy (a MemoryError) than the mistake named."""
    G = GATES[cell]
    w_hh = as_dtype_array("w_hh", w_hh, dtype, _X_DTYPE)
    if w_hh.ndim != 2 or w_hh.shape[0] % G:
        raise ShapeError(f"w_hh must be 2-d with a multiple of {G} rows, got shape {w_hh.shape}")
    H, H_out = w_hh.shape[0] // G, w_hh.shape[1]
    w_ih = as_dtype_array("w_ih", w_ih, dtype, _X_DTYPE)
    check_shape("w_ih", w_ih, (G * H, I))
    if w_hr is not None:
        if cell != "lstm":
            raise ValueError("w_hr (projection) exists only for lstm")
        w_hr = as_dtype_array("w_hr", w_hr, dtype, _X_DTYPE)
        check_shape("w_hr", w_hr, (H_out, H))
    elif H_out != H:
        raise ShapeError(f"w_hh must have shape ({G * H}, {H}), got {w_hh.shape}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None")
    if b_ih is not None:
        b_ih = as_dtype_array("b_ih", b_ih, dtype, _X_DTYPE)
        b_hh = as_dtype_array("b_hh", b_hh, dtype, _X_DTYPE)
        check_shape("b_ih", b_ih, (G * H,))
        check_shape("b_hh", b_hh, (G * H,))
    # None: zeros, as reference.forward and torch.nn take it
    h0 = np.zeros((B, H_out), dtype) if h0 is None else as_dtype_array("h0", h0, dtype, _X_DTYPE)
    check_shape("h0", h0, (B, H_out))
    if cell == "lstm":
        c0 = np.zeros((B, H), dtype) if c0 is None else as_dtype_array("c0", c0, dtype, _X_DTYPE)
        check_shape("c0", c0, (B, H))
    elif c0 is not None:
        raise ValueError(f"c0 is only for lstm, got an array for {cell}")
    return tuple(None if a is None else np.ascontiguousarray(a)
                 for a in (h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
