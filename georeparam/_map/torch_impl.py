r"""The pure-torch GmP map and its analytic backward: the backend that runs everywhere.

CUDA and other devices, ``torch.compile``, ``torch.func`` transforms, higher-order gradients,
tensor subclasses, and CPU wherever the compiled kernel is not in use (:mod:`georeparam._map.dispatch`
chooses). It is also the reference the kernel is tested against. :func:`unit` and
:func:`scaled_unit` take promoted tensors with ``n ≥ 2``; :func:`unit_forward_traced`,
:func:`unit_backward` and :func:`unit_jvp` are the differentiable formulas the kernel's Function
shares for double backward and forward mode.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._compat import FAST_PATHS, call, exporting, is_plain
from .modes import MODES
from .pool import LazyPool

__all__ = [
    "unit",
    "scaled_unit",
    "unit_forward",
    "unit_forward_traced",
    "unit_backward",
    "unit_jvp",
    "batch_first",
    "UnitVector",
    "ScaledUnitVector",
    "UnitVectorFwAD",
    "ScaledUnitVectorFwAD",
]


# ---------------------------------------------------------------------------------------------
# The pure-torch map and its analytic backward (always available; the reference for the kernel)
# ---------------------------------------------------------------------------------------------

# Note [Blocks of rows]
# The map and its backward are about a dozen elementwise passes and two scans. They run on the
# whole weight at once, in place where they can: with several threads every torch op is a
# parallel region, and on a shared machine each region can wait for a descheduled thread, so
# few large ops beat many small ones (cache-sized blocks of 2**16-2**18 elements were 5-10%
# faster on one idle core but 1.5-10x slower with two threads on a loaded 2-core machine).
# Only a weight above 2**22 elements goes in blocks of whole rows, which caps the temporaries
# (float64 ones too) at a block's size.
BLOCK_ELEMENTS = 1 << 22


def _block_rows(fan_in: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(fan_in, 1))


# Note [float32 sin and cos on CPU]
# torch's float32 cos (SLEEF, ≤ 1 ulp) errs with a bias just below 1 (-0.016 ulp on average over
# small angles, -0.05 ulp on the latitudes of a random direction at n = 25,088), and a product
# of n cosines adds those biases up: that alone made ``fast`` mode 5.5e-5 off at n = 25,088.
# numpy's SIMD float32 sin/cos are within 0.51 ulp with no measurable bias and run 2.4× faster on
# one core (single-threaded; on two threads they tie with torch's). Plain CPU float32 tensors go
# through numpy, writing in place through a shared-memory view; anything else uses torch.


def _numpy_ok(t: Tensor) -> bool:
    return FAST_PATHS and t.device.type == "cpu" and t.dtype == torch.float32 and is_plain(t)


# Note [A second thread for the sines]
# numpy's ufuncs are single-threaded, but they release the GIL. With two or more torch threads
# allowed, the sines of a large block (≥ 2**18 angles: below that the hand-over costs about what
# it saves) are computed on one helper thread while the calling thread computes the cosines'
# product; with one torch thread nothing runs beside the caller. The helper is created on first
# use and forgotten in a forked child (Note [Pools and fork] in ``pool.py``).
_SINE_THREAD = LazyPool("georeparam-sin")
SINE_THREAD_MIN_ELEMENTS = 1 << 18


def _sine_thread() -> Optional[ThreadPoolExecutor]:
    return _SINE_THREAD.get(1) if torch.get_num_threads() >= 2 else None


def _unit_block(a: Tensor, mode: str, u: Tensor, prefix: Tensor, use_numpy: bool) -> None:
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
        helper = _sine_thread() if a.numel() >= SINE_THREAD_MIN_ELEMENTS else None
        if helper is not None:
            sines = helper.submit(np.sin, a.detach().numpy(), out=s.numpy())
        else:
            np.sin(a.detach().numpy(), out=s.numpy())
    else:
        torch.sin(a, out=s)
    if MODES[mode].float64_product and a.dtype != torch.float64:
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


def unit_forward(angles: Tensor, mode: str, radius: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """``(u, prefix)``, or ``(r·u, u, prefix)`` with ``radius``, block by block (Note [Blocks of rows])."""
    if torch.compiler.is_compiling() or exporting():
        return unit_forward_traced(angles, mode, radius)
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
        _unit_block(a, mode, u, prefix, use_numpy)
    else:
        for a_b, u_b, p_b in zip(a.split(step), u.split(step), prefix.split(step)):
            _unit_block(a_b, mode, u_b, p_b, use_numpy)
    w = None if radius is None else u * (radius.reshape(rows, 1) if flat else radius.unsqueeze(-1))
    if flat:
        u, prefix = u.reshape(lead + (n,)), prefix.reshape(lead + (m,))
        w = None if w is None else w.reshape(lead + (n,))
    return (u, prefix) if w is None else (w, u, prefix)


def _cumprod_by_logs(c: Tensor) -> Tensor:
    """``cumprod(c, -1)`` as ``sign · exp(cumsum(log|c|))``, for export.

    # Note [Export without cumprod]
    ONNX has no cumulative product, and torch's decomposition of ``cumprod`` (``prims.prod``)
    has no ONNX function, so ``torch.onnx.export`` of a registered model failed. Under
    ``torch.export`` (which the ONNX exporter runs first) the prefix is a cumulative sum of
    logarithms instead, with the sign from the parity of the negative factors; a zero factor
    gives log 0 = −inf and exp(−inf) = 0 after it, as the product would. In float64 (exact
    mode) this agrees with cumprod to ~1e-15 relative; tests/test_export.py checks the ONNX
    model's outputs against the eager model.
    """
    mag = torch.exp(torch.cumsum(torch.log(torch.abs(c)), -1))
    negatives = torch.cumsum((c < 0).to(c.dtype), -1)
    return (1 - 2 * torch.remainder(negatives, 2)) * mag


def unit_forward_traced(angles: Tensor, mode: str, radius: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """:func:`unit_forward` in out-of-place ops, for ``torch.compile`` (which fuses the passes
    itself) and ``torch.export`` (Note [Export without cumprod])."""
    m = angles.shape[-1] - 1
    lat, lon = angles[..., :m], angles[..., m:]
    prod = _cumprod_by_logs if exporting() else (lambda c: torch.cumprod(c, -1))
    if MODES[mode].float64_product and angles.dtype != torch.float64:
        prefix = prod(torch.cos(lat.to(torch.float64))).to(angles.dtype)
    else:
        prefix = prod(torch.cos(lat))
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


def unit_backward(
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
    if gp is None and not torch.is_grad_enabled() and is_plain(g, u, prefix, scale):
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


def unit_jvp(da: Tensor, u: Tensor, prefix: Tensor) -> Tuple[Tensor, Tensor]:
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


class UnitVector(torch.autograd.Function):
    """``angles → (u, prefix)`` for latitude angles (``n ≥ 2``), with an analytic backward.

    Forward and backward stay in the dtype of the angles (float32 or float64; :func:`_unit`
    promotes half precision first); ``mode="exact"`` adds the float64 product of Note [Where float64
    is needed]. The saved tensors are the two outputs: nothing of the forward's cos/sin/cumprod
    graph is kept and nothing is recomputed. ``prefix`` is an output so that ``setup_context``
    can save it (the form ``torch.func`` and ``torch.compile`` need); callers ignore it.
    """

    @staticmethod
    def forward(angles: Tensor, mode: str) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        return unit_forward(angles, mode)

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
        return unit_backward(grad_u, grad_prefix, u, prefix)[0], None

    @staticmethod
    def vmap(info, in_dims, angles: Tensor, mode: str):  # type: ignore[override]
        # Note [vmap rule]
        # The forward writes into tensors it allocates, which a vmap-generated rule cannot batch.
        # The map is row-wise, so a batch dimension is just one more leading dimension.
        return UnitVector.apply(angles.movedim(in_dims[0], 0), mode), (0, 0)


def batch_first(info, in_dims, *tensors: Tensor) -> Tuple[Tensor, ...]:
    """A vmap rule's tensor inputs with the batch dimension first (Note [vmap rule]: the map is
    row-wise, so the batch is one more leading dimension); an unbatched one is expanded to the batch."""
    return tuple(
        x.movedim(d, 0) if d is not None else x.expand((info.batch_size,) + x.shape) for x, d in zip(tensors, in_dims)
    )


def _vmap_scaled(fn, info, in_dims, radius: Tensor, angles: Tensor, mode: str):
    """vmap rule of the scaled map (Note [vmap rule]), three outputs."""
    return fn.apply(*batch_first(info, in_dims, radius, angles), mode), (0, 0, 0)


class ScaledUnitVector(torch.autograd.Function):
    """``(radius, angles) → (r·u, u, prefix)``: the weight rows in one pass (see :class:`UnitVector`).

    Folding the radius in saves the separate ``r · u`` product, its backward (two full passes
    and a temporary the size of the weight) and keeps ``u`` saved once.
    """

    @staticmethod
    def forward(radius: Tensor, angles: Tensor, mode: str) -> Tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return unit_forward(angles, mode, radius)

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
            grad_angles, grad_r = unit_backward(grad_w, None, u, prefix, scale=radius)
            return grad_r, grad_angles, None
        g = None if grad_w is None else grad_w * radius.unsqueeze(-1)
        if grad_u is not None:
            g = grad_u if g is None else g + grad_u
        grad_angles, _ = unit_backward(g, grad_prefix, u, prefix)
        grad_r = None if grad_w is None else (grad_w * u).sum(-1)
        return grad_r, grad_angles, None

    @staticmethod
    def vmap(info, in_dims, radius: Tensor, angles: Tensor, mode: str):  # type: ignore[override]
        return _vmap_scaled(ScaledUnitVector, info, in_dims, radius, angles, mode)


# Note [Forward mode and compile]
# Dynamo does not trace an autograd.Function that defines ``jvp``, and ``torch.func.jacfwd`` /
# ``hessian`` need one. The eager path uses these subclasses (with ``jvp``); a compiled graph
# uses the base classes.


class UnitVectorFwAD(UnitVector):
    """:class:`UnitVector` with forward-mode AD; see Note [Forward mode and compile]."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        UnitVector.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*output)

    @staticmethod
    def jvp(ctx, d_angles: Optional[Tensor], _):  # type: ignore[override]
        u, prefix = ctx.saved_tensors
        return unit_jvp(d_angles, u, prefix)

    @staticmethod
    def vmap(info, in_dims, angles: Tensor, mode: str):  # type: ignore[override]
        return UnitVectorFwAD.apply(angles.movedim(in_dims[0], 0), mode), (0, 0)


