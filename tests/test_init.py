"""init_geometric_: distributions (with stated statistical bounds), equivalence with torch.nn.init
on the plain layer, in-place writes, reproducibility, errors.

Statistical bounds: every check of a sample mean uses 5 standard errors (CLT), with the standard
error either known in closed form or estimated from the same sample. With fixed generators the
tests are deterministic; under a correct sampler a 5σ check fails with probability < 1e-6 per
coordinate, so a different seed would pass too.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from georeparam.init import SCHEMES, glorot_radius, init_geometric_

Z = 5.0  # standard errors allowed in every statistical check


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def units_of(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (units, fan_in), float64, via the parametrization's own layout."""
    p = layer.parametrizations.weight[0]
    return p.to_units(layer.weight.detach()).to(torch.float64)


def direction_stats(u: torch.Tensor) -> dict:
    """Sample statistics of unit rows ``u`` (U, n) and their standard errors."""
    U, n = u.shape
    m2 = u**2
    return {
        "mean": u.mean(0),  # per coordinate, E = 0
        "mean_se": u.std(0) / math.sqrt(U),
        "m2": m2.mean(0),  # per coordinate, E = 1/n
        "m2_se": m2.std(0) / math.sqrt(U),
    }


# ---------------------------------------------------------------------------------------------
# errors and the nn.init pitfall
# ---------------------------------------------------------------------------------------------


