"""The map (georeparam._map: the pure-torch UnitVector / ScaledUnitVector, and on CPU the
compiled kernel where it is built) and what rides on it.

References are independent of the code under test: the plain autograd formula (cos, sin,
cumprod, roll, as existing GmP code writes it) evaluated in float64, gradcheck/gradgradcheck,
and float64 evaluations of the same float32 angles. Speed is measured in benchmarks/speed.py,
never here; what is checked here about cost is structural (what the graph saves).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import georeparam
import georeparam._map.torch_impl as torch_impl
from conftest import rel_err, seeded
from georeparam._map import fast_paths, kernel_status, use_backend
from georeparam._map import scaled_unit as _scaled_unit
from georeparam._map import unit as _unit
from georeparam._map.torch_impl import ScaledUnitVector, ScaledUnitVectorFwAD
from georeparam.coords import latitude_to_polar, to_hyperspherical


def plain_unit(theta: torch.Tensor) -> torch.Tensor:
    """The baseline: polar θ (..., n-1) → u (..., n) with autograd through every op."""
    ones = torch.ones_like(theta[..., :1])
    sines = torch.roll(torch.cumprod(torch.cat([torch.sin(theta), ones], dim=-1), dim=-1), 1, dims=-1)
    sines = torch.cat([ones, sines[..., 1:]], dim=-1)
    return torch.cat([torch.cos(theta), ones], dim=-1) * sines


def plain_from_latitude(lat: torch.Tensor) -> torch.Tensor:
    """The baseline in the library's latitude convention (the shift is part of the graph)."""
    return plain_unit(latitude_to_polar(lat))


def random_angles(rows, n, dtype=torch.float64, seed=0):
    with seeded(seed):
        _, lat = to_hyperspherical(torch.randn(rows, n, dtype=torch.float64))
    return lat.to(dtype)


def pole_angles(dtype=torch.float64):
    """Rows with latitudes exactly at ±π/2 (polar 0 and π), at 0, several poles in a row, and
    last angles 0, ±π/2, π."""
    h = math.pi / 2
    rows = [
        [h, 0.3, -0.2, 0.5, 1.0],
        [-h, 0.0, 0.0, 0.0, 0.0],
        [0.1, h, -h, h, math.pi],
        [0.0, 0.0, 0.0, 0.0, -h],
        [0.4, -0.7, h, 0.2, h],
        [h, h, h, h, 0.0],
    ]
    return torch.tensor(rows, dtype=dtype)


