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

Precision of the map for float32 angles (relative error of each unit vector against a float64
evaluation of the same angles, tested up to n = 25,088 in ``tests/test_coords.py``, the measured
values in ``docs/precision.md``): ``mode="exact"`` (default) ≤ 2e-7; ``mode="fast"`` is the same
with the compiled CPU kernel and otherwise stays in float32, ≤ 4·√n·eps
(:data:`georeparam._map.MODES` states each). The autograd Functions, the kernel and the modes
live in :mod:`georeparam._map`; this module keeps the pure maps.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._map import check_mode, compute_dtype, unit

__all__ = ["to_cartesian", "to_hyperspherical", "row_norms", "canonicalize", "polar_to_latitude", "latitude_to_polar"]

_CONVENTIONS = ("latitude", "polar")


def _check_convention(convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}. Got: {convention!r}")


def _check_real_float(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor. Got: {type(x).__name__}")
    if not x.is_floating_point() or x.is_complex():
        raise TypeError(f"{what} must be a real floating-point tensor. Got: dtype={x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the vector). Got: a 0-d tensor")


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


def to_cartesian(angles: Tensor, *, convention: str = "latitude", mode: str = "exact") -> Tensor:
    r"""Unit vectors from angles, row-wise over the last dimension.

    Args:
        angles: ``(..., n-1)`` angles; an empty last dimension gives ``n = 1`` and the vector ``+1``.
        convention: ``"latitude"`` (the library's storage) or ``"polar"`` (the paper's θ).
        mode: ``"exact"`` (the cosines' product in float64: ≤ 2e-7 relative in float32) or
            ``"fast"`` (all float32: ≤ 4·√n·eps; faster, see ``docs/speed.md``); tested up to
            n = 25,088, measured in ``docs/precision.md``.

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
    check_mode(mode)
    if convention == "polar":
        # convert in the compute dtype: π/2 − θ in float32 would shift every angle by float32's
        # rounding of π/2 (4.4e-8), the very storage error the latitude convention avoids
        work = compute_dtype(angles.dtype, mode)
        return unit(polar_to_latitude(angles.to(work)), mode).to(angles.dtype)
    return unit(angles, mode)


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


def _nudge_inside(x: Tensor, bound: float) -> Tensor:
    """``x.clamp(-bound, bound)`` in value, with derivative 1 everywhere.

    # Note [The one-ulp clamp has no gradient]
    The clamps below move an angle that rounded one ulp past a pole back inside; they are a
    rounding fix, not part of canonicalization's affine map ``x → σ·x + c``, whose derivative is σ.
    A plain clamp has derivative 0 where it acts: with r < 0 and last angle 0, θ + π rounds to
    float32's π, just past the bound, and the derivative came out 0 instead of σ = 1 (seen as a
    torch 2.14.1 failure of tests/test_coords.py, whose hypothesis example reaches that point
    there; the same input gives 0 on torch 2.13). Passing the gradient straight through keeps σ
    the derivative on every torch version.
    """
    inside = x.clamp(-bound, bound)
    return torch.where(inside == x, x, x + (inside - x).detach())


def _round_latitude(lat: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 latitudes in [-π/2, π/2] to ``dtype`` keeping ``cos φ > 0``."""
    return _nudge_inside(lat.to(dtype), _largest_below(math.pi / 2, dtype))


