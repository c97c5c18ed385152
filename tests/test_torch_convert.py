"""fusedrnn.torch.convert: every torch.nn RNN/LSTM/GRU of a model swapped at once, against the
same model on torch.nn (outputs, gradients, an optimiser's step), and its refusals."""
import copy
import re
import warnings

import numpy as np
import pytest

from fusedrnn.tolerances import assert_close

torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402

pytestmark = pytest.mark.torch


class Model(torch.nn.Module):
    """Every cell in every kind of container, one GRU held at two places."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True,
                                     proj_size=3)
        self.blocks = torch.nn.ModuleList([torch.nn.GRU(6, 5), torch.nn.Linear(5, 5)])
        self.by_name = torch.nn.ModuleDict({"relu": torch.nn.RNN(5, 4, nonlinearity="relu")})
        self.tail = torch.nn.Sequential(torch.nn.Sequential(torch.nn.RNN(4, 3)))
        self.same_gru = self.blocks[0]
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        y, _ = self.encoder(x)
        y, _ = self.same_gru(y.transpose(0, 1))
        y = self.blocks[1](y)
        y, _ = self.by_name["relu"](y)
        y, _ = self.tail[0][0](y)
        return self.head(y[-1])


def _rnn_types(model):
    return {name: type(m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.RNNBase)}


def test_convert_swaps_every_layer_in_place_and_trains_as_torch_nn():
    torch.manual_seed(0)
    want_model = Model().double()
    model = copy.deepcopy(want_model)
    params = list(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)      # built before the swap
    want_opt = torch.optim.Adam(want_model.parameters(), lr=0.01)
    keys = list(model.state_dict())

    assert ft.convert(model) is model
    assert _rnn_types(model) == {"encoder": ft.LSTM, "blocks.0": ft.GRU,
                                 "by_name.relu": ft.RNN, "tail.0.0": ft.RNN}
    assert model.same_gru is model.blocks[0]
    assert model.by_name["relu"].nonlinearity == "relu" and model.encoder.proj_size == 3
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys

    x, target = torch.randn(2, 7, 4, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
    for _ in range(3):
        for m, o in ((model, opt), (want_model, want_opt)):
            o.zero_grad()
            ((m(x) - target) ** 2).mean().backward()
            o.step()
    for (name, got), want in zip(model.named_parameters(), want_model.parameters()):
        assert_close(got.detach().numpy(), want.detach().numpy(), np.float64, what=name)
    assert_close(model(x).detach().numpy(), want_model(x).detach().numpy(), np.float64)


def test_convert_keeps_training_flags_and_is_idempotent():
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.GRU(4, 4).eval())
    ft.convert(model)
    assert model[0].training and not model[1].training
    converted = list(model)
    assert ft.convert(model) is model                  # fusedrnn's own modules stay as they are
    assert all(a is b for a, b in zip(model, converted))


def test_convert_of_a_layer_returns_its_replacement():
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    new = ft.convert(lstm)
    assert type(new) is ft.LSTM and type(lstm) is torch.nn.LSTM
    assert new.weight_ih_l0 is lstm.weight_ih_l0
    assert_close(new(x)[0].detach().numpy(), lstm(x)[0].detach().numpy(), np.float32)


def test_convert_takes_a_subclass_that_only_adds_a_constructor():
    class Tagged(torch.nn.GRU):
        def __init__(self, tag):
            super().__init__(2, 3)
            self.tag = tag

    model = torch.nn.Sequential(Tagged("a"))
    ft.convert(model)
    assert type(model[0]) is ft.GRU


def _model_with_a_hooked_lstm():
    hooked = torch.nn.LSTM(3, 4)
    hooked.register_forward_hook(lambda *args: None)
    return torch.nn.Sequential(torch.nn.GRU(3, 3), torch.nn.Sequential(hooked))


def test_convert_refuses_by_path_before_replacing_anything():
    class Scaled(torch.nn.RNN):
        def forward(self, x, hx=None):
            return super().forward(2 * x, hx)

    model = _model_with_a_hooked_lstm()
    model.append(Scaled(3, 3))
    with pytest.raises(TypeError) as e:
        ft.convert(model)
    msg = str(e.value)
    assert "model.1.0: LSTM.from_module cannot convert a module with hooks" in msg
    assert re.search(r"model\.2: RNN\.from_module cannot convert a \S*Scaled: it overrides "
                     r"forward", msg)
    assert "strict=False" in msg
    assert _rnn_types(model) == {"0": torch.nn.GRU, "1.0": torch.nn.LSTM, "2": Scaled}


def test_convert_not_strict_replaces_the_rest_and_warns():
    model = _model_with_a_hooked_lstm()
    with pytest.warns(UserWarning, match=r"left these as they are: model\.1\.0: LSTM"):
        ft.convert(model, strict=False)
    assert _rnn_types(model) == {"0": ft.GRU, "1.0": torch.nn.LSTM}


def _scripted(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch 2.13 deprecates script)
        return torch.jit.script(module)


def test_convert_refuses_a_scripted_rnn_and_what_is_no_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _scripted(torch.nn.LSTM(3, 4)))
    with pytest.raises(TypeError, match=r"model\.1: a TorchScript LSTM.*torch\.jit\.trace"):
        ft.convert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ft.convert(torch.nn.Sequential(_scripted(torch.nn.Linear(2, 2)))) \
            is not None                      # TorchScript without RNNs: nothing to refuse
    with pytest.raises(TypeError, match="needs a torch.nn.Module, got dict"):
        ft.convert({"rnn": torch.nn.LSTM(2, 2)})


def test_convert_an_rnn_held_by_an_rnn_in_one_call():
    """The outer was replaced first, carrying the old inner; the inner's replacement went to
    the old outer, so a second convert was needed."""
    outer = torch.nn.LSTM(3, 4)
    outer.inner = torch.nn.GRU(4, 4)
    model = torch.nn.Sequential(outer)
    ft.convert(model)
    assert type(model[0]) is ft.LSTM and type(model[0].inner) is ft.GRU


def test_convert_takes_traced_fusedrnn_and_scripted_modules_of_other_classes():
    """Refused by their TorchScript class name alone before: a jit.trace of fusedrnn's own GRU
    (what the refusal recommends) and a user's scripted class named GRU."""
    class GRU(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ft.GRU(3, 4), torch.randn(2, 1, 3))
    model = torch.nn.Sequential(traced, _scripted(GRU()), torch.nn.RNN(3, 3))
    ft.convert(model)
    assert model[0] is traced and type(model[2]) is ft.RNN


def test_convert_refuses_a_second_scripted_rnn_and_a_compiled_one():
    """A second scripted LSTM of another configuration has a mangled TorchScript name, and
    went through silently; torch.compile's wrapper kept calling the torch.nn module."""
    model = torch.nn.Sequential(_scripted(torch.nn.LSTM(3, 4)), _scripted(torch.nn.LSTM(4, 2)))
    with pytest.raises(TypeError, match=r"model\.0: a TorchScript LSTM.*model\.1: a TorchScript"):
        ft.convert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # (torch's own imports)
        compiled = torch.compile(torch.nn.GRU(3, 4), backend="eager")
    with pytest.raises(TypeError, match=r"model\._orig_mod: compiled by torch.compile.*"
                                        r"torch.compile\(convert\(model\)\)"):
        ft.convert(compiled)


def test_convert_takes_an_rnn_held_as_orig_mod_by_a_plain_module():
    """Only torch.compile's wrapper is refused (a state_dict saved from a compiled model is
    often loaded into a module with an _orig_mod child)."""
    holder = torch.nn.Module()
    holder._orig_mod = torch.nn.LSTM(3, 4)
    ft.convert(holder)
    assert type(holder._orig_mod) is ft.LSTM
