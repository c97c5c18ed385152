"""Bad input to fusedrnn.RNN / LSTM / GRU: every case raises TypeError or ValueError (RuntimeError
for backward out of order) whose message names the argument and the shape or dtype expected.
And the unusual-but-valid inputs: non-contiguous, Fortran-ordered and read-only arrays work and
are never modified; NaN propagates; a batch of 0 works.
"""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import functional

F32, F64 = np.float32, np.float64


def x_of(T=5, B=3, I=4, dtype=F32):
    return np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Constructor arguments

@pytest.mark.parametrize("make,exc,match", [
    (lambda: fusedrnn.LSTM(4, 0), ValueError, "hidden_size must be >= 1, got 0"),
    (lambda: fusedrnn.GRU(4, -3), ValueError, "hidden_size must be >= 1, got -3"),
    (lambda: fusedrnn.RNN(4, 2.5), TypeError, "hidden_size must be an int, got float"),
    (lambda: fusedrnn.RNN(0, 3), ValueError, "input_size must be >= 1, got 0"),
    (lambda: fusedrnn.RNN("4", 3), TypeError, "input_size must be an int, got str"),
    (lambda: fusedrnn.LSTM(4, 3, num_layers=0), ValueError, "num_layers must be >= 1, got 0"),
    (lambda: fusedrnn.LSTM(4, 3, proj_size=3), ValueError,
     r"proj_size must be smaller than hidden_size \(3\), got 3"),
    (lambda: fusedrnn.LSTM(4, 3, proj_size=5), ValueError, "proj_size must be smaller"),
    (lambda: fusedrnn.LSTM(4, 3, proj_size=-1), ValueError, "proj_size must be >= 0, got -1"),
    # torch.nn's words and exception, for any proj_size on RNN or GRU (0 too)
    (lambda: fusedrnn.GRU(4, 3, proj_size=2), ValueError,
     "proj_size argument is only supported for LSTM, not RNN or GRU"),
    (lambda: fusedrnn.RNN(4, 3, proj_size=0), ValueError,
     "proj_size argument is only supported for LSTM, not RNN or GRU"),
    (lambda: fusedrnn.RNN(4, 3, nonlinearity="sigmoid"), ValueError,
     "nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    (lambda: fusedrnn.GRU(4, 3, num_layers=2, dropout=1.5), ValueError,
     r"dropout must be a probability in \[0, 1\], got 1.5"),
    (lambda: fusedrnn.GRU(4, 3, num_layers=2, dropout=-0.1), ValueError,
     r"dropout must be a probability in \[0, 1\], got -0.1"),
    (lambda: fusedrnn.GRU(4, 3, num_layers=2, dropout="0.5"), TypeError,
     r"dropout must be a number in \[0, 1\], got str"),
    (lambda: fusedrnn.LSTM(4, 3, dtype=np.float16), TypeError,
     "dtype must be float32 or float64, got float16"),
    (lambda: fusedrnn.LSTM(4, 3, dtype=np.int32), TypeError,
     "dtype must be float32 or float64, got int32"),
    (lambda: fusedrnn.LSTM(4, 3, dtype="junk"), TypeError, "dtype must be float32 or float64"),
    (lambda: fusedrnn.LSTM(4, 3, dtype=">f4"), TypeError,
     r"dtype must be float32 or float64, got >f4 \(not native byte order\)"),
    (lambda: fusedrnn.LSTM(4, 3, device="cuda"), ValueError,
     r"device must be None or 'cpu' \(fusedrnn runs on the CPU\), got 'cuda'"),
    (lambda: fusedrnn.GRU(4, 3, device="meta"), ValueError, "device must be None or 'cpu'"),
    (lambda: fusedrnn.RNN(4, 3, device=0), TypeError,
     r"device must be None, 'cpu' or torch.device\('cpu'\), got int"),
    (lambda: fusedrnn.LSTM(4, 3, bias=1), TypeError, "bias must be a bool, got int"),
    (lambda: fusedrnn.LSTM(4, 3, batch_first="yes"), TypeError, "batch_first must be a bool"),
    (lambda: fusedrnn.LSTM(4, 3, bidirectional=None), TypeError, "bidirectional must be a bool"),
    (lambda: fusedrnn.GRU(4, 3, linear_before_reset=0), TypeError,
     "linear_before_reset must be a bool"),
    (lambda: fusedrnn.GRU(4, 3, seed=-1), ValueError, "seed must be >= 0, got -1"),
    (lambda: fusedrnn.GRU(4, 3, seed=1.5), TypeError, "seed must be None or an int, got float"),
])
def test_bad_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_wrong_types_torch_refuses_with_valueerror_are_valueerrors_too():
    """torch.nn raises ValueError for a dropout that is not a number (a str, a bool) and for a
    train() mode that is not a bool; ours are TypeErrors that are ValueErrors too."""
    calls = [(lambda: fusedrnn.GRU(4, 3, num_layers=2, dropout="0.5"), "dropout must be a number"),
             (lambda: fusedrnn.LSTM(4, 3, num_layers=2, dropout=True), "dropout must be a number"),
             (lambda: fusedrnn.GRU(2, 3).train(0), "mode must be a bool, got int"),
             (lambda: fusedrnn.RNN(2, 3).train(None), "mode must be a bool, got NoneType")]
    for call, match in calls:
        for kind in (TypeError, ValueError):
            with pytest.raises(kind, match=match):
                call()


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        fusedrnn.LSTM(4, 3, dropout=0.2)


