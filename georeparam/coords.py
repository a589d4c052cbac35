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

Precision of :func:`to_cartesian` for float32 angles (relative error of each unit vector against
a float64 evaluation of the same angles, worst of 16 random directions;
``python benchmarks/speed.py --precision``, ``docs/speed.md``): ``mode="exact"`` (default)
evaluates the cosines and their running product in float64, the rest in float32: 4.5e-8 at every
n up to 25,088. ``mode="fast"`` stays in float32: 5.8e-7 at n = 784, 1.4e-6 at 4,608, 5.6e-6 at
25,088 (a random walk of the cosines' roundings, ~√n·eps/4). Both are computed by one fused
autograd Function with an analytic backward in float32 (gradient error 4.5e-8 exact, up to
4.3e-6 fast); see Note [Backward without the cumprod graph].
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
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
    """The dtype of the cosines' running product: float64 for ``exact``, float32 or better for ``fast``.

    Everything else (sines, the output, the backward) is evaluated in float32 or better in both
    modes; see Note [Where float64 is needed].
    """
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

# Note [Blocks of rows]
# The map and its backward are about a dozen elementwise passes and two scans. They run on the
# whole weight at once, in place where they can: with several threads every torch op is a
# parallel region, and on a shared machine each region can wait for a descheduled thread, so
# few large ops beat many small ones (cache-sized blocks of 2**16-2**18 elements were 5-10%
# faster on one idle core but 1.5-10x slower with two threads on a loaded 2-core machine).
# Only a weight above 2**22 elements goes in blocks of whole rows, which caps the temporaries
# (float64 ones too) at a block's size.
_BLOCK_ELEMENTS = 1 << 22


def _block_rows(fan_in: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(fan_in, 1))


# Note [float32 sin and cos on CPU]
# torch's float32 cos (SLEEF, ≤ 1 ulp) errs with a bias just below 1 (-0.016 ulp on average over
# small angles, -0.05 ulp on the latitudes of a random direction at n = 25,088), and a product
# of n cosines adds those biases up: that alone made ``fast`` mode 5.5e-5 off at n = 25,088.
# numpy's SIMD float32 sin/cos are within 0.51 ulp with no measurable bias and run 2.4× faster on
# one core (single-threaded; on two threads they tie with torch's). Plain CPU float32 tensors go
# through numpy, writing in place through a shared-memory view; anything else uses torch.


def _numpy_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and _is_plain(t)


# Note [A second thread for the sines]
# numpy's ufuncs are single-threaded, but they release the GIL. With two or more torch threads
# allowed, the sines of a large block (≥ 2**18 angles: below that the hand-over costs about what
# it saves) are computed on one helper thread while the calling thread computes the cosines'
# product; with one torch thread nothing runs beside the caller. The helper is created on first
# use and forgotten in a forked child (its thread is not there).
_SINE_THREAD: Optional[ThreadPoolExecutor] = None
_SINE_THREAD_MIN_ELEMENTS = 1 << 18


def _sine_thread() -> Optional[ThreadPoolExecutor]:
    global _SINE_THREAD
    if torch.get_num_threads() < 2:
        return None
    if _SINE_THREAD is None:
        _SINE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="georeparam-sin")
    return _SINE_THREAD


def _forget_sine_thread() -> None:
    global _SINE_THREAD
    _SINE_THREAD = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_sine_thread)


