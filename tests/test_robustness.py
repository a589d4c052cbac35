"""Rows of the adversarial audit (issue 20, georeparam's own part): nothing destroyed by a refusal,
and the silent wrong results made exact. Each test failed on the code before its fix (see
docs/robustness.md for the table)."""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import georeparam
from georeparam.coords import to_cartesian

sys.path.insert(0, str(Path(__file__).parent))
from _torchvision_like import ResNet18  # noqa: E402


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


# -------------------------------------------------------------------------------------------------
# data loss: torch.save over a checkpoint, a refused cast
# -------------------------------------------------------------------------------------------------


def test_torch_save_of_a_registered_model_over_a_checkpoint_writes_a_loadable_model(tmp_path):
    # was: refused while pickling, after torch.save had truncated the file (no longer loadable)
    path = tmp_path / "model.pt"
    torch.save(_mlp(1).state_dict(), path)
    model = _mlp()
    georeparam.register(model)
    with torch.no_grad():
        georeparam.geometry(model[0]).radius[1] *= -1  # a negative radius: the sign hook is live
    x = torch.randn(7, 3)
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded[0]).__name__ == "ParametrizedLinear" and isinstance(loaded[0], nn.Linear)
    assert torch.equal(loaded(x), model(x))
    # it trains like the original: same gradients of the coordinates
    model(x).square().sum().backward()
    loaded(x).square().sum().backward()
    for a, b in zip(georeparam.geometry(model[0]), georeparam.geometry(loaded[0])):
        assert torch.equal(a.grad, b.grad)
    # and removes to the same plain model
    georeparam.remove(loaded)
    assert type(loaded[0]) is nn.Linear and torch.equal(loaded(x), model(x))


def test_a_pickled_model_keeps_its_hooks_when_a_new_process_counts_hook_ids_from_0():
    model = _mlp()
    georeparam.register(model)
    with torch.no_grad():
        georeparam.geometry(model[0]).radius[0] *= -1
    x = torch.randn(4, 3)
    data = pickle.dumps(model)
    ours = list(model[1]._forward_hooks) + list(model[0]._load_state_dict_pre_hooks)
    saved = RemovableHandle.next_id
    try:
        RemovableHandle.next_id = min(ours)  # a fresh process counts from 0 and gets there
        twin = pickle.loads(data)
        assert RemovableHandle.next_id > max(ours)
        while RemovableHandle.next_id <= max(ours):  # (without that) a new hook would take the sign hook's id
            twin[1].register_forward_hook(lambda *a: None)
    finally:
        RemovableHandle.next_id = max(saved, RemovableHandle.next_id)
    assert torch.equal(twin(x), model(x))
    assert georeparam.geometry(twin[0]).radius[0] < 0  # the sign acts: the output differs from |r|'s
    twin.load_state_dict(_mlp(2).state_dict())  # the plain-checkpoint hook is still there
    assert torch.allclose(twin(x), _mlp(2)(x), rtol=1e-5, atol=1e-6)


def test_refused_half_leaves_every_layer_bit_identical():
    # was: layers cast before the refusing one stayed float16 (the model no longer ran)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    georeparam.register(model, exclude=["0"], form="weight")
    with torch.no_grad():
        georeparam.geometry(model[4]).radius.fill_(1e5)  # r overflows float16 (65504)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.randn(2, 3)
    y = model(x)
    with pytest.raises(ValueError, match="Nothing was cast"):
        model.half()
    for n, p in model.named_parameters():
        assert p is before[n][0] and p.dtype == torch.float32 and torch.equal(p, before[n][1]), n
    assert torch.equal(model(x), y)
    model[:4].half()  # the layers that fit still cast
    assert model[0].weight.dtype == torch.float16


# -------------------------------------------------------------------------------------------------
# silent wrong results
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["geometric", "register"])
def test_a_frozen_bias_does_not_move_and_remove_keeps_requires_grad(how):
    # was: b = r·λ followed the trainable r (0.18 in 10 Adam steps) and came back trainable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    bias = model[0].bias
    b0 = bias.detach().clone()
    if how == "geometric":
        georeparam.geometric(model[0])
    else:
        georeparam.register(model, form="weight")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(8, 3)).square().sum().backward()
        opt.step()
    assert model[0].bias is bias and torch.equal(model[0].bias, b0)
    # the layer computes r·u(θ)ᵀx + b (float64 reference from its coordinates)
    g = georeparam.geometry(model[0])
    x = torch.randn(5, 3, dtype=torch.float64)
    w = g.radius.detach().double()[:, None] * to_cartesian(g.angles.detach().double())
    torch.testing.assert_close(model[0](x.float()).double(), x @ w.T + b0.double(), rtol=1e-5, atol=1e-6)
    georeparam.remove(model)
    assert model[0].bias is bias and not model[0].bias.requires_grad and model[0].weight.requires_grad