def test_train_mode_must_be_bool():
    with pytest.raises(TypeError, match="mode must be a bool, got str"):
        fusedrnn.GRU(2, 3).train("no")


# ----------------------------------------------------------------------------------------------
# Forward arguments

@pytest.mark.parametrize("x,match", [
    (np.zeros((5, 3, 7), F32), r"input must have shape \(T, B, 4\) or \(T, 4\) unbatched, "
                               r"got \(5, 3, 7\)"),
    (np.zeros((5, 3, 4, 1), F32), r"input must have shape \(T, B, 4\) .*got \(5, 3, 4, 1\)"),
    (np.zeros(4, F32), r"input must have shape \(T, B, 4\) .*got \(4,\)"),
    (np.zeros((0, 3, 4), F32), r"input must have at least one time step, got shape \(0, 3, 4\)"),
])
def test_x_of_wrong_shape(x, match):
    with pytest.raises(ValueError, match=match):
        fusedrnn.GRU(4, 3)(x)


def test_x_shape_message_for_batch_first():
    with pytest.raises(ValueError, match=r"input must have shape \(B, T, 4\)"):
        fusedrnn.GRU(4, 3, batch_first=True)(np.zeros((2, 5, 3), F32))


@pytest.mark.parametrize("layer_dtype,x_dtype", [(F32, F64), (F64, F32), (F32, np.int64),
                                                 (F64, np.float16), (F32, np.complex64)])
def test_x_of_another_dtype_is_refused_not_cast(layer_dtype, x_dtype):
    layer = fusedrnn.LSTM(4, 3, dtype=layer_dtype)
    with pytest.raises(TypeError, match=f"input must have dtype {np.dtype(layer_dtype).name} "
                                        rf"\(the layer's dtype\), got {np.dtype(x_dtype).name}"):
        layer(np.zeros((2, 1, 4), x_dtype))


def test_another_dtype_is_caught_as_torch_nn_raises_it():
    """torch.nn raises ValueError for an input of another dtype than the weights' and
    RuntimeError for such an hx; ours is a TypeError and both of those, as the adapter's."""
    h = np.zeros((1, 3, 3), F32)
    calls = [lambda: fusedrnn.GRU(4, 3)(x_of(dtype=F64)),
             lambda: fusedrnn.GRU(4, 3)(x_of(), h.astype(F64)),
             lambda: fusedrnn.LSTM(4, 3)(x_of(), (h, h.astype(F64)))]
    for call in calls:
        for kind in (TypeError, ValueError, RuntimeError):
            with pytest.raises(kind, match="must have dtype float32"):
                call()


def test_list_input_is_float64_and_refused_by_a_float32_layer():
    with pytest.raises(TypeError, match="input must have dtype float32 .*got float64"):
        fusedrnn.RNN(1, 2)([[[0.5]]])
    y, _ = fusedrnn.RNN(1, 2, dtype=F64)([[[0.5]]])
    assert y.shape == (1, 1, 2)


@pytest.mark.parametrize("hx,match", [
    (np.zeros((1, 3, 3), F32), r"hx must have shape \(4, 3, 3\) \(num_layers\*num_directions, "
                               r"batch, hidden_size\), got \(1, 3, 3\)"),
    (np.zeros((4, 2, 3), F32), r"hx must have shape \(4, 3, 3\)"),
    (np.zeros((4, 3, 5), F32), r"hx must have shape \(4, 3, 3\)"),
    (np.zeros((4, 3), F32), r"hx must have shape \(4, 3, 3\) .*got \(4, 3\)"),
])
def test_hx_of_wrong_shape(hx, match):
    layer = fusedrnn.GRU(4, 3, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=match):
        layer(x_of(), hx)


def test_unbatched_x_needs_unbatched_hx():
    layer = fusedrnn.RNN(4, 3, num_layers=2)
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 3\) \(num_layers\*num_directions"
                                         r", hidden_size\), got \(2, 1, 3\)"):
        layer(np.zeros((5, 4), F32), np.zeros((2, 1, 3), F32))
    with pytest.raises(ValueError, match="lengths is for batched input"):
        layer(np.zeros((5, 4), F32), lengths=[3])


def test_lstm_h0_and_c0_of_wrong_shape():
    layer = fusedrnn.LSTM(4, 6, proj_size=2)
    h0, c0 = np.zeros((1, 3, 2), F32), np.zeros((1, 3, 6), F32)
    layer(x_of(), (h0, c0))
    with pytest.raises(ValueError, match=r"hx\[0\] \(h0\) must have shape \(1, 3, 2\) "
                                         r"\(num_layers\*num_directions, batch, proj_size\), "
                                         r"got \(1, 3, 6\)"):
        layer(x_of(), (c0, c0))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c0\) must have shape \(1, 3, 6\) .*"
                                         r"hidden_size\), got \(1, 3, 2\)"):
        layer(x_of(), (h0, h0))


def test_hx_of_wrong_dtype():
    layer = fusedrnn.LSTM(4, 3)
    h = np.zeros((1, 3, 3), F32)
    with pytest.raises(TypeError, match=r"hx\[0\] \(h0\) must have dtype float32 .*got float64"):
        layer(x_of(), (h.astype(F64), h))
    with pytest.raises(TypeError, match=r"hx\[1\] \(c0\) must have dtype float32 .*got int32"):
        layer(x_of(), (h, h.astype(np.int32)))
    with pytest.raises(TypeError, match=r"hx must have dtype float64 .*got float32"):
        fusedrnn.GRU(4, 3, dtype=F64)(x_of(dtype=F64), h)


