r"""Hyperspherical coordinates: pure tensor functions, row-wise over the last dimension.

A vector ``x`` of length ``n`` is written ``x = r · u(angles)`` with ``‖u‖ = 1``.

Two angle conventions share one map:

* ``"polar"`` (the paper's): ``θ_1 … θ_{n-1}`` with

  .. code-block:: text

      u_1 = cos θ_1
      u_k = cos θ_k · ∏_{j<k} sin θ_j        (2 ≤ k ≤ n-1)
      u_n = ∏_{j<n} sin θ_j

  canonical ranges ``θ_1 … θ_{n-2} ∈ [0, π]`` and ``θ_{n-1} ∈ (-π, π]``.

* ``"latitude"`` (what the library stores, the default): ``φ_k = π/2 − θ_k`` for
  ``k ≤ n-2`` and the last angle unchanged, so that

  .. code-block:: text

      u_k = sin φ_k · ∏_{j<k} cos φ_j       (k ≤ n-2)
      u_{n-1} = cos θ_{n-1} · ∏_{j<n-1} cos φ_j
      u_n     = sin θ_{n-1} · ∏_{j<n-1} cos φ_j

  with ``φ_k ∈ [-π/2, π/2]``. The sign of ``φ_k`` is the sign of ``u_k``.

# Note [Why latitudes]
Almost every polar angle of a high-dimensional direction sits near π/2, where float32 has a
spacing of 1.2e-7: storing θ rounds each one by ~6e-8 and the direction error grows like √n
(3.9e-6 at n = 25,088). The latitude ``φ = π/2 − θ`` is small there, so its rounding error is
relative to a small number and the reconstruction stays at ~1e-7 at every n. The two conventions
differ by a shift and a sign, so a gradient step in one is the same step in the other.

Fan-in ``n = 1``: the sphere S⁰ = {−1, +1} has no angles. The direction is then carried by the
sign of the radius: ``to_hyperspherical`` returns ``radius = x`` (possibly negative) and an
empty angle tensor, and ``to_cartesian`` returns ``+1``.

A zero vector gets radius 0 and all angles 0 (the direction ``e_{n-1}``), so ``r · u`` is
exactly zero again.

Precision of :func:`to_cartesian`: ``mode="exact"`` (default) evaluates sines, cosines and the
cumulative product in float64 and rounds once; ``mode="fast"`` computes in the input's dtype
(float32 at least) and loses about ``√n·eps`` relative to the product (measured in
``benchmarks/speed.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["to_cartesian", "to_hyperspherical", "canonicalize", "polar_to_latitude", "latitude_to_polar"]

_CONVENTIONS = ("latitude", "polar")
_MODES = ("exact", "fast")


def _check_convention(convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}. Got: {convention!r}")


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}. Got: {mode!r}")


def _check_real_float(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor. Got: {type(x).__name__}")
    if not x.is_floating_point() or x.is_complex():
        raise TypeError(f"{what} must be a real floating-point tensor. Got: dtype={x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the vector). Got: a 0-d tensor")


def compute_dtype(dtype: torch.dtype, mode: str) -> torch.dtype:
    """The dtype the map is evaluated in: float64 for ``exact``, float32 or better for ``fast``."""
    if mode == "exact":
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


def polar_to_latitude(angles: Tensor) -> Tensor:
    """Polar angles ``θ`` → latitude angles ``φ`` (``φ_k = π/2 − θ_k`` except the last).

    >>> polar_to_latitude(torch.tensor([0.0, 0.5]))
    tensor([1.5708, 0.5000])
    """
    if angles.shape[-1] <= 1:
        return angles.clone()
    return torch.cat([math.pi / 2 - angles[..., :-1], angles[..., -1:]], dim=-1)


def latitude_to_polar(angles: Tensor) -> Tensor:
    """Latitude angles ``φ`` → polar angles ``θ``; the inverse of :func:`polar_to_latitude`.

    >>> latitude_to_polar(polar_to_latitude(torch.tensor([0.25, 3.0, -1.0])))
    tensor([ 0.2500,  3.0000, -1.0000])
    """
    return polar_to_latitude(angles)


# ---------------------------------------------------------------------------------------------
# The map and its analytic backward
# ---------------------------------------------------------------------------------------------


def _unit_from(lat: Tensor, lon: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unit vectors from latitudes (..., n-2) and the last angle (..., 1), all in one dtype.

    Returns ``(u, cos_lat, sin_lat, prefix)`` where ``prefix[..., k] = ∏_{j≤k} cos φ_j``.
    """
    c = torch.cos(lat)
    s = torch.sin(lat)
    prefix = torch.cumprod(c, dim=-1)
    ones = torch.ones_like(lon)
    before = torch.cat([ones, prefix[..., :-1]], dim=-1)  # ∏_{j<k} cos φ_j
    tail = prefix[..., -1:] if lat.shape[-1] > 0 else ones
    u = torch.cat([s * before, tail * torch.cos(lon), tail * torch.sin(lon)], dim=-1)
    return u, c, s, prefix


