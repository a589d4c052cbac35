"""georeparam.analysis: characteristic points, AngularDrift, the Figure-1 experiment, plots."""

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from georeparam import geometric, geometry, register
from georeparam.analysis import (
    AngularDrift,
    PointsRecorder,
    angle_between,
    characteristic_points,
    plot_boundaries_2d,
    plot_points_1d,
    stability_experiment,
)

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
        torch.testing.assert_close(angle_between(p, d).clamp(max=math.pi - angle_between(p, d)), torch.zeros(5, dtype=F64), atol=1e-7, rtol=0)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="Got: ReLU"):
        characteristic_points(nn.ReLU())
    with pytest.raises(ValueError, match="lazy"):
        characteristic_points(nn.LazyLinear(3))
    with pytest.raises(TypeError, match="BatchNorm"):
        characteristic_points(nn.Linear(2, 2), norm=nn.LayerNorm(2))
    with pytest.raises(ValueError, match="one feature per unit"):
        characteristic_points(nn.Linear(2, 2), norm=nn.BatchNorm1d(3))


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


# -------------------------------------------------------------------------------------------------
# Figure 1
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("perturbation", ["ones", "random"])
def test_gmp_direction_change_is_exactly_the_angle_step(perturbation):
    res = stability_experiment(trials=500, seed=1, perturbation=perturbation)
    gmp = res.direction[res.methods.index("GmP")]
    # ‖δθ‖ bounds the turn; in 2-D it is the turn itself (all steps here are < π)
    assert bool((gmp <= res.angle_step + 1e-12).all())
    torch.testing.assert_close(gmp, res.angle_step, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("perturbation", ["ones", "random"])
def test_cartesian_directions_are_lost_when_eps_dominates_w(perturbation):
    res = stability_experiment(trials=500, seed=2, perturbation=perturbation)
    big = res.eps.index(0.1)
    for m in ("SP", "WN", "BN"):
        d = res.direction[res.methods.index(m), big]
        assert d.median() > 1.0, m  # ~π/2: the new direction is unrelated to the old one
        assert (d > math.pi / 2).float().mean() > 0.3, m
    gmp = res.direction[res.methods.index("GmP"), big]
    assert gmp.max() <= 0.1 * (1 if perturbation == "ones" else 6) + 1e-12


def test_stability_sp_trial_by_hand_and_bn_turns_like_sp():
    res = stability_experiment((1e-3,), trials=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(3, 2, generator=gen, dtype=F64) * 1e-3
    b = torch.randn(3, generator=gen, dtype=F64) * 1e-3
    w1, b1 = w + 1e-3, b + 1e-3
    cos = (w * w1).sum(1) / (w.norm(dim=1) * w1.norm(dim=1))
    torch.testing.assert_close(res.direction[0, 0], torch.acos(cos), rtol=1e-7, atol=1e-12)
    shift = (-b1[:, None] * w1 / w1.norm(dim=1, keepdim=True) ** 2 + b[:, None] * w / w.norm(dim=1, keepdim=True) ** 2).norm(dim=1)
    torch.testing.assert_close(res.point[0, 0], shift)
    torch.testing.assert_close(res.direction[res.methods.index("BN")], res.direction[0])  # same Cartesian turn
    assert "| GmP |" in res.table() and res.table().count("\n") == 1 + len(res.methods)


def test_stability_zero_eps_changes_nothing_and_validates():
    res = stability_experiment((0.0,), trials=10)
    assert res.direction.abs().max() < 1e-7 and res.point.abs().max() < 1e-9
    with pytest.raises(ValueError, match="perturbation"):
        stability_experiment(perturbation="up")
    with pytest.raises(ValueError, match="methods"):
        stability_experiment(methods=("LN",))


# -------------------------------------------------------------------------------------------------
# recorder and plots
# -------------------------------------------------------------------------------------------------


def test_points_recorder_and_plots_write_files(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    register(model, exclude=["2"])
    x = torch.randn(100, 2)
    y = (x[:, 0] > x[:, 1]).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with PointsRecorder(model[0], every=2).attach(opt) as rec:
        for _ in range(6):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
            opt.step()
    assert rec.steps == [0, 2, 4, 6] and rec.points.shape == (4, 8, 2)
    torch.testing.assert_close(rec.points[-1], characteristic_points(model[0])[0])
    assert model.training
    ax = plot_boundaries_2d(model, x, y, trajectories=rec, title="GmP")
    assert model.training  # mode restored
    ax.figure.savefig(tmp_path / "b2d.png")
    # multi-class output and a plain model
    mc = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    plot_boundaries_2d(mc, x, resolution=20).figure.savefig(tmp_path / "mc.png")
    lvl = nn.Linear(1, 5)
    r1 = PointsRecorder(lvl)
    r1.record()
    plot_points_1d(r1, x_range=(-1, 1)).figure.savefig(tmp_path / "p1d.png")
    for f in ("b2d.png", "mc.png", "p1d.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_boundaries_2d(nn.Linear(2, 1), torch.randn(4, 3))
    with pytest.raises(ValueError, match="fan-in 2"):
        plot_boundaries_2d(nn.Sequential(nn.Linear(2, 3)), torch.randn(4, 2), layer=nn.Linear(3, 1))
    with pytest.raises(ValueError, match="fan-in 1"):
        plot_points_1d(torch.zeros(3, 4, 2))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_points_1d(torch.zeros(3, 4))


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