def test_hx_of_wrong_kind():
    """Each a TypeError (a ValueError for an LSTM tuple of another length) and a RuntimeError,
    as the torch adapter raises (torch.nn's modules raise RuntimeError or, by accident,
    IndexError and AttributeError)."""
    h = np.zeros((1, 3, 3), F32)
    for layer, hx in ((fusedrnn.GRU(4, 3), (h, h)), (fusedrnn.LSTM(4, 3), h),
                      (fusedrnn.LSTM(4, 3), (h, h, h))):
        for kind in (TypeError, ValueError, RuntimeError):
            with pytest.raises(kind, match="hx for"):
                layer(x_of(), hx)
    with pytest.raises(TypeError, match=r"hx for GRU must be one array .*got a tuple "
                                        r"\(only LSTM takes \(h0, c0\)\)"):
        fusedrnn.GRU(4, 3)(x_of(), (h, h))
    with pytest.raises(TypeError, match="hx for RNN must be one array"):
        fusedrnn.RNN(4, 3)(x_of(), [h])
    with pytest.raises(TypeError, match=r"hx for LSTM must be a tuple \(h0, c0\) of arrays, "
                                        r"got ndarray"):
        fusedrnn.LSTM(4, 3)(x_of(), h)
    with pytest.raises(ValueError, match=r"hx for LSTM must be a tuple \(h0, c0\) of two arrays, "
                                         r"got 3 items"):
        fusedrnn.LSTM(4, 3)(x_of(), (h, h, h))
    with pytest.raises(TypeError, match=r"hx\[1\] \(c0\) must be an array, got None"):
        fusedrnn.LSTM(4, 3)(x_of(), (h, None))


@pytest.mark.parametrize("lengths,exc,match", [
    ([0, 2, 5], ValueError, r"lengths must lie in 1..5 \(the number of time steps\), got min 0"),
    ([1, 6, 5], ValueError, r"lengths must lie in 1..5 .*max 6"),
    ([-1, 2, 3], ValueError, r"lengths must lie in 1..5"),
    ([1, 2], ValueError, r"lengths must have shape \(3,\) \(one per batch row\), got \(2,\)"),
    ([[1, 2, 3]], ValueError, r"lengths must have shape \(3,\)"),
    ([1.0, 2.0, 3.0], TypeError, "lengths must be integers, got dtype float64"),
    ([True, True, True], TypeError, "lengths must be integers, got dtype bool"),
    (["1", "2", "3"], TypeError, "lengths must be integers"),
])
def test_bad_lengths(lengths, exc, match):
    with pytest.raises(exc, match=match):
        fusedrnn.LSTM(4, 3, bidirectional=True)(x_of(), lengths=lengths)


def test_lengths_out_of_range_are_caught_as_torchs_packing_raises_them():
    """pack_padded_sequence raises RuntimeError for a length of 0: so does ours (a ValueError
    too), for the layers and fusedrnn.functional alike."""
    for call in (lambda: fusedrnn.GRU(4, 3)(x_of(), lengths=[0, 2, 5]),
                 lambda: functional.forward("gru", x_of(), None, None, np.zeros((9, 4), F32),
                                            np.zeros((9, 3), F32), None, None, lengths=[1, 6, 5])):
        for exc in (ValueError, RuntimeError):
            with pytest.raises(exc, match="lengths must lie in 1..5"):
                call()


@pytest.mark.parametrize("bad", [0, 6, -2 ** 62])
def test_the_kernels_own_call_refuses_lengths_out_of_range(bad):
    """_C.forward checks lengths itself (the kernels index by them), whoever called it: the
    Python checks above never let such lengths reach it."""
    from fusedrnn import _C
    rng = np.random.default_rng(0)
    w_ih, w_hh = rng.standard_normal((3, 4)).astype(F32), rng.standard_normal((3, 3)).astype(F32)
    h0 = np.zeros((3, 3), F32)
    lengths = np.array([1, bad, 5], np.int64)
    with pytest.raises(ValueError, match=f"lengths must lie in 1..5, got {bad}"):
        _C.forward(0, True, False, True, x_of(), h0, None, w_ih, w_hh, None, None, None, lengths)


def test_lengths_of_any_integer_type_work():
    layer = fusedrnn.GRU(4, 3, dtype=F64)
    x = x_of(dtype=F64)
    want = layer(x, lengths=[5, 2, 3])[0]
    for lens in (np.array([5, 2, 3], np.int8), np.array([5, 2, 3], np.uint32), (5, 2, 3)):
        np.testing.assert_array_equal(layer(x, lengths=lens)[0], want)


# ----------------------------------------------------------------------------------------------
# Backward arguments and order

def test_backward_before_any_training_forward():
    layer = fusedrnn.GRU(4, 3)
    with pytest.raises(RuntimeError, match="backward needs a forward in training mode first: "
                                           "no forward has run yet"):
        layer.backward(np.zeros((5, 3, 3), F32))


def test_backward_after_eval_forward():
    layer = fusedrnn.LSTM(4, 3)
    y, _ = layer(x_of())
    layer.eval()
    layer(x_of())
    with pytest.raises(RuntimeError, match=r"the last forward ran in eval mode \(call "
                                           r"layer.train\(\) first\)"):
        layer.backward(y)


