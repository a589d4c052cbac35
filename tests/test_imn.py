"""Input mean normalization: train / eval semantics against manual centring, gradients, running
mean, state_dict, register(imn=True), and folding on remove (exact where claimed, and the
foldability rule checked both ways against a naive fold over generated convolutions)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import georeparam
from georeparam.imn import (
    InputMeanNorm,
    _shift,
    fold_input_mean_norm,
    has_input_mean_norm,
    input_mean_norm,
    is_foldable,
)

F64 = torch.float64


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def plain_forward(layer, x):
    """The layer's own computation, without the pre-hook."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    if not layer.transposed:
        return layer._conv_forward(x, layer.weight, layer.bias)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(layer.kernel_size)]
    return fn(
        x, layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
    )


CASES = [  # (layer, input shape, reduce dims of the input)
    (lambda: nn.Linear(5, 3), (7, 5), (0,)),
    (lambda: nn.Linear(5, 3), (4, 6, 5), (0, 1)),
    (lambda: nn.Conv1d(4, 6, 3, groups=2), (3, 4, 9), (0, 2)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 5), (0, 2, 3)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5), (0, 2, 3)),
]


@pytest.mark.parametrize("make,shape,dims", CASES)
def test_train_mode_is_manual_centring_with_gradient_through_the_mean(make, shape, dims):
    torch.manual_seed(0)
    layer = make().double()
    georeparam.register(layer, imn=True)
    x = (torch.randn(shape, dtype=F64) * 2 + 3).requires_grad_()
    out = layer(x)
    xr = x.detach().clone().requires_grad_()
    manual = plain_forward(layer, xr - xr.mean(dim=dims, keepdim=True))
    assert rel(out, manual) <= 1e-12
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gm,) = torch.autograd.grad(manual, xr, g)
    assert rel(gx, gm) <= 1e-12
    # and the gradient has the centring's structure: it sums to zero over the reduced dims
    assert gx.sum(dim=dims).abs().max() <= 1e-10


def test_gradcheck_of_the_normalization():
    norm = InputMeanNorm(3, dim=-3).double()
    x = torch.randn(2, 3, 4, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))


def test_running_mean_and_eval():
    torch.manual_seed(0)
    layer = input_mean_norm(nn.Conv1d(3, 2, 1), momentum=0.25)
    expected = torch.zeros(3)
    for k in range(5):
        x = torch.randn(4, 3, 7) + k
        layer(x)
        expected = 0.75 * expected + 0.25 * x.mean(dim=(0, 2))
    assert torch.allclose(layer.imn.running_mean, expected, atol=1e-6)
    layer.eval()
    x = torch.randn(4, 3, 7)
    before = layer.imn.running_mean.clone()
    assert torch.allclose(layer(x), F.conv1d(x - expected[:, None], layer.weight, layer.bias), atol=1e-6)
    assert torch.equal(layer.imn.running_mean, before)  # eval does not update
    # unbatched input (C, L): the channel is dimension 0
    assert torch.allclose(layer(x[0]), F.conv1d(x[0] - expected[:, None], layer.weight, layer.bias), atol=1e-6)
    # no_grad in training still updates, like BatchNorm
    layer.train()
    with torch.no_grad():
        layer(x)
    assert not torch.equal(layer.imn.running_mean, before)


def test_state_dict_round_trip_and_deepcopy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    georeparam.register(model, exclude=["2"], imn=True)
    for _ in range(3):
        model(torch.randn(16, 4) + 1)
    sd = model.state_dict()
    assert "0.imn.running_mean" in sd and "2.imn.running_mean" not in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    georeparam.register(fresh, exclude=["2"], imn=True)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(5, 4)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    twin = copy.deepcopy(model).train()
    twin(torch.randn(16, 4) + 10)  # the copy's own running mean moves, the original's does not
    assert not torch.equal(twin[0].imn.running_mean, model[0].imn.running_mean)
    assert torch.equal(model[0].imn.running_mean, sd["0.imn.running_mean"])


