"""Properties of georeparam.coords: the map, its inverse, canonical form, gradients.

Every numerical claim is checked against an independent computation: float64 references, the
paper's polar formula written out here with plain cos/sin/cumprod, gradcheck, and autograd
through float64 maps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import rel_err, seeded
from georeparam.coords import (
    canonical_parts,
    canonicalize,
    latitude_to_polar,
    to_cartesian,
    to_hyperspherical,
)

DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.float32, torch.float64: np.float64}
EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # unit roundoff


def largest_below(x, dtype):
    """The largest ``dtype`` value ≤ the float64 x (float32 rounds π and π/2 *up*)."""
    v = np.array(x, dtype=NP[dtype])
    if float(v) > x:
        v = np.nextafter(v, NP[dtype](0))
    return float(v)


def pi_in(dtype):
    """The canonical bound of the last angle: the largest ``dtype`` value inside the real (-π, π]."""
    return largest_below(math.pi, dtype)


def half_pi_in(dtype):
    """The canonical bound of latitudes: the largest ``dtype`` value with cos > 0."""
    return largest_below(math.pi / 2, dtype)


# -------------------------------------------------------------------------------------------------
# strategies
# -------------------------------------------------------------------------------------------------


def _scalars(dtype):
    """Moderate, tiny and huge magnitudes of both signs, zeros and negative zeros (no subnormals:
    a subnormal radius cannot hold 24 bits, so no representation could be 1e-6 exact)."""
    width = 32 if dtype == torch.float32 else 64
    tiny, huge = (1e-30, 1e35) if dtype == torch.float32 else (1e-290, 1e290)
    f = lambda v: float(NP[dtype](v))  # noqa: E731  (bounds must be exact in the width)
    mag = st.one_of(
        st.floats(0.5, 2.0, width=width),
        st.floats(f(1e-3), f(1e3), width=width),
        st.floats(f(tiny), f(tiny * 1e6), width=width),
        st.floats(f(huge / 1e6), f(huge), width=width),
    )
    signed = st.tuples(mag, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])
    return st.one_of(signed, st.sampled_from([0.0, -0.0]))


@st.composite
def batches(draw, dtypes=DTYPES, max_n=17, min_n=1):
    """``(..., n)`` tensors: leading batch dims (possibly empty or of size 0), n = 1, 2, odd sizes,
    mixed magnitudes, all-zero and negative-zero rows."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.one_of(st.sampled_from([v for v in (1, 2, 3) if min_n <= v <= max_n]), st.integers(min_n, max_n)))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    if draw(st.integers(0, 15)) == 0:
        lead = (0,) + lead
    arr = draw(hnp.arrays(NP[dtype], lead + (n,), elements=_scalars(dtype)))
    x = torch.from_numpy(np.ascontiguousarray(arr)).clone()
    if x.numel() and x.dim() > 1 and draw(st.booleans()):
        rows = x.reshape(-1, n)
        which = draw(st.integers(0, rows.shape[0] - 1))
        rows[which] = draw(st.sampled_from([0.0, -0.0]))
    return x


@st.composite
def angle_batches(draw, max_n=12, span=10.0, dtypes=DTYPES):
    """Arbitrary (non-canonical) latitude-convention angles ``(..., n-1)`` with n ≥ 2."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(2, max_n))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    width = 32 if dtype == torch.float32 else 64
    special = st.sampled_from([0.0, -0.0, math.pi / 2, -math.pi / 2, math.pi, -math.pi, 2 * math.pi])
    bound = float(NP[dtype](span))
    el = st.one_of(st.floats(-bound, bound, width=width), special.map(lambda v: float(NP[dtype](v))))
    arr = draw(hnp.arrays(NP[dtype], lead + (n - 1,), elements=el))
    return torch.from_numpy(np.ascontiguousarray(arr)).clone()


def radii_like(angles, draw_sign=True):
    with seeded(angles.numel()):
        r = torch.rand(angles.shape[:-1], dtype=torch.float64) * 3 + 0.1
        if draw_sign:
            r = r * torch.where(torch.rand(r.shape, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return r.to(angles.dtype)


def bitwise_equal(a, b):
    """Equal values *and* equal sign bits (so -0.0 ≠ 0.0)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a, b)
        and torch.equal(torch.signbit(a), torch.signbit(b))
    )