def test_backward_with_bad_dy_and_dhn_keeps_the_saved_state():
    layer = fusedrnn.LSTM(4, 3, num_layers=2, batch_first=True)
    x = x_of().transpose(1, 0, 2)                       # (B, T, I) = (3, 5, 4)
    y, (hn, cn) = layer(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(3, 5, 3\), got \(5, 3, 3\)"):
        layer.backward(np.zeros((5, 3, 3), F32))
    with pytest.raises(TypeError, match="dy must have dtype float32 .*got float64"):
        layer.backward(y.astype(F64))
    with pytest.raises(TypeError, match=r"dhn for LSTM must be None or a tuple \(dhn, dcn\)"):
        layer.backward(y, hn)
    with pytest.raises(TypeError, match=r"dhn for LSTM must be None or a tuple \(dhn, dcn\) "
                                        r"\(either may be None\), got a tuple of 3 items"):
        layer.backward(y, (hn, cn, cn))
    with pytest.raises(ValueError, match=r"dhn\[1\] \(dcn\) must have shape \(2, 3, 3\)"):
        layer.backward(y, (hn, cn[:1]))
    with pytest.raises(TypeError, match=r"dhn\[0\] \(dhn\) must have dtype float32"):
        layer.backward(y, (hn.astype(F64), None))
    dx, (dh0, dc0) = layer.backward(y, (None, cn))    # still there after the failures
    assert dx.shape == x.shape and dh0.shape == hn.shape and dc0.shape == cn.shape
    gru = fusedrnn.GRU(4, 3)
    y, hn = gru(x_of())
    with pytest.raises(TypeError, match="dhn for GRU must be one array"):
        gru.backward(y, (hn,))
    with pytest.raises(RuntimeError, match="dhn for GRU must be one array"):
        gru.backward(y, (hn,))
    with pytest.raises(ValueError, match=r"dhn must have shape \(1, 3, 3\)"):
        gru.backward(y, hn[:, :2])


# ----------------------------------------------------------------------------------------------
# State dicts

def test_state_dict_missing_and_unexpected_keys_are_named():
    layer = fusedrnn.LSTM(4, 3, bidirectional=True)
    sd = dict(layer.state_dict())
    del sd["bias_hh_l0_reverse"]
    sd["weight_hr_l0"] = np.zeros((3, 3), F32)
    with pytest.raises(ValueError, match=r"missing keys \['bias_hh_l0_reverse'\] and "
                                         r"unexpected keys \['weight_hr_l0'\]"):
        layer.load_state_dict(sd)
    no_bias = fusedrnn.LSTM(4, 3, bidirectional=True, bias=False)
    with pytest.raises(ValueError, match=r"unexpected keys \['bias_ih_l0', 'bias_hh_l0', "):
        no_bias.load_state_dict(layer.state_dict())


def test_state_dict_not_strict_loads_what_matches_and_names_the_rest():
    """strict=False as torch's: the layer's names that are there are loaded, the others keep
    their values, and the result names both sides' extra keys; a misshaped entry still fails."""
    layer = fusedrnn.LSTM(4, 3, bidirectional=True, seed=0)
    source = fusedrnn.LSTM(4, 3, bidirectional=True, seed=1)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("_reverse")}
    sd["weight_hr_l0"] = np.zeros((3, 3), F32)
    result = layer.load_state_dict(sd, strict=False)
    assert result.missing_keys == [k for k in before if k.endswith("_reverse")]
    assert result.unexpected_keys == ["weight_hr_l0"]
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k] if k.endswith("_reverse") else sd[k])
    assert layer.load_state_dict(source.state_dict()) == ([], [])
    sd["weight_ih_l0"] = np.zeros((12, 5), F32)
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l0'\] must have shape"):
        layer.load_state_dict(sd, strict=False)
    with pytest.raises(TypeError, match="strict must be a bool, got str"):
        layer.load_state_dict(sd, strict="no")
    with pytest.raises(ValueError, match="assign=True is not supported"):
        layer.load_state_dict(source.state_dict(), assign=True)


def test_state_dict_mismatches_are_also_runtime_errors_as_torchs():
    """Keys that do not match (strict) and misshaped values (strict or not): torch.nn raises
    RuntimeError, so code written for it catches that; ours are ValueErrors too."""
    layer = fusedrnn.LSTM(4, 3)
    sd = dict(layer.state_dict())
    del sd["bias_hh_l0"]
    with pytest.raises(RuntimeError, match="missing keys"):
        layer.load_state_dict(sd)
    sd = dict(layer.state_dict(), weight_ih_l0=np.zeros((12, 5), F32))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"state_dict\['weight_ih_l0'\] must have shape"):
            layer.load_state_dict(sd, strict=strict)


def test_state_dict_arguments_are_checked():
    layer = fusedrnn.GRU(4, 3)
    with pytest.raises(TypeError, match="prefix must be a str, got int"):
        layer.state_dict(prefix=3)
    with pytest.raises(TypeError, match=r"destination must be None or a mutable mapping \(a dict\)"
                                        r" to fill, got list"):
        layer.state_dict(destination=[])
    with pytest.raises(TypeError, match="keep_vars must be a bool, got str"):
        layer.state_dict(keep_vars="yes")


