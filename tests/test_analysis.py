"""georeparam.analysis: characteristic points (both GmP forms, IMN, BN), AngularDrift, PointsRecorder."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from georeparam import geometric, geometry, register
from georeparam.analysis import AngularDrift, angle_between, characteristic_points

F64 = torch.float64


# -------------------------------------------------------------------------------------------------
# independent references
# -------------------------------------------------------------------------------------------------


def unit_rows(layer):
    """(units, fan_in) weight rows written out per unit, without the library's reshape/permute."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.clone()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        in_per_g = w.shape[0] // g
        out_per_g = w.shape[1]
        rows = []
        for o in range(out_per_g * g):
            grp, local = divmod(o, out_per_g)
            rows.append(w[grp * in_per_g : (grp + 1) * in_per_g, local].flatten())
        return torch.stack(rows)
    return torch.stack([w[o].flatten() for o in range(w.shape[0])])


def nearest_point(w_row, b):
    """Point of {x : w·x + b = 0} nearest the origin: the minimum-norm least-squares solution."""
    a = w_row.to(F64).reshape(1, -1)
    rhs = torch.tensor([[-float(b)]], dtype=F64)
    return (torch.linalg.pinv(a) @ rhs).reshape(-1)


def reference(layer):
    rows = unit_rows(layer).to(F64)
    bias = layer.bias.detach().to(F64) if layer.bias is not None else torch.zeros(rows.shape[0], dtype=F64)
    pts = torch.stack([nearest_point(rows[i], bias[i]) for i in range(rows.shape[0])])
    dirs = rows / rows.norm(dim=1, keepdim=True)
    return pts, dirs


def make_layer(kind, cin, cout, k, groups, bias):
    if kind == "linear":
        return nn.Linear(cin, cout, bias=bias)
    if kind == "conv1d":
        return nn.Conv1d(cin * groups, cout * groups, k, groups=groups, bias=bias)
    if kind == "conv2d":
        return nn.Conv2d(cin * groups, cout * groups, k, groups=groups, bias=bias)
    return nn.ConvTranspose2d(cin * groups, cout * groups, k, groups=groups, bias=bias)


layer_specs = st.tuples(
    st.sampled_from(["linear", "conv1d", "conv2d", "convT2d"]),
    st.integers(1, 3),  # in channels per group
    st.integers(1, 3),  # out channels per group
    st.integers(1, 2),  # kernel
    st.integers(1, 2),  # groups
    st.booleans(),  # bias
    st.integers(0, 2**16),  # seed
    st.floats(1e-3, 1e2),  # weight scale
)


# -------------------------------------------------------------------------------------------------
# characteristic points
# -------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(layer_specs)
def test_points_match_least_squares_cartesian_and_gmp(spec):
    kind, cin, cout, k, groups, bias, seed, scale = spec
    torch.manual_seed(seed)
    layer = make_layer(kind, cin, cout, k, groups, bias).to(F64)
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.normal_()
    ref_p, ref_d = reference(layer)
    p, d = characteristic_points(layer)
    assert p.dtype == F64 and p.shape == ref_p.shape == d.shape
    torch.testing.assert_close(p, ref_p, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d, ref_d, rtol=1e-10, atol=1e-12)
    # the point is on the boundary and along the direction (a third, geometric check)
    rows = unit_rows(layer).to(F64)
    b = layer.bias.detach() if layer.bias is not None else torch.zeros(rows.shape[0], dtype=F64)
    torch.testing.assert_close((rows * p).sum(1) + b, torch.zeros_like(b), atol=1e-10 * (1 + b.abs().max()), rtol=0)

    geometric(layer)  # GmP in float64: from (r, θ, λ) directly, the same boundary
    pg, dg = characteristic_points(layer)
    torch.testing.assert_close(pg, ref_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dg, ref_d, rtol=1e-9, atol=1e-11)


def test_gmp_points_are_minus_lambda_u_and_negative_radius_flips_direction():
    torch.manual_seed(0)
    layer = geometric(nn.Linear(3, 4).double())
    g = geometry(layer)
    with torch.no_grad():
        g.radius[1] = -g.radius[1]
        g.radius[2] = 0.0  # GmP keeps θ and λ: the boundary stays defined
    p, d = characteristic_points(layer)
    from georeparam import to_cartesian

    u = to_cartesian(g.angles.detach())
    lam = g.offset.detach()
    torch.testing.assert_close(p, -lam[:, None] * u)
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(d, sign[:, None] * u)
    # rows with r != 0 agree with the Cartesian reading of the same weight and bias
    plain = nn.Linear(3, 4).double()
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    pp, dp = characteristic_points(plain)
    keep = [0, 1, 3]
    torch.testing.assert_close(pp[keep], p[keep])
    torch.testing.assert_close(dp[keep], d[keep])
    assert torch.isnan(pp[2]).all() and torch.isnan(dp[2]).all()  # Cartesian w = 0: no boundary
    assert torch.isfinite(p[2]).all()