def reconstruct(radius, angles, **kw):
    return radius.unsqueeze(-1) * to_cartesian(angles, **kw)


# -------------------------------------------------------------------------------------------------
# an independent reference: the paper's polar formula with plain cos / sin / cumprod
# -------------------------------------------------------------------------------------------------


def paper_unit(theta):
    """u(θ) for polar θ (..., n-1), written exactly as in the paper (autograd through it)."""
    sines = torch.cumprod(torch.sin(theta), dim=-1)
    ones = torch.ones_like(theta[..., :1])
    before = torch.cat([ones, sines], dim=-1)  # ∏_{j<k} sin θ_j, k = 1..n
    cosines = torch.cat([torch.cos(theta), ones], dim=-1)
    return before * cosines


# -------------------------------------------------------------------------------------------------
# to_hyperspherical / to_cartesian
# -------------------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(x=batches())
def test_round_trip_and_shapes(x):
    n = x.shape[-1]
    r, a = to_hyperspherical(x)
    assert r.shape == x.shape[:-1] and a.shape == x.shape[:-1] + (n - 1,)
    assert r.dtype == a.dtype == x.dtype
    y = reconstruct(r, a)
    assert y.dtype == x.dtype
    err = rel_err(y, x, dim=-1)
    bound = 1e-6 if x.dtype == torch.float32 else 1e-14
    assert bool((err <= bound).all()), f"worst row error {err.max().item():.3g} > {bound}"
    zero_rows = (x == 0).all(dim=-1)
    assert bool((r[zero_rows] == 0).all())
    assert bool((y[zero_rows] == 0).all()), "a zero row must be reconstructed exactly"
    if n > 1:
        assert bool((r >= 0).all())
    else:
        assert bool((r == x[..., 0]).all()), "fan-in 1: the radius is the value itself"


@settings(max_examples=150)
@given(x=batches())
def test_canonical_ranges_both_conventions(x):
    n = x.shape[-1]
    r, lat = to_hyperspherical(x)
    _, polar = to_hyperspherical(x, convention="polar")
    assert torch.isfinite(r).all() and torch.isfinite(lat).all() and torch.isfinite(polar).all()
    if n == 1:
        assert lat.numel() == 0 and polar.numel() == 0
        return
    d = x.dtype
    latd, pold = lat.double(), polar.double()
    # latitudes in [-π/2, π/2], polar θ_1..θ_{n-2} in [0, π]; last angle in (-π, π] (π as rounded)
    assert bool((latd[..., :-1].abs() <= half_pi_in(d)).all())
    assert bool(((pold[..., :-1] >= 0) & (pold[..., :-1] <= pi_in(d))).all())
    for last in (latd[..., -1], pold[..., -1]):
        assert bool((last.abs() <= pi_in(d)).all())
    # the two conventions share the last angle and describe the same directions (their angles
    # differ only where they are irrelevant: after the row's last non-zero coordinate)
    assert bitwise_equal(lat[..., -1], polar[..., -1])
    u_lat, u_pol = to_cartesian(lat), to_cartesian(polar, convention="polar")
    assert bool((rel_err(u_pol, u_lat, dim=-1) <= 8 * math.sqrt(n) * EPS[d]).all())


@settings(max_examples=200)
@given(x=batches())
def test_sign_of_every_coordinate_kept(x):
    """No coordinate of the reconstructed direction has the opposite sign of the input's, in
    either convention, even for coordinates far below the row's precision (e.g. [1, 1e-10])."""
    for convention in ("latitude", "polar"):
        r, a = to_hyperspherical(x, convention=convention)
        u = to_cartesian(a, convention=convention)
        if x.shape[-1] == 1:
            u = torch.sign(r).unsqueeze(-1)
        wrong = (u.double() * x.double()) < 0
        assert not bool(wrong.any()), (
            f"{convention}: signs flipped at {wrong.nonzero()[:3].tolist()}: x={x[wrong][:3].tolist()} "
            f"u={u[wrong][:3].tolist()}"
        )
        # the coordinates that carry weight in the row are non-zero with the right sign
        big = x.abs() >= 1e-3 * x.abs().amax(dim=-1, keepdim=True)
        big &= x != 0
        assert bool((torch.sign(u)[big] == torch.sign(x)[big]).all())


