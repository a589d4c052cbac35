"""The paper's form, r·f(uᵀx + λ) with r signed, against an independent reference of the official layers.

The reference below is written from the paper's formula (official code, ``models.py``:
``DenseReparam`` / ``Conv2DReparam``: ``r * relu(conv(x, u(θ)) + λ)``), in polar angles with its
own cumprod, and shares no code with georeparam. A registered model and the reference start from
the same point and are trained side by side with Adam in float64; the radii cross zero on the
way, which is where the weight form ``relu(r·(uᵀx + λ))`` parts from the paper's.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import georeparam
from georeparam import geometry, register, remove

# -------------------------------------------------------------------------------------------------
# the reference: the official layers, from the formula
# -------------------------------------------------------------------------------------------------


def polar_unit(theta: torch.Tensor) -> torch.Tensor:
    """u(θ) for polar angles (units, n−1): u1 = cos θ1, u_k = cos θ_k ∏_{j<k} sin θ_j, u_n = ∏ sin θ_j."""
    units = theta.shape[0]
    sines = torch.cat([torch.ones(units, 1, dtype=theta.dtype), torch.cumprod(torch.sin(theta), dim=1)], dim=1)
    cosines = torch.cat([torch.cos(theta), torch.ones(units, 1, dtype=theta.dtype)], dim=1)
    return sines * cosines


class RefLayer(nn.Module):
    """One official GmP layer: r·act(op(x, u(θ)) + λ); op is a linear map or a 2-D convolution."""

    def __init__(self, layer: nn.Module, act: bool):
        super().__init__()
        g = geometry(layer)
        lat = g.angles.detach().clone()
        theta = lat.clone()
        theta[:, :-1] = math.pi / 2 - lat[:, :-1]  # latitude φ = π/2 − θ for all but the last angle
        self.theta = nn.Parameter(theta)
        self.lam = nn.Parameter(g.offset.detach().clone())
        self.r = nn.Parameter(g.radius.detach().clone())
        self.conv = isinstance(layer, nn.Conv2d)
        self.shape = tuple(layer.weight.shape)
        self.stride, self.padding = (layer.stride, layer.padding) if self.conv else (None, None)
        self.act = act

    def forward(self, x):
        u = polar_unit(self.theta).reshape(self.shape)
        if self.conv:
            z = F.conv2d(x, u, stride=self.stride, padding=self.padding) + self.lam[:, None, None]
            r = self.r[:, None, None]
        else:
            z = x @ u.T + self.lam
            r = self.r
        return r * (torch.relu(z) if self.act else z)


def mlp():
    return nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1))


def conv_pool():
    return nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 1),
    )  # fmt: skip


def conv_flat():
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 1))


def reference(model: nn.Sequential) -> nn.Sequential:
    """The official model with the registered model's current coordinates (pools etc. shared as modules)."""
    mods = list(model)
    out = []
    for i, m in enumerate(mods):
        if georeparam.is_geometric(m):
            act = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            out.append(RefLayer(m, act))
        elif isinstance(m, nn.ReLU):
            continue  # inside RefLayer
        else:
            out.append(m)
    return nn.Sequential(*out)


CASES = {"mlp": (mlp, (64, 3)), "conv_pool": (conv_pool, (16, 2, 10, 10)), "conv_flat": (conv_flat, (16, 2, 8, 8))}


def data(case: str, seed: int):
    factory, shape = CASES[case]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory().to(torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape[0], 1, generator=g, dtype=torch.float64) * 2 + 1
    return model, x, y


SEEDS = {"mlp": 0, "conv_pool": 0, "conv_flat": 1}