FORMS = ("weight", "paper")


def register_form(model, form, **kwargs):
    return register(model, form=form, **kwargs)


def preactivation_at(layer, points):
    """Unit i's pre-activation at points[i], computed by running the layer itself in eval mode."""
    layer.eval()
    units = points.shape[0]
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return torch.diagonal(layer(points))
        g, cin = layer.groups, layer.in_channels
        in_g, k = cin // g, layer.kernel_size
        per_group = layer.out_channels // g
        x = torch.zeros(units, cin, *k, dtype=points.dtype)
        for i in range(units):
            patch = points[i].reshape(in_g, *k)
            if layer.transposed:  # stride 1, no padding: output K−1 reads input K−1−tap
                patch = patch.flip(list(range(1, patch.dim())))
            x[i, (i // per_group) * in_g : (i // per_group + 1) * in_g] = patch
        out = layer(x)
        if layer.transposed:
            out = out[(slice(None), slice(None)) + tuple(kk - 1 for kk in k)]
        return out.reshape(units, units).diagonal()


def imn_layer(kind, dtype):
    if kind == "linear":
        return nn.Linear(4, 5)
    if kind == "conv2d":
        return nn.Conv2d(4, 6, (2, 3), groups=2)
    return nn.ConvTranspose1d(4, 6, 3, groups=2)


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(["linear", "conv2d", "convT1d"]),
    st.sampled_from(["plain", "imn only"] + [f"GmP {f}" for f in FORMS]),
    st.sampled_from([torch.float32, F64]),
    st.integers(0, 2**16),
)
def test_points_are_on_the_boundary_the_layer_computes_with_input_mean_norm(kind, how, dtype, seed):
    # issue 9 item 6: IMN shifts the layer's input by its running mean μ; the point must follow
    from georeparam import input_mean_norm

    torch.manual_seed(seed)
    layer = imn_layer(kind, dtype).to(dtype)
    model = nn.Sequential(layer, nn.ReLU())
    if how == "imn only":
        input_mean_norm(layer)
    elif how.startswith("GmP"):
        register_form(model, how.split()[1], imn=True)
    shape = (64, 4) if kind == "linear" else ((8, 4, 5, 6) if kind == "conv2d" else (8, 4, 7))
    shift = (torch.rand(4, dtype=dtype) * 4 + 1) * torch.sign(torch.randn(4, dtype=dtype))
    batch = torch.randn(*shape, dtype=dtype) + shift.view(4, *([1] * (len(shape) - 2)))
    model.train()(batch)  # one training batch updates the running mean
    if how != "plain":
        assert layer.imn.running_mean.abs().min() > 0.05  # μ is far from 0: ignoring it would show
    points, directions = characteristic_points(layer)
    assert points.dtype == dtype
    z = preactivation_at(layer, points)
    scale = 1 + layer.weight.detach().abs().max() * points.abs().max()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert z.abs().max() <= tol * scale, (kind, how, z)
    # the direction is the gradient of the pre-activation, normalized (the active side)
    x0 = points.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(preactivation_with_grad(layer, x0).sum(), x0)
    torch.testing.assert_close(directions, grad / grad.norm(dim=1, keepdim=True), rtol=0, atol=10 * tol)


def preactivation_with_grad(layer, points):
    if isinstance(layer, nn.Linear):
        return torch.diagonal(layer(points))
    # conv: the pre-activation is affine in the patch with gradient = the unit's weight row
    from georeparam.layouts import layout_of  # the library's layout, checked by unit_rows below

    rows = unit_rows(layer).to(points.dtype)
    torch.testing.assert_close(rows, layout_of(layer).to_units(layer.weight.detach()))
    return (rows * points).sum(1)


def test_imn_shift_reproduces_the_reported_bug_size():
    # the measurement in issue 9: after register(imn=True) and one batch, the uncorrected point
    # (−b·w/‖w‖², the layer's own w and b) is off the boundary; the corrected one is on it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    register(model, exclude=["2"], imn=True)
    model.train()(torch.randn(256, 2) + torch.tensor([1.5, -2.0]))
    layer = model[0].eval()
    w, b = layer.weight.detach(), layer.bias.detach()
    naive = -(b / w.norm(dim=1) ** 2)[:, None] * w
    with torch.no_grad():
        assert layer(naive).diagonal().abs().max() > 0.01
    points, _ = characteristic_points(layer)
    with torch.no_grad():
        assert layer(points).diagonal().abs().max() < 1e-6


def test_paper_form_direction_is_u_whatever_the_sign_of_r():
    from georeparam import to_cartesian

    torch.manual_seed(5)
    models = {}
    for form in ("paper", "weight"):
        torch.manual_seed(5)
        m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)).double()
        register_form(m, form, exclude=["2"])
        with torch.no_grad():
            geometry(m[0]).radius[[1, 4]] *= -1  # r < 0: in the paper's form only the output's sign
        models[form] = m
    u = {f: to_cartesian(geometry(m[0]).angles.detach()) for f, m in models.items()}
    torch.testing.assert_close(u["paper"], u["weight"])
    lam = geometry(models["paper"][0]).offset.detach()
    sign = torch.ones(6, dtype=F64)
    sign[[1, 4]] = -1
    for form, m in models.items():
        p, d = characteristic_points(m[0])
        torch.testing.assert_close(d, (sign[:, None] if form == "weight" else 1) * u[form])
        torch.testing.assert_close(p, -lam[:, None] * u[form])
        ref_p, ref_d = reference(m[0])  # least squares on the layer's effective weight and bias
        torch.testing.assert_close(d, ref_d)
        torch.testing.assert_close(p, ref_p)
    # the paper-form unit is active exactly where uᵀx + λ > 0, whatever r's sign (a point a bit
    # along ±u from the characteristic point): the hidden ReLU fires on the +u side only
    p, d = characteristic_points(models["paper"][0])
    for side, active in ((1e-3, True), (-1e-3, False)):
        x = p + side * d
        h = models["paper"][1](models["paper"][0](x)).diagonal()
        assert bool(((h != 0) == active).all())