def test_parameter_listing_arguments_are_checked():
    layer = fusedrnn.RNN(4, 3)
    with pytest.raises(TypeError, match="prefix must be a str, got bytes"):
        layer.named_parameters(prefix=b"rnn")
    with pytest.raises(TypeError, match="recurse must be a bool, got int"):
        layer.named_parameters(recurse=0)
    with pytest.raises(TypeError, match="remove_duplicate must be a bool, got NoneType"):
        layer.named_parameters(remove_duplicate=None)
    with pytest.raises(TypeError, match="recurse must be a bool, got str"):
        layer.parameters(recurse="no")


def test_state_dict_misshaped_or_non_float_entries_are_named():
    layer = fusedrnn.GRU(4, 3, num_layers=2)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    sd = {k: v + 1 for k, v in layer.state_dict().items()}
    sd["weight_ih_l1"] = np.zeros((9, 4), F32)
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l1'\] must have shape \(9, 3\), "
                                         r"got \(9, 4\)"):
        layer.load_state_dict(sd)
    sd["weight_ih_l1"] = np.zeros((9, 3), np.int64)
    with pytest.raises(TypeError, match=r"state_dict\['weight_ih_l1'\] must have a float dtype, "
                                        r"got int64"):
        layer.load_state_dict(sd)
    # a ragged list gave NumPy's "setting an array element with a sequence", naming no key
    sd["weight_ih_l1"] = [[0.0] * 3] * 8 + [[0.0] * 2]
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l1'\] must be an array, got a "
                                         r"list that NumPy cannot read as one"):
        layer.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"weight_hh_l0 must be an array, got a list"):
        layer.weight_hh_l0 = [[0.0] * 3] * 8 + [[0.0] * 2]
    for k, v in layer.state_dict().items():            # nothing was copied
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match="state_dict must be a mapping of names to arrays, "
                                        "got list"):
        layer.load_state_dict(list(sd.values()))


# ----------------------------------------------------------------------------------------------
# Unusual but valid inputs