@pytest.fixture
def torch_path():
    """The pure-torch map, with the compiled kernel turned off (it is used otherwise on CPU)."""
    with use_backend("torch"):
        yield


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so every test crosses block boundaries."""
    monkeypatch.setattr(torch_impl, "BLOCK_ELEMENTS", 16)


# -------------------------------------------------------------------------------------------------
# values and gradients against the plain formula
# -------------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(
    n=st.integers(2, 12),
    lead=st.sampled_from([(), (1,), (3,), (2, 3)]),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1.0, 4.0, 50.0]),
    mode=st.sampled_from(["exact", "fast"]),
    kernel=st.booleans(),
)
def test_matches_plain_formula_values_and_gradients(n, lead, seed, spread, mode, kernel):
    """Any angles (not only canonical ones: drifted, negative cosines) in float64, by the
    compiled kernel (where it is built) and by the pure-torch map."""
    if kernel and not kernel_status().startswith("loaded"):
        kernel = False
    with use_backend("cpu" if kernel else "torch"):
        _check_against_plain(n, lead, seed, spread, mode)


def _check_against_plain(n, lead, seed, spread, mode):
    with seeded(seed):
        lat = (torch.rand(lead + (n - 1,), dtype=torch.float64) - 0.5) * spread
        radius = torch.randn(lead, dtype=torch.float64)
        g = torch.randn(lead + (n,), dtype=torch.float64)
    a1, a2 = lat.clone().requires_grad_(), lat.clone().requires_grad_()
    r1, r2 = radius.clone().requires_grad_(), radius.clone().requires_grad_()
    ours = _scaled_unit(r1, a1, mode)
    ref = r2.unsqueeze(-1) * plain_from_latitude(a2)
    assert rel_err(ours, ref) <= 1e-13
    assert rel_err(_unit(lat, mode), plain_from_latitude(lat)) <= 1e-13
    ours.backward(g)
    ref.backward(g)
    assert rel_err(a1.grad, a2.grad) <= 1e-12
    assert rel_err(r1.grad, r2.grad) <= 1e-12


def test_block_boundaries_change_nothing(small_blocks, monkeypatch, torch_path):
    lat = random_angles(13, 9, torch.float32)
    radius = torch.rand(13) + 0.5
    g = torch.randn(13, 9)
    outs = {}
    for block in (16, 1 << 20):
        monkeypatch.setattr(torch_impl, "BLOCK_ELEMENTS", block)
        a, r = lat.clone().requires_grad_(), radius.clone().requires_grad_()
        w = _scaled_unit(r, a, "exact")
        w.backward(g)
        outs[block] = (w.detach(), a.grad, r.grad)
    for x, y in zip(outs[16], outs[1 << 20]):
        assert torch.equal(x, y)


# -------------------------------------------------------------------------------------------------
# gradcheck at generic and singular points, first and second order
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("points", ["generic", "poles"])
def test_gradcheck_and_gradgradcheck(points, mode, small_blocks):
    lat = random_angles(4, 6) if points == "generic" else pole_angles()
    radius = torch.tensor([1.5, -0.5, 0.0, 2.0, 1.0, 0.7][: lat.shape[0]], dtype=torch.float64)
    a = lat.clone().requires_grad_()
    r = radius.clone().requires_grad_()
    fw = dict(check_forward_ad=True)  # the jvp rules too (jacfwd, hessian)
    assert torch.autograd.gradcheck(lambda t: _unit(t, mode), (a,), **fw)
    assert torch.autograd.gradcheck(lambda s, t: _scaled_unit(s, t, mode), (r, a), **fw)
    # every output of the Function (w, u and the saved prefix) is differentiable, each alone
    # (gradcheck takes one output at a time: the other cotangents are None)
    exact = mode  # the Functions take the mode's name
    assert torch.autograd.gradcheck(lambda s, t: ScaledUnitVectorFwAD.apply(s, t, exact), (r, a), **fw)
    if points == "generic":
        # second order only away from the poles: see Note [Backward without the cumprod graph]
        assert torch.autograd.gradgradcheck(lambda s, t: _scaled_unit(s, t, mode), (r, a))
        assert torch.autograd.gradgradcheck(lambda s, t: ScaledUnitVector.apply(s, t, exact), (r, a))


def test_poles_agree_with_plain_formula():
    lat = pole_angles().requires_grad_()
    g = torch.randn(lat.shape[0], lat.shape[1] + 1, dtype=torch.float64)
    (ours,) = torch.autograd.grad(_unit(lat), lat, g)
    (ref,) = torch.autograd.grad(plain_from_latitude(lat), lat, g)
    assert rel_err(ours, ref) <= 1e-12


def test_underflowing_product_gives_finite_exact_gradient():
    """Forty latitudes at float32's largest value below π/2 (cos = 4.4e-8): the running product
    underflows to exactly 0 in float32, where tan φ·S is 0/0 unless guarded."""
    below = torch.nextafter(torch.tensor(math.pi / 2, dtype=torch.float32), torch.tensor(0.0)).item()
    lat = torch.full((2, 41), below)
    lat[1, 20:] = 0.3
    lat[:, -1] = 0.7
    g = torch.randn(2, 42)
    for mode in ("exact", "fast"):
        a = lat.clone().requires_grad_()
        _unit(a, mode).backward(g)
        a64 = lat.double().requires_grad_()
        plain_from_latitude(a64).backward(g.double())
        assert torch.isfinite(a.grad).all()
        assert rel_err(a.grad, a64.grad) <= 1e-6


# -------------------------------------------------------------------------------------------------
# precision in float32
# -------------------------------------------------------------------------------------------------


def test_exact_mode_reconstructs_to_1e6_at_fan_in_25088():
    with seeded(1):
        x = torch.randn(4, 25088, dtype=torch.float64)
    radius, lat = to_hyperspherical(x.float())
    w = _scaled_unit(radius, lat, "exact")
    assert w.dtype == torch.float32
    assert rel_err(w, x.float(), dim=-1).max() <= 1e-6
    # and the compute error alone, against the float64 map of the same float32 angles
    assert rel_err(_unit(lat, "exact"), _unit(lat.double(), "exact"), dim=-1).max() <= 2e-7


@pytest.mark.parametrize("n, bound, bound_torch_cos", [(784, 1.5e-6, 3e-6), (4608, 4e-6, 1.2e-5)])
def test_fast_mode_error_is_what_docs_say(n, bound, bound_torch_cos):
    """docs/speed.md quotes 5.8e-7 at 784 and 1.4e-6 at 4608 over 16 rows (a √n random walk; it
    is 1.2e-6 and ~5e-6 with torch's biased float32 cos, which the pure-torch map uses when
    GEOREPARAM_NO_FAST_PATHS turns numpy off); exact must be far better on the same angles."""
    if not fast_paths():
        bound = bound_torch_cos
    lat = random_angles(8, n, torch.float32)
    ref = _unit(lat.double(), "exact")
    fast = rel_err(_unit(lat, "fast"), ref, dim=-1).max()
    exact = rel_err(_unit(lat, "exact"), ref, dim=-1).max()
    assert fast <= bound
    assert exact <= 2e-7 < fast


@pytest.mark.parametrize("mode, bound", [("exact", 3e-7), ("fast", 5e-6)])
def test_float32_gradient_error(mode, bound):
    """The backward runs in float32 in both modes; measured 4.3e-8 (exact) and 1e-6 (fast) at 4608."""
    lat = random_angles(8, 4608, torch.float32)
    radius = torch.rand(8) + 0.5
    g = torch.randn(8, 4608)
    a, r = lat.clone().requires_grad_(), radius.clone().requires_grad_()
    _scaled_unit(r, a, mode).backward(g)
    a64, r64 = lat.double().requires_grad_(), radius.double().requires_grad_()
    (r64.unsqueeze(-1) * plain_from_latitude(a64)).backward(g.double())
    assert rel_err(a.grad, a64.grad, dim=-1).max() <= bound
    assert rel_err(r.grad, r64.grad) <= bound


# -------------------------------------------------------------------------------------------------
# torch.func and torch.compile
# -------------------------------------------------------------------------------------------------


def test_vmap_grad_jacrev_hessian():
    from torch.func import grad, hessian, jacfwd, jacrev, vmap

    lat = random_angles(3, 6)
    radius = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64)

    def ours(r, a):
        return _scaled_unit(r, a)

    def ref(r, a):
        return r * plain_from_latitude(a)

    for argnums in (0, 1):
        J = vmap(jacrev(ours, argnums=argnums))(radius, lat)
        Jr = vmap(jacrev(ref, argnums=argnums))(radius, lat)
        assert rel_err(J, Jr) <= 1e-12
    G = vmap(grad(lambda r, a: (ours(r, a) * w).sum(), argnums=(0, 1)))(radius, lat)
    Gr = vmap(grad(lambda r, a: (ref(r, a) * w).sum(), argnums=(0, 1)))(radius, lat)
    assert all(rel_err(x, y) <= 1e-12 for x, y in zip(G, Gr))
    # forward mode: jacfwd, and hessian (jacfwd of jacrev)
    for argnums in (0, 1):
        J = vmap(jacfwd(ours, argnums=argnums))(radius, lat)
        Jr = vmap(jacrev(ref, argnums=argnums))(radius, lat)
        assert rel_err(J, Jr) <= 1e-12
    Jp = jacfwd(_unit)(pole_angles())
    assert rel_err(Jp, jacrev(plain_from_latitude)(pole_angles())) <= 1e-12
    H = hessian(lambda a: (_unit(a) * w).sum())(lat[0])
    Hr = hessian(lambda a: (plain_from_latitude(a) * w).sum())(lat[0])
    assert rel_err(H, Hr) <= 1e-12
    H2 = jacrev(jacrev(lambda a: (_unit(a) * w).sum()))(lat[0])
    assert rel_err(H2, Hr) <= 1e-12
    # the batch dimension anywhere, and only one input batched
    assert torch.equal(vmap(_unit, in_dims=1)(lat.t()), _unit(lat))
    ws = vmap(lambda r: _scaled_unit(r, lat[0]))(radius)
    assert rel_err(ws, radius[:, None] * _unit(lat[0])) <= 1e-15


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_compile_fullgraph(mode):
    torch._dynamo.reset()
    lat = random_angles(5, 7, torch.float32)
    radius = torch.rand(5) + 0.5
    g = torch.randn(5, 7)
    f = torch.compile(lambda r, a: _scaled_unit(r, a, mode), fullgraph=True, backend="aot_eager")
    a1, r1 = lat.clone().requires_grad_(), radius.clone().requires_grad_()
    w1 = f(r1, a1)
    w1.backward(g)
    a2, r2 = lat.clone().requires_grad_(), radius.clone().requires_grad_()
    w2 = _scaled_unit(r2, a2, mode)
    w2.backward(g)
    assert rel_err(w1, w2) <= 1e-7
    assert rel_err(a1.grad, a2.grad) <= 1e-6
    assert rel_err(r1.grad, r2.grad) <= 1e-6


def test_compile_a_registered_model():
    torch._dynamo.reset()
    with seeded(0):
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        x = torch.randn(4, 6)
    georeparam.register(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, b in zip(got, (p.grad for p in model.parameters())):
        assert rel_err(a, b) <= 1e-6


# -------------------------------------------------------------------------------------------------
# dtypes and autocast
# -------------------------------------------------------------------------------------------------


def test_half_precision_angles_are_evaluated_in_float32():
    lat = random_angles(4, 50, torch.float32).to(torch.bfloat16)
    u = _unit(lat)
    assert u.dtype == torch.bfloat16
    assert torch.equal(u, _unit(lat.float()).to(torch.bfloat16))


def test_autocast_map_runs_in_float32_and_layer_casts(torch_path):
    with seeded(0):
        layer = nn.Linear(40, 8)
        x = torch.randn(3, 40)
    georeparam.geometric(layer)
    plain_w = layer.weight.detach().clone()
    seen = []
    orig = torch_impl.unit_forward

    def spy(angles, exact, radius=None):
        seen.append(angles.dtype)
        return orig(angles, exact, radius)

    torch_impl.unit_forward = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = layer.weight
            y = layer(x)
    finally:
        torch_impl.unit_forward = orig
    assert seen == [torch.float32, torch.float32]
    assert w.dtype == torch.float32 and torch.equal(w, plain_w)
    assert y.dtype == torch.bfloat16  # the layer's own matmul ran in bf16


# -------------------------------------------------------------------------------------------------
# evaluation: parametrize.cached() and remove()
# -------------------------------------------------------------------------------------------------


def _count_maps(monkeypatch):
    calls = []
    orig = torch_impl.unit_forward

    def counting(angles, exact, radius=None):
        calls.append(1)
        return orig(angles, exact, radius)

    monkeypatch.setattr(torch_impl, "unit_forward", counting)
    return calls


def test_parametrize_cached_computes_each_weight_once(monkeypatch, torch_path):
    with seeded(0):
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
        xs = torch.randn(4, 2, 5)
    georeparam.register(model)
    model.eval()
    with torch.no_grad():
        want = [model(x) for x in xs]
    calls = _count_maps(monkeypatch)
    with torch.no_grad(), parametrize.cached():
        got = [model(x) for x in xs]
    assert len(calls) == 2  # one per layer, not one per layer and batch
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_remove_leaves_plain_layers_with_the_same_outputs(monkeypatch):
    with seeded(0):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
        x = torch.randn(2, 3, 6, 6)
    georeparam.register(model)
    with torch.no_grad():
        want = model(x)
    georeparam.remove(model)
    calls = _count_maps(monkeypatch)
    with torch.no_grad():
        got = model(x)
    assert calls == []
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert torch.equal(got, want)


# -------------------------------------------------------------------------------------------------
# memory: what the graph keeps
# -------------------------------------------------------------------------------------------------


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_graph_keeps_only_u_prefix_and_radius(mode):
    """The fused map saves u, the cosines' running product and the radius: about two weights'
    worth, nothing float64 and nothing of cos/sin/cumprod (the plain formula keeps ~5)."""
    units, n = 16, 300
    lat = random_angles(units, n, torch.float32).requires_grad_()
    radius = (torch.rand(units) + 0.5).requires_grad_()
    weight_bytes = units * n * 4
    ours, _ = _saved_bytes(lambda: _scaled_unit(radius, lat, mode))
    assert ours <= 2 * weight_bytes + units * 4
    plain, _ = _saved_bytes(lambda: radius.unsqueeze(-1) * plain_unit(latitude_to_polar(lat)))
    assert plain >= 4 * weight_bytes


@pytest.mark.skipif(not fast_paths(), reason="GEOREPARAM_NO_FAST_PATHS: no numpy, no helper thread")
def test_sine_helper_thread_changes_nothing(monkeypatch, torch_path):
    """Note [A second thread for the sines]: the helper thread computes the same numbers."""
    lat = random_angles(64, 1100, torch.float32)
    radius = torch.rand(64) + 0.5
    monkeypatch.setattr(torch_impl, "SINE_THREAD_MIN_ELEMENTS", 1)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for mode in ("exact", "fast"):
                outs.append(_scaled_unit(radius, lat, mode))
    finally:
        torch.set_num_threads(before)
    assert any(t.name.startswith("georeparam-sin") for t in threading.enumerate())  # the two-thread run used it
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