def _unit_block(a: Tensor, exact: bool, u: Tensor, prefix: Tensor, use_numpy: bool) -> None:
    """Write ``u`` ``(rows, n)`` and ``prefix`` ``(rows, n-2)`` for contiguous angles ``(rows, n-1)``.

    ``prefix[:, k] = ∏_{j≤k} cos φ_j`` over the latitudes. Sines and cosines are taken of all
    ``n-1`` angles at once (the last one's too): one contiguous pass each, which numpy runs at
    full speed and, on two threads, side by side (Note [A second thread for the sines]; a strided
    2-D view runs half as fast and does not overlap).

    # Note [Where float64 is needed]
    Almost every ``cos φ_j`` of a high-dimensional direction sits just below 1, where float32's
    spacing is 6e-8; a product of ``n`` of them carries ``n`` rounding errors (~√n·3e-8, more
    if they lean one way: Note [float32 sin and cos on CPU]). ``exact`` evaluates the cosines
    and their running product in float64 and rounds the product once. The sines stay in the
    working dtype: each enters one coordinate once, so their rounding costs eps/2 per
    coordinate, not a sum over n. (The running product itself is not the problem on CPU: torch's
    ``cumprod`` accumulates float32 in double.)
    """
    m = a.shape[-1] - 1
    s = torch.empty_like(a)
    sines = None
    if use_numpy:
        helper = _sine_thread() if a.numel() >= _SINE_THREAD_MIN_ELEMENTS else None
        if helper is not None:
            sines = helper.submit(np.sin, a.detach().numpy(), out=s.numpy())
        else:
            np.sin(a.detach().numpy(), out=s.numpy())
    else:
        torch.sin(a, out=s)
    if exact and a.dtype != torch.float64:
        c64 = a.to(torch.float64).cos_()  # the one float64 temporary
        lat_c = c64[:, :m]
        prefix.copy_(torch.cumprod(lat_c, -1, out=lat_c))
        cos_last = c64[:, m:].to(a.dtype)
    else:
        c = torch.from_numpy(np.cos(a.detach().numpy())) if use_numpy else torch.cos(a)
        torch.cumprod(c[:, :m], -1, out=prefix)
        cos_last = c[:, m:]
    if sines is not None:
        sines.result()
    # u_k = sin φ_k · ∏_{j<k} cos φ_j, then (cos θ, sin θ) · ∏_{j≤n-2} cos φ_j
    if m > 0:
        u[:, :1].copy_(s[:, :1])
        torch.mul(s[:, 1:m], prefix[:, :-1], out=u[:, 1:m])
        tail = prefix[:, m - 1 :]
        torch.mul(cos_last, tail, out=u[:, m : m + 1])
        torch.mul(s[:, m:], tail, out=u[:, m + 1 :])
    else:
        u[:, :1].copy_(cos_last)
        u[:, 1:].copy_(s)