def test_drift_sees_no_turn_when_r_changes_sign_in_the_paper_form():
    for form, expect in (("paper", 0.0), ("weight", math.pi)):
        torch.manual_seed(6)
        m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
        register_form(m, form, exclude=["2"])
        drift = AngularDrift(m, layers=["0"], history=True)
        with torch.no_grad():
            geometry(m[0]).radius[2] *= -1
        angles = drift.step()
        torch.testing.assert_close(angles, torch.tensor([0, 0, expect, 0], dtype=F64), rtol=0, atol=1e-7)
        assert drift.summary()["flip_fraction"] == (0.0 if form == "paper" else 0.25)


def test_float32_layers_return_float32_and_weight_norm_is_read_through_weight():
    torch.manual_seed(1)
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(5, 3))
    p, d = characteristic_points(wn)
    assert p.dtype == torch.float32
    ref_p, ref_d = reference(wn)
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=1e-6)


def test_norm_folding_matches_eval_mode_composite():
    torch.manual_seed(2)
    lin, bn = nn.Linear(3, 5).double(), nn.BatchNorm1d(5).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()  # some γ < 0: the active side flips
        bn.bias.normal_()
    bn.eval()
    for layer in (lin, geometric(nn.Linear(3, 5).double())):
        p, d = characteristic_points(layer, norm=bn)
        z = bn(layer(p))  # row i of p is on unit i's boundary
        torch.testing.assert_close(torch.diagonal(z), torch.zeros(5, dtype=F64), atol=1e-10, rtol=0)
        # the direction is the normalized gradient of the composite pre-activation
        x = torch.zeros(1, 3, dtype=F64, requires_grad=True)
        for i in range(5):
            (grad,) = torch.autograd.grad(bn(layer(x))[0, i], x)
            torch.testing.assert_close(d[i], grad[0] / grad.norm())
        # and p is nearest the origin: it is parallel to the direction
        torch.testing.assert_close(
            angle_between(p, d).clamp(max=math.pi - angle_between(p, d)), torch.zeros(5, dtype=F64), atol=1e-7, rtol=0
        )


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="Got: ReLU"):
        characteristic_points(nn.ReLU())
    with pytest.raises(ValueError, match="lazy"):
        characteristic_points(nn.LazyLinear(3))
    with pytest.raises(TypeError, match="BatchNorm"):
        characteristic_points(nn.Linear(2, 2), norm=nn.LayerNorm(2))
    with pytest.raises(ValueError, match="one feature per unit"):
        characteristic_points(nn.Linear(2, 2), norm=nn.BatchNorm1d(3))