def test_remove_restores_requires_grad_of_weight_and_bias_as_they_were():
    layer = nn.Linear(3, 2)
    layer.weight.requires_grad_(False)
    georeparam.geometric(layer)
    georeparam.remove(layer)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    layer = georeparam.geometric(nn.Linear(3, 2))
    georeparam.geometry(layer).offset.requires_grad_(False)  # frozen after registration
    georeparam.remove(layer)
    assert layer.weight.requires_grad and not layer.bias.requires_grad  # was: True (the radius trains)


def test_register_then_remove_keeps_the_parameter_order_and_an_optimizer_state_loads():
    # was: parameters() came back as (bias, weight): the saved Adam state no longer matched
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    georeparam.register(model)
    georeparam.remove(model)
    assert [n for n, _ in model.named_parameters()] == names
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(state)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # was: a size-mismatch RuntimeError
    for p, s in zip(model.parameters(), opt.state_dict()["state"].values()):
        assert s["exp_avg"].shape == p.shape


@pytest.mark.parametrize(
    "conv, fmt", [(nn.Conv2d(3, 8, 3), torch.channels_last), (nn.Conv3d(2, 4, 3), torch.channels_last_3d)]
)
def test_channels_last_weight_keeps_its_layout_and_registered_equals_removed_bit_for_bit(conv, fmt):
    # was: the registered weight was contiguous, so the conv's output layout changed
    torch.manual_seed(0)
    conv = conv.to(memory_format=fmt)
    x = torch.randn((2, conv.in_channels) + (7,) * (conv.weight.dim() - 2))  # a contiguous input
    plain_stride = conv(x).stride()
    georeparam.geometric(conv)
    assert conv.weight.is_contiguous(memory_format=fmt)
    y = conv(x)
    assert y.stride() == plain_stride
    georeparam.remove(conv)
    z = conv(x)
    assert z.stride() == y.stride() and torch.equal(z, y)


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
def test_gradient_of_r_at_zero_is_the_papers_under_flush_to_zero(flush):
    # was: under torch.set_flush_denormal(True) the carrier t·z flushed to 0 and ∂/∂r = 0 again
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        georeparam.register(model, exclude=["2"])
        g = georeparam.geometry(model[0])
        with torch.no_grad():
            g.radius[:2] = 0.0
        x = torch.randn(16, 3)
        model(x).sum().backward()
    finally:
        torch.set_flush_denormal(False)
    # reference: the paper's unit r·relu(uᵀx + λ) in float64, differentiated by autograd
    r = g.radius.detach().double().requires_grad_()
    u = to_cartesian(g.angles.detach().double())
    v = model[2].weight.detach().double()
    hidden = r * torch.relu(x.double() @ u.T + g.offset.detach().double())
    (hidden @ v.T).sum().backward()
    assert r.grad[:2].abs().min() > 0.01  # non-zero: the test can see a gradient stuck at 0
    torch.testing.assert_close(g.radius.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


def test_register_moves_a_resnet_output_no_more_than_rounding_its_weights_once():
    # The bound in register's docstring: per weight ≤ 1e-6 relative; a whole network's output
    # moves about as much as one float32 rounding of its plain weights moves it (was claimed ≤ 1e-6
    # for outputs; a ResNet-18's output moved 2.2e-6, one rounding 2.75e-6).
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    torch.manual_seed(0)
    model = ResNet18(width=16).eval()
    x = torch.randn(2, 3, 32, 32)
    rounded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        y = model(x)
        for p in rounded.parameters():  # each entry moved by a random fraction of half an ulp
            noise = (torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5) * 2.0**-23
            p.copy_((p.double() * (1 + noise)).float())
        one_rounding = rel(rounded(x), y)
    plain = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    georeparam.register(model)
    with torch.no_grad():
        moved = rel(model(x), y)
        per_weight = [rel(m.weight, plain[n]) for n, m in model.named_modules() if georeparam.is_geometric(m)]
    assert len(per_weight) == len(plain) and max(per_weight) <= 1e-6
    assert 0 < moved <= 2 * one_rounding, (moved, one_rounding)


def test_a_frozen_bias_on_a_zero_row_registers_and_keeps_the_function():
    # b = r·λ cannot hold a bias on r = 0, a frozen plain bias can (Note [A frozen bias])
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[1] = 0.0
        layer.bias.fill_(0.5)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 3)
    y = layer(x)
    georeparam.geometric(layer)
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-7)
    assert georeparam.geometry(layer).offset is None