def _round_last(lon: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 last angles in [-π, π] to ``dtype``, inside the real (-π, π]."""
    return _nudge_inside(lon.to(dtype), _largest_below(math.pi, dtype))


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


# Note [Row blocks]
# A large input is converted ~2**20 entries (whole rows) at a time. Its float64 temporaries
# (the widened rows, their squares' running sums: 16 bytes per entry) are then allocated again
# and again at the same size, which the C allocator serves from memory it already holds; one
# call over the whole input takes them fresh from the system, page fault by page fault.
# Measured (2048×2048 float32, 1 thread, thread CPU time): to_hyperspherical 16.0 → 8.9 ns and
# row_norms 3.8 → 0.9 ns per entry. Every row is computed as before: results are bit-identical
# (tests/test_coords.py). CPU only: on an accelerator one launch per block would cost more.
_BLOCK = 1 << 20


def _blocked(x: Tensor) -> bool:
    """Large, on the CPU, and more than one block of rows (a block itself is never split again)."""
    if x.device.type != "cpu" or x.dim() < 2 or x.numel() <= 2 * _BLOCK:
        return False
    return x.numel() // x.shape[-1] > max(1, _BLOCK // x.shape[-1])


def _row_blocks(rows: Tensor):
    step = max(1, _BLOCK // rows.shape[-1])
    return [(i, min(i + step, rows.shape[0])) for i in range(0, rows.shape[0], step)]


def row_norms(x: Tensor) -> Tensor:
    r"""``‖x‖`` of each row (the last dimension), computed in float64 and rounded once to ``x.dtype``.

    The radius of :func:`to_hyperspherical` without the angles, in one pass: what checks before
    registration need (a float64 row is scaled by a power of two first, Note [Scaling rows]). It
    may differ from that radius by one rounding (the sum runs in another order). An overflow of
    the dtype comes back as ``inf``, for the caller to refuse.

    Example:
        >>> row_norms(torch.tensor([[3.0, -4.0], [1e30, 1e30]]))
        tensor([5.0000e+00, 1.4142e+30])
    """
    _check_real_float(x, "x")
    if _blocked(x):
        rows = x.reshape(-1, x.shape[-1])
        out = x.new_empty(rows.shape[:1])
        for i, j in _row_blocks(rows):
            out[i:j] = row_norms(rows[i:j])
        return out.reshape(x.shape[:-1])
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).to(x.dtype)
    _, e = torch.frexp(x.abs().amax(dim=-1, keepdim=True))
    scale = torch.pow(2.0, e.clamp(-1000, 1000).to(torch.float64))
    return torch.linalg.vector_norm(x / scale, dim=-1) * scale[..., 0]


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
    if _blocked(x):
        rows = x.reshape(-1, n)
        radius, angles = x.new_empty(rows.shape[:1]), x.new_empty((rows.shape[0], n - 1))
        for i, j in _row_blocks(rows):
            radius[i:j], angles[i:j] = to_hyperspherical(rows[i:j], convention=convention)
        return radius.reshape(x.shape[:-1]), angles.reshape(x.shape[:-1] + (n - 1,))
    dtype = x.dtype
    # Note [Reversed rows]
    # The angles need the tail norms ‖(x_k, …, x_n)‖, a cumulative sum from the row's end. The
    # row is reversed once, in the input dtype (the copy that protects the input), and every
    # float64 pass after it runs in place on that copy; the float32 angles are reversed back.
    # (Two float64 flips around the cumsum, and a zero-row where() over every angle, made
    # registration 2× slower.)
    xf = torch.flip(x, (-1,)).to(torch.float64)
    # Note [Scaling rows]
    # Squares of float64 entries overflow above 1e154 and underflow below 1e-154. A float64 row
    # is scaled by a power of two first (exact), so any finite row gets its radius and angles.
    # Squares of float32/float16/bfloat16 entries always fit float64: no scaling needed.
    scale = None
    if dtype == torch.float64:
        _, e = torch.frexp(xf.abs().amax(dim=-1, keepdim=True))
        scale = torch.pow(2.0, e.clamp(-1000, 1000).to(torch.float64))
        xf.div_(scale)
    tail = torch.mul(xf, xf).cumsum_(-1).sqrt_()  # tail[..., j] = ‖(x_{n-j}, …, x_n)‖ (1-based x)
    radius = tail[..., -1] if scale is None else tail[..., -1] * scale[..., 0]
    # the angles in reversed order into one buffer: rev[..., 0] is the last angle, rev[..., j]
    # for j ≥ 1 is angle n-1-j (x_k is xf[..., n-1-k] and tail_{k+1} is tail[..., n-2-k])
    rev = torch.empty(x.shape[:-1] + (n - 1,), dtype=dtype, device=x.device)
    if convention == "polar":
        first = torch.atan2(tail[..., 1 : n - 1], xf[..., 2:])  # θ_k ∈ [0, π]
        rev[..., 1:] = _round_half_turn(first, torch.flip(x, (-1,))[..., 2:], dtype)
    else:
        bound = _largest_below(math.pi / 2, dtype)  # rounded keeping cos φ > 0 (_round_latitude)
        rev[..., 1:].copy_(xf[..., 2:].atan2_(tail[..., 1 : n - 1])).clamp_(-bound, bound)  # φ_k ∈ [-π/2, π/2]
    # the last angle: |θ| = atan2(|x_n|, x_{n-1}) ∈ [0, π], then the sign of x_n (so that
    # x_n = -0. gives +π, inside (-π, π]). Signs come from the unscaled row: a tiny entry next
    # to a huge one underflows when scaled.
    xa, xb = xf[..., 1], xf[..., 0]
    lon = _round_half_turn(torch.atan2(xb.abs(), xa), x[..., n - 2], dtype)
    rev[..., 0] = torch.where(x[..., n - 1] < 0, -lon, lon)
    angles = torch.flip(rev, (-1,))
    # a zero row (whatever the signs of its zeros) gets the fixed direction of all-zero latitudes
    # (polar: θ_k = π/2, below the pole, and last angle 0)
    zero_row = radius == 0
    if bool(zero_row.any()):
        fixed = torch.zeros(n - 1, dtype=dtype, device=x.device)
        if convention == "polar":
            fixed[: n - 2] = _largest_below(math.pi / 2, dtype)
        angles[zero_row] = fixed
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
_THREE_PARTS_EXACT_BELOW = 2.0**27 * 2 * math.pi  # |k| < 2**27


def _reduce(x: Tensor, k: Tensor) -> Tensor:
    return ((x - k * _TWO_PI_HI) - k * _TWO_PI_MID) - k * _TWO_PI_LO


# Note [Huge angles]
# Beyond 2**27 turns (|x| > 8.4e8: one huge finite step) the three parts above are no longer
# exact (k·part needs more than 53 bits), and w changed by up to 1.6 at 1e20. Such angles are
# reduced exactly instead: a float64 is an integer times a power of two, so x·2**P is an integer
# for P = 1,280, and its remainder by ⌊2π·2**P⌋ (2π to 1,280 bits, from Machin's formula in
# integers) is x mod 2π to within 2**-170 rad; Python's int division rounds it once to float64.
# About 2 µs per angle, in Python: only the rare huge angles take this path.
_P_BITS = 1280


def _two_pi_fixed(bits: int) -> int:
    """``⌊2π·2**bits⌋`` (off by at most a few units), by Machin's π = 16·atan(1/5) − 4·atan(1/239)."""
    guard = bits + 32

    def atan_inv(x: int) -> int:  # atan(1/x)·2**guard
        total, term, k, x2 = 0, (1 << guard) // x, 1, x * x
        while term:
            total += term // k if (k // 2) % 2 == 0 else -(term // k)
            term //= x2
            k += 2
        return total

    return (2 * (16 * atan_inv(5) - 4 * atan_inv(239))) >> 32


_TWO_PI_FIXED = _two_pi_fixed(_P_BITS)


def _reduce_exact(x: float) -> float:
    """``x − 2π·round(x / 2π)`` for a finite float, computed exactly and rounded once (Note [Huge angles])."""
    m, e = math.frexp(x)
    mant, exp = int(m * 2.0**53), e - 53  # x = mant·2**exp exactly
    r = (mant << (exp + _P_BITS)) % _TWO_PI_FIXED  # exp + P ≥ 1280 − 1127 > 0 for every float64
    if 2 * r > _TWO_PI_FIXED:
        r -= _TWO_PI_FIXED
    return r / (1 << _P_BITS)  # int / int: correctly rounded


def _wrap(x: Tensor) -> Tensor:
    """Wrap float64 angles to [-π, π] (float64's π); angles already there come back unchanged.

    Exact up to one rounding at any finite size (Note [Huge angles]); non-finite angles stay
    non-finite.
    """
    k = torch.round(x / (2 * math.pi))
    r = _reduce(x, k)
    k = k + (r > math.pi).to(x.dtype) - (r < -math.pi).to(x.dtype)
    r = _reduce(x, k)
    huge = (x.abs() > _THREE_PARTS_EXACT_BELOW) & torch.isfinite(x)
    if bool(huge.any()):
        exact = torch.tensor([_reduce_exact(v) for v in x.detach()[huge].tolist()], dtype=x.dtype, device=x.device)
        fixed = torch.zeros_like(x).masked_scatter(huge, exact)
        r = torch.where(huge, fixed + (x - x.detach()), r)  # the value exact, the derivative 1
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


def _check_per_row(x, angles: Tensor, what: str) -> None:
    """``x`` (radius or offset) is a real float tensor with one entry per row of ``angles``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"canonicalize: {what} must be a torch.Tensor. Got: {type(x).__name__}")
    if not x.is_floating_point() or x.is_complex():
        raise TypeError(f"canonicalize: {what} must be a real floating-point tensor. Got: dtype={x.dtype}")
    if tuple(x.shape) != tuple(angles.shape[:-1]):
        raise ValueError(
            f"canonicalize: {what} must have one entry per row of angles, shape {tuple(angles.shape[:-1])} "
            f"for angles of shape {tuple(angles.shape)}. Got: {what} of shape {tuple(x.shape)}"
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
    _check_real_float(angles, "canonicalize: angles")
    _check_convention(convention)
    _check_per_row(radius, angles, "radius")
    if offset is not None:
        _check_per_row(offset, angles, "offset")
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