def test_the_refusal_lists_the_layer_registry(monkeypatch):
    """The message names what georeparam.layouts.LAYOUTS holds (a layer type added there is listed
    without touching analysis.py)."""
    from georeparam import layouts

    class Planted(nn.Module):
        pass

    monkeypatch.setitem(layouts.LAYOUTS, Planted, layouts.LAYOUTS[nn.Linear])
    with pytest.raises(TypeError, match=r"Conv1D, Planted \(or a subclass\)\. Got: ReLU"):
        characteristic_points(nn.ReLU())


def test_attention_in_projection_is_refused_and_hf_conv1d_is_read_by_columns():
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(
        TypeError, match=r"feed an activation: Linear, .*Conv1D \(or a subclass\)\. Got: MultiheadAttention"
    ) as info:
        characteristic_points(mha)
    assert "MultiheadAttention," not in str(info.value)  # the list leaves attention out
    drift = AngularDrift(nn.TransformerEncoderLayer(4, 2, dim_feedforward=8))
    assert [t.name for t in drift._tracks] == ["self_attn.out_proj", "linear1", "linear2"]
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    conv1d = transformers.pytorch_utils.Conv1D(5, 3).double()  # weight (in=3, out=5): units are columns
    with torch.no_grad():
        conv1d.weight.normal_()
        conv1d.bias.normal_()
    plain = nn.Linear(3, 5).double()
    with torch.no_grad():
        plain.weight.copy_(conv1d.weight.T)
        plain.bias.copy_(conv1d.bias)
    p, d = characteristic_points(conv1d)
    ref_p, ref_d = reference(plain)
    torch.testing.assert_close(p, ref_p)
    torch.testing.assert_close(d, ref_d)
    with torch.no_grad():
        torch.testing.assert_close(conv1d(p).diagonal(), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)


def test_angle_between_is_accurate_at_both_ends():
    a = torch.tensor([[1.0, 0.0]], dtype=F64)
    for t in (1e-12, 1e-6, 0.3, 2.0, math.pi - 1e-9):
        b = torch.tensor([[math.cos(t), math.sin(t)]], dtype=F64)
        assert abs(angle_between(a, b).item() - t) <= 1e-15 + 1e-13 * t
    assert torch.isnan(angle_between(torch.zeros(1, 2), torch.ones(1, 2))).all()


# -------------------------------------------------------------------------------------------------
# AngularDrift
# -------------------------------------------------------------------------------------------------


def rotate(v, t):
    c, s = math.cos(t), math.sin(t)
    return torch.stack([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def test_drift_hand_computation_explicit_steps():
    layer = nn.Linear(2, 4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1e-3, -1e-3]]))
    drift = AngularDrift(layer, history=True)
    with torch.no_grad():
        w = layer.weight
        w[0] = rotate(w[0], 0.3)  # turns by 0.3
        w[1] = 5 * w[1]  # rescaled: no turn
        w[2] = -w[2]  # negated: a flip by π
        w[3] = rotate(w[3], -1e-7)  # a tiny turn
    angles = drift.step()
    torch.testing.assert_close(angles, torch.tensor([0.3, 0.0, math.pi, 1e-7], dtype=F64), rtol=1e-9, atol=1e-15)
    with torch.no_grad():
        layer.weight[0] = rotate(layer.weight[0], 2.0)
    drift.step()  # second step: only unit 0 turns, by 2.0 (> π/2: a flip)
    s = drift.summary()
    all_angles = torch.tensor([0.3, 0.0, math.pi, 1e-7, 2.0, 0.0, 0.0, 0.0], dtype=F64)
    assert s["steps"] == 2 and s["units"] == 4 and s["undefined"] == 0
    assert s["max"] == pytest.approx(math.pi)
    assert s["flip_fraction"] == pytest.approx(2 / 8)
    assert s["median"] == pytest.approx(float(all_angles.median() + all_angles.sort().values[4]) / 2)
    assert s["p99"] == pytest.approx(float(torch.quantile(all_angles, 0.99)))
    per = drift.per_step
    assert per["flip_fraction"].tolist() == [0.25, 0.25]
    assert per["max"][1].item() == pytest.approx(2.0)
    assert drift.history().shape == (2, 4)