class ScaledUnitVectorFwAD(ScaledUnitVector):
    """:class:`ScaledUnitVector` with forward-mode AD; see Note [Forward mode and compile]."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ScaledUnitVector.setup_context(ctx, inputs, output)
        _, u, prefix = output
        ctx.save_for_forward(inputs[0], u, prefix)

    @staticmethod
    def jvp(ctx, d_radius: Optional[Tensor], d_angles: Optional[Tensor], _):  # type: ignore[override]
        radius, u, prefix = ctx.saved_tensors
        if d_angles is None:  # (None tangents for outputs trip an internal assert: zeros)
            assert d_radius is not None
            return d_radius.unsqueeze(-1) * u, torch.zeros_like(u), torch.zeros_like(prefix)
        du, dprefix = unit_jvp(d_angles, u, prefix)
        dw = radius.unsqueeze(-1) * du
        if d_radius is not None:
            dw = dw + d_radius.unsqueeze(-1) * u
        return dw, du, dprefix

    @staticmethod
    def vmap(info, in_dims, radius: Tensor, angles: Tensor, mode: str):  # type: ignore[override]
        return _vmap_scaled(ScaledUnitVectorFwAD, info, in_dims, radius, angles, mode)


def unit(angles: Tensor, mode: str) -> Tensor:
    """:func:`georeparam._map.dispatch.unit` by the pure-torch map (``n ≥ 2``, promoted angles)."""
    if exporting():  # plain ops, no autograd.Function: the legacy exporter mis-wires multi-output ones
        return unit_forward_traced(angles, mode)[0]
    compiling = torch.compiler.is_compiling()
    fn = UnitVector if compiling else UnitVectorFwAD
    u, _ = call(fn, compiling, angles, mode)
    return u


def scaled_unit(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None] · u(angles)`` by the pure-torch map (``n ≥ 2``, promoted tensors)."""
    if exporting():  # see unit
        return unit_forward_traced(angles, mode, radius)[0]
    compiling = torch.compiler.is_compiling()
    fn = ScaledUnitVector if compiling else ScaledUnitVectorFwAD
    w, _, _ = call(fn, compiling, radius, angles, mode)
    return w
