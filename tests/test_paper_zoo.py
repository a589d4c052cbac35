"""The paper's-form invariant over a zoo of models (tests/_zoo.py), not a list of cases.

A layer the report calls ``paper`` must compute the paper's unit ``r·f(u(θ)ᵀx + λ)``: its
activation boundaries belong to θ and λ alone. For every such layer of every zoo model, with
hypothesis choosing which radii to negate:

* the layer itself computes ``|r|·(u(θ)ᵀx + λ)`` (the sign after the activation) or
  ``r·(u(θ)ᵀx + λ)`` (no activation of its own), with ``u(θ)`` written here from the polar formula;
* where the sign acts, the entries each unit owns (found here by doubling that unit's radius:
  exactly its entries double, positive homogeneity) are ``≥ 0`` after the ReLU, and negating the
  unit's radius negates exactly them: the active set does not change;
* the model's output is the unchanged model with exactly that negation applied there;
* a layer reported without an activation of its own reaches some later module's input (or the
  output) linearly: doubling its radii doubles exactly its entries there, negating negates them.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from georeparam import geometry
from georeparam.signs import live_hooks

import _zoo


def polar_unit(theta: torch.Tensor) -> torch.Tensor:
    """u(θ) for polar angles (units, n−1): u1 = cos θ1, u_k = cos θ_k ∏_{j<k} sin θ_j, u_n = ∏ sin θ_j."""
    units = theta.shape[0]
    sines = torch.cat([torch.ones(units, 1, dtype=theta.dtype), torch.cumprod(torch.sin(theta), dim=1)], dim=1)
    cosines = torch.cat([torch.cos(theta), torch.ones(units, 1, dtype=theta.dtype)], dim=1)
    return sines * cosines


def formula(layer: nn.Module, x: torch.Tensor, signed: bool) -> torch.Tensor:
    """``r·(u(θ)ᵀx + λ)`` (``|r|`` when the sign acts after the activation), from the coordinates."""
    g = geometry(layer)
    lat = g.angles.detach()
    theta = lat.clone()
    theta[:, :-1] = math.pi / 2 - lat[:, :-1]  # latitude φ = π/2 − θ for all but the last angle
    u = polar_unit(theta) if lat.shape[1] else torch.ones(lat.shape[0], 1, dtype=lat.dtype)
    d = getattr(layer.parametrizations.weight[0], "direction", None)
    if d is not None:
        u = u * d[:, None]
    lam = g.offset.detach() if g.offset is not None else torch.zeros_like(g.radius)
    r = g.radius.detach() if signed else g.radius.detach().abs()
    if isinstance(layer, nn.Linear):
        return (x @ u.T + lam) * r
    assert isinstance(layer, nn.Conv2d) and not layer.transposed, type(layer)
    conv = F.conv2d(x, u.reshape(layer.weight.shape), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return (conv + lam[:, None, None]) * r[:, None, None]


def _capture(module, pre: bool):
    """A hook recording what ``module`` sees (its input, after the sign pre-hook) or gives (its output)."""
    box = {}
    if pre:
        h = module.register_forward_pre_hook(lambda m, a: box.__setitem__("t", a[0].detach().clone()))
    else:
        h = module.register_forward_hook(lambda m, a, o: box.__setitem__("t", o.detach().clone()))
    return box, h


def _layer_io(model, layer, x):
    box = {}
    h = layer.register_forward_hook(lambda m, a, o: box.update(x=a[0].detach().clone(), y=o.detach().clone()))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        h.remove()
    return box["x"], box["y"], out


def _at(model, name):
    return dict(model.named_modules())[name]


def _registered(name):
    model, x = _zoo.make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = georeparam.register(model)
    return model, x, report


REGISTERED = {}


def registered(name):
    if name not in REGISTERED:
        REGISTERED[name] = _registered(name)
    return REGISTERED[name]


def check_layer(name: str, layer_name: str, units) -> None:
    model, x, report = registered(name)
    entry = next(e for e in report.layers if e.name == layer_name)
    assert entry.form == "paper"
    layer = _at(model, layer_name)
    hooks = [h for h in live_hooks(model) if h.layer is layer]
    signed = not hooks
    assert signed == (not layer.parametrizations.weight[0].sign_after)
    neg = copy.deepcopy(model)
    with torch.no_grad():
        geometry(_at(neg, layer_name)).radius[list(units)] *= -1
    # the layer computes the formula, in the registered and the negated model
    for m in (model, neg):
        xin, y, _ = _layer_io(m, _at(m, layer_name), x)
        torch.testing.assert_close(y, formula(_at(m, layer_name), xin, signed), rtol=1e-10, atol=1e-12)
    twice = copy.deepcopy(model)
    with torch.no_grad():
        geometry(_at(twice, layer_name)).radius[list(units)] *= 2
    if signed:
        _reaches_a_linear_consumer(model, neg, twice, x, layer_name)
        return
    names = {id(m): n for n, m in model.named_modules()}
    marks = []
    for hook in hooks:
        host = names[id(hook.host)]
        seen = {}
        for tag, m in (("a", model), ("neg", neg), ("twice", twice)):
            box, h = _capture(_at(m, host), hook.pre)
            try:
                with torch.no_grad():
                    out = m(x)
            finally:
                h.remove()
            seen[tag], seen[tag + "_out"] = box["t"], out
        a, owned = seen["a"], seen["twice"] != seen["a"]
        assert owned.any() or not (seen["neg"] != a).any()
        torch.testing.assert_close(seen["twice"][owned], 2 * a[owned], rtol=1e-10, atol=1e-12)  # homogeneous
        assert bool((a[owned] >= 0).all()), "the sign acts before the ReLU"
        expected = torch.where(owned, -a, a)
        torch.testing.assert_close(seen["neg"], expected, rtol=1e-10, atol=1e-12)  # same active set, negated
        marks.append((_at(model, host), hook.pre, owned))
    # the output: the unchanged model with exactly those negations where the signs act
    handles = []
    for mod, pre, owned in marks:
        if pre:
            handles.append(
                mod.register_forward_pre_hook(lambda m, args, o=owned: (torch.where(o, -args[0], args[0]),) + args[1:])
            )
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, o=owned: torch.where(o, -out, out)))
    try:
        with torch.no_grad():
            want = model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(seen["neg_out"], want, rtol=1e-10, atol=1e-12)


def _inputs_everywhere(model, x):
    """Every module's input (after all pre-hooks) and the model's output, by module name."""
    seen, handles = {}, []

    def keep(n, a):
        if n not in seen and a and torch.is_tensor(a[0]):
            seen[n] = a[0].detach().clone()

    for n, m in model.named_modules():
        if "parametrizations" not in n:
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: keep(n, a)))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    seen["<output>"] = out
    return seen


def _reaches_a_linear_consumer(model, neg, twice, x, layer_name):
    """No activation of its own: some later input (or the output) holds the units' entries
    linearly: doubling r doubles exactly them, negating r negates exactly them."""
    a, n2, t2 = (_inputs_everywhere(m, x) for m in (model, neg, twice))
    for key, v in a.items():
        if key == layer_name or v is None or n2.get(key) is None or v.shape != n2[key].shape:
            continue
        owned = t2[key] != v
        if not owned.any() or not torch.allclose(t2[key][owned], 2 * v[owned], rtol=1e-10, atol=1e-12):
            continue
        if torch.allclose(n2[key], torch.where(owned, -v, v), rtol=1e-10, atol=1e-12):
            return
    raise AssertionError(f"{layer_name}: reported without an activation, but no later input holds its units linearly")


def _paper_layers(name):
    _, _, report = registered(name)
    return [e.name for e in report.layers if e.form == "paper"]


@pytest.mark.parametrize("name", sorted(_zoo.ZOO))
def test_every_paper_layer_is_the_papers_unit(name):
    model, _, report = registered(name)
    layers = _paper_layers(name)
    for e in report.layers:  # the weight form always says why, and names what it met
        assert e.form != "weight" or e.why
        assert "no activation follows" not in (e.where or "") or "output" in e.where
    if not layers:
        return
    units = {n: _at(model, n).parametrizations.weight.original0.numel() for n in layers}

    @settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        layer = data.draw(st.sampled_from(layers))
        k = data.draw(st.lists(st.integers(0, units[layer] - 1), min_size=1, max_size=units[layer], unique=True))
        check_layer(name, layer, k)

    run()


# issue 19's table: each case exact in the paper's form (the test above) or the weight form with the op named
TABLE = {
    "view_fn": ("fc1", "paper", ".view()"),
    "unsqueeze_transpose": ("fc1", "paper", ".transpose()"),
    "scaled": ("fc1", "paper", "relu"),
    "glu": ("fc1", "weight", "mul"),
    "view_module": ("fc1", "paper", "act (ReLU)"),
    "clamp": ("fc1", "paper", ".clamp()"),
    "chunk_modules": ("fc1", "paper", "a2 (ReLU)"),
    "conv_bn_relu": ("0", "weight", "BatchNorm2d"),
    "residual_plain": ("conv2", "weight", "residual add"),
    "residual_norm": ("block.conv1", "weight", "BatchNorm2d"),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_issue_table_forms_and_reasons(name):
    layer, form, text = TABLE[name]
    _, _, report = registered(name)
    e = next(e for e in report.layers if e.name == layer)
    assert e.form == form and text in (e.where if form == "paper" else e.why), e


# -------------------------------------------------------------------------------------------------
# unitpath: where it follows the units, it is right (against a tensor of unit indices)
# -------------------------------------------------------------------------------------------------


@st.composite
def _path(draw):
    from georeparam import unitpath as up

    units = draw(st.sampled_from([4, 6, 8]))
    conv = draw(st.booleans())
    shape = (draw(st.sampled_from([2, 3])), units) + ((draw(st.sampled_from([2, 3])), 5) if conv else ())
    axis = -3 if conv else -1
    ops, cur = [], list(shape)
    for _ in range(draw(st.integers(1, 4))):
        rank = len(cur)
        kind = draw(st.sampled_from(["transpose", "unsqueeze", "flatten", "view", "chunk", "same"]))
        if kind == "transpose":
            op = ("transpose", draw(st.integers(-rank, rank - 1)), draw(st.integers(-rank, rank - 1)))
        elif kind == "unsqueeze":
            op = ("unsqueeze", draw(st.integers(-rank - 1, rank)))
        elif kind == "flatten":
            s = draw(st.integers(0, rank - 1))
            op = ("flatten", s, draw(st.integers(s, rank - 1)))
        elif kind == "view":
            i = draw(st.integers(0, rank - 1))
            n = cur[i]
            f = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
            op = ("view", tuple(cur[:i]) + (f, n // f) + tuple(cur[i + 1 :]))
        elif kind == "chunk":
            op = ("chunk", draw(st.integers(1, 3)), draw(st.integers(-rank, rank - 1)), 0)
        else:
            op = (up.ELEMENTWISE,)
        ops.append(op)
        cur = list(_torch_op(torch.zeros(cur), op).shape)
    return shape, axis, units, ops


def _torch_op(t, op):
    kind = op[0]
    if kind == "transpose":
        return t.transpose(op[1], op[2])
    if kind == "unsqueeze":
        return t.unsqueeze(op[1])
    if kind == "flatten":
        return t.flatten(op[1], op[2])
    if kind == "view":
        return t.reshape(op[1])
    if kind == "chunk":
        return t.chunk(op[1], op[2])[op[3]]
    return t


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_path())
def test_unitpath_follows_the_units_exactly_where_it_claims_to(case):
    from georeparam import unitpath as up

    shape, axis, units, ops = case
    index = torch.arange(units, dtype=torch.float64).reshape((units,) + (1,) * (-axis - 1)).expand(shape).contiguous()
    x = index
    for op in ops:
        x = _torch_op(x, op)
    try:
        st_ = up.follow(shape, axis, units, ops)
    except up.Lost:
        return
    s = torch.arange(units, dtype=torch.float64)
    assert torch.equal(up.broadcast(s, st_, x).expand_as(x), x), (shape, ops, st_)
