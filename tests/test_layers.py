"""Every supported layer computes the same function before and after registration and removal.

The grid covers Linear (in_features 1, 2, odd, large), Conv1d/2d/3d with groups (depthwise
included), dilation, stride and every padding mode, ConvTranspose1d/2d/3d with groups and
output_padding, Bilinear (two inputs; a unit is a row of the (out, in1·in2) weight view), with and
without bias, in float32 and float64. The unit layout (one unit per
output neuron / output channel) is checked against norms computed directly from the weight.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import georeparam
from conftest import rel_err, seeded, tol

DTYPES = [torch.float32, torch.float64]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _convs():
    cases = []
    for mode in PADDING_MODES:
        # (constructor, input shape without batch); odd sizes, groups incl. depthwise, stride, dilation
        cases += [
            (f"conv1d-{mode}", lambda b, m=mode: nn.Conv1d(3, 5, 3, padding=1, padding_mode=m, bias=b), (3, 9)),
            (
                f"conv1d-g2-s2-d2-{mode}",
                lambda b, m=mode: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode=m, bias=b),
                (4, 11),
            ),
            (
                f"conv1d-depthwise-{mode}",
                lambda b, m=mode: nn.Conv1d(3, 3, 3, padding=1, groups=3, padding_mode=m, bias=b),
                (3, 7),
            ),
            (
                f"conv2d-{mode}",
                lambda b, m=mode: nn.Conv2d(
                    3, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1, padding_mode=m, bias=b
                ),
                (3, 7, 5),
            ),
            (
                f"conv2d-depthwise-x2-{mode}",
                lambda b, m=mode: nn.Conv2d(3, 6, 3, padding=1, groups=3, padding_mode=m, bias=b),
                (3, 5, 5),
            ),
            (
                f"conv3d-{mode}",
                lambda b, m=mode: nn.Conv3d(2, 3, (2, 3, 1), padding=1, padding_mode=m, bias=b),
                (2, 3, 5, 3),
            ),
            (
                f"conv3d-g2-{mode}",
                lambda b, m=mode: nn.Conv3d(4, 6, 3, padding=1, stride=(1, 2, 1), groups=2, padding_mode=m, bias=b),
                (4, 3, 5, 3),
            ),
        ]
    return cases


LAYERS = (
    [
        ("linear-1", lambda b: nn.Linear(1, 3, bias=b), (1,)),
        ("linear-2", lambda b: nn.Linear(2, 5, bias=b), (2,)),
        ("linear-7", lambda b: nn.Linear(7, 3, bias=b), (7,)),
        ("linear-33", lambda b: nn.Linear(33, 5, bias=b), (33,)),
        ("linear-batch", lambda b: nn.Linear(5, 3, bias=b), (2, 5)),  # extra leading dims
    ]
    + _convs()
    + [
        (
            "convT1d-s2-op1",
            lambda b: nn.ConvTranspose1d(3, 5, 3, stride=2, output_padding=1, bias=b),
            (3, 7),
        ),
        (
            "convT1d-g2-d2",
            lambda b: nn.ConvTranspose1d(4, 6, 3, groups=2, dilation=2, padding=1, bias=b),
            (4, 7),
        ),
        (
            "convT2d-g2-s2-op1",
            lambda b: nn.ConvTranspose2d(4, 6, (3, 2), groups=2, stride=2, padding=1, output_padding=1, bias=b),
            (4, 5, 3),
        ),
        ("convT2d-depthwise", lambda b: nn.ConvTranspose2d(3, 3, 3, groups=3, bias=b), (3, 5, 5)),
        (
            "convT3d-g2",
            lambda b: nn.ConvTranspose3d(2, 4, 2, groups=2, stride=(1, 2, 1), output_padding=(0, 1, 0), bias=b),
            (2, 3, 3, 3),
        ),
        (
            "convT3d-g3-op",
            lambda b: nn.ConvTranspose3d(3, 6, (1, 3, 2), groups=3, stride=2, output_padding=1, bias=b),
            (3, 3, 3, 3),
        ),
        # two inputs: in_shape is one shape per input
        ("bilinear", lambda b: nn.Bilinear(3, 4, 5, bias=b), ((3,), (4,))),
        ("bilinear-1x1", lambda b: nn.Bilinear(1, 1, 3, bias=b), ((1,), (1,))),  # fan-in 1
        ("bilinear-batch", lambda b: nn.Bilinear(2, 3, 4, bias=b), ((2, 2), (2, 3))),
    ]
)


def _inputs(in_shape, dtype):
    """The batch of inputs: a tensor, or a tuple of them for a layer of several inputs."""
    if isinstance(in_shape[0], tuple):
        return tuple(torch.randn((2,) + s, dtype=dtype) for s in in_shape)
    return torch.randn((2,) + in_shape, dtype=dtype)


def _call(layer, x):
    return layer(*x) if isinstance(x, tuple) else layer(x)


class _Then(nn.Sequential):
    """``(layer, activation)`` for a layer of two inputs (``nn.Sequential`` passes one)."""

    def forward(self, x1, x2):
        return self[1](self[0](x1, x2))


def _make(factory, bias, dtype, seed=0):
    with seeded(seed):
        layer = factory(bias).to(dtype)
        if bias:  # a bias of the same scale as the weight rows (default init is tiny for big fan-in)
            with torch.no_grad():
                layer.bias.uniform_(-1, 1)
    return layer


def _forward_and_input_grad(layer, x, g):
    xs = tuple(t.clone().requires_grad_() for t in (x if isinstance(x, tuple) else (x,)))
    y = layer(*xs)
    gx = torch.autograd.grad(y, xs, g)
    return y.detach(), torch.cat([t.flatten() for t in gx])


def _expected_units(layer, weight=None):
    """(radius, fan_in) per unit straight from the weight: rows for Linear/Conv, output channels for
    ConvTranspose (written independently of GeometricWeight.to_units)."""
    w = (layer.weight if weight is None else weight).detach()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        ipg, opg = w.shape[0] // g, w.shape[1]
        norms = []
        for o in range(opg * g):
            gi, oj = divmod(o, opg)
            norms.append(w[gi * ipg : (gi + 1) * ipg, oj].norm())
        return torch.stack(norms), ipg * math.prod(w.shape[2:])
    return w.flatten(1).norm(dim=1), math.prod(w.shape[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name,factory,in_shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_same_function_before_after_register_and_remove(name, factory, in_shape, bias, dtype):
    layer = _make(factory, bias, dtype)
    cls = type(layer)
    with seeded(1):
        x = _inputs(in_shape, dtype)
        y0 = _call(layer, x).detach()
        g = torch.randn_like(y0)
    y0, gx0 = _forward_and_input_grad(layer, x, g)
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone() if bias else None
    exp_radius, fan_in = _expected_units(layer)

    out = georeparam.geometric(layer)
    assert out is layer and georeparam.is_geometric(layer) and isinstance(layer, cls)
    t = tol(dtype)
    assert rel_err(layer.weight, w0) <= t
    if bias:
        assert rel_err(layer.bias, b0) <= t
    y1, gx1 = _forward_and_input_grad(layer, x, g)
    assert rel_err(y1, y0) <= t, f"{name}: output changed by {rel_err(y1, y0):.3g}"
    assert rel_err(gx1, gx0) <= t, f"{name}: input gradient changed by {rel_err(gx1, gx0):.3g}"

    # the live parameters and the unit layout
    geo = georeparam.geometry(layer)
    units = exp_radius.numel()
    assert geo.radius.shape == (units,) and geo.angles.shape == (units, fan_in - 1)
    assert isinstance(geo.radius, nn.Parameter) and isinstance(geo.angles, nn.Parameter)
    assert geo.radius.dtype == geo.angles.dtype == dtype
    if fan_in > 1:
        assert rel_err(geo.radius, exp_radius) <= t
    else:  # fan-in 1: the radius is the weight itself and carries the sign
        assert (
            rel_err(
                geo.radius, w0.reshape(-1) if not isinstance(layer, nn.modules.conv._ConvTransposeNd) else exp_radius
            )
            <= t
        )
    if bias:
        assert geo.offset is not None and geo.offset.shape == (units,)
        assert rel_err(geo.radius.detach() * geo.offset.detach(), b0) <= t
    else:
        assert geo.offset is None and layer.bias is None
    # gradients reach every new parameter
    _call(layer, x).mul(g).sum().backward()
    for p in (geo.radius, geo.angles) + ((geo.offset,) if bias else ()):
        if p.numel():  # fan-in 1 has an empty angle tensor, which nothing depends on
            assert p.grad is not None and torch.isfinite(p.grad).all()

    w1 = layer.weight.detach().clone()
    b1 = layer.bias.detach().clone() if bias else None
    assert georeparam.remove(layer) is layer
    assert type(layer) is cls and not georeparam.is_geometric(layer)
    assert not hasattr(layer, "parametrizations")
    assert type(layer.weight) is nn.Parameter and layer.weight.requires_grad
    assert torch.equal(layer.weight, w1), "remove must bake the computed weight bit for bit"
    if bias:
        assert type(layer.bias) is nn.Parameter and torch.equal(layer.bias, b1)
    assert {n for n, _ in layer.named_parameters()} == ({"weight", "bias"} if bias else {"weight"})
    y2, gx2 = _forward_and_input_grad(layer, x, g)
    assert torch.equal(y2, y1) and rel_err(gx2, gx0) <= t


def test_geometric_without_bias_argument_keeps_bias_cartesian():
    with seeded(0):
        layer = nn.Linear(6, 4)
        x = torch.randn(3, 6)
    y0 = layer(x).detach()
    b = layer.bias
    georeparam.geometric(layer, bias=None)
    assert layer.bias is b and georeparam.geometry(layer).offset is None
    assert not torch.nn.utils.parametrize.is_parametrized(layer, "bias")
    assert rel_err(layer(x), y0) <= 1e-6
    georeparam.remove(layer)
    assert layer.bias is b


@pytest.mark.parametrize("training", [True, False])
def test_multihead_attention_out_proj(training):
    with seeded(0):
        mha = nn.MultiheadAttention(embed_dim=6, num_heads=2, batch_first=True).double()
        q = torch.randn(2, 5, 6, dtype=torch.float64)
        kv = torch.randn(2, 4, 6, dtype=torch.float64)
    mha.train(training)
    with torch.no_grad():
        mha.out_proj.bias.uniform_(-1, 1)
        mha.in_proj_bias.uniform_(-1, 1)

    def run():
        x = q.clone().requires_grad_()
        y, attn = mha(x, kv, kv, need_weights=True)
        (gx,) = torch.autograd.grad(y.sum() + attn.sum(), x)
        with torch.no_grad():  # inference fast path reads out_proj.weight/bias too
            y_fast, _ = mha(q, kv, kv, need_weights=False)
        return y.detach(), gx, y_fast

    y0, gx0, f0 = run()
    in_proj = mha.in_proj_weight
    names = georeparam.register(mha)
    assert names == ["", "out_proj"]  # in_proj_weight (packed q/k/v) and out_proj
    assert georeparam.is_geometric(mha.out_proj) and georeparam.is_geometric(mha)
    assert georeparam.geometry(mha, "in_proj_weight").radius.shape == (18,) and mha.in_proj_weight is not in_proj
    y1, gx1, f1 = run()
    assert rel_err(y1, y0) <= 1e-12 and rel_err(gx1, gx0) <= 1e-12 and rel_err(f1, f0) <= 1e-12
    georeparam.remove(mha)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(mha) is nn.MultiheadAttention and type(mha.in_proj_weight) is nn.Parameter
    y2, gx2, f2 = run()
    # the inference fast path is taken again once in_proj_weight is a plain Parameter: rounding differs
    assert torch.equal(y2, y1) and rel_err(f2, f1) <= 1e-12


ASSIGN_LAYERS = [
    ("linear", lambda: nn.Linear(5, 3)),
    ("conv2d-g2", lambda: nn.Conv2d(4, 6, 3, groups=2)),
    ("convT2d-g2", lambda: nn.ConvTranspose2d(4, 6, (2, 3), groups=2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,factory", ASSIGN_LAYERS, ids=[c[0] for c in ASSIGN_LAYERS])
def test_assigning_weight_and_bias(name, factory, dtype):
    t = tol(dtype)
    with seeded(0):
        layer = factory().to(dtype)
        georeparam.geometric(layer)
        W = torch.randn_like(layer.weight) * 3
        b = torch.randn_like(layer.bias)
    geo = georeparam.geometry(layer)
    bias_before = layer.bias.detach().clone()
    layer.weight = W
    assert rel_err(layer.weight, W) <= t
    assert rel_err(layer.bias, bias_before) <= t, "assigning the weight must keep the bias value"
    # the same Parameters were updated in place (an optimizer holding them stays valid)
    geo2 = georeparam.geometry(layer)
    assert geo2.radius is geo.radius and geo2.angles is geo.angles and geo2.offset is geo.offset
    assert rel_err(geo.radius, _expected_units(layer, W)[0]) <= t
    w_before = layer.weight.detach().clone()
    layer.bias = b
    assert rel_err(layer.bias, b) <= t
    assert torch.equal(layer.weight, w_before), "assigning the bias must not touch the weight"
    assert rel_err(geo.radius.detach() * geo.offset.detach(), b) <= t


def test_assigning_weight_with_zero_row_and_bias_zero():
    """A zero weight row is fine while that unit's bias is zero (b = r·λ = 0)."""
    layer = georeparam.geometric(nn.Linear(3, 2))
    with torch.no_grad():
        layer.bias = torch.tensor([0.0, 0.5])
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    layer.weight = W
    assert torch.equal(layer.weight[0], torch.zeros(3))
    assert rel_err(layer.weight, W) <= 1e-6 and rel_err(layer.bias, torch.tensor([0.0, 0.5])) <= 1e-6