def test_unregistered_module_raises():
    with pytest.raises(ValueError, match="no GmP-registered layer.*register"):
        init_geometric_(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no GmP-registered layer"):
        init_geometric_(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module"):
        init_geometric_(torch.zeros(3))


def test_bad_arguments_raise():
    layer = georeparam.geometric(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="scheme must be one of.*Got: 'xavier'"):
        init_geometric_(layer, "xavier")
    with pytest.raises(ValueError, match="radius is only used by scheme='uniform_sphere'"):
        init_geometric_(layer, "glorot_uniform", radius=1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="radius must be a positive finite number"):
            init_geometric_(layer, "uniform_sphere", radius=bad)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        init_geometric_(layer, generator=0)


def test_nn_init_on_parametrized_weight_does_nothing():
    # the PyTorch behaviour the docs warn about (pytorch#180968); if it ever changes, update them
    layer = georeparam.geometric(nn.Linear(5, 4))
    before = layer.weight.detach().clone()
    nn.init.xavier_uniform_(layer.weight)
    assert torch.equal(layer.weight, before)
    init_geometric_(layer)
    assert not torch.equal(layer.weight, before)


# ---------------------------------------------------------------------------------------------
# the Cartesian schemes are torch.nn.init on the plain layer, converted
# ---------------------------------------------------------------------------------------------

LAYERS = [
    lambda: nn.Linear(7, 5),
    lambda: nn.Conv2d(4, 6, 3, groups=2),
    lambda: nn.ConvTranspose2d(4, 6, (2, 3), groups=2),
    lambda: nn.Conv1d(1, 3, 1),  # fan-in 1: the radius carries the sign
]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("scheme", ["glorot_uniform", "kaiming_uniform"])
def test_cartesian_schemes_match_torch_init_on_the_plain_layer(make, scheme):
    plain = make()
    w = torch.empty_like(plain.weight)
    if scheme == "glorot_uniform":
        nn.init.xavier_uniform_(w, generator=gen(3))
    else:
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen(3))
    layer = georeparam.geometric(make())
    init_geometric_(layer, scheme, generator=gen(3))
    err = (layer.weight.detach().double() - w.double()).norm() / w.double().norm()
    assert err <= 1e-6
    assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    g = georeparam.geometry(layer)
    assert torch.equal(g.offset, torch.zeros_like(g.offset))


@settings(max_examples=15)
@given(
    fan_in=st.integers(1, 40),
    units=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_glorot_is_xavier_converted_for_generated_shapes(fan_in, units, seed, dtype):
    plain = nn.Linear(fan_in, units).to(dtype)
    w = torch.empty_like(plain.weight)
    nn.init.xavier_uniform_(w, generator=gen(seed))
    layer = georeparam.geometric(nn.Linear(fan_in, units).to(dtype))
    init_geometric_(layer, generator=gen(seed))
    err = (layer.weight.detach().double() - w.double()).norm() / w.double().norm()
    assert err <= (1e-6 if dtype == torch.float32 else 1e-12)
    g = georeparam.geometry(layer)
    assert g.radius.dtype == dtype and g.angles.dtype == dtype
    if fan_in > 1:
        assert bool((g.radius >= 0).all())
        assert bool((g.angles[:, :-1].abs() <= math.pi / 2).all()) and bool((g.angles[:, -1].abs() <= math.pi).all())


# ---------------------------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------------------------

N_IN, N_UNITS = 32, 4000


@pytest.mark.parametrize("scheme", SCHEMES)
def test_directions_have_mean_zero_and_second_moment_one_over_n(scheme):
    layer = georeparam.geometric(nn.Linear(N_IN, N_UNITS))
    init_geometric_(layer, scheme, generator=gen(1))
    w = units_of(layer)
    u = w / w.norm(dim=1, keepdim=True)
    s = direction_stats(u)
    assert bool((s["mean"].abs() <= Z * s["mean_se"]).all()), s["mean"].abs().max()
    assert bool(((s["m2"] - 1 / N_IN).abs() <= Z * s["m2_se"]).all()), (s["m2"] * N_IN).aminmax()
    # off-diagonal second moments E[u_i u_j] = 0 (all schemes are sign- and permutation-symmetric)
    cross = (u.T @ u / N_UNITS).fill_diagonal_(0)
    assert cross.abs().max() <= Z * (1 / N_IN) / math.sqrt(N_UNITS) * 1.5


def test_uniform_sphere_fourth_moment_is_the_sphere_s():
    # E[u_i^4] = 3 / (n (n + 2)) on the uniform sphere; a normalized cube sample (Glorot) gives a
    # different value, and so does a sampler of uniform angles: this tells them apart
    n = N_IN
    expected = 3 / (n * (n + 2))
    for scheme, should_match in (("uniform_sphere", True), ("glorot_uniform", False)):
        layer = georeparam.geometric(nn.Linear(n, 20000))
        init_geometric_(layer, scheme, generator=gen(2))
        w = units_of(layer)
        u4 = (w / w.norm(dim=1, keepdim=True)) ** 4
        m4 = u4.mean()  # pooled over coordinates (exchangeable); SE bounded by the per-coordinate one
        se = u4.std(0).max() / math.sqrt(u4.shape[0])
        assert bool((m4 - expected).abs() <= Z * se) == should_match, (scheme, m4 / expected)


@pytest.mark.parametrize("fan_out", [16, 4000])
def test_glorot_radius_matches_the_cartesian_expected_norm(fan_out):
    layer = georeparam.geometric(nn.Linear(N_IN, fan_out))
    init_geometric_(layer, "glorot_uniform", generator=gen(4))
    r2 = georeparam.geometry(layer).radius.detach().double() ** 2
    a2 = 6 / (N_IN + fan_out)
    mean, var = N_IN * a2 / 3, 4 * N_IN * a2**2 / 45  # ‖w‖² = Σ of n U(±a)² terms
    assert abs(r2.mean() - mean) <= Z * math.sqrt(var / fan_out)
    assert math.isclose(glorot_radius(layer.parametrizations.weight[0]), math.sqrt(mean))


def test_kaiming_radius_matches_the_cartesian_expected_norm():
    layer = georeparam.geometric(nn.Conv2d(8, 3000, 3))  # torch fan_in = 8·9 = 72 = the unit's fan-in
    init_geometric_(layer, "kaiming_uniform", generator=gen(5))
    r2 = georeparam.geometry(layer).radius.detach().double() ** 2
    n = 72
    a2 = 1 / n  # kaiming_uniform_(a=√5): bound √(6 / ((1 + 5) fan_in))
    mean, var = n * a2 / 3, 4 * n * a2**2 / 45
    assert abs(r2.mean() - mean) <= Z * math.sqrt(var / 3000)


def test_uniform_sphere_radius_rule_and_unit_layout():
    layer = georeparam.geometric(nn.ConvTranspose2d(6, 10, 3, groups=2))
    init_geometric_(layer, "uniform_sphere", generator=gen(6))
    g = georeparam.geometry(layer)
    expected = glorot_radius(layer.parametrizations.weight[0])
    assert torch.allclose(g.radius, torch.full_like(g.radius, expected))
    assert torch.allclose(units_of(layer).norm(dim=1), torch.full((10,), expected, dtype=torch.float64), rtol=1e-6)
    init_geometric_(layer, "uniform_sphere", generator=gen(6), radius=2.5)
    assert torch.allclose(units_of(layer).norm(dim=1), torch.full((10,), 2.5, dtype=torch.float64), rtol=1e-6)
    assert torch.equal(g.offset, torch.zeros_like(g.offset))


def test_uniform_sphere_on_fan_in_one_is_a_random_sign():
    layer = georeparam.geometric(nn.Linear(1, 4000))
    init_geometric_(layer, "uniform_sphere", generator=gen(7), radius=0.5)
    r = georeparam.geometry(layer).radius.detach()
    assert torch.equal(r.abs(), torch.full_like(r, 0.5))
    frac = (r > 0).double().mean().item()
    assert abs(frac - 0.5) <= Z * 0.5 / math.sqrt(4000)


# ---------------------------------------------------------------------------------------------
# in place, reproducible, model-wide
# ---------------------------------------------------------------------------------------------


def test_writes_in_place_so_an_earlier_optimizer_stays_valid():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    georeparam.register(model, exclude=["2"])
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    init_geometric_(model, generator=gen(0))
    assert all(a is b for a, b in zip(params, model.parameters()))
    before = model[0].weight.detach().clone()
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)  # the optimizer moves the live coordinates


def test_generator_reproducibility_and_plain_layers_untouched():
    def fresh():
        torch.manual_seed(123)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 1))
        georeparam.register(m, exclude=["5"])
        return m

    a, b, c = fresh(), fresh(), fresh()
    plain = a[5].weight.detach().clone()
    for scheme in SCHEMES:
        init_geometric_(a, scheme, generator=gen(9))
        init_geometric_(b, scheme, generator=gen(9))
        init_geometric_(c, scheme, generator=gen(10))
        for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
            assert torch.equal(pa, pb)
        assert not torch.equal(a[0].weight, c[0].weight)
    assert torch.equal(a[5].weight, plain)
    # without a generator: the global RNG, so torch.manual_seed reproduces
    torch.manual_seed(5)
    init_geometric_(a)
    torch.manual_seed(5)
    init_geometric_(b)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_cartesian_bias_left_alone():
    layer = georeparam.geometric(nn.Linear(4, 3), bias=None)
    bias = layer.bias.detach().clone()
    init_geometric_(layer, generator=gen(0))
    assert torch.equal(layer.bias, bias)