@settings(max_examples=60)
@given(x=batches())
def test_inputs_never_modified_and_outputs_never_alias(x):
    x0 = x.clone()
    r, a = to_hyperspherical(x)
    _, p = to_hyperspherical(x, convention="polar")
    assert bitwise_equal(x, x0)
    for out in (r, a, p):
        assert out.numel() == 0 or out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    r.add_(1)
    a.add_(1)
    assert bitwise_equal(x, x0)
    if x.shape[-1] > 1 and x.numel():
        a0, r0 = a.clone(), r.clone()
        off = r.clone()
        for convention, ang in (("latitude", a), ("polar", p)):
            ang0 = ang.clone()
            to_cartesian(ang, convention=convention)
            canonicalize(r, ang, off, convention=convention)
            canonical_parts(r, ang)
            assert bitwise_equal(ang, ang0)
        assert bitwise_equal(a, a0) and bitwise_equal(r, r0) and bitwise_equal(off, r0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_and_fan_in_one(dtype):
    for z in ([0.0, 0.0, 0.0], [-0.0, -0.0, -0.0], [0.0, -0.0, 0.0]):
        x = torch.tensor(z, dtype=dtype)
        r, a = to_hyperspherical(x)
        assert r == 0 and bool((r * to_cartesian(a) == 0).all())
        # a *fixed* direction: every zero row gets the same angles, whatever its zero signs
        assert bitwise_equal(a, to_hyperspherical(torch.zeros(3, dtype=dtype))[1].abs())
    x = torch.tensor([[-3.0], [0.0], [2.5]], dtype=dtype)
    r, a = to_hyperspherical(x)
    assert bitwise_equal(r, x[:, 0]) and a.shape == (3, 0)
    assert bitwise_equal(to_cartesian(a), torch.ones(3, 1, dtype=dtype))


def test_known_values():
    """Hand-checked cases of the polar convention (georeparam/coords.py's module docstring): θ_1 = 0 is the first axis, the last
    angle is atan2(x_n, x_{n-1}) and keeps the sign of x_n."""
    d = torch.float64
    u = to_cartesian(torch.tensor([0.0, 0.0], dtype=d), convention="polar")
    assert torch.allclose(u, torch.tensor([1.0, 0.0, 0.0], dtype=d), rtol=0, atol=1e-16)
    r, a = to_hyperspherical(torch.tensor([0.0, 3.0, -4.0], dtype=d), convention="polar")
    assert r == 5.0
    assert torch.allclose(a, torch.tensor([math.pi / 2, math.atan2(-4.0, 3.0)], dtype=d), rtol=0, atol=1e-15)
    r, a = to_hyperspherical(torch.tensor([1.0, -1.0, 0.0], dtype=d), convention="polar")
    assert torch.allclose(a, torch.tensor([math.pi / 4, math.pi], dtype=d), rtol=0, atol=1e-15)
    # latitude = π/2 − θ for all but the last
    _, lat = to_hyperspherical(torch.tensor([1.0, -1.0, 0.0], dtype=d))
    assert torch.allclose(lat, torch.tensor([math.pi / 4, math.pi], dtype=d), rtol=0, atol=1e-15)


# -------------------------------------------------------------------------------------------------
# the map: unit norm, agreement with the paper's formula, negation identity
# -------------------------------------------------------------------------------------------------


@settings(max_examples=100)
@given(a=angle_batches())
def test_unit_norm_and_paper_formula(a):
    n = a.shape[-1] + 1
    d = a.dtype
    u = to_cartesian(a)
    norm = torch.linalg.vector_norm(u.double(), dim=-1)
    assert bool(((norm - 1).abs() <= 4 * math.sqrt(n) * EPS[d]).all())
    # the paper's polar formula evaluated in float64 on the same (exactly converted) angles
    ref = paper_unit(latitude_to_polar(a.double()))
    assert bool((rel_err(u, ref, dim=-1) <= 4 * math.sqrt(n) * EPS[d] + 1e-15).all())
    # and the polar convention of to_cartesian is the same map
    up = to_cartesian(latitude_to_polar(a.double()), convention="polar")
    assert bool((rel_err(up, ref, dim=-1) <= 1e-14).all())
    # fast mode: evaluated in float32, less exact but still a unit vector
    uf = to_cartesian(a, mode="fast")
    assert uf.dtype == d
    bound = 1e-14 if d == torch.float64 else 4e-6
    assert bool((rel_err(uf, ref, dim=-1) <= bound).all())


@pytest.mark.parametrize("n", [784, 4608, 25088])
def test_map_error_bounds_the_docstrings_state(n):
    """What coords.py, georeparam._map.MODES and register's docstring state for float32 angles,
    whichever backend runs (CI runs this with GEOREPARAM_NO_FAST_PATHS too): relative error of
    each unit row against float64 on the same angles, ``exact`` ≤ 2e-7 and ``fast`` ≤ 4·√n·eps
    up to fan-in 25,088 (measured values: docs/precision.md)."""
    with seeded(3):
        x = torch.randn(16, n, dtype=torch.float64)
    _, a = to_hyperspherical(x.float())
    ref = to_cartesian(a.double())
    exact = rel_err(to_cartesian(a), ref, dim=-1).max().item()
    fast = rel_err(to_cartesian(a, mode="fast"), ref, dim=-1).max().item()
    assert exact <= 2e-7
    assert fast <= 4 * math.sqrt(n) * torch.finfo(torch.float32).eps


@settings(max_examples=100)
@given(a=angle_batches())
def test_negation_identity(a):
    """(φ, θ, r, λ) → (−φ, θ+π, −r, −λ) and, in polar form, θ_i → π − θ_i leave w and b unchanged."""
    d = a.dtype
    n = a.shape[-1] + 1
    r = radii_like(a)
    lam = radii_like(a) * 0.7
    a64 = a.double()
    w = reconstruct(r.double(), a64)
    b = r.double() * lam.double()
    neg_lat = torch.cat([-a64[..., :-1], a64[..., -1:] + math.pi], dim=-1)
    w2 = reconstruct(-r.double(), neg_lat)
    b2 = (-r.double()) * (-lam.double())
    assert bool((rel_err(w2, w, dim=-1) <= 1e-14).all())
    assert torch.equal(b2, b)
    theta = latitude_to_polar(a64)
    neg_polar = torch.cat([math.pi - theta[..., :-1], theta[..., -1:] + math.pi], dim=-1)
    w3 = -r.double().unsqueeze(-1) * to_cartesian(neg_polar, convention="polar")
    assert bool((rel_err(w3, w, dim=-1) <= 1e-14).all())
    # the same identity in the dtype itself (the angles rounded once)
    neg_d = torch.cat([-a[..., :-1], (a64[..., -1:] + math.pi).to(d)], dim=-1)
    w4 = reconstruct(-r, neg_d)
    assert bool((rel_err(w4, w, dim=-1) <= 4 * math.sqrt(n) * EPS[d] * 4).all())


# -------------------------------------------------------------------------------------------------
# canonical form
# -------------------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(a=angle_batches(span=1e6), data=st.data())
def test_canonicalize_keeps_w_and_b(a, data):
    """Drifted (huge) angles and negative radii: canonical output, same w and b."""
    d = a.dtype
    n = a.shape[-1] + 1
    r = radii_like(a)
    if data.draw(st.booleans()):
        r = r * 1e3
    lam = radii_like(a)
    w = reconstruct(r.double(), a.double())  # the float64 map of the given (rounded) values
    b = r.double() * lam.double()
    r2, a2, lam2 = canonicalize(r, a, lam)
    assert r2.dtype == a2.dtype == lam2.dtype == d
    assert bool((r2 >= 0).all())
    a2d = a2.double()
    assert bool((a2d[..., :-1].abs() <= half_pi_in(d)).all())
    assert bool((a2d[..., -1].abs() <= pi_in(d)).all())
    w2 = reconstruct(r2.double(), a2d)
    # one rounding of each angle to the dtype: ≤ ulp(π)/2 each
    bound = 2 * math.sqrt(n) * EPS[d] * math.pi + (1e-15 if d == torch.float64 else 0.0)
    err = rel_err(w2, w, dim=-1)
    assert bool((err <= bound).all()), f"worst {err.max().item():.3g} > {bound:.3g}"
    assert torch.equal(r2.double() * lam2.double(), b), "b = r·λ must be kept exactly (signs only)"
    # idempotent on canonical input
    r3, a3, lam3 = canonicalize(r2, a2, lam2)
    assert bitwise_equal(r3, r2) and bitwise_equal(lam3, lam2)
    assert torch.equal(a3, a2)
    # polar convention: same w
    theta = latitude_to_polar(a.double()).to(d)
    rp, tp, _ = canonicalize(r, theta, None, convention="polar")
    tpd = tp.double()
    assert bool(((tpd[..., :-1] >= 0) & (tpd[..., :-1] <= pi_in(d))).all())
    wp = rp.double().unsqueeze(-1) * to_cartesian(tpd, convention="polar")
    wref = r.double().unsqueeze(-1) * to_cartesian(theta.double(), convention="polar")
    err = rel_err(wp, wref, dim=-1)
    assert bool((err <= bound).all()), f"polar: worst {err.max().item():.3g} > {bound:.3g}"


@settings(max_examples=100)
@given(a=angle_batches(span=50.0, dtypes=[torch.float64]))
def test_canonical_parts_signs_are_the_derivatives(a):
    """Each coordinate's canonicalization is affine x → σ·x + c; σ (what first moments are multiplied
    by) must be the derivative, and no coordinate may depend on another (a diagonal Jacobian)."""
    r = radii_like(a)
    r2, a2, rs, as_ = canonical_parts(r, a)
    assert rs.shape == r.shape and as_.shape == a.shape
    assert bool((rs.abs() == 1).all() and (as_.abs() == 1).all())

    def f(rr, aa):
        out_r, out_a, _, _ = canonical_parts(rr, aa)
        return out_r, out_a

    (jrr, jra), (jar, jaa) = torch.func.jacrev(f, argnums=(0, 1))(r, a)
    R, A = r.numel(), a.numel()
    jrr, jra = jrr.reshape(R, R), jra.reshape(R, A)
    jar, jaa = jar.reshape(A, R), jaa.reshape(A, A)
    assert torch.equal(jrr, torch.diag(rs.reshape(-1)))
    assert torch.equal(jaa, torch.diag(as_.reshape(-1)))
    assert not jra.any() and not jar.any()
    # and by finite differences: a step δ along a coordinate moves the output by σ·δ (away from
    # the branch boundaries, which the strategy hits with probability 0 at this step size)
    delta = 1e-7
    bumped = a + delta
    _, a3, _, _ = canonical_parts(r, bumped)
    moved = (a3 - a2) / delta
    ok = (moved - as_).abs() < 1e-4
    # a latitude crossing ±π/2 flips every later coordinate: skip such rows
    near = (a2.abs() - math.pi / 2).abs() < 1e-6
    near[..., -1] = (a2[..., -1].abs() - math.pi).abs() < 1e-6
    near_boundary = near.any(dim=-1, keepdim=True)
    assert bool((ok | near_boundary).all())


def test_canonicalize_fan_in_one_and_errors():
    r = torch.tensor([-2.0, 3.0])
    a = torch.empty(2, 0)
    r2, a2, lam = canonicalize(r, a, torch.tensor([1.0, 1.0]))
    # S⁰ has no angle to absorb the sign: nothing changes
    assert torch.equal(r2, r) and a2.shape == (2, 0) and torch.equal(lam, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="Got:"):
        canonicalize(r, torch.zeros(2, 3), convention="spherical")
    with pytest.raises(TypeError, match="Got:"):
        canonicalize(r, torch.zeros(2, 3, dtype=torch.int64))


# -------------------------------------------------------------------------------------------------
# gradients, torch.func
# -------------------------------------------------------------------------------------------------


def _pole_angles(n_rows=4, n=6, *, convention):
    with seeded(1):
        a = (torch.rand(n_rows, n - 1, dtype=torch.float64) - 0.5) * 6
    if convention == "latitude":
        a[0, :-1] = math.pi / 2  # cos φ = 6e-17: everything after the first coordinate vanishes
        a[1, :-1] = -math.pi / 2
        a[2, 1] = 0.0
        a[3, -1] = math.pi
    else:
        a[0, :-1] = 0.0
        a[1, :-1] = math.pi
        a[2, 1] = math.pi / 2
        a[3, -1] = -math.pi / 2
    return a


@pytest.mark.parametrize("convention", ["latitude", "polar"])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_gradcheck_including_poles(convention, mode):
    a = _pole_angles(convention=convention).requires_grad_()
    f = lambda t: to_cartesian(t, convention=convention, mode=mode)  # noqa: E731
    assert torch.autograd.gradcheck(f, (a,), eps=1e-6, atol=1e-8, rtol=1e-6)
    # n = 2 (only the last angle) and n = 3
    for m in (1, 2):
        b = a[:, :m].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (b,), eps=1e-6, atol=1e-8, rtol=1e-6)
    # second order (Hessian-vector products) away from the poles and 1e-3 from them
    with seeded(4):
        c = (torch.rand(3, 5, dtype=torch.float64) - 0.5) * 6
    c[0, :-1] = (math.pi / 2 - 1e-3) if convention == "latitude" else 1e-3
    assert torch.autograd.gradgradcheck(f, (c.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.xfail(
    strict=True,
    reason="double backward of UnitVector at an exact pole: d(S/cos φ) "
    "cancels catastrophically when cos φ = 6e-17 (first derivatives are exact)",
)
def test_double_backward_at_exact_pole():
    a = _pole_angles(convention="latitude").requires_grad_()
    assert torch.autograd.gradgradcheck(to_cartesian, (a,), eps=1e-6, atol=1e-7, rtol=1e-5)


@settings(max_examples=60)
@given(a=angle_batches(dtypes=[torch.float64]), data=st.data())
def test_backward_matches_autograd_of_the_paper_formula(a, data):
    g = torch.from_numpy(
        data.draw(hnp.arrays(np.float64, a.shape[:-1] + (a.shape[-1] + 1,), elements=st.floats(-3, 3)))
    )
    x = a.clone().requires_grad_()
    (got,) = torch.autograd.grad(to_cartesian(x), x, g)
    # The oracle's cumprod backward divides products that underflow for a lone tiny angle
    # (θ = 5e-324 gave ∂/∂θ = 0 where the true value is 0.5), so it is evaluated with angles below
    # 1e-250 set to 0: the derivative is smooth there and moves by ~1e-250. Ours keeps them.
    y = torch.where(a.abs() < 1e-250, 0.0, a).requires_grad_()
    (want,) = torch.autograd.grad(paper_unit(latitude_to_polar(y)), y, g)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_backward_at_a_subnormal_angle_is_the_limit_at_zero():
    """The case that showed the oracle's underflow: n = 3, latitudes (0, 5e-324), g = ½·1."""
    a = torch.tensor([[0.0, 5e-324], [5e-324, 0.0], [1e-310, -1e-310]], dtype=torch.float64)
    g = torch.full((3, 3), 0.5, dtype=torch.float64)
    x = a.clone().requires_grad_()
    (got,) = torch.autograd.grad(to_cartesian(x), x, g)
    # by hand at (0, 0): u = (sin φ, cos φ cos θ, cos φ sin θ), ∂/∂φ = g₁, ∂/∂θ = g₃
    assert torch.equal(got, torch.full((3, 2), 0.5, dtype=torch.float64))


def test_poles_exact_values_and_gradients():
    """At the poles the forward is exact and the backward is finite and equals the formula's."""
    d = torch.float64
    theta = torch.tensor([[0.0, 0.3, 1.1], [math.pi, 0.3, -2.0], [0.4, math.pi, 0.5], [0.4, 0.0, math.pi]], dtype=d)
    x = theta.clone().requires_grad_()
    u = to_cartesian(x, convention="polar")
    ref = paper_unit(theta)
    assert torch.allclose(u, ref, rtol=0, atol=1e-15)
    g = torch.linspace(-1, 1, 16, dtype=d).reshape(4, 4)
    (got,) = torch.autograd.grad(u, x, g)
    y = theta.clone().requires_grad_()
    (want,) = torch.autograd.grad(paper_unit(y), y, g)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_vmap_and_jacrev():
    with seeded(2):
        a = torch.randn(5, 7, dtype=torch.float64)
    # vmap over rows = the batched call
    assert torch.allclose(torch.func.vmap(to_cartesian)(a), to_cartesian(a), rtol=0, atol=0)
    # vmap of jacrev, against the Jacobian of the paper's formula
    jac = torch.func.vmap(torch.func.jacrev(to_cartesian))(a)
    ref = torch.func.vmap(torch.func.jacrev(lambda t: paper_unit(latitude_to_polar(t))))(a)
    assert jac.shape == (5, 8, 7)
    assert torch.allclose(jac, ref, rtol=1e-12, atol=1e-14)
    # forward-mode (jacfwd) and per-row jacrev agree as well
    assert torch.allclose(torch.func.jacrev(to_cartesian)(a[0]), ref[0], rtol=1e-12, atol=1e-14)
    # a vmapped gradient of a scalar loss through the radius, too
    r = torch.rand(5, dtype=torch.float64) + 0.5

    def loss(ri, ai):
        return (ri * to_cartesian(ai)).pow(2).sum() + (ri * to_cartesian(ai))[0]

    gr, ga = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(r, a)
    for i in range(5):
        ri, ai = r[i].clone().requires_grad_(), a[i].clone().requires_grad_()
        rr, aa = torch.autograd.grad(loss(ri, ai), (ri, ai))
        assert torch.allclose(gr[i], rr, rtol=1e-12, atol=1e-14) and torch.allclose(ga[i], aa, rtol=1e-12, atol=1e-14)


def test_float32_gradients_match_float64():
    with seeded(3):
        a = torch.randn(3, 40, dtype=torch.float64)
        g = torch.randn(3, 41, dtype=torch.float64)
    x32 = a.float().requires_grad_()
    (g32,) = torch.autograd.grad(to_cartesian(x32), x32, g.float())
    x64 = a.float().double().requires_grad_()
    (g64,) = torch.autograd.grad(to_cartesian(x64), x64, g)
    assert g32.dtype == torch.float32
    assert rel_err(g32, g64) < 1e-6


def test_bad_arguments():
    with pytest.raises(TypeError, match="Got:"):
        to_hyperspherical(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="Got:"):
        to_hyperspherical(torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="Got:"):
        to_cartesian([0.1, 0.2])
    with pytest.raises(ValueError, match="Got:"):
        to_hyperspherical(torch.ones(2, 0))
    with pytest.raises(ValueError, match="Got:"):
        to_hyperspherical(torch.tensor(1.0))
    with pytest.raises(ValueError, match="Got:"):
        to_cartesian(torch.ones(2, 3), mode="fastest")
    with pytest.raises(ValueError, match="Got:"):
        to_cartesian(torch.ones(2, 3), convention="spherical")


# -------------------------------------------------------------------------------------------------
# Note [Row blocks]: a large input in blocks of rows gives the same bits
# -------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(x=batches(max_n=17, min_n=2), convention=st.sampled_from(["latitude", "polar"]), block=st.integers(1, 40))
def test_row_blocks_are_bit_identical(x, convention, block):
    """Blocks of any size (here down to one row) against the whole input at once: the same radius,
    angles and row norms, sign bits included (zero rows, -0.0, float64 rows that need scaling)."""
    import georeparam.coords as coords

    whole = coords.to_hyperspherical(x, convention=convention) + (coords.row_norms(x),)
    saved, coords._BLOCK = coords._BLOCK, block
    try:
        n = x.shape[-1]
        assert coords._blocked(x) == (x.dim() >= 2 and x.numel() > 2 * block and x.numel() // n > max(1, block // n))
        parts = coords.to_hyperspherical(x, convention=convention) + (coords.row_norms(x),)
    finally:
        coords._BLOCK = saved
    for a, b in zip(whole, parts):
        assert bitwise_equal(a, b)