def train_side_by_side(case: str, form: str, steps: int = 120, lr: float = 0.1, wrap: bool = False):
    model, x, y = data(case, SEEDS[case])
    report = register(model, form=form)
    with torch.no_grad():  # small hidden radii (as Glorot gives at large fan-in): they cross zero early
        for m in list(model)[:-1]:
            if georeparam.is_geometric(m):
                geometry(m).radius.mul_(0.1)
    ref = reference(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if wrap:
        opt = georeparam.GeometricOptimizer(opt, model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=lr)
    radii = [geometry(m).radius for m in model if georeparam.is_geometric(m)]
    crossed = [torch.zeros_like(r, dtype=torch.bool) for r in radii]
    worst = 0.0
    for _ in range(steps):
        for o in (opt, ref_opt):
            o.zero_grad()
        F.mse_loss(model(x), y).backward()
        F.mse_loss(ref(x), y).backward()
        opt.step()
        ref_opt.step()
        for c, r in zip(crossed, radii):
            c |= r.detach() < 0
        with torch.no_grad():
            a, b = model(x), ref(x)
            worst = max(worst, float((a - b).norm() / b.norm()))
    return model, ref, x, report, worst, sum(int(c.sum()) for c in crossed)


# -------------------------------------------------------------------------------------------------
# trajectories: the paper's form follows the official layers; the weight form does not
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_paper_form_follows_the_official_layers(case):
    model, ref, x, report, worst, crossed = train_side_by_side(case, "paper")
    print(
        f"\n{case}: max relative output error over 120 Adam steps (lr 0.1) {worst:.2e}; units that took r < 0: {crossed}"
    )
    assert all(e.form == "paper" for e in report.registered)
    assert crossed > 0, "no radius crossed zero: the test would not tell the forms apart"
    assert worst <= 1e-6


@pytest.mark.parametrize("case", ["mlp", "conv_flat"])
def test_paper_form_with_the_wrapper_follows_too(case):
    _, _, _, _, worst, crossed = train_side_by_side(case, "paper", wrap=True)
    assert crossed > 0 and worst <= 1e-6


def test_weight_form_parts_from_the_official_layers_once_r_crosses_zero():
    # the same run in the weight form: the check above can fail
    _, _, _, _, worst, crossed = train_side_by_side("mlp", "weight")
    assert crossed > 0 and worst > 1e-2


@pytest.mark.parametrize("case", sorted(CASES))
def test_remove_after_training_keeps_the_function(case):
    model, _, x, _, _, crossed = train_side_by_side(case, "paper")
    assert crossed > 0 and bool((geometry(model[0]).radius < 0).any())
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remove(model)
    with torch.no_grad():
        after = model(x)
    assert not any(georeparam.is_geometric(m) for m in model.modules())
    assert float((after - before).norm() / before.norm()) <= 1e-6
    kept = [m for m in model.modules() if hasattr(m, "georeparam_sign")]
    if case == "conv_flat":  # conv → ReLU → flatten → Linear: every sign baked into the Linear's columns
        assert not kept and not caught
    if kept:  # only after a max-pool, and then remove says so
        assert case == "conv_pool" and any("max-pool" in str(w.message) for w in caught)
        assert "georeparam_sign" not in model.state_dict().keys()


def test_remove_one_layer_bakes_its_sign_into_a_registered_consumer():
    model, _, x, _, _, _ = train_side_by_side("mlp", "paper")
    assert bool((geometry(model[0]).radius < 0).any())
    own_signs = geometry(model[2]).radius.detach() < 0
    with torch.no_grad():
        before = model(x)
        remove(model[0])
        after = model(x)
    assert georeparam.is_geometric(model[2])
    assert torch.equal(geometry(model[2]).radius.detach() < 0, own_signs)  # the consumer keeps its own signs
    assert float((after - before).norm() / before.norm()) <= 1e-9


# -------------------------------------------------------------------------------------------------
# the gradient at r = 0 and the machinery
# -------------------------------------------------------------------------------------------------


def test_gradient_at_zero_radius_is_the_papers():
    model, x, y = data("mlp", 1)
    register(model)
    with torch.no_grad():
        geometry(model[0]).radius[:4] = 0.0
        geometry(model[0]).radius[4:8] *= -1
    ref = reference(model)
    F.mse_loss(model(x), y).backward()
    F.mse_loss(ref(x), y).backward()
    g_ours, g_ref = geometry(model[0]).radius.grad, ref[0].r.grad
    assert bool((g_ref[:4] != 0).any())  # the paper's ∂/∂r = f(z) does not vanish at r = 0
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    # angles: latitude φ = π/2 − θ for all but the last, so ∂/∂φ = −∂/∂θ there
    d_theta = ref[0].theta.grad.clone()
    d_theta[:, :-1] *= -1
    torch.testing.assert_close(geometry(model[0]).angles.grad, d_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(geometry(model[0]).offset.grad, ref[0].lam.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_effective_radius_is_abs_with_tiny_zero_and_sign_gradient(dtype):
    """|r|, an exact ±0 carried as the dtype's zero carrier (√tiny rounded to a power of 2: Note [A
    carrier that survives flush-to-zero]), ∂/∂r = sign(r) with sign(±0) = +1, in the radius's own
    dtype (float64's carrier is 0 in float32: computing it there would lose it)."""
    from georeparam.parametrization import GeometricWeight, zero_carrier
    from georeparam.signs import unit_sign

    p = GeometricWeight((4, 3), sign_after=True)
    r = torch.tensor([2.5, -3.0, 0.0, -0.0, float(torch.finfo(dtype).tiny) * 4], dtype=dtype, requires_grad=True)
    eff = p.effective_radius(r)
    eff.backward(torch.ones_like(eff))
    tiny, t = torch.finfo(dtype).tiny, zero_carrier(dtype)
    assert eff.dtype == dtype and tiny <= t <= max(tiny, 1e-18)
    assert eff.tolist() == [2.5, 3.0, t, t, tiny * 4]
    assert r.grad.tolist() == [1.0, -1.0, 1.0, 1.0, 1.0]
    assert unit_sign(r).dtype == dtype and unit_sign(r).tolist() == [1.0, -1.0, 1.0, 1.0, 1.0]


_RADII = st.lists(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -3.0, 1e-30, -1e-30, 1e-45, float("nan"), float("inf")])
    | st.floats(-1e3, 1e3, width=32),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(values=_RADII, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_effective_radius_fast_paths_match_the_formula_bit_for_bit(values, dtype):
    """Note [The paper form's fixed cost]: the host-read shortcuts (all r > 0: r itself; some r < 0
    and none 0: r·sign(r)) give the value and gradient of the general form, written here from its
    definition (|r|, an exact ±0 carried as the zero carrier, ∂/∂r = s with s(±0) = s(NaN) = +1),
    bit for bit, over radii with zeros, signed zeros, subnormals, NaN and inf; and so does the same
    call under vmap, where the shortcuts cannot run."""
    from georeparam.parametrization import GeometricWeight, zero_carrier
    from georeparam.signs import unit_sign

    p = GeometricWeight((len(values), 3), sign_after=True)
    r = torch.tensor(values, dtype=dtype, requires_grad=True)
    eff = p.effective_radius(r)
    (g,) = torch.autograd.grad(eff, r, torch.ones_like(eff))
    rd = r.detach()
    s_ref = torch.tensor([-1.0 if v < 0 else 1.0 for v in rd.tolist()], dtype=dtype)
    eff_ref = torch.where(rd == 0, torch.tensor(zero_carrier(dtype), dtype=dtype), rd.abs())
    assert torch.equal(eff.detach().isnan(), rd.isnan())
    keep = ~rd.isnan()
    assert eff.detach()[keep].tolist() == eff_ref[keep].tolist()
    assert g.tolist() == s_ref.tolist() and unit_sign(r).tolist() == s_ref.tolist()
    batched = torch.func.vmap(lambda t: p.effective_radius(t))(rd.unsqueeze(0)).squeeze(0)
    assert batched[keep].tolist() == eff_ref[keep].tolist()


def negative_model(case="conv_flat", seed=2):
    model, x, y = data(case, seed)
    register(model)
    with torch.no_grad():
        for m in model:
            if georeparam.is_geometric(m):
                r = geometry(m).radius
                r[::2] *= -1
    return model, x


def test_deepcopy_reads_its_own_radius():
    model, x = negative_model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        ref_before = reference(model)(x)
        torch.testing.assert_close(twin(x), ref_before, rtol=1e-12, atol=1e-12)
        geometry(twin[0]).radius.mul_(-1)  # flip every sign in the copy only
        torch.testing.assert_close(model(x), ref_before, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(twin(x), reference(twin)(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(twin(x), ref_before)


@given(signs=st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=5, max_size=5))
@settings(max_examples=15)
def test_functional_call_with_a_swapped_signed_radius(signs):
    model, x = negative_model()
    r = geometry(model[0]).radius.detach()
    swapped = r.abs() * torch.tensor(signs, dtype=r.dtype)  # a 0 sign: r = 0
    out = functional_call(model, {"0.parametrizations.weight.original0": swapped}, (x,))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        geometry(twin[0]).radius.copy_(swapped)
        expected = reference(twin)(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_keeps_the_signs():
    model, x = negative_model("conv_pool")
    fresh, _, _ = data("conv_pool", 9)
    register(fresh)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh(x), reference(model)(x), rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_matches_eager():
    model, x = negative_model("conv_flat")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    g = geometry(model[0]).radius.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(g, geometry(model[0]).radius.grad, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------------
# placement and the report
# -------------------------------------------------------------------------------------------------


class FunctionalNet(nn.Module):
    """A tutorial-style model: F.relu in forward, so the sign goes to the next layer's input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 1)  # the sign must act before this pool: no place
        return self.fc(torch.flatten(self.drop(x), 1))


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.b(self.act(self.a(x)))))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        if x.sum() > 1e30:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.head(self.body(x))


def test_report_for_a_functional_model():
    torch.manual_seed(0)
    model = FunctionalNet().double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    before = model(x)
    report = register(model)
    assert report.form_of("c1") == "paper" and "input of c2" in report.layers[0].where
    assert report.form_of("c2") == "weight" and "function" in report.layers[1].why
    assert report.form_of("fc") == "paper"
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        geometry(model.c1).radius[:2] *= -1
        # c1's sign acts at c2's input: flipping unit 0 of c1 equals negating c2's input channel 0
        sign = torch.tensor([-1.0, -1, 1, 1], dtype=x.dtype)[:, None, None]
        h = F.relu(F.conv2d(x, model.c1.weight, model.c1.bias)) * sign  # not model.c2(...): its pre-hook signs
        expected = model.fc(torch.flatten(F.relu(F.conv2d(h, model.c2.weight, model.c2.bias)), 1))
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_report_shared_activation_untraceable_gelu_tied_excluded():
    r1 = register(SharedReLU())
    assert r1.form_of("a") == "paper" and "input of b" in r1.layers[0].where
    assert r1.form_of("b") == "paper" and "input of out" in r1.layers[1].where
    r2 = register(Untraceable())
    assert r2.form_of("body.0") == "paper" and "after body.1" in r2.layers[0].where
    assert r2.form_of("body.2") == "weight" and "Tanh" in r2.layers[1].why
    assert r2.form_of("head") == "weight" and "could not trace" in r2.layers[2].why
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    r3 = register(tied, exclude=[])
    assert list(r3) == [] and "tied" in r3.layers[0].why and "2.weight" in r3.layers[0].why
    assert tied[2].weight is tied[0].weight
    r4 = register(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), exclude=["1"])
    assert [(e.name, e.form) for e in r4.layers] == [("0", None), ("1", None)]
    assert "unsupported type Embedding" in str(r4) and "excluded" in str(r4)


def test_weight_form_on_request_and_bad_form():
    model = mlp()
    report = register(model, form="weight")
    assert all(e.form == "weight" for e in report.layers) and not any(
        p.sign_after
        for m in model
        for p in getattr(getattr(m, "parametrizations", {}), "get", lambda *_: [])("weight", [])
    )
    with pytest.raises(ValueError, match="form must be one of"):
        register(mlp(), form="signed")


@pytest.mark.parametrize("form", ["paper", "weight"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_registration_is_exact_in_both_forms(form, dtype, tol):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, groups=1), nn.ReLU(), nn.ConvTranspose2d(5, 7, 3, groups=1), nn.LeakyReLU(0.1),
        nn.Conv2d(7, 9, 2, groups=1), nn.PReLU(), nn.Flatten(), nn.Linear(9 * 5 * 5, 11), nn.ReLU(), nn.Linear(11, 2),
    ).to(dtype)  # fmt: skip
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        report = register(model, form=form)
        after = model(x)
    assert len(report) == 5
    assert float((after - before).norm() / before.norm()) <= tol


def test_report_and_remove_on_torchvision_like_models():
    from _torchvision_like import ResNet18, vgg11

    torch.manual_seed(0)
    resnet = ResNet18(width=4).double().eval()
    report = register(resnet)
    # every conv feeds a BatchNorm before its ReLU: the weight form, the norm named (Note [A norm before the activation])
    assert len(report) == 21 and all(
        e.form == "weight" and "BatchNorm2d" in e.why for e in report.layers if e.kind == "Conv2d"
    )
    assert report.form_of("fc") == "paper" and "output" in report.layers[-1].where

    vgg = vgg11(width=4).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    report = register(vgg)
    convs = [e for e in report.layers if e.kind == "Conv2d"]
    assert len(convs) == 8 and all(e.where.startswith("sign(r) after features.") for e in convs)
    with torch.no_grad():
        for m in vgg.modules():
            if georeparam.is_geometric(m):
                geometry(m).radius[::3] *= -1
        before = vgg(x)
        # features.6's units feed features.8 through an in-place ReLU alone: flipping every r there
        # negates features.8's input
        flipped = copy.deepcopy(vgg)
        geometry(flipped.features[6]).radius.mul_(-1)
        minus = -torch.ones(vgg.features[8].in_channels, dtype=x.dtype)
        torch.testing.assert_close(flipped(x), _with_input_sign(vgg, x, "features.8", minus), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(flipped(x), before)
    with pytest.warns(UserWarning, match="max-pool"):
        remove(vgg)
    with torch.no_grad():
        after = vgg(x)
    assert float((after - before).norm() / before.norm()) <= 1e-9
    kept = {n for n, m in vgg.named_modules() if hasattr(m, "georeparam_sign")}
    assert kept and all(vgg.features[int(n.split(".")[1]) + 1].__class__ is nn.MaxPool2d for n in kept)


def _with_input_sign(model, x, name, sign):
    """model(x) with the input of module ``name`` multiplied by ``sign`` per channel (a second hook)."""
    target = dict(model.named_modules())[name]
    handle = target.register_forward_pre_hook(lambda m, a: (a[0] * sign[:, None, None],))
    try:
        return model(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("form", ["paper", "weight"])
def test_torchs_own_remover_keeps_the_function_and_remove_finishes(form):
    model, x = negative_model("mlp")
    if form == "weight":
        model, x, _ = data("mlp", 2)
        register(model, form="weight")
    with torch.no_grad():
        before = model(x)
    torch.nn.utils.parametrize.remove_parametrizations(model[0], "weight")
    with pytest.warns(UserWarning, match="torch's remove_parametrizations"), torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    remove(model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------------
# issue 20: the sign where the unit is
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d, (2, 9)), (nn.Conv2d, (2, 7, 6)), (nn.Conv1d, (2, 11))])
def test_unbatched_conv_input_gets_the_sign_on_its_channels(conv, shape):
    """An unbatched (C, L) / (C, H, W) input: the sign multiplies channels, as for the batch of one,
    and as the formula r·relu(conv(x, u) + λ) written here says (``remove`` agrees)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3), nn.ReLU(), conv(4, 3, 3)).double()
    register(model)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        geometry(model[0]).radius[:2] *= -1
        g = geometry(model[0])
        op = F.conv1d if conv is nn.Conv1d else F.conv2d
        spatial = (1,) * (len(shape) - 1)
        u = model[0].weight / g.radius.abs().reshape(-1, 1, *spatial)
        h = g.radius.reshape(-1, *spatial) * torch.relu(op(x, u) + g.offset.reshape(-1, *spatial))
        want = op(h, model[2].weight, model[2].bias)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x[None])[0], want, rtol=1e-12, atol=1e-12)
        remove(model)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


class DirectCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)

    def forward(self, x):
        self.features = self.act(self.l1(x))  # a ``return_features`` attribute read at the ReLU
        return self.l2(self.features)


def test_direct_call_and_features_see_the_papers_unit():
    """The sign is a hook on the activation: ``model.l2(z)`` is plain ``l2``, and a feature read at
    the ReLU (an attribute, or a forward hook as torchvision's feature extractors use) is r·relu(z)."""
    torch.manual_seed(0)
    model = DirectCall().double()
    report = register(model)
    assert "after act (ReLU)" in report.layers[0].where
    x, z = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    seen = {}
    model.act.register_forward_hook(lambda m, a, o: seen.__setitem__("act", o))
    with torch.no_grad():
        geometry(model.l1).radius[::2] *= -1
        g = geometry(model.l1)
        u = model.l1.weight / g.radius.abs()[:, None]
        unit = g.radius * torch.relu(x @ u.T + g.offset)
        torch.testing.assert_close(model(x), F.linear(unit, model.l2.weight, model.l2.bias), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.features, unit, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seen["act"], unit, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.l2(z), F.linear(z, model.l2.weight, model.l2.bias), rtol=0, atol=0)


def test_a_functional_activation_says_where_the_sign_lives():
    report = register(FunctionalNet())
    assert "a direct call c2(z) multiplies z by it too" in report.layers[0].where


# -------------------------------------------------------------------------------------------------
# the form is part of the state; nothing lost at the hand-back; the official 1-D unit
# -------------------------------------------------------------------------------------------------


def _negative_pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    b = copy.deepcopy(a)
    register(a)
    register(b, form="weight")
    with torch.no_grad():
        geometry(a[0]).radius[:5] *= -1
    return a, b


def test_a_checkpoint_of_another_form_is_refused_and_nothing_loaded(tmp_path):
    a, b = _negative_pair()
    torch.save(a.state_dict(), tmp_path / "a.pt")
    sd = torch.load(tmp_path / "a.pt")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match=r"another form.*form='paper'.*\[\"0 \(checkpoint: the paper's form"):
        b.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    with pytest.raises(ValueError, match="another form"):  # a layer alone: its own hook
        b[0].load_state_dict(a[0].state_dict())
    with pytest.raises(ValueError, match="another form"):  # and back
        a.load_state_dict(b.state_dict())
    c = copy.deepcopy(a)
    c.load_state_dict(sd)  # the same form loads
    plain = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    b.load_state_dict(plain.state_dict())  # plain checkpoints load into either form, as before
    a.load_state_dict(plain.state_dict())


def test_a_sign_no_plain_layer_holds_stays_as_a_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 1)
    ).double()
    report = register(model)
    assert report.layers[0].stays and "MaxPool2d" in str(report)  # said up front
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        geometry(model[0]).radius[:2] *= -1
        before = model(x)
    with pytest.raises(
        ValueError, match=r"plain_state_dict: .*\['0 \(2 units with r < 0, sign at 1\)'\].*form='weight'"
    ):
        georeparam.plain_state_dict(model)
    with pytest.warns(UserWarning, match="MaxPool|max-pool"):
        remove(model)
    assert isinstance(model[1].georeparam_sign, georeparam.signs.UnitSign)
    assert "1.georeparam_sign.sign" in model.state_dict()
    torch.save(model, tmp_path / "m.pt")
    for twin in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            torch.testing.assert_close(twin(x), before, rtol=1e-12, atol=1e-12)
    fresh = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 1)).double()
    with pytest.raises(RuntimeError, match="georeparam_sign.sign"):  # never silently another function
        fresh.load_state_dict(model.state_dict())
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].georeparam_sign.sign.fill_(1.0)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), before, rtol=1e-12, atol=1e-12)


@given(st.lists(st.booleans(), min_size=6, max_size=6))
@settings(max_examples=10, deadline=None)
def test_fan_in_1_is_the_official_1d_unit(flip):
    """r·ReLU(s·x + λ) with s = sign(w₀) frozen (a buffer in the state dict), exact at register, baked at remove."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    w0 = model[0].weight.detach()[:, 0].clone()
    with torch.no_grad():
        start = model(x)
    report = register(model)
    assert report.form_of("0") == "paper"
    assert "0.parametrizations.weight.0.direction" in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x), start, rtol=1e-12, atol=1e-12)
        g = geometry(model[0])
        g.radius[torch.tensor(flip)] *= -1
        s = torch.where(w0 < 0, -1.0, 1.0).to(torch.float64)
        want = model[2](g.radius * torch.relu(x * s + g.offset))
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
        remove(model)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