def _unit_forward(angles: Tensor, exact: bool, radius: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """``(u, prefix)``, or ``(r·u, u, prefix)`` with ``radius``, block by block (Note [Blocks of rows])."""
    if torch.compiler.is_compiling():
        return _unit_forward_traced(angles, exact, radius)
    n = angles.shape[-1] + 1
    m = n - 2
    flat = angles.dim() != 2
    lead = angles.shape[:-1]
    rows = math.prod(lead)
    a = (angles.reshape(rows, n - 1) if flat else angles).contiguous()
    u = a.new_empty(rows, n)
    prefix = a.new_empty(rows, m)
    use_numpy = _numpy_ok(a)
    if use_numpy and a.untyped_storage().data_ptr() == angles.untyped_storage().data_ptr():
        # Note [numpy pins storage]
        # ``tensor.numpy()`` marks the tensor's storage non-resizable for good, and FSDP2 frees
        # an unsharded parameter by resizing its storage to 0. numpy only ever sees buffers the
        # map allocated itself: the angles are copied first (one memory-bound pass).
        a = a.clone()
    step = _block_rows(n) if a.device.type == "cpu" else rows
    if rows <= step:
        _unit_block(a, exact, u, prefix, use_numpy)
    else:
        for a_b, u_b, p_b in zip(a.split(step), u.split(step), prefix.split(step)):
            _unit_block(a_b, exact, u_b, p_b, use_numpy)
    w = None if radius is None else u * (radius.reshape(rows, 1) if flat else radius.unsqueeze(-1))
    if flat:
        u, prefix = u.reshape(lead + (n,)), prefix.reshape(lead + (m,))
        w = None if w is None else w.reshape(lead + (n,))
    return (u, prefix) if w is None else (w, u, prefix)


def _unit_forward_traced(angles: Tensor, exact: bool, radius: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """:func:`_unit_forward` in out-of-place ops, for ``torch.compile`` (which fuses the passes itself)."""
    m = angles.shape[-1] - 1
    lat, lon = angles[..., :m], angles[..., m:]
    if exact and angles.dtype != torch.float64:
        prefix = torch.cumprod(torch.cos(lat.to(torch.float64)), -1).to(angles.dtype)
    else:
        prefix = torch.cumprod(torch.cos(lat), -1)
    before = torch.cat([torch.ones_like(lon), prefix[..., :-1]], dim=-1)
    tail = prefix[..., m - 1 :] if m > 0 else torch.ones_like(lon)
    u = torch.cat([torch.sin(lat) * before[..., :m], tail * torch.cos(lon), tail * torch.sin(lon)], dim=-1)
    if radius is None:
        return u, prefix
    return radius.unsqueeze(-1) * u, u, prefix


def _grad_block(g: Tensor, gp: Optional[Tensor], u: Tensor, prefix: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradient of ``⟨g, u⟩ + ⟨gp, prefix⟩`` with respect to the angles, and ``Σ_i g_i u_i``.

    # Note [Backward without the cumprod graph]
    With ``S_k = Σ_{i>k} g_i u_i + Σ_{i≥k} p_i prefix_i`` (reverse cumulative sums; ``p`` is the
    gradient reaching ``prefix``, zero unless something differentiates through it) the gradient is

        ∂/∂φ_k = g_k · prefix_k − tan φ_k · S_k              (k ≤ n-2)
        ∂/∂θ   = g_n · u_{n-1} − g_{n-1} · u_n             (the last angle)

    and ``tan φ_k = u_k / prefix_k`` comes from the two saved tensors without a sine or cosine.
    Every term of ``S_k`` carries the factor ``cos φ_k``, as ``prefix_k`` does, so their ratio
    stays exact next to the poles (polar θ = 0 or π, where ``cos φ_k`` is tiny but never exactly
    zero for a finite float). The sums run from the end, so ``S_k`` is accurate relative to its
    own size there, not to the whole sum. Where ``prefix_k`` underflows to 0, every ``u_i`` after
    it is 0 as well and ``S_k = 0``; the divisor 1 put in there only avoids 0/0.

    Written in out-of-place differentiable ops of the saved *outputs*, so it also runs under
    ``vmap`` (``jacrev`` batches the cotangents) and can be differentiated again (Hessians). That
    second derivative is exact away from the poles; at a pole the quotient ``S_k / prefix_k``
    differentiates into two terms of size ``1/cos φ_k`` that cancel, so it loses about
    ``eps / cos φ_k`` (first derivatives stay exact there).
    """
    m = prefix.shape[-1]
    gu = g * u
    v = gu[..., 1:]
    if gp is not None and m > 0:
        v = v + torch.cat([gp * prefix, torch.zeros_like(gp[..., :1])], dim=-1)
    S = v.flip(-1).cumsum(-1).flip(-1)[..., :m]
    den = torch.where(prefix == 0, 1.0, prefix)
    g_lat = g[..., :m] * prefix - (u[..., :m] / den) * S
    g_lon = g[..., m + 1 :] * u[..., m : m + 1] - g[..., m : m + 1] * u[..., m + 1 :]
    return torch.cat([g_lat, g_lon], dim=-1), gu.sum(-1)


def _neg_grad_block_into(g: Tensor, u: Tensor, prefix: Tensor, sums: Tensor, guard: bool) -> Tensor:
    """:func:`_grad_block` for one block of plain tensors, in place and *negated*: ``(rows, n-1)``
    whose last column is left for the caller, and ``Σ_i g_i u_i`` written into ``sums``.

    Two block-sized temporaries at a time; the second becomes the result. The sign is folded into
    the caller's final scaling, which saves a pass.
    """
    m = prefix.shape[-1]
    S = (g[:, 1:] * u[:, 1:]).flip(-1)
    S.cumsum_(-1)
    S = S.flip(-1)  # S[:, k] = Σ_{i>k} g_i u_i
    torch.addcmul(S[:, 0], g[:, 0], u[:, 0], out=sums)
    lat = S[:, :m]
    lat.mul_(u[:, :m])  # tan φ_k · S_k = u_k · S_k / prefix_k
    lat.div_(prefix if not guard else torch.where(prefix == 0, 1.0, prefix))
    lat.addcmul_(g[:, :m], prefix, value=-1)
    return S


def _is_plain(*tensors: Optional[Tensor]) -> bool:
    """Eager, and no tensor is a functorch wrapper (vmap/grad level) or a subclass other than Parameter."""
    if torch.compiler.is_compiling():
        return False
    return all(
        t is None
        or (type(t) in (Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t))
        for t in tensors
    )


def _unit_backward(
    g: Optional[Tensor], gp: Optional[Tensor], u: Tensor, prefix: Tensor, scale: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``(grad_angles · scale, Σ_i g_i u_i)``: the gradient of ``⟨g, u⟩ + ⟨gp, prefix⟩``.

    ``scale`` (one factor per row) multiplies only the angle gradient; it must be ``None`` when
    ``gp`` is given. A plain first-order backward (the training step) runs in place
    (:func:`_neg_grad_block_into`, in blocks of rows only for huge weights: Note [Blocks of
    rows]); under ``torch.func``, ``torch.compile`` or ``create_graph`` the whole tensor goes
    through the differentiable :func:`_grad_block`.
    """
    n = u.shape[-1]
    lead = u.shape[:-1]
    rows = math.prod(lead)
    if g is None:
        g = torch.zeros_like(u)
    if gp is None and not torch.is_grad_enabled() and _is_plain(g, u, prefix, scale):
        m = n - 2
        flat = u.dim() != 2
        if flat:
            g, u, prefix = g.reshape(rows, n), u.reshape(rows, n), prefix.reshape(rows, m)
        if m > 0:
            sums = u.new_empty(rows)
            cpu = u.device.type == "cpu"
            step = _block_rows(n) if cpu else rows
            # |prefix| never grows along a row, so a row has a zero iff its last entry is zero (a
            # cheap check on CPU; elsewhere the guarded division runs without a sync)
            guard = not cpu or bool((prefix[:, -1] == 0).any())
            if rows <= step:
                out = _neg_grad_block_into(g, u, prefix, sums, guard)
            else:
                out = u.new_empty(rows, n - 1)
                blocks = zip(g.split(step), u.split(step), prefix.split(step), out.split(step), sums.split(step))
                for g_b, u_b, p_b, out_b, sums_b in blocks:
                    out_b.copy_(_neg_grad_block_into(g_b, u_b, p_b, sums_b, guard))
        else:
            out = u.new_empty(rows, 1)
            sums = (g * u).sum(-1)
        # the last angle, negated like the rest: g_{n-1} · u_n − g_n · u_{n-1}
        lon = out[:, m:]
        torch.mul(g[:, m : m + 1], u[:, m + 1 :], out=lon)
        lon.sub_(g[:, m + 1 :] * u[:, m : m + 1])
        if scale is not None:
            out.mul_(-(scale.reshape(rows, 1) if flat else scale.unsqueeze(-1)))
        else:
            out.neg_()
        if flat:
            out, sums = out.reshape(lead + (n - 1,)), sums.reshape(lead)
        return out, sums
    grad, sums = _grad_block(g, gp, u, prefix)
    if scale is not None:
        grad = grad * scale.unsqueeze(-1)
    return grad, sums


def _unit_jvp(da: Tensor, u: Tensor, prefix: Tensor) -> Tuple[Tensor, Tensor]:
    """Forward-mode tangents ``(du, dprefix)`` for an angle tangent ``da`` (for ``jacfwd``/``hessian``).

    With ``C_k = Σ_{j≤k} tan φ_j · dφ_j``: ``dprefix_k = −prefix_k · C_k``,
    ``du_k = prefix_k · dφ_k − u_k · C_{k−1}`` for the latitudes and, for the last pair,
    ``du_{n−1} = −u_n · dθ − u_{n−1} · C_{n−2}``, ``du_n = u_{n−1} · dθ − u_n · C_{n−2}``. The large
    ``tan φ_j`` of a pole only ever meets coordinates that carry its small ``cos φ_j``.
    """
    m = prefix.shape[-1]
    den = torch.where(prefix == 0, 1.0, prefix)
    C = ((u[..., :m] / den) * da[..., :m]).cumsum(-1)
    dprefix = -prefix * C
    Cex = torch.cat([torch.zeros_like(da[..., :1]), C], dim=-1)  # C_{k−1}, k = 0..m
    dl, last = da[..., m:], Cex[..., m:]
    du = torch.cat(
        [
            prefix * da[..., :m] - u[..., :m] * Cex[..., :m],
            -u[..., m + 1 :] * dl - u[..., m : m + 1] * last,
            u[..., m : m + 1] * dl - u[..., m + 1 :] * last,
        ],
        dim=-1,
    )
    return du, dprefix


class _UnitVector(torch.autograd.Function):
    """``angles → (u, prefix)`` for latitude angles (``n ≥ 2``), with an analytic backward.

    Forward and backward stay in the dtype of the angles (float32 or float64; :func:`_unit`
    promotes half precision first); ``exact=True`` adds the float64 product of Note [Where float64
    is needed]. The saved tensors are the two outputs: nothing of the forward's cos/sin/cumprod
    graph is kept and nothing is recomputed. ``prefix`` is an output so that ``setup_context``
    can save it (the form ``torch.func`` and ``torch.compile`` need); callers ignore it.
    """

    @staticmethod
    def forward(angles: Tensor, exact: bool) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        return _unit_forward(angles, exact)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        u, prefix = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, prefix)

    @staticmethod
    def backward(ctx, grad_u: Optional[Tensor], grad_prefix: Optional[Tensor]):  # type: ignore[override]
        u, prefix = ctx.saved_tensors
        if grad_u is None and grad_prefix is None:
            return None, None
        return _unit_backward(grad_u, grad_prefix, u, prefix)[0], None

    @staticmethod
    def vmap(info, in_dims, angles: Tensor, exact: bool):  # type: ignore[override]
        # Note [vmap rule]
        # The forward writes into tensors it allocates, which a vmap-generated rule cannot batch.
        # The map is row-wise, so a batch dimension is just one more leading dimension.
        return _UnitVector.apply(angles.movedim(in_dims[0], 0), exact), (0, 0)


def _vmap_scaled(fn, info, in_dims, radius: Tensor, angles: Tensor, exact: bool):
    """vmap rule of the scaled map (Note [vmap rule]): batch dimension first; an unbatched
    radius or angles tensor is expanded to the batch."""

    def front(x: Tensor, d: Optional[int]) -> Tensor:
        return x.movedim(d, 0) if d is not None else x.expand((info.batch_size,) + x.shape)

    return fn.apply(front(radius, in_dims[0]), front(angles, in_dims[1]), exact), (0, 0, 0)


class _ScaledUnitVector(torch.autograd.Function):
    """``(radius, angles) → (r·u, u, prefix)``: the weight rows in one pass (see :class:`_UnitVector`).

    Folding the radius in saves the separate ``r · u`` product, its backward (two full passes
    and a temporary the size of the weight) and keeps ``u`` saved once.
    """

    @staticmethod
    def forward(radius: Tensor, angles: Tensor, exact: bool) -> Tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return _unit_forward(angles, exact, radius)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        radius = inputs[0]
        _, u, prefix = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(radius, u, prefix)

    @staticmethod
    def backward(ctx, grad_w: Optional[Tensor], grad_u: Optional[Tensor], grad_prefix: Optional[Tensor]):  # type: ignore[override]
        radius, u, prefix = ctx.saved_tensors
        if grad_w is None and grad_u is None and grad_prefix is None:
            return None, None, None
        if grad_u is None and grad_prefix is None:
            # w = r·u: ∂/∂angles = r · (∂u/∂angles)ᵀ g and ∂/∂r = Σ g·u, both from one pass
            grad_angles, grad_r = _unit_backward(grad_w, None, u, prefix, scale=radius)
            return grad_r, grad_angles, None
        g = None if grad_w is None else grad_w * radius.unsqueeze(-1)
        if grad_u is not None:
            g = grad_u if g is None else g + grad_u
        grad_angles, _ = _unit_backward(g, grad_prefix, u, prefix)
        grad_r = None if grad_w is None else (grad_w * u).sum(-1)
        return grad_r, grad_angles, None

    @staticmethod
    def vmap(info, in_dims, radius: Tensor, angles: Tensor, exact: bool):  # type: ignore[override]
        return _vmap_scaled(_ScaledUnitVector, info, in_dims, radius, angles, exact)


# Note [Forward mode and compile]
# Dynamo does not trace an autograd.Function that defines ``jvp``, and ``torch.func.jacfwd`` /
# ``hessian`` need one. The eager path uses these subclasses (with ``jvp``); a compiled graph
# uses the base classes.


class _UnitVectorFwAD(_UnitVector):
    """:class:`_UnitVector` with forward-mode AD; see Note [Forward mode and compile]."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _UnitVector.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*output)

    @staticmethod
    def jvp(ctx, d_angles: Optional[Tensor], _):  # type: ignore[override]
        u, prefix = ctx.saved_tensors
        return _unit_jvp(d_angles, u, prefix)

    @staticmethod
    def vmap(info, in_dims, angles: Tensor, exact: bool):  # type: ignore[override]
        return _UnitVectorFwAD.apply(angles.movedim(in_dims[0], 0), exact), (0, 0)


class _ScaledUnitVectorFwAD(_ScaledUnitVector):
    """:class:`_ScaledUnitVector` with forward-mode AD; see Note [Forward mode and compile]."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _ScaledUnitVector.setup_context(ctx, inputs, output)
        _, u, prefix = output
        ctx.save_for_forward(inputs[0], u, prefix)

    @staticmethod
    def jvp(ctx, d_radius: Optional[Tensor], d_angles: Optional[Tensor], _):  # type: ignore[override]
        radius, u, prefix = ctx.saved_tensors
        if d_angles is None:  # (None tangents for outputs trip an internal assert: zeros)
            assert d_radius is not None
            return d_radius.unsqueeze(-1) * u, torch.zeros_like(u), torch.zeros_like(prefix)
        du, dprefix = _unit_jvp(d_angles, u, prefix)
        dw = radius.unsqueeze(-1) * du
        if d_radius is not None:
            dw = dw + d_radius.unsqueeze(-1) * u
        return dw, du, dprefix

    @staticmethod
    def vmap(info, in_dims, radius: Tensor, angles: Tensor, exact: bool):  # type: ignore[override]
        return _vmap_scaled(_ScaledUnitVectorFwAD, info, in_dims, radius, angles, exact)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# Note [Calling the Function]
# ``Function.apply`` binds the arguments with ``inspect.signature`` on every call (~40 µs, more
# than the whole map of a small conv layer) before handing over to the C++ ``apply``. Outside
# functorch transforms and compile, with every argument positional, that binding does nothing,
# so the eager path calls the C++ ``apply`` directly; everything else goes through ``apply``.
_DIRECT_APPLY = hasattr(torch._C, "_are_functorch_transforms_active") and hasattr(torch._C._FunctionBase, "apply")


def _call(fn, compiling: bool, *args):
    if _DIRECT_APPLY and not compiling and not torch._C._are_functorch_transforms_active():
        return super(torch.autograd.Function, fn).apply(*args)
    return fn.apply(*args)


def _unit(angles: Tensor, mode: str = "exact") -> Tensor:
    """Latitude angles (..., n-1) → unit vectors (..., n) in the dtype of ``angles``; ``n = 1`` gives ones.

    Half-precision angles are evaluated in float32 and the result is cast back.
    """
    n = angles.shape[-1] + 1
    if n == 1:
        return torch.ones(angles.shape[:-1] + (1,), dtype=angles.dtype, device=angles.device)
    compiling = torch.compiler.is_compiling()
    fn = _UnitVector if compiling else _UnitVectorFwAD
    u, _ = _call(fn, compiling, angles.to(_work_dtype(angles.dtype)), mode == "exact")
    return u.to(angles.dtype)


def _scaled_unit(radius: Tensor, angles: Tensor, mode: str = "exact") -> Tensor:
    """``radius[..., None] · u(angles)``, the rows of a GmP weight, in the dtype of ``angles``.

    Same values as ``radius.unsqueeze(-1) * _unit(angles, mode)`` with a cheaper backward
    (:class:`_ScaledUnitVector`).
    """
    n = angles.shape[-1] + 1
    if n == 1:
        return radius.unsqueeze(-1).to(angles.dtype)
    work = _work_dtype(torch.promote_types(angles.dtype, radius.dtype))
    compiling = torch.compiler.is_compiling()
    fn = _ScaledUnitVector if compiling else _ScaledUnitVectorFwAD
    w, _, _ = _call(fn, compiling, radius.to(work), angles.to(work), mode == "exact")
    return w.to(angles.dtype)


def to_cartesian(angles: Tensor, *, convention: str = "latitude", mode: str = "exact") -> Tensor:
    r"""Unit vectors from angles, row-wise over the last dimension.

    Args:
        angles: ``(..., n-1)`` angles; an empty last dimension gives ``n = 1`` and the vector ``+1``.
        convention: ``"latitude"`` (the library's storage) or ``"polar"`` (the paper's θ).
        mode: ``"exact"`` (the cosines' product in float64: 4.5e-8 relative in float32 at every
            n up to 25,088) or ``"fast"`` (all float32: 5.6e-6 at n = 25,088; faster, see
            ``docs/speed.md``).

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