class _UnitVector(torch.autograd.Function):
    """``u(angles)`` for n ≥ 2 in latitude form, with an analytic backward.

    # Note [Backward without the cumprod graph]
    With ``S_k = Σ_{i>k} g_i u_i`` (a reverse cumulative sum) the gradient of ``⟨g, u⟩`` is

        ∂/∂φ_k = g_k ∏_{j≤k} cos φ_j − tan φ_k · S_k           (k ≤ n-2)
        ∂/∂θ   = ∏_{j≤n-2} cos φ_j · (g_n cos θ − g_{n-1} sin θ)  (the last angle)

    ``S_k`` carries the factor ``cos φ_k`` of every ``u_i`` with ``i > k``, so ``S_k / cos φ_k``
    is a well-conditioned division: it stays exact next to the poles (polar θ = 0 or π), where
    ``cos φ_k`` is tiny but never exactly zero for a finite float argument. Nothing of the
    forward's intermediate ``cumprod`` graph is kept; the backward recomputes it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(angles: Tensor, work_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        a = angles.to(work_dtype)
        u, _, _, _ = _unit_from(a[..., :-1], a[..., -1:])
        return u.to(angles.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        angles, work_dtype = inputs
        ctx.work_dtype = work_dtype
        ctx.save_for_backward(angles)

    @staticmethod
    def backward(ctx, grad_u: Tensor):  # type: ignore[override]
        (angles,) = ctx.saved_tensors
        return _unit_backward(angles, grad_u, ctx.work_dtype), None


def _unit_backward(angles: Tensor, grad_u: Tensor, work_dtype: torch.dtype) -> Tensor:
    a = angles.to(work_dtype)
    g = grad_u.to(work_dtype)
    lat, lon = a[..., :-1], a[..., -1:]
    u, c, s, prefix = _unit_from(lat, lon)
    m = lat.shape[-1]
    tail = prefix[..., -1:] if m > 0 else torch.ones_like(lon)
    g_lon = tail * (g[..., -1:] * torch.cos(lon) - g[..., -2:-1] * torch.sin(lon))
    if m == 0:
        return g_lon.to(angles.dtype)
    gu = g * u
    # S_k = Σ_{i>k} g_i u_i for k = 1..n-2: the suffix sums starting at k+1, accumulated from the
    # end so that the small late terms are added first.
    suffix = torch.flip(torch.cumsum(torch.flip(gu, (-1,)), dim=-1), (-1,))
    S = suffix[..., 1 : m + 1]
    g_lat = g[..., :m] * prefix - s * S / c
    return torch.cat([g_lat, g_lon], dim=-1).to(angles.dtype)


def _unit(angles: Tensor, mode: str = "exact") -> Tensor:
    """Latitude angles (..., n-1) → unit vectors (..., n); ``n = 1`` gives ones."""
    n = angles.shape[-1] + 1
    if n == 1:
        return torch.ones(angles.shape[:-1] + (1,), dtype=angles.dtype, device=angles.device)
    return _UnitVector.apply(angles, compute_dtype(angles.dtype, mode))


def to_cartesian(angles: Tensor, *, convention: str = "latitude", mode: str = "exact") -> Tensor:
    r"""Unit vectors from angles, row-wise over the last dimension.

    Args:
        angles: ``(..., n-1)`` angles; an empty last dimension gives ``n = 1`` and the vector ``+1``.
        convention: ``"latitude"`` (the library's storage) or ``"polar"`` (the paper's θ).
        mode: ``"exact"`` (float64 evaluation, ≤ 1e-6 relative in float32 at n = 25,088) or
            ``"fast"`` (evaluated in the input's dtype).

    Returns:
        ``(..., n)`` unit vectors in the dtype of ``angles``. Differentiable (analytic backward,
        ``torch.func`` and ``torch.compile`` compatible).

    Example:
        >>> to_cartesian(torch.tensor([[0.0], [math.pi / 2]]))   # n = 2: (cos θ, sin θ)
        tensor([[ 1.0000e+00,  0.0000e+00],
                [-4.3711e-08,  1.0000e+00]])
        >>> to_cartesian(torch.tensor([0.0, 0.0]), convention="polar").abs().round(decimals=7)  # θ_1 = 0: first axis
        tensor([1., 0., 0.])
    """
    _check_real_float(angles, "angles")
    _check_convention(convention)
    _check_mode(mode)
    if convention == "polar":
        # convert in the compute dtype: π/2 − θ in float32 would shift every angle by float32's
        # rounding of π/2 (4.4e-8), the very storage error the latitude convention avoids
        work = compute_dtype(angles.dtype, mode)
        return _unit(polar_to_latitude(angles.to(work)), mode).to(angles.dtype)
    return _unit(angles, mode)


def _largest_below(x: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value not above the float64 ``x``.

    float32 rounds π/2 and π *up* (by 4.4e-8 and 8.7e-8), past the poles: cos(float32(π/2)) < 0
    and sin(float32(π)) < 0. The canonical float ranges stop one ulp earlier, so that every
    canonical angle has cos φ > 0 (latitudes) and the last angle lies in the real (-π, π].
    """
    b = torch.tensor(x, dtype=dtype)
    if float(b) > x:
        b = torch.nextafter(b, torch.zeros_like(b))
    return float(b)


def _round_latitude(lat: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 latitudes in [-π/2, π/2] to ``dtype`` keeping ``cos φ > 0``."""
    bound = _largest_below(math.pi / 2, dtype)
    return lat.to(dtype).clamp(-bound, bound)


def _round_last(lon: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 last angles in [-π, π] to ``dtype``, inside the real (-π, π]."""
    bound = _largest_below(math.pi, dtype)
    return lon.to(dtype).clamp(-bound, bound)


def _round_half_turn(theta: Tensor, cos_sign: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 angles in [0, π] to ``dtype`` without flipping a coordinate's sign.

    # Note [Rounding keeps signs]
    An angle within half an ulp of π/2 or π can round to the other side: atan2(1, 1e-10) rounds
    to float32's π/2, whose cosine is -4.4e-8, so the coordinate 1e-10 would come back negative.
    The angle is kept below π (so sin θ ≥ 0), and where ``cos θ`` disagrees with ``cos_sign`` the
    rounded angle is moved one ulp back across π/2 (still within one ulp of θ).
    """
    out = theta.to(dtype).clamp(0.0, _largest_below(math.pi, dtype))
    if out.numel() == 0:
        return out
    zero, big = torch.zeros_like(out), torch.full_like(out, 4.0)
    for _ in range(3):
        c = torch.cos(out.to(torch.float64))
        down = (cos_sign > 0) & (c < 0)
        up = (cos_sign < 0) & (c > 0)
        if not bool((down | up).any()):
            break
        out = torch.where(down, torch.nextafter(out, zero), torch.where(up, torch.nextafter(out, big), out))
    return out


def to_hyperspherical(x: Tensor, *, convention: str = "latitude") -> Tuple[Tensor, Tensor]:
    r"""Radius and angles of each row of ``x`` (the last dimension is the vector).

    The input is never modified. Computed in float64 and rounded once to ``x.dtype``; every
    coordinate's sign is kept (the last angle is ``atan2(x_n, x_{n-1})``). Angles come out in the
    canonical ranges of the chosen convention (see the module docstring).

    Returns:
        ``(radius, angles)`` with shapes ``(...)`` and ``(..., n-1)``. For ``n = 1`` the radius is
        ``x[..., 0]`` itself (it carries the sign) and ``angles`` is empty.

    Example:
        >>> r, a = to_hyperspherical(torch.tensor([3.0, -4.0]))
        >>> r, a
        (tensor(5.), tensor([-0.9273]))
        >>> torch.allclose(r * to_cartesian(a), torch.tensor([3.0, -4.0]))
        True
    """
    _check_real_float(x, "x")
    _check_convention(convention)
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"x must have a non-empty last dimension. Got: shape {tuple(x.shape)}")
    if n == 1:
        return x[..., 0].clone(), x.new_empty(x.shape[:-1] + (0,))
    # Note [Scaling rows]
    # Squares of float64 entries overflow above 1e154 and underflow below 1e-154. Each row is
    # scaled by a power of two first (exact), so any finite row gets its radius and angles.
    xd = x.to(torch.float64)
    _, e = torch.frexp(xd.abs().amax(dim=-1, keepdim=True))
    scale = torch.pow(2.0, e.clamp(-1000, 1000).to(torch.float64))
    xs = xd / scale
    sq = xs * xs
    tail_sq = torch.flip(torch.cumsum(torch.flip(sq, (-1,)), dim=-1), (-1,))  # Σ_{i≥k} x_i²
    tail = torch.sqrt(tail_sq)
    radius = tail[..., 0] * scale[..., 0]
    dtype = x.dtype
    if convention == "polar":
        first = torch.atan2(tail[..., 1 : n - 1], xs[..., : n - 2])  # θ_k ∈ [0, π]
        first = _round_half_turn(first, xd[..., : n - 2], dtype)
    else:
        first = torch.atan2(xs[..., : n - 2], tail[..., 1 : n - 1])  # φ_k ∈ [-π/2, π/2]
        first = _round_latitude(first, dtype)
    # the last angle: |θ| = atan2(|x_n|, x_{n-1}) ∈ [0, π], then the sign of x_n (so that
    # x_n = -0. gives +π, inside (-π, π]). Signs come from the unscaled row: a tiny entry next
    # to a huge one underflows when scaled.
    xa, xb = xs[..., n - 2], xs[..., n - 1]
    lon = _round_half_turn(torch.atan2(xb.abs(), xa), xd[..., n - 2], dtype)
    lon = torch.where(xd[..., n - 1] < 0, -lon, lon)
    angles = torch.cat([first, lon.unsqueeze(-1)], dim=-1)
    # a zero row (whatever the signs of its zeros) gets the fixed direction of all-zero latitudes
    zero_row = (radius == 0).unsqueeze(-1)
    angles = torch.where(zero_row, torch.zeros_like(angles), angles)
    if convention == "polar":  # the same direction: θ_k = π/2 (below the pole), last angle 0
        first_zero = torch.full_like(first, _largest_below(math.pi / 2, dtype))
        angles = torch.where(zero_row, torch.cat([first_zero, torch.zeros_like(lon).unsqueeze(-1)], -1), angles)
    return radius.to(dtype), angles


# ---------------------------------------------------------------------------------------------
# Canonical form
# ---------------------------------------------------------------------------------------------


# 2π in three parts of 26 significant bits each: k·part is exact for |k| < 2**27, so the
# reduction below keeps a drifted angle of 1e6 exact to ~1e-16 (a float64 ``remainder`` by
# 2·math.pi is off by k·2.4e-16: 4e-11 at 1e6).
_TWO_PI_HI = float.fromhex("0x1.921fb50000000p+2")
_TWO_PI_MID = float.fromhex("0x1.110b460000000p-24")
_TWO_PI_LO = float.fromhex("0x1.1a62633145c07p-52")


def _reduce(x: Tensor, k: Tensor) -> Tensor:
    return ((x - k * _TWO_PI_HI) - k * _TWO_PI_MID) - k * _TWO_PI_LO


def _wrap(x: Tensor) -> Tensor:
    """Wrap float64 angles to [-π, π] (float64's π); angles already there come back unchanged."""
    k = torch.round(x / (2 * math.pi))
    r = _reduce(x, k)
    k = k + (r > math.pi).to(x.dtype) - (r < -math.pi).to(x.dtype)
    r = _reduce(x, k)
    # an angle on the boundary can round one ulp outside after the shift: pull it in
    # (as r − (r − bound): exact by Sterbenz, and the derivative stays 1)
    r = torch.where(r > math.pi, r - (r - math.pi).detach(), r)
    return torch.where(r < -math.pi, r - (r + math.pi).detach(), r)


def _canonical64(r: Tensor, a: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """canonical_parts in float64, before rounding (n ≥ 2)."""
    lat = _wrap(a[..., :-1])
    flip = lat.abs() > math.pi / 2  # cos φ < 0: fold φ → ±π − φ and negate everything after it
    lat = torch.where(flip, torch.where(lat > 0, math.pi - lat, -math.pi - lat), lat)
    # parity of the flips strictly before k: negate (φ → −φ) the later latitudes of odd parity
    flips = flip.to(torch.int64)
    before = torch.cumsum(flips, dim=-1) - flips
    odd = (before % 2) == 1
    lat = torch.where(odd, -lat, lat)
    lat_sign = torch.where(flip ^ odd, -1.0, 1.0).to(torch.float64)
    total_odd = (flips.sum(dim=-1, keepdim=True) % 2) == 1
    # a negative radius: negate the direction (all latitudes φ → −φ, θ → θ + π) and the radius
    neg = (r < 0).unsqueeze(-1)
    lat = torch.where(neg, -lat, lat)
    lat_sign = torch.where(neg, -lat_sign, lat_sign)
    # the last angle: reduce first (adding π to a drifted 1e6 would round), then shift by π once
    # per odd number of negations, then reduce again
    lon = _wrap(a[..., -1:])
    lon = _wrap(torch.where(total_odd ^ neg, lon + math.pi, lon))
    radius_sign = torch.where(r < 0, -1.0, 1.0).to(torch.float64)
    out_angles = torch.cat([lat, lon], dim=-1)
    angle_sign = torch.cat([lat_sign, torch.ones_like(lon)], dim=-1)
    return r * radius_sign, out_angles, radius_sign, angle_sign


def canonical_parts(radius: Tensor, angles: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Canonical (radius, latitude angles) and the sign of each coordinate's map.

    Every coordinate is mapped by an affine map ``x → σ·x + c`` with ``σ = ±1`` (a shift by a
    multiple of 2π, a reflection ``φ → ±π − φ`` or ``φ → −φ``, or ``r → −r``). The returned signs
    ``σ`` are what an optimizer's first-moment state must be multiplied by to follow the same
    trajectory (second moments are even and stay).

    Returns:
        ``(radius, angles, radius_sign, angle_sign)``; signs are float tensors of ±1 shaped like
        their coordinates. For ``n = 1`` nothing changes (S⁰ has no angles to absorb the sign).
    """
    n = angles.shape[-1] + 1
    if n == 1:
        return radius.clone(), angles.clone(), torch.ones_like(radius), torch.ones_like(angles)
    r, a, radius_sign, angle_sign = _canonical64(radius.to(torch.float64), angles.to(torch.float64))
    # rounded inside the dtype's canonical range (float32's π/2 and π round past the poles)
    d = angles.dtype
    out_angles = torch.cat([_round_latitude(a[..., :-1], d), _round_last(a[..., -1:], d)], dim=-1)
    return (
        r.to(radius.dtype),
        out_angles,
        radius_sign.to(radius.dtype),
        angle_sign.to(angles.dtype),
    )


def canonicalize(
    radius: Tensor,
    angles: Tensor,
    offset: Optional[Tensor] = None,
    *,
    convention: str = "latitude",
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""Map any ``(radius, angles, offset)`` to canonical ranges with ``radius ≥ 0``.

    ``w = r·u(angles)`` and ``b = r·offset`` are unchanged (up to one rounding of the new
    angles, done in float64). Inputs are not modified; new tensors are returned.

    Example:
        >>> r, a = torch.tensor([-2.0]), torch.tensor([[2.0, 7.0]])
        >>> r2, a2, _ = canonicalize(r, a)
        >>> r2
        tensor([2.])
        >>> torch.allclose(r2[:, None] * to_cartesian(a2), r[:, None] * to_cartesian(a), atol=1e-6)
        True
    """
    _check_real_float(angles, "angles")
    _check_convention(convention)
    if convention == "polar":
        # converted in float64 both ways and rounded once (see to_cartesian)
        if angles.shape[-1] == 0:
            r, a, radius_sign, _ = canonical_parts(radius, angles)
        else:
            d = angles.dtype
            r64, a64, sign64, _ = _canonical64(radius.to(torch.float64), polar_to_latitude(angles.to(torch.float64)))
            theta = latitude_to_polar(a64)
            first = theta[..., :-1].to(d).clamp(0.0, _largest_below(math.pi, d))
            a = torch.cat([first, _round_last(theta[..., -1:], d)], dim=-1)
            r, radius_sign = r64.to(radius.dtype), sign64.to(radius.dtype)
    else:
        r, a, radius_sign, _ = canonical_parts(radius, angles)
    if offset is not None:
        offset = offset * radius_sign
    return r, a, offset
