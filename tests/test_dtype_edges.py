"""Huge angles and gradients at the edges of the dtype.

* Huge angles: ``canonicalize`` (and the optimizer wrapper, which uses the same reduction) keeps
  ``w = r·u`` up to one rounding of each angle at any finite size (Note [Huge angles] in
  coords.py). Reference: exact sin/cos of the exact float values in mpmath.
* Gradients at the edges: the coordinate gradients are the true gradients rounded once to the dtype: ``inf``
  exactly where the true value (computed here in float64 on the same coordinates) exceeds the
  dtype's range, finite and accurate everywhere else (docs/precision.md, "Gradients at the edges
  of the dtype").
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from georeparam._map import kernel_status, use_backend
from conftest import seeded
from georeparam.coords import _wrap, canonicalize
from georeparam.optim import GeometricOptimizer

mpmath.mp.prec = 2400  # exact enough for sin/cos of any float64 up to 1.8e308


def mp_unit(angles):
    """Latitude map of one row in mpmath: ``u_k = sin φ_k ∏_{j<k} cos φ_j``, last pair (cos θ, sin θ)."""
    a = [mpmath.mpf(float(v)) for v in angles.detach()]
    u, p = [], mpmath.mpf(1)
    for phi in a[:-1]:
        u.append(mpmath.sin(phi) * p)
        p *= mpmath.cos(phi)
    return u + [mpmath.cos(a[-1]) * p, mpmath.sin(a[-1]) * p]


def mp_rel(w1, w2):
    num = mpmath.sqrt(sum((x - y) ** 2 for x, y in zip(w1, w2)))
    return float(num / mpmath.sqrt(sum(y**2 for y in w2)))


# -------------------------------------------------------------------------------------------------
# huge angles
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x", [8.5e8, 1e10, 1e12, 1e15, 1e20, -1e20, 1e300, 1.7976931348623157e308])
def test_wrap_is_the_exact_remainder_rounded_once(x):
    ref = float(x - 2 * mpmath.pi * mpmath.nint(mpmath.mpf(x) / (2 * mpmath.pi)))
    got = _wrap(torch.tensor([x], dtype=torch.float64)).item()
    assert got == ref


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    exponent=st.floats(0.0, 300.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_canonicalize_keeps_w_at_any_angle_size(n, exponent, dtype, seed):
    """Angles up to 1e300 (float32: up to its 3.4e38): w changes by one rounding of each
    stored angle, not by the 1.6 measured at 1e20 before."""
    exponent = min(exponent, 38.0) if dtype == torch.float32 else exponent
    with seeded(seed):
        signs = torch.randint(0, 2, (n - 1,)) * 2 - 1
        scale = 10.0 ** (exponent * torch.rand(n - 1, dtype=torch.float64))
        angles = (signs * scale).to(dtype).unsqueeze(0)
        radius = (torch.randn(1, dtype=torch.float64) * 3).to(dtype)
        offset = torch.randn(1, dtype=dtype)
    r2, a2, o2 = canonicalize(radius, angles, offset)
    w_before = [float(radius) * v for v in mp_unit(angles[0])]
    w_after = [float(r2) * v for v in mp_unit(a2[0])]
    eps = torch.finfo(dtype).eps
    assert mp_rel(w_after, w_before) <= 2 * eps * math.sqrt(n)
    assert float(r2) >= 0 and float(r2 * o2) == pytest.approx(float(radius * offset), rel=eps)


def test_optimizer_wrapper_keeps_w_after_a_huge_step():
    """The wrapper canonicalizes with the same reduction: angles thrown to ~1e20 by one step."""
    with seeded(0):
        layer = nn.Linear(5, 3)
    georeparam.geometric(layer)
    angles = layer.parametrizations.weight.original1
    with torch.no_grad():
        angles.mul_(1e20)
    w_before = [[float(layer.parametrizations.weight.original0[i]) * v for v in mp_unit(angles[i])] for i in range(3)]
    opt = GeometricOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), layer)
    layer(torch.randn(2, 5)).sum().backward()
    opt.step()
    assert bool((angles.abs() <= math.pi).all())
    for i in range(3):
        w_after = [float(layer.parametrizations.weight.original0[i]) * v for v in mp_unit(angles[i])]
        assert mp_rel(w_after, w_before[i]) <= 4e-7


# -------------------------------------------------------------------------------------------------
# gradients at the edges of the dtype
# -------------------------------------------------------------------------------------------------


def _coordinate_grads(layer: nn.Module, x: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
    p = layer.parametrizations
    return p.weight.original0.grad, p.weight.original1.grad, p.bias.original.grad


def _edge_layer(case: str) -> nn.Linear:
    with seeded(0):
        layer = nn.Linear(16, 4)
        row = torch.randn(16)
    with torch.no_grad():
        if case == "huge row":  # ‖w‖ = 1e37
            layer.weight[0] = row * (1e37 / row.norm())
        else:  # ‖w‖ = 1e-37 with bias 1: λ = b / r = 1e37
            layer.weight[0] = row * (1e-37 / row.norm())
            layer.bias[0] = 1.0
    return layer


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pure-torch"])
@pytest.mark.parametrize("case", ["huge row", "tiny row, bias 1"])
@pytest.mark.parametrize("x_scale", [1.0, 1e-6])
def test_edge_gradients_are_the_true_gradients_rounded_once(case, x_scale, kernel):
    """float32 coordinate gradients against the same model's float64 gradients (same
    coordinates, exactly widened): inf exactly where the true value exceeds float32's range
    (r·Σ∂L/∂w ~ 2.6e39 for the angles and offset of the huge row; λ·Σ∂L/∂b ~ 2.6e39 for the
    tiny row's radius), with the true sign; finite and within 1e-5 elsewhere. With inputs
    scaled by 1e-6 the angles' gradients fit, and none may overflow on the way."""
    if kernel and not kernel_status().startswith("loaded"):
        pytest.skip(f"kernel not in use here: {kernel_status()}")
    with use_backend("cpu" if kernel else "torch"):
        _check_edge_gradients(case, x_scale)


def _check_edge_gradients(case, x_scale):
    layer32 = _edge_layer(case)
    georeparam.geometric(layer32)
    layer64 = _edge_layer(case).double()
    georeparam.geometric(layer64)
    with torch.no_grad():  # the same coordinates, widened exactly
        for p64, p32 in zip(layer64.parameters(), layer32.parameters()):
            p64.copy_(p32.double())
    with seeded(1):
        x = torch.randn(256, 16) * x_scale
    g32 = _coordinate_grads(layer32, x)
    g64 = _coordinate_grads(layer64, x.double())
    big = torch.finfo(torch.float32).max
    for a, b in zip(g32, g64):
        assert torch.isfinite(b).all()  # float64 holds every true gradient here
        over = b.abs() > big * (1 + 2**-24)
        assert torch.equal(torch.isinf(a), over)
        assert torch.equal(torch.sign(a[over]), torch.sign(b[over]).float())
        fin = ~over
        scale = b[fin].abs().max().clamp_min(1e-300)
        assert ((a[fin].double() - b[fin]).abs() / scale).max() <= 1e-5
    if x_scale == 1e-6:  # the angles' r·Σ∂L/∂w is ~2.6e33 for the huge row: fits, and nothing overflowed on the way
        assert torch.isfinite(g32[1]).all()
    assert any(torch.isinf(a).any() for a in g32)  # the audit's case: the true ∂L/∂λ or ∂L/∂r is ~2.6e39