@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_strided_fortran_and_read_only_inputs_work_and_are_not_modified(cell):
    rng = np.random.default_rng(1)
    make = {"rnn_tanh": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[cell]
    layer = make(4, 5, num_layers=2, bidirectional=True, dtype=F64, seed=0)
    x = rng.standard_normal((5, 3, 4))
    h0 = rng.standard_normal((4, 3, 5))
    c0 = rng.standard_normal((4, 3, 5))
    lengths = np.array([5, 2, 4])
    dy = rng.standard_normal((5, 3, 10))
    dhn = rng.standard_normal((4, 3, 5))

    def hx(h, c):
        return (h, c) if cell == "lstm" else h

    y, h = layer(x, hx(h0, c0), lengths)
    dx, dh = layer.backward(dy, hx(dhn, dhn))
    want = [y, dx, dict((k, g.copy()) for k, g in layer.grads.items())]

    def variants(a):
        big = np.zeros(a.shape + (2,))
        big[..., 0] = a
        f = np.asfortranarray(a)
        ro = a.copy()
        ro.flags.writeable = False
        return {"strided": big[..., 0], "fortran": f, "readonly": ro,
                "reversed": np.ascontiguousarray(a[::-1])[::-1]}

    originals = {n: a.copy() for n, a in
                 dict(x=x, h0=h0, c0=c0, lengths=lengths, dy=dy, dhn=dhn).items()}
    for kind in ("strided", "fortran", "readonly", "reversed"):
        v = {n: variants(a)[kind] for n, a in dict(x=x, h0=h0, c0=c0, dy=dy, dhn=dhn).items()}
        ro_len = lengths.copy()
        ro_len.flags.writeable = False
        layer.zero_grad()
        y2, _ = layer(v["x"], hx(v["h0"], v["c0"]), ro_len if kind == "readonly" else lengths)
        dx2, _ = layer.backward(v["dy"], hx(v["dhn"], v["dhn"]))
        np.testing.assert_array_equal(y2, want[0])
        np.testing.assert_array_equal(dx2, want[1])
        for k, g in layer.grads.items():
            np.testing.assert_array_equal(g, want[2][k])
        for n, a in v.items():                         # inputs are never modified
            np.testing.assert_array_equal(a, originals[n])
    for n, a in dict(x=x, h0=h0, c0=c0, lengths=lengths, dy=dy, dhn=dhn).items():
        np.testing.assert_array_equal(a, originals[n])


@pytest.mark.parametrize("make", [fusedrnn.RNN, fusedrnn.LSTM, fusedrnn.GRU])
def test_nan_propagates(make):
    layer = make(4, 3, num_layers=2, dtype=F64, seed=0)
    x = x_of(dtype=F64)
    x[2, 1, 0] = np.nan                               # row 1 from step 2 on
    y, h = layer(x)
    hn = h[0] if isinstance(h, tuple) else h
    assert np.isnan(y[2:, 1]).all() and np.isnan(hn[:, 1]).all()
    assert np.isfinite(y[:2]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isfinite(hn[:, [0, 2]]).all()
    dx, _ = layer.backward(np.ones_like(y))
    assert np.isnan(dx[:, 1]).any()
    assert np.isfinite(dx[:, [0, 2]]).all()


@pytest.mark.parametrize("make", [fusedrnn.RNN, fusedrnn.LSTM, fusedrnn.GRU])
def test_batch_of_zero_with_hx_and_lengths(make):
    layer = make(4, 3, bidirectional=True, batch_first=True)
    h0 = np.zeros((2, 0, 3), F32)
    hx = (h0, h0) if make is fusedrnn.LSTM else h0
    y, h = layer(np.zeros((0, 5, 4), F32), hx, lengths=[])
    assert y.shape == (0, 5, 6)
    dx, dh = layer.backward(y, h)
    assert dx.shape == (0, 5, 4)


def test_functional_refusals_name_the_argument():
    """fusedrnn.functional blamed the wrong argument or none: x=None ("got object"), a list x
    (the weights "must have dtype float64"), dy=None, a ctx of another type and isa=3 (pybind's
    dump of the arrays), a layer tuple short of its five entries (an internal function's
    argument names); and a big-endian x read "must have dtype float32, got float32"."""
    from fusedrnn import functional as F
    rng = np.random.default_rng(0)
    x = x_of()
    w_ih, w_hh = (rng.standard_normal(s).astype(F32) for s in ((12, 4), (12, 4)))
    h0 = np.zeros((3, 4), F32)
    args = ("gru", x, h0, None, w_ih, w_hh, None, None)
    with pytest.raises(TypeError, match=r"x must be an array \(T, B, I\) of float32 or float64, "
                                        "got None"):
        F.forward("gru", None, *args[2:])
    with pytest.raises(TypeError, match=r"w_hh must have dtype float64 \(x's dtype\), got float32"):
        F.forward("gru", x.astype(F64).tolist(), *args[2:])
    with pytest.raises(TypeError, match="x must be native-byte-order float32, got >f4"):
        F.forward("gru", x.astype(">f4"), *args[2:])
    with pytest.raises(TypeError, match="isa must be None or a name"):
        F.forward(*args, isa=3)
    with pytest.raises(ValueError, match=r"layers\[0\] must be \(w_ih, w_hh, b_ih, b_hh, w_hr\)"):
        F.forward_stack("gru", x, [h0], [None], [(w_ih, w_hh)])
    ctx = F.forward(*args)[3]
    with pytest.raises(TypeError, match="dy must be an array shaped as the forward's y"):
        F.backward(ctx, None)
    with pytest.raises(TypeError, match="ctx must be the context a forward with training=True "
                                        "returned, got str"):
        F.backward("junk", np.zeros((5, 3, 4), F32))
    # the kernels' own call blamed h0 ("h0 must have dtype float16") for a float16 x
    from fusedrnn import _C
    with pytest.raises(TypeError, match="x must be float32 or float64, got float16"):
        _C.forward(3, True, False, False, x.astype(np.float16), h0, None, w_ih, w_hh, None, None,
                   None, None)


def _functional_gru(**changes):
    """functional.forward of a small GRU (T, B, I, H = 5, 3, 4, 4), with ``changes`` to its
    arguments."""
    rng = np.random.default_rng(0)
    args = dict(cell="gru", x=x_of(), h0=None, c0=None,
                w_ih=rng.standard_normal((12, 4)).astype(F32),
                w_hh=rng.standard_normal((12, 4)).astype(F32), b_ih=None, b_hh=None)
    args.update(changes)
    return functional.forward(**args)


@pytest.mark.parametrize("changes,exc,match", [
    (dict(cell="elman"), ValueError,
     r"cell must be one of \['gru', 'lstm', 'rnn_relu', 'rnn_tanh'\], got 'elman'"),
    (dict(x=x_of().astype(np.int32)), TypeError, "x must have dtype float32 or float64, got int32"),
    (dict(x=[[[1.0]], [[1.0], [2.0]]]), ValueError,
     "x must be an array, got a list that NumPy cannot read as one"),
    (dict(x=x_of(T=0)), ValueError, r"x must have at least one time step, got shape \(0, 3, 4\)"),
    (dict(w_hr=np.zeros((4, 4), F32)), ValueError, r"w_hr \(projection\) exists only for lstm"),
    (dict(w_hh=np.zeros((12, 3), F32)), ValueError,
     r"w_hh must have shape \(12, 4\), got \(12, 3\)"),
    (dict(b_ih=np.zeros(12, F32)), ValueError, "b_ih and b_hh must both be given or both be None"),
    (dict(b_hh=np.zeros(12, F32)), ValueError, "b_ih and b_hh must both be given or both be None"),
    (dict(c0=np.zeros((3, 4), F32)), ValueError, "c0 is only for lstm, got an array for gru"),
])
def test_functional_checks_name_the_argument(changes, exc, match):
    with pytest.raises(exc, match=match):
        _functional_gru(**changes)


def test_a_misshaped_argument_is_named_before_a_broadcast_x_is_copied():
    """functional.forward made x C-contiguous before checking the other arguments: a broadcast
    x of 60 TiB as a copy raised MemoryError instead of naming the misshaped h0 (and one that
    fitted in memory was copied first, gigabytes written for an error)."""
    from fusedrnn import functional as F
    x = np.broadcast_to(np.zeros((1, 1, 4), F32), (2 ** 40, 3, 4))
    w_ih, w_hh = np.zeros((9, 4), F32), np.zeros((9, 3), F32)
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 3\), got \(2, 3\)"):
        F.forward("gru", x, np.zeros((2, 3), F32), None, w_ih, w_hh, None, None)
    with pytest.raises(ValueError, match=r"lengths must lie in 1\.\.1099511627776"):
        F.forward("gru", x, None, None, w_ih, w_hh, None, None, lengths=[1, 0, 1])



def test_misshaped_states_and_weights_are_named_before_they_are_copied():
    """functional.forward made h0, c0 and each weight C-contiguous before checking its shape: a
    broadcast one of the wrong shape, 24 TiB as a copy, raised MemoryError instead of naming it
    (and one that fitted in memory was copied first)."""
    from fusedrnn import functional as F
    x = x_of()
    huge = lambda cols: np.broadcast_to(np.zeros((1, 1), F32), (2 ** 40, cols))  # noqa: E731
    w_ih, w_hh, b = np.zeros((16, 4), F32), np.zeros((16, 4), F32), np.zeros(16, F32)
    args = dict(cell="lstm", x=x, h0=None, c0=None, w_ih=w_ih, w_hh=w_hh, b_ih=b, b_hh=b)
    for name, value, match in [
            ("h0", huge(4), r"h0 must have shape \(3, 4\), got \(1099511627776, 4\)"),
            ("c0", huge(4), r"c0 must have shape \(3, 4\), got \(1099511627776, 4\)"),
            ("w_ih", huge(4), r"w_ih must have shape \(16, 4\), got \(1099511627776, 4\)"),
            ("w_hr", huge(4), r"w_hr must have shape \(4, 4\), got \(1099511627776, 4\)"),
            ("b_ih", huge(1)[:, 0], r"b_ih must have shape \(16,\), got \(1099511627776,\)"),
            ("w_hh", np.broadcast_to(np.zeros(1, F32), (2 ** 40, 3, 2)),
             r"w_hh must be 2-d with a multiple of 4 rows, got shape \(1099511627776, 3, 2\)")]:
        with pytest.raises(ValueError, match=match):
            F.forward(**{**args, name: value})


def test_backward_names_a_misshaped_gradient_before_it_is_copied():
    """functional.backward made dy, dhn, dcn and the weights C-contiguous before the kernels
    checked their shapes: a broadcast one of the wrong shape, terabytes as a copy, raised
    MemoryError instead of naming it."""
    from fusedrnn import functional as F
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4)).astype(F32)
    w_ih, w_hh, w_hr = (rng.standard_normal(s).astype(F32) for s in [(16, 4), (16, 2), (2, 4)])
    _, _, _, ctx = F.forward("lstm", x, None, None, w_ih, w_hh, None, None, w_hr=w_hr,
                             training=True)
    huge = lambda *shape: np.broadcast_to(np.zeros(1, F32), shape)  # noqa: E731
    dy, T40 = np.zeros((5, 3, 2), F32), 2 ** 40
    weights = (w_ih, w_hh, w_hr)
    for kwargs, match in [
            (dict(dy=huge(T40, 3, 2)), r"dy must have shape \(5, 3, 2\), got \(1099511627776, 3, 2\)"),
            (dict(dhn=huge(T40, 2)), r"dhn must have shape \(3, 2\), got \(1099511627776, 2\)"),
            (dict(dcn=huge(T40, 4)), r"dcn must have shape \(3, 4\), got \(1099511627776, 4\)"),
            (dict(weights=(huge(T40, 4), w_hh, w_hr)),
             r"weights\[0\] \(w_ih\) must have shape \(16, 4\), got \(1099511627776, 4\)"),
            (dict(weights=(w_ih, w_hh, huge(T40, 4))),
             r"weights\[2\] \(w_hr\) must have shape \(2, 4\), got \(1099511627776, 4\)")]:
        with pytest.raises(ValueError, match=match):
            F.backward(ctx, **{"dy": dy, "weights": weights, **kwargs})
    # a GRU's context has no cell state and no projection
    _, _, _, ctx = F.forward("gru", x, None, None, rng.standard_normal((12, 4)).astype(F32),
                             rng.standard_normal((12, 4)).astype(F32), None, None, training=True)
    with pytest.raises(ValueError, match="dcn is only for LSTM"):
        F.backward(ctx, np.zeros((5, 3, 4), F32), dcn=huge(T40, 4))
    with pytest.raises(ValueError, match=r"weights\[2\] \(w_hr\) must be None"):
        F.backward(ctx, np.zeros((5, 3, 4), F32),
                   weights=(np.zeros((12, 4), F32), np.zeros((12, 4), F32), huge(T40, 4)))
    # and the context is still good for a well-shaped backward
    assert F.backward(ctx, np.zeros((5, 3, 4), F32))[0].shape == (5, 3, 4)