def test_register_imn_only_on_registered_layers_and_validates_first():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    assert georeparam.register(model, exclude=["2"], imn=True) == ["0"]
    assert has_input_mean_norm(model[0]) and not has_input_mean_norm(model[2])
    again = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    input_mean_norm(again[1])
    with pytest.raises(ValueError, match="layer '1'.*already has an input mean normalization"):
        georeparam.register(again, imn=True)
    assert not georeparam.is_geometric(again[0]) and not has_input_mean_norm(again[0])  # unchanged
    with pytest.raises(TypeError, match="imn must be a bool"):
        georeparam.register(nn.Linear(2, 2), imn=1)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="supports nn.Linear.*Got: ReLU"):
        input_mean_norm(nn.ReLU())
    with pytest.raises(ValueError, match="momentum must be a number in \\(0, 1\\]"):
        input_mean_norm(nn.Linear(2, 2), momentum=0.0)
    with pytest.raises(ValueError, match="lazy"):
        input_mean_norm(nn.LazyLinear(2))
    layer = input_mean_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="more than one value per feature"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 3 features in dimension -1.*Got: shape \\(4, 2\\)"):
        layer(torch.randn(4, 2))
    with pytest.raises(ValueError, match="has no input mean normalization"):
        fold_input_mean_norm(nn.Linear(3, 2))
    model = nn.Sequential(nn.Linear(3, 2))
    georeparam.register(model, imn=True)
    with pytest.raises(ValueError, match="plain Parameter \\(remove GmP first\\)"):
        fold_input_mean_norm(model[0])


# ---------------------------------------------------------------------------------------------
# folding on remove
# ---------------------------------------------------------------------------------------------

FOLD = [  # (layer, input shape, foldable)
    (lambda: nn.Linear(6, 4), (8, 6), True),
    (lambda: nn.Linear(6, 4, bias=False), (8, 6), True),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7), True),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6), True),
    (lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="circular", bias=False), (2, 3, 9), True),
    (lambda: nn.ConvTranspose2d(4, 6, 3, padding=2, groups=2), (2, 4, 7, 7), True),
    (lambda: nn.ConvTranspose1d(3, 2, 3, dilation=2, padding=4), (2, 3, 11), True),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6), False),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5), False),
    (lambda: nn.ConvTranspose1d(3, 4, 3, padding=1), (2, 3, 8), False),
]


@pytest.mark.parametrize("make,shape,foldable", FOLD)
def test_remove_folds_where_exact_and_keeps_eval_outputs(make, shape, foldable):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    georeparam.register(model, imn=True)
    for _ in range(4):
        model(torch.randn(shape) * 2 + 3)  # training steps move the running mean away from 0
    model.eval()
    x = torch.randn(shape) * 2 + 3
    before = model(x).detach()
    georeparam.remove(model)
    assert not georeparam.is_geometric(model[0])
    assert has_input_mean_norm(model[0]) != foldable
    assert ("0.imn.running_mean" in model.state_dict()) != foldable
    assert rel(model(x), before) <= 1e-6


def conv_configs():
    return st.fixed_dictionaries(
        {
            "transposed": st.booleans(),
            "k": st.integers(1, 4),
            "stride": st.integers(1, 3),
            "padding": st.integers(0, 4),
            "dilation": st.integers(1, 2),
            "output_padding": st.integers(0, 2),
            "groups": st.sampled_from([1, 2]),
        }
    )


