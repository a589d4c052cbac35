"""Bad input gets a clear ValueError/TypeError ("… Got: …", naming the module or tensor) and
loses nothing: after every failed call the model holds the same Parameter objects with the same
values, the same classes, and nothing is registered."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import georeparam


def snapshot(model):
    return (
        {
            n: (p, None if isinstance(p, nn.parameter.UninitializedParameter) else p.detach().clone())
            for n, p in model.named_parameters()
        },
        {n: type(m) for n, m in model.named_modules()},
        {n: georeparam.is_geometric(m) for n, m in model.named_modules()},
    )


def assert_unchanged(model, snap):
    params, classes, registered = snap
    now = dict(model.named_parameters())
    assert set(now) == set(params), f"parameters changed: {set(now) ^ set(params)}"
    for n, (obj, value) in params.items():
        assert now[n] is obj, f"{n} was replaced"
        if value is None:  # an uninitialized (lazy) parameter
            continue
        assert torch.equal(now[n].detach(), value) or (
            value.is_floating_point() and torch.equal(now[n].isnan(), value.isnan())
        ), f"{n} changed"
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: georeparam.is_geometric(m) for n, m in model.named_modules()} == registered


def expect_error(exc, model, call, *names):
    """``call()`` raises ``exc`` with "Got:" and each of ``names`` in its message; ``model`` unchanged."""
    snap = snapshot(model)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert "Got:" in msg, msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    assert_unchanged(model, snap)
    return msg


def _linear_with(weight=None, bias=None):
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        if weight is not None:
            layer.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point() or weight.is_complex())
        if bias is not None:
            layer.bias = nn.Parameter(bias)
    return layer


# -------------------------------------------------------------------------------------------------
# geometric on one layer
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_weight(dtype):
    layer = _linear_with(weight=torch.ones(2, 3, dtype=dtype))
    expect_error(TypeError, layer, lambda: georeparam.geometric(layer), "Linear", "weight", str(dtype))


def test_complex_weight():
    layer = nn.Linear(3, 2, dtype=torch.complex64)
    expect_error(TypeError, layer, lambda: georeparam.geometric(layer), "Linear", "weight", "complex64")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_and_bias(bad):
    w = torch.randn(2, 3)
    w[1, 2] = bad
    layer = _linear_with(weight=w)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer), "Linear.weight", "NaN/Inf")
    b = torch.randn(2)
    b[0] = bad
    layer = _linear_with(bias=b)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer), "Linear.bias")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)], ids=["in0", "out0"])
def test_empty_weight(shape):
    out_f, in_f = shape[1], shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        layer = nn.Linear(in_f, out_f)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer), "Linear.weight", "empty")


@pytest.mark.parametrize(
    "module",
    [nn.ReLU(), nn.BatchNorm1d(3), nn.Embedding(5, 3), nn.RNN(2, 3), nn.LayerNorm(3)],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_module(module):
    expect_error(TypeError, module, lambda: georeparam.geometric(module), type(module).__name__)


def test_not_a_module():
    with pytest.raises(TypeError, match="Got:"):
        georeparam.geometric(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="Got:"):
        georeparam.register([nn.Linear(2, 3)])
    with pytest.raises(TypeError, match="Got:"):
        georeparam.remove("model")


def test_name_that_is_not_a_parameter():
    layer = nn.Linear(3, 2)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer, name="weights"), "weights", "Linear")
    # a 1-D parameter cannot be a weight matrix
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer, name="bias"), "Linear.bias")
    # a bias name that does not exist (other than the default, which may be absent)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer, bias="offset"), "offset", "Linear")
    # a buffer is not a parameter either
    layer.register_buffer("scale", torch.ones(2, 3))
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer, name="scale"), "scale")


def test_lazy_module():
    layer = nn.LazyLinear(3)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer), "LazyLinear.weight")


def test_bad_mode():
    layer = nn.Linear(3, 2)
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer, mode="fastest"), "fastest")
    model = nn.Sequential(nn.Linear(3, 2))
    expect_error(ValueError, model, lambda: georeparam.register(model, mode="fastest"), "fastest")


def test_registering_twice():
    layer = georeparam.geometric(nn.Linear(3, 2))
    expect_error(ValueError, layer, lambda: georeparam.geometric(layer), "Linear", "already")
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    georeparam.register(model)
    expect_error(ValueError, model, lambda: georeparam.register(model), "'0'", "already")
    # a weight carrying some other parametrization
    other = nn.Linear(3, 2)
    parametrize.register_parametrization(other, "weight", nn.Identity())
    expect_error(ValueError, other, lambda: georeparam.geometric(other), "Linear.weight", "Identity")


def test_removing_an_unregistered_module():
    layer = nn.Linear(3, 2)
    expect_error(ValueError, layer, lambda: georeparam.remove(layer), "Linear")
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    expect_error(ValueError, model, lambda: georeparam.remove(model), "Sequential")
    # removing twice
    layer = georeparam.remove(georeparam.geometric(nn.Linear(3, 2)))
    expect_error(ValueError, layer, lambda: georeparam.remove(layer), "Linear")


def test_zero_weight_row_with_nonzero_bias():
    w = torch.randn(3, 4)
    w[1] = 0.0
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.tensor([0.1, 0.5, -0.2]))
    msg = expect_error(ValueError, layer, lambda: georeparam.geometric(layer), "Linear.bias")
    assert "[1]" in msg  # names the unit
    # the same layer with a zero bias there is fine (b = r·λ = 0)
    with torch.no_grad():
        layer.bias[1] = 0.0
    georeparam.geometric(layer)
    assert torch.equal(layer.weight[1], torch.zeros(4)) and layer.bias[1] == 0


def test_bias_of_another_dtype():
    layer = nn.Linear(3, 2)
    layer.bias = nn.Parameter(layer.bias.detach().double())
    expect_error(TypeError, layer, lambda: georeparam.geometric(layer), "Linear.bias", "float64")


# -------------------------------------------------------------------------------------------------
# register is atomic
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["nan", "zero-row-bias", "int"])
def test_register_is_atomic(problem):
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2), nn.Sequential(nn.Linear(2, 2))
    )
    bad = model[4]  # the 3rd supported layer
    with torch.no_grad():
        if problem == "nan":
            bad.weight[0, 0] = math.nan
        elif problem == "zero-row-bias":
            bad.weight[1] = 0.0
            bad.bias[1] = 1.0
        else:
            bad.weight = nn.Parameter(torch.ones(2, 4, dtype=torch.int64), requires_grad=False)
    exc = TypeError if problem == "int" else ValueError
    expect_error(exc, model, lambda: georeparam.register(model), "'4'")
    assert not any(georeparam.is_geometric(m) for m in model.modules())


def _hooks(model):
    return {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._state_dict_hooks))
        for n, m in model.named_modules()
    }


@pytest.mark.parametrize("where", ["sign", "imn"])
def test_register_rolls_back_sign_hooks_and_imn(where, monkeypatch):
    """A failure after the parametrizations (placing the second sign hook, or adding an IMN) takes
    back everything register did: parametrizations, the sign hooks already placed and the IMN."""
    from georeparam import imn as imn_mod
    from georeparam import signs

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    before, snap, hooks = model(x), snapshot(model), _hooks(model)
    calls = []

    def failing(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("planted failure")
            return real(*args, **kwargs)

        return call

    if where == "sign":
        monkeypatch.setattr(signs, "attach", failing(signs.attach))
    else:
        monkeypatch.setattr(imn_mod, "input_mean_norm", failing(imn_mod.input_mean_norm))
    with pytest.raises(RuntimeError, match="planted failure"):
        georeparam.register(model, imn=(where == "imn"))
    assert len(calls) == 2  # the first call succeeded and had to be undone
    assert_unchanged(model, snap)
    assert _hooks(model) == hooks
    assert not any(imn_mod.has_input_mean_norm(m) for m in model.modules())
    assert torch.equal(model(x), before)


def test_register_bad_selectors():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    expect_error(ValueError, model, lambda: georeparam.register(model, exclude=["7"]), "'7'")
    expect_error(ValueError, model, lambda: georeparam.register(model, include=["0", "nope"]), "'nope'")
    expect_error(TypeError, model, lambda: georeparam.register(model, exclude=[3]), "3")
    # including an unsupported module by name is an error, not a silent skip
    expect_error(TypeError, model, lambda: georeparam.register(model, include=["1"]), "ReLU")


# -------------------------------------------------------------------------------------------------
# assignment after registration
# -------------------------------------------------------------------------------------------------


def _registered(transposed=False):
    layer = nn.ConvTranspose1d(4, 6, 3, groups=2) if transposed else nn.Linear(3, 2)
    return georeparam.geometric(layer)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "convT"])
def test_bad_weight_assignment_changes_nothing(transposed):
    layer = _registered(transposed)
    shape = tuple(layer.weight.shape)
    w_before, b_before = layer.weight.detach().clone(), layer.bias.detach().clone()
    cases = [
        (ValueError, torch.randn(tuple(reversed(shape))), "shape"),  # same number of elements
        (ValueError, torch.randn(shape + (1,)), "shape"),
        (TypeError, torch.randn(shape, dtype=torch.float64), "float64"),
        (TypeError, torch.ones(shape, dtype=torch.int64), "int64"),
        (ValueError, torch.full(shape, math.nan), "NaN/Inf"),
    ]
    # a zero unit while that unit's bias is non-zero
    zero_unit = torch.randn(shape)
    if transposed:
        zero_unit[:2, 0] = 0.0  # output channel 0 (group 0, local channel 0)
    else:
        zero_unit[0] = 0.0
    with torch.no_grad():
        layer.bias[0] = 0.5
    b_before = layer.bias.detach().clone()
    cases.append((ValueError, zero_unit, "bias"))
    name = "ConvTranspose1d.weight" if transposed else "Linear.weight"

    def assign(v):
        layer.weight = v

    for exc, value, word in cases:
        expect_error(exc, layer, lambda v=value: assign(v), name, word)
        assert torch.equal(layer.weight, w_before) and torch.equal(layer.bias, b_before)


def test_bad_bias_assignment_changes_nothing():
    layer = _registered()
    w_before, b_before = layer.weight.detach().clone(), layer.bias.detach().clone()

    def assign(v):
        layer.bias = v

    for exc, value, word in [
        (ValueError, torch.randn(1), "shape"),
        (ValueError, torch.randn(2, 1), "shape"),
        (TypeError, torch.randn(2, dtype=torch.float64), "float64"),
        (ValueError, torch.tensor([math.inf, 0.0]), "NaN/Inf"),
    ]:
        expect_error(exc, layer, lambda v=value: assign(v), "Linear.bias", word)
        assert torch.equal(layer.weight, w_before) and torch.equal(layer.bias, b_before)
    # a non-zero bias on a zero unit
    layer.bias = torch.tensor([0.0, 1.0])
    layer.weight = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    expect_error(ValueError, layer, lambda: assign(torch.tensor([1.0, 1.0])), "Linear.bias", "[0]")


def test_plain_checkpoint_with_bad_values_is_refused():
    """load_state_dict of a plain checkpoint with a NaN weight: PyTorch's RuntimeError lists our
    message; the module keeps its coordinates."""
    model = nn.Sequential(nn.Linear(3, 2))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    plain["0.weight"][0, 0] = math.nan
    georeparam.register(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"0\.weight must be finite\. Got:"):
        model.load_state_dict(plain, strict=True)
    assert_unchanged(model, snap)
    plain["0.weight"] = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(plain, strict=True)
    assert_unchanged(model, snap)


# -------------------------------------------------------------------------------------------------
# issue 20: unclear errors made clear
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "size"])
def test_refused_plain_checkpoint_gives_only_the_reason(bad):
    # was: false "Missing key(s) … original0" / "Unexpected key(s) … 0.weight" lines first
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    if bad == "nan":
        plain["0.weight"][0, 0] = math.nan
    else:
        plain["0.weight"] = torch.randn(3, 2)
    georeparam.register(model)
    snap = snapshot(model)
    for strict in (True, False):
        with pytest.raises(RuntimeError) as info:
            model.load_state_dict(plain, strict=strict)
        msg = str(info.value)
        assert "Missing key" not in msg and "Unexpected key" not in msg, msg
        assert ("0.weight must be finite. Got:" if bad == "nan" else "size mismatch for 0.weight") in msg
        assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "args, exc, names",
    [
        ((torch.ones(3), torch.ones(2, 4)), ValueError, ["radius", "(2,)", "(3,)"]),
        (([1.0, 2.0], torch.ones(2, 3)), TypeError, ["radius", "list"]),
        ((torch.ones(2), [[1.0, 2.0], [1.0, 2.0]]), TypeError, ["angles", "list"]),
        ((torch.ones(2), torch.ones(2, 3), torch.ones(3)), ValueError, ["offset", "(2,)", "(3,)"]),
        ((torch.ones(2), torch.ones(2, 3), [0.0, 1.0]), TypeError, ["offset", "list"]),
        ((torch.ones(2, dtype=torch.int64), torch.ones(2, 3)), TypeError, ["radius", "int64"]),
    ],
)
def test_canonicalize_bad_arguments(args, exc, names):
    # was: raw "size of tensor a (3) must match …" / "'list' object has no attribute 'to'"
    with pytest.raises(exc) as info:
        georeparam.canonicalize(*args)
    msg = str(info.value)
    assert "canonicalize" in msg and "Got:" in msg, msg
    for n in names:
        assert n in msg, (n, msg)


def test_demo_out_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    # was: a traceback after the whole training run (19 s by default)
    from georeparam import demo

    monkeypatch.setattr(demo, "_run", lambda *a, **k: pytest.fail("trained before checking --out"))
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(target), "--steps", "1"])
    err = capsys.readouterr().err
    assert "--out" in err and "Got:" in err and "results.txt" in err
    with pytest.raises(ValueError, match="out .* must be a directory"):
        demo.run_demo(steps=1, out=target)
    with pytest.raises(ValueError, match="can be created"):
        demo.run_demo(steps=1, out=target / "sub")
    assert target.read_text() == "keep me"


def test_registering_the_rest_of_a_model_points_at_exclude():
    # was: "already GmP-registered; call georeparam.remove first", wrong advice for the rest of a model
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    georeparam.geometric(model[0])
    msg = expect_error(ValueError, model, lambda: georeparam.register(model), "'0'", "already", "exclude=")
    assert "remove" in msg  # still says how to register it again differently
    georeparam.register(model, exclude=["0"])  # the advice works
    assert georeparam.is_geometric(model[2])


def test_a_tie_through_a_plain_attribute_is_not_detected_and_the_docs_say_so():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.held = [self.a.weight]  # not a Parameter of Holder: invisible to the tie check

    model = Holder()
    assert list(georeparam.register(model)) == ["a"]  # registered, not reported as tied
    assert model.held[0] is not model.a.weight  # the tie is gone, silently
    doc = " ".join(georeparam.register.__doc__.split())
    assert "Only ties through Parameters are seen" in doc and "exclude" in doc