def test_functional_takes_weights_as_lists():
    """A list for w_ih passed every check and then failed on its .shape (AttributeError: 'list'
    object has no attribute 'shape') in functional.forward."""
    from fusedrnn import functional as F
    rng = np.random.default_rng(0)
    x = x_of(dtype=F64)
    w_ih, w_hh = rng.standard_normal((9, 4)), rng.standard_normal((9, 3))
    want = F.forward("gru", x, None, None, w_ih, w_hh, None, None, training=False)
    got = F.forward("gru", x, None, None, w_ih.tolist(), w_hh.tolist(), None, None,
                    training=False)
    np.testing.assert_array_equal(got[0], want[0])


def test_lengths_numpy_cannot_read_are_named():
    """A ragged lengths list gave NumPy's "setting an array element with a sequence", naming
    no argument."""
    with pytest.raises(ValueError, match="lengths must be an array, got a list that NumPy"):
        fusedrnn.GRU(4, 3)(x_of(), lengths=[[5], [4, 3], 2])

def test_a_big_endian_input_is_named_as_such():
    with pytest.raises(TypeError, match=r"input must be native-byte-order float32 \(the layer's "
                                        r"dtype\), got >f4"):
        fusedrnn.GRU(4, 3)(x_of().astype(">f4"))


def test_an_input_numpy_cannot_read_is_named():
    """A ragged list gave NumPy's "setting an array element with a sequence" naming no argument."""
    with pytest.raises(ValueError,
                       match="input must be an array, got a list that NumPy cannot read"):
        fusedrnn.GRU(1, 3, dtype=F64)([[[1.0]], [[1.0], [2.0]]])
    layer = fusedrnn.GRU(4, 3)
    y, _ = layer(x_of())
    with pytest.raises(ValueError, match="dy must be an array, got a list"):
        layer.backward([y[0], y[1, :2]])