# -------------------------------------------------------------------------------------------------
# precision at realistic fan-ins (the acceptance numbers)
# -------------------------------------------------------------------------------------------------

FAN_INS = [(2, 64), (784, 64), (4608, 16), (25088, 4)]


@pytest.mark.parametrize("fan_in,units", FAN_INS, ids=[str(f) for f, _ in FAN_INS])
def test_reconstruction_precision(fan_in, units, capsys):
    """float32 ≤ 1e-6 and float64 ≤ 1e-12 relative (Frobenius) after registration, exact mode;
    default (Kaiming-uniform) init and Gaussian rows. Prints the measured errors."""
    lines = []
    for dtype in DTYPES:
        for init in ("kaiming", "gaussian"):
            with seeded(fan_in):
                layer = nn.Linear(fan_in, units, dtype=dtype)
                if init == "gaussian":
                    nn.init.normal_(layer.weight)
            w0 = layer.weight.detach().clone()
            georeparam.geometric(layer)
            err = rel_err(layer.weight, w0).item()
            lines.append(f"fan_in={fan_in:>6} units={units:>3} {str(dtype)[6:]:>7} {init:>8} exact: {err:.2e}")
            assert err <= tol(dtype), lines[-1]
            if dtype == torch.float32:
                with seeded(fan_in):
                    fast = nn.Linear(fan_in, units, dtype=dtype)
                    if init == "gaussian":
                        nn.init.normal_(fast.weight)
                georeparam.geometric(fast, mode="fast")
                lines[-1] += f"  fast: {rel_err(fast.weight, w0).item():.2e}"
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_precision_through_a_conv_layout():
    """fan-in 25,088 as VGG's 512·7·7, through Conv2d and ConvTranspose2d layouts."""
    for layer in (nn.Conv2d(512, 2, 7), nn.ConvTranspose2d(512, 2, 7)):
        w0 = layer.weight.detach().clone()
        georeparam.geometric(layer)
        assert georeparam.geometry(layer).angles.shape == (2, 25087)
        assert rel_err(layer.weight, w0) <= 1e-6


@pytest.mark.parametrize("form", ["paper", "weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,factory,in_shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_register_followed_by_relu_is_exact_in_both_forms(name, factory, in_shape, dtype, form):
    # register on (layer, ReLU): the paper's form puts sign(r) after the ReLU, the weight form does not
    model = (_Then if isinstance(in_shape[0], tuple) else nn.Sequential)(_make(factory, True, dtype), nn.ReLU())
    with seeded(2):
        x = _inputs(in_shape, dtype)
        g = torch.randn_like(_call(model, x))
    y0, gx0 = _forward_and_input_grad(model, x, g)
    report = georeparam.register(model, form=form)
    assert report.form_of("0") == ("weight" if form == "weight" else "paper")  # fan-in 1 too: the official 1-D unit
    y1, gx1 = _forward_and_input_grad(model, x, g)
    t = tol(dtype)
    assert rel_err(y1, y0) <= t and rel_err(gx1, gx0) <= t
    georeparam.remove(model)
    y2, _ = _forward_and_input_grad(model, x, g)
    assert torch.equal(y2, y1)