@settings(max_examples=40)
@given(cfg=conv_configs(), seed=st.integers(0, 2**31 - 1))
def test_foldability_rule_agrees_with_a_naive_fold(cfg, seed):
    # is_foldable must say exactly when b' = b − Σ W·μ reproduces the centred layer
    torch.manual_seed(seed)
    c = cfg
    if c["transposed"]:
        if c["output_padding"] >= max(c["stride"], c["dilation"]):
            c = {**c, "output_padding": 0}
        layer = nn.ConvTranspose1d(
            4,
            6,
            c["k"],
            stride=c["stride"],
            padding=c["padding"],
            dilation=c["dilation"],
            output_padding=c["output_padding"],
            groups=c["groups"],
        ).double()
    else:
        layer = nn.Conv1d(
            4, 6, c["k"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"]
        ).double()
    x = torch.randn(2, 4, 12, dtype=F64)
    mu = torch.randn(4, dtype=F64) + 2
    try:
        centred = layer(x - mu[:, None])
    except RuntimeError:  # an impossible configuration (output size ≤ 0)
        return
    with torch.no_grad():
        naive = copy.deepcopy(layer)
        naive.bias -= _shift(layer, mu)
    exact = rel(naive(x), centred) <= 1e-12
    assert is_foldable(layer) == exact, (c, rel(naive(x), centred))


# ---------------------------------------------------------------------------------------------
# the official placement (Note [The official placement]) against a port of the official gmp_mn
# ---------------------------------------------------------------------------------------------


def test_output_mean_norm_is_the_official_gmp_mn():
    """A two-block GmP conv net with ``output_mean_norm`` on each GmP conv's ReLU against the
    official ``Conv2DReparam(activation='relu')`` → ``MeanOnlyBatchNormalization()`` ported from
    its formulas: ``r·ReLU(conv(x, u) + λ)`` with signed ``r``, then ``x − μ`` per channel (batch
    mean over N, H, W in training; Keras' ``moving ← 0.99·moving + 0.01·μ``, used in evaluation)."""
    from georeparam.coords import to_cartesian
    from georeparam.imn import OFFICIAL_MOMENTUM, has_output_mean_norm, output_mean_norm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).double()
    georeparam.register(model, include=["0", "3"])
    with torch.no_grad():
        for i in (0, 3):
            g = georeparam.geometry(model[i])
            g.radius[::2].mul_(-1.0)  # signed radii: the sign must come before the centring
            g.offset.normal_(0, 0.5)
    for i in (0, 3):
        output_mean_norm(model[i + 1], model[i].weight.shape[0], dim=-3, dtype=torch.float64)
    assert OFFICIAL_MOMENTUM == 0.01 and has_output_mean_norm(model[1]) and not has_output_mean_norm(model[0])

    moving = {0: torch.zeros(4, dtype=F64), 3: torch.zeros(5, dtype=F64)}

    def official(x, training):
        for i in (0, 3):
            g = georeparam.geometry(model[i])
            u = to_cartesian(g.angles.detach()).reshape(model[i].weight.shape)
            z = F.conv2d(x, u, padding=1) + g.offset.detach().view(1, -1, 1, 1)
            y = g.radius.detach().view(1, -1, 1, 1) * torch.relu(z)
            if training:
                mu = y.mean(dim=(0, 2, 3))
                moving[i] = moving[i] * 0.99 + mu.detach() * 0.01
            else:
                mu = moving[i]
            x = F.max_pool2d(y - mu.view(1, -1, 1, 1), 2)
        return F.linear(x.mean(dim=(2, 3)), model[8].weight.detach(), model[8].bias.detach())

    for step in range(3):
        x = (torch.randn(6, 3, 8, 8, dtype=F64) + step).requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        out, ref = model.train()(x), official(xr, True)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        out.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-12)  # the gradient flows through the batch mean
    torch.testing.assert_close(model[1].omn.running_mean, moving[0], rtol=1e-12, atol=1e-14)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), official(x, False), rtol=1e-10, atol=1e-12)
    assert "1.omn.running_mean" in model.state_dict()


def test_output_mean_norm_refuses_bad_arguments():
    from georeparam.imn import output_mean_norm

    relu = nn.ReLU()
    with pytest.raises(ValueError, match="momentum"):
        output_mean_norm(relu, 3, momentum=0.0)
    assert not hasattr(relu, "omn") and not relu._forward_hooks
    output_mean_norm(relu, 3)
    with pytest.raises(ValueError, match="already has"):
        output_mean_norm(relu, 3)
    with pytest.raises(ValueError, match="expected 3 features"):
        relu(torch.randn(2, 4))
