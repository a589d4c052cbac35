"""The recomputing pure-torch map (georeparam._map.recompute, issue 22 item 1).

References are independent of the code under test: the paper's formula written here
(u_k = sin φ_k ∏_{j<k} cos φ_j, last pair ∏ cos φ_j · (cos θ, sin θ)) with autograd through every
op in float64, gradcheck / gradgradcheck, the existing pure-torch Function (ScaledUnitVector)
and float64 evaluations of the same float32 angles. Cost is checked structurally: what the
graph saves, and how many aten ops a layer's step dispatches (a TorchDispatchMode count).
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import georeparam._map.recompute as rc
from conftest import rel_err, seeded
from georeparam._map.torch_impl import ScaledUnitVector
from georeparam.coords import to_hyperspherical

MODES = ["exact", "fast"]


def paper_unit(lat: torch.Tensor) -> torch.Tensor:
    """The unit row from latitude angles (..., n-1), the last one the longitude θ, autograd
    through every op (written from the paper's formula, not from the code under test)."""
    m = lat.shape[-1] - 1
    cos = torch.cos(lat[..., :m])
    before = torch.cat([torch.ones_like(lat[..., :1]), torch.cumprod(cos, -1)], -1)  # ∏_{j<k}, k = 0..m
    th = lat[..., m:]
    return torch.cat(
        [torch.sin(lat[..., :m]) * before[..., :m], before[..., m:] * torch.cos(th), before[..., m:] * torch.sin(th)],
        -1,
    )


def random_angles(rows, n, dtype=torch.float64, seed=0):
    with seeded(seed):
        _, lat = to_hyperspherical(torch.randn(rows, n, dtype=torch.float64))
    return lat.to(dtype)


def pole_angles():
    """Latitudes exactly at ±π/2 and 0, several poles in a row, last angles 0 (sin θ = 0: no
    quotient may use it), ±π/2, π."""
    h = math.pi / 2
    return torch.tensor(
        [
            [h, 0.3, -0.2, 0.5, 1.0],
            [-h, 0.0, 0.0, 0.0, 0.0],
            [0.1, h, -h, h, math.pi],
            [0.0, 0.0, 0.0, 0.0, -h],
            [0.4, -0.7, h, 0.2, h],
        ],
        dtype=torch.float64,
    )


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so the in-place blocked path runs and crosses block boundaries."""
    monkeypatch.setattr(rc, "_CPU_BLOCK_ELEMENTS", 16)


@settings(max_examples=25)
@given(
    n=st.integers(2, 12),
    lead=st.sampled_from([(), (1,), (3,), (2, 3), (7,)]),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1.0, 4.0, 50.0]),
    mode=st.sampled_from(MODES),
    blocks=st.sampled_from([16, 1 << 15]),
)
def test_matches_paper_formula(n, lead, seed, spread, mode, blocks):
    """Any angles (drifted, negative cosines), any leading shape, blocked or not, in float64."""
    with seeded(seed):
        lat = (torch.rand(lead + (n - 1,), dtype=torch.float64) - 0.5) * spread
        radius = torch.randn(lead, dtype=torch.float64)
        g = torch.randn(lead + (n,), dtype=torch.float64)
    saved = rc._CPU_BLOCK_ELEMENTS
    rc._CPU_BLOCK_ELEMENTS = blocks
    try:
        a1, a2 = lat.clone().requires_grad_(), lat.clone().requires_grad_()
        r1, r2 = radius.clone().requires_grad_(), radius.clone().requires_grad_()
        ours = rc.scaled_unit(r1, a1, mode)
        ref = r2.unsqueeze(-1) * paper_unit(a2)
        assert rel_err(ours, ref) <= 1e-13
        ours.backward(g)
        ref.backward(g)
    finally:
        rc._CPU_BLOCK_ELEMENTS = saved
    assert rel_err(a1.grad, a2.grad) <= 1e-12
    assert rel_err(r1.grad, r2.grad) <= 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("points", ["generic", "poles"])
def test_gradcheck_gradgradcheck_forward_ad(points, mode):
    lat = random_angles(4, 6) if points == "generic" else pole_angles()
    a = lat.clone().requires_grad_()
    r = torch.tensor([1.5, -0.5, 0.0, 2.0, 0.7][: lat.shape[0]], dtype=torch.float64).requires_grad_()
    f = lambda s, t: rc.scaled_unit(s, t, mode)  # noqa: E731
    assert torch.autograd.gradcheck(f, (r, a), check_forward_ad=True)
    if points == "generic":
        # second order only away from the poles: the quotient s'/c' of Note [Recomputed
        # backward] differentiates into two terms of size 1/cos φ that cancel (as the map it
        # replaces: Note [Backward without the cumprod graph])
        assert torch.autograd.gradgradcheck(f, (r, a))


@pytest.mark.parametrize("mode", MODES)
def test_float32_values_and_gradients_agree_with_the_existing_map(mode, small_blocks):
    """The same float32 angles through the existing pure-torch Function and through this one:
    values and gradients within a few float32 roundings, blocked in place and not."""
    lat = random_angles(37, 50, torch.float32)
    radius = torch.rand(37) + 0.5
    g = torch.randn(37, 50)
    out = {}
    for name, fn in {
        "old": lambda r, a: ScaledUnitVector.apply(r, a, mode)[0],
        "new": lambda r, a: rc.scaled_unit(r, a, mode),
    }.items():
        a, r = lat.clone().requires_grad_(), radius.clone().requires_grad_()
        w = fn(r, a)
        w.backward(g)
        out[name] = (w.detach(), a.grad, r.grad)
    for x, y in zip(out["new"], out["old"]):
        assert rel_err(x, y) <= 1e-6


def test_exact_mode_reconstructs_float32_to_1e6_at_fan_in_25088(small_blocks):
    """Float64 inside: the float32 weight of float32 angles is within 1e-6 (relative, per row) of
    the float64 map of the same angles, on the blocked path too."""
    n = 25088
    lat = random_angles(3, n, torch.float32, seed=3)
    with torch.no_grad():
        ref = paper_unit(lat.double())
        for blocks in (16, 1 << 20):
            rc._CPU_BLOCK_ELEMENTS = blocks
            w = rc.scaled_unit(torch.ones(3), lat, "exact")
            assert w.dtype == torch.float32
            assert rel_err(w, ref, dim=-1).max() <= 1e-6


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("mode", MODES)
def test_graph_saves_only_radius_and_angles(mode):
    """Note [What the recompute saves]: nothing of u, the prefix or cos/sin is kept."""
    lat = random_angles(16, 300, torch.float32).requires_grad_()
    radius = (torch.rand(16) + 0.5).requires_grad_()
    saved, _ = _saved_bytes(lambda: rc.scaled_unit(radius, lat, mode))
    assert saved == lat.numel() * 4 + radius.numel() * 4


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_aten_ops_per_layer_step(mode):
    """The map's forward and backward for one layer (one block): 56 aten ops in exact mode, 49 in
    fast on torch 2.13 (the Function it replaces: 64-67 and 61-66, with and without
    GEOREPARAM_NO_FAST_PATHS; a standard Linear's whole step 13). The bounds leave room for a torch
    version's extra view or two, and fail the old Function."""
    lat = random_angles(64, 65, torch.float32).requires_grad_()
    radius = (torch.rand(64) + 0.5).requires_grad_()
    g = torch.randn(64, 65)

    def step(fn):
        with _CountOps() as c:
            fn(radius, lat).backward(g)
        return sum(c.ops.values())

    ours = step(lambda r, a: rc.scaled_unit(r, a, mode))
    old = step(lambda r, a: ScaledUnitVector.apply(r, a, mode)[0])
    bound = {"exact": 60, "fast": 55}[mode]
    assert ours <= bound, ours
    assert old > bound, old  # the count can tell the two apart


def test_torch_func_transforms():
    """vmap over a batch of layers, jacrev and jacfwd agree with the paper formula."""
    from torch.func import jacfwd, jacrev, vmap

    lat = random_angles(3, 5)
    radius = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    f = lambda r, a: rc.scaled_unit(r, a, "exact")  # noqa: E731
    ref = lambda r, a: r.unsqueeze(-1) * paper_unit(a)  # noqa: E731
    batch = torch.stack([lat, lat * 0.5])
    assert rel_err(vmap(f, in_dims=(None, 0))(radius, batch), vmap(ref, in_dims=(None, 0))(radius, batch)) <= 1e-13
    for jac in (jacrev, jacfwd):
        got = jac(f, argnums=(0, 1))(radius, lat)
        want = jacrev(ref, argnums=(0, 1))(radius, lat)
        for x, y in zip(got, want):
            assert rel_err(x, y) <= 1e-12
    hess = torch.func.hessian(lambda a: f(radius, a).sum())(lat)
    assert rel_err(hess, torch.func.hessian(lambda a: ref(radius, a).sum())(lat)) <= 1e-10


def test_compile_fullgraph():
    """dynamo traces the Function (no jvp on the class it uses there) in one graph."""
    lat = random_angles(4, 6, torch.float32)
    radius = torch.rand(4) + 0.5
    f = torch.compile(lambda r, a: rc.scaled_unit(r, a, "exact"), fullgraph=True, backend="aot_eager")
    a1, a2 = lat.clone().requires_grad_(), lat.clone().requires_grad_()
    w1, w2 = f(radius, a1), rc.scaled_unit(radius, a2, "exact")
    assert rel_err(w1, w2) <= 1e-7
    w1.sum().backward()
    w2.sum().backward()
    assert rel_err(a1.grad, a2.grad) <= 1e-6