# ---------------------------------------------------------------------------------------------
# the official draw (Note [The official draw]) against a port of the official code
# ---------------------------------------------------------------------------------------------


def official_cartesian_to_hyperspherical(x: torch.Tensor):
    """``utils.cartesian_to_hyperspherical`` of the official code, ported line by line
    (columns are units: ``x`` is ``(n, units)``)."""
    numerator = x[:-1, :].clone()
    correction = torch.sqrt((x[-2:, :] ** 2).sum(0, keepdim=True))
    numerator[-1:, :] = numerator[-1:, :] + correction
    denominator = torch.sqrt(torch.flip(torch.cumsum(torch.flip(x[1:, :] ** 2, [0]), 0), [0]))
    angles = math.pi / 2.0 - torch.atan2(numerator, denominator)
    angles[-1:, :] = 2.0 * angles[-1:, :]
    return angles, x.norm(dim=0, keepdim=True)


def official_hyperspherical_to_cartesian(angles: torch.Tensor, radius):
    """``utils.hyperspherical_to_cartesian`` of the official code, ported line by line."""
    aug = torch.cat([torch.zeros(1, angles.shape[-1], dtype=angles.dtype), angles], 0)
    cos = torch.roll(torch.cos(aug), -1, 0)
    sin = torch.sin(aug)
    sin[0] = 1.0
    return radius * torch.cumprod(sin, 0) * cos


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 5), lambda: nn.Conv2d(3, 6, 3), lambda: nn.Conv1d(4, 8, 5)])
@pytest.mark.parametrize("sign_loss", [False, True])
def test_official_scheme_is_the_official_draw(make, sign_loss):
    plain = make().double()
    n, units = plain.weight[0].numel(), plain.weight.shape[0]
    a = math.sqrt(6.0 / (n + units))  # GlorotUniformHyperSpherical: n_in = the unit's fan-in, n_out = units
    w = torch.empty_like(plain.weight).uniform_(-a, a, generator=gen(11)).reshape(units, n)
    if sign_loss:  # the official inverse and forward map, ported: the round trip loses the last coordinate's sign
        angles, radius = official_cartesian_to_hyperspherical(w.T.clone())
        w = official_hyperspherical_to_cartesian(angles, radius).T
    layer = georeparam.geometric(make().double())
    init_geometric_(layer, "official", generator=gen(11), sign_loss=sign_loss)
    got = layer.weight.detach().reshape(units, n)
    torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    if sign_loss:
        assert bool((got[:, -1] >= 0).all()) and bool((got[:, :-1] < 0).any())
    else:
        assert bool((got[:, -1] < 0).any())


def test_official_scheme_on_linear_is_glorot_and_on_conv_larger():
    lin = georeparam.geometric(nn.Linear(30, 20).double())
    ref = georeparam.geometric(nn.Linear(30, 20).double())
    init_geometric_(lin, "official", generator=gen(2))
    init_geometric_(ref, "glorot_uniform", generator=gen(2))
    torch.testing.assert_close(lin.weight, ref.weight, rtol=0, atol=0)
    conv = georeparam.geometric(nn.Conv2d(64, 128, 3).double())
    glo = georeparam.geometric(nn.Conv2d(64, 128, 3).double())
    init_geometric_(conv, "official", generator=gen(3))
    init_geometric_(glo, "glorot_uniform", generator=gen(3))
    ratio = (conv.weight.detach().norm() / glo.weight.detach().norm()).item()
    # same uniform numbers, bounds √(6/(576+128)) vs √(6/(576+1152)): ratio √(1728/704) = 1.567
    assert ratio == pytest.approx(math.sqrt(1728 / 704), rel=1e-12)


def test_sign_loss_is_refused_outside_the_official_scheme():
    layer = georeparam.geometric(nn.Linear(3, 2))
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="scheme='official'"):
        init_geometric_(layer, "glorot_uniform", sign_loss=True)
    with pytest.raises(TypeError, match="sign_loss must be a bool"):
        init_geometric_(layer, "official", sign_loss=1)
    assert torch.equal(layer.weight, before)