@pytest.mark.torch
def test_a_tensor_that_requires_grad_is_named_with_what_to_pass_instead():
    """torch's own refusal ("Can't call numpy() on Tensor that requires grad") named nothing."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(x_of()).requires_grad_(True)
    with pytest.raises(TypeError, match=r"input is a torch tensor that requires grad: .* pass "
                                        r"input.detach\(\), or use fusedrnn.torch's modules"):
        fusedrnn.LSTM(4, 3)(x)
    y, _ = fusedrnn.LSTM(4, 3, seed=0)(x.detach())
    np.testing.assert_array_equal(y, fusedrnn.LSTM(4, 3, seed=0)(x_of())[0])


@pytest.mark.torch
def test_a_packed_sequence_is_named_with_what_to_pass_instead():
    """Code moved from torch.nn passes a PackedSequence; NumPy read it as a ragged tuple."""
    torch = pytest.importorskip("torch")
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x_of()), [5, 4, 2])
    with pytest.raises(TypeError, match=r"input is a torch PackedSequence: .* take the padded "
                                        r"array with lengths="):
        fusedrnn.LSTM(4, 3)(packed)


def test_an_output_too_big_for_memory_is_a_memory_error_with_its_size():
    """A call whose outputs cannot be allocated raises MemoryError naming the size and shape
    (pybind11's said "std::bad_alloc"), here y (T, B, H) of 4 PiB from an input of no values."""
    from fusedrnn import functional as F
    T, B, H = 2 ** 46, 4, 4
    # strided over one byte: NumPy before 1.23 refuses np.empty of a shape that large
    x = np.lib.stride_tricks.as_strided(np.empty(1, np.float32), (T, B, 0), (0, 0, 4))
    weights = (np.zeros((H, 0), np.float32), np.zeros((H, H), np.float32), None, None)
    with pytest.raises(MemoryError, match=rf"cannot allocate 4194304.0 GiB for an array of "
                                          rf"shape \({T}, {B}, {H}\) float32"):
        F.forward("rnn_tanh", x, np.zeros((B, H), np.float32), None, *weights, training=False)


_OUTPUT_PAST_2_63_BYTES = """
import sys
import numpy as np
from fusedrnn import functional as F
T, H = 7 * 2 ** 58, 2  # y (T, 1, H) float32: 1.75 * 2^63 bytes, less than 2^64
x = np.lib.stride_tricks.as_strided(np.empty(1, np.float32), (T, 1, 0), (0, 0, 4))
weights = (np.zeros((H, 0), np.float32), np.zeros((H, H), np.float32), None, None)
lengths = [3] if sys.argv[1] == "lengths" else None
try:
    F.forward("rnn_tanh", x, np.zeros((1, H), np.float32), None, *weights, lengths=lengths,
              training=False)
except MemoryError as e:
    print("MemoryError:", e)
"""


@pytest.mark.parametrize("lengths", ["none", "lengths"])
def test_an_output_of_more_bytes_than_2_63_is_a_memory_error_not_a_hang(lengths):
    """y of 1.75 * 2^63 bytes (under 2^64, so no wrap in the count) from an x of no values hung
    the call: the block cache's size classes doubled past 2^63 to 0 and never ended; and with
    lengths, before that, the scan of x's padding walked its 2^61 empty rows. Run apart, so a
    hang fails."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _OUTPUT_PAST_2_63_BYTES, lengths],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (f"MemoryError: cannot allocate {1.75 * 2 ** 33:.1f} GiB for an array of shape "
            f"({7 * 2 ** 58}, 1, 2) float32") in out.stdout, out.stdout


def test_shape_errors_are_also_runtime_errors_as_torchs():
    """torch.nn raises RuntimeError for a misshaped input or state: code ported with `except
    RuntimeError` still catches fusedrnn's (a ValueError too, as before)."""
    lstm = fusedrnn.LSTM(4, 3, num_layers=2)
    x = x_of()
    y, (hn, cn) = lstm(x)
    calls = [lambda: lstm(np.zeros((5, 3, 7), F32)),                    # input size
             lambda: lstm(np.zeros((0, 3, 4), F32)),                    # no time step
             lambda: lstm(x, (hn[:1], cn)),                             # h0
             lambda: lstm(x, lengths=[5, 5]),                           # lengths
             lambda: lstm.backward(y[:, :2]),                           # dy
             lambda: lstm.backward(y, (hn, cn[:1])),                    # dcn
             lambda: functional.forward("gru", x[0], None, None, np.zeros((9, 4), F32),
                                        np.zeros((9, 3), F32), None, None)]   # x not 3-d
    for call in calls:
        with pytest.raises(RuntimeError, match="must") as caught:
            call()
        assert isinstance(caught.value, ValueError)