def test_drift_hooks_match_weights_before_and_after_each_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(32, 2)
    expected = []
    with AngularDrift(model, exclude=["4"], history=True).attach(opt) as drift:
        for _ in range(4):
            before = [model[i].weight.detach().double().clone() for i in (0, 2)]
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            after = [model[i].weight.detach().double() for i in (0, 2)]
            cos = torch.cat([(b * a).sum(1) / (b.norm(dim=1) * a.norm(dim=1)) for b, a in zip(before, after)])
            expected.append(torch.acos(cos.clamp(-1, 1)))
    opt.step()  # detached: not recorded
    assert drift.steps == 4
    got = torch.cat([drift.history("0"), drift.history("2")], dim=1).double()
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=2e-7)


@pytest.mark.parametrize("method", ["WN", "GmP", "BN"])
def test_drift_works_for_reparameterized_layers(method):
    torch.manual_seed(4)
    layers = [nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)]
    if method == "BN":
        layers.insert(1, nn.BatchNorm1d(8))
    model = nn.Sequential(*layers)
    if method == "WN":
        nn.utils.parametrizations.weight_norm(model[0])
    elif method == "GmP":
        register(model, exclude=["2"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(64, 3)
    with AngularDrift(model, layers=[model[0]]).attach(opt) as drift:
        for _ in range(5):
            before = model[0].weight.detach().double().clone()
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            expect = angle_between(before, model[0].weight.detach())
            got = drift.per_step["max"][-1].item()
            assert got == pytest.approx(expect.max().item(), rel=1e-3, abs=1e-6)
    assert drift.summary()["steps"] == 5 and drift.summary()["units"] == 8


def test_drift_histogram_quantiles_close_to_exact():
    torch.manual_seed(5)
    layer = nn.Linear(2, 200).double()
    exact = AngularDrift(layer, history=True)
    approx = AngularDrift(layer)
    for _ in range(10):
        with torch.no_grad():
            t = 10 ** (torch.rand(200, dtype=F64) * 6 - 6) * torch.sign(torch.randn(200, dtype=F64))
            c, s = torch.cos(t), torch.sin(t)
            w = layer.weight
            w.copy_(torch.stack([c * w[:, 0] - s * w[:, 1], s * w[:, 0] + c * w[:, 1]], 1))
        exact.step()
        approx.step()
    a, e = approx.summary(), exact.summary()
    for key in ("median", "p99"):
        assert a[key] == pytest.approx(e[key], rel=0.04)
    assert a["max"] == pytest.approx(e["max"], rel=1e-6)  # history is kept in float32
    assert a["flip_fraction"] == e["flip_fraction"] == 0.0


def test_drift_counts_zero_rows_as_undefined_and_validates():
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight[1] = 0.0
    drift = AngularDrift(layer)
    drift.step()
    assert drift.summary()["undefined"] == 1
    with pytest.raises(ValueError, match="no module named 'nope'"):
        AngularDrift(nn.Sequential(nn.Linear(2, 2)), layers=["nope"])
    with pytest.raises(ValueError, match="no Linear/Conv layer"):
        AngularDrift(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="Optimizer"):
        AngularDrift(layer).attach(object())
    with pytest.raises(RuntimeError, match="history=True"):
        drift.history()


def test_drift_does_not_see_canonicalization():
    # GeometricOptimizer maps r < 0 to r > 0 and u to −u after each step without changing w: the
    # oriented directions, hence the recorded angles, must be those of the unwrapped run.
    optim = pytest.importorskip("georeparam.optim")
    x, y = torch.randn(64, 3, dtype=F64), torch.randn(64, 1, dtype=F64)

    def run(wrap):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1)).double()
        register(model, exclude=["2"], form="weight")  # the weight form: r < 0 is canonicalized away
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        if wrap:
            opt = optim.GeometricOptimizer(opt, model)
        with AngularDrift(model, layers=["0"], history=True).attach(opt) as drift:
            for _ in range(30):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        return drift, int((geometry(model[0]).radius < 0).sum())

    (plain, negative_plain), (wrapped, negative_wrapped) = run(False), run(True)
    assert negative_plain > 0 and negative_wrapped == 0  # canonicalization did happen
    assert wrapped.steps == plain.steps == 30
    torch.testing.assert_close(wrapped.history(), plain.history(), rtol=0, atol=1e-6)
