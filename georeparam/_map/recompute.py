r"""The pure-torch GmP map as one recomputing autograd Function (issue 22, item 1).

``(radius, angles) → w = r·u(angles)`` with the compiled CPU kernel's structure (Note [The kernel]
in ``georeparam/_map/cpu.py``): the graph saves only the radius and the angles, the backward
recomputes the cosines' running product and runs one reverse scan. What every non-CPU device
gets where the Triton map does not run (CUDA without triton, CUDA under ``torch.compile`` or
``torch.func``, MPS, XPU, …), and the CPU with ``use_backend("recompute")`` (Note [Which
pure-torch map] in ``dispatch.py``).

Public (internal) names: :func:`scaled_unit`, :func:`weight`, :func:`weight_grads`,
:func:`block_elements`.

# Note [What the recompute saves]
The map it replaces (``_ScaledUnitVector``) saved ``u`` and the cosines' prefix product: two
tensors the size of the weight for the whole step (8 bytes per weight in float32), and its call
dispatched 64-67 aten ops forward and backward in exact mode, 61-66 in fast (a whole Linear step
84 / 81, standard 13; torch 2.13, counted as ``tests/test_map_recompute.py`` does). Here the graph
holds nothing but its inputs, which the parameters already hold: like weight norm's, the extra
memory of a step is the materialized weight and the temporaries of one block of rows at a time;
the call dispatches 56 ops in exact mode and 49 in fast for a one-block layer (the Linear step
72 / 69).

# Note [Recomputed backward]
With ``c_k = cos φ_k``, ``s_k = sin φ_k``, ``E_k = ∏_{j<k} c_j`` (``E_0 = 1``), the row is
``u = (s_0 E_0, …, s_{m-1} E_{m-1}, cos θ E_m, sin θ E_m)`` (``m = n − 2`` latitudes, θ last).
For a cotangent ``g`` of ``w = r·u``, with ``S_k = Σ_{i>k} g_i u_i`` (one reverse cumulative sum):

    ∂/∂r   = Σ_i g_i u_i
    ∂/∂φ_k = r·(g_k E_{k+1} − (s_k / c_k)·S_k)               (k < m)
    ∂/∂θ   = r·E_m·(g_{m+1} cos θ − g_m sin θ)

``S_k`` carries the factor ``c_k`` like every ``u_i`` after it, so the quotient is exact next to a
pole; a latitude's ``c_k`` is never exactly zero for a finite float angle (the float nearest π/2 has cosine
6e-17 in float64, -4e-8 in float32), and where ``E`` underflows, ``S_k`` is zero with it, so no
guard is needed. In ``exact`` mode the cosines, their product and the sums run in float64
(Note [Where float64 is needed] in ``georeparam/_map/torch_impl.py``); each output is rounded once.

The backward is written in out-of-place differentiable ops of the *inputs*, so
``create_graph=True`` differentiates it again (gradgradcheck), ``vmap`` batches it and
``torch.compile`` traces it. Forward-mode AD recomputes ``u`` and the prefix and uses the
pure-torch map's tangent formula (:func:`georeparam._map.torch_impl.unit_jvp`).

# Note [Blocks of rows for memory]
Out-of-place ops leave several weight-sized temporaries alive at a time (float64 ones in exact
mode: ~50 bytes per weight at the backward's peak; an MLP step's extra peak measured 8.7× (exact)
and 4.2× (fast) its parameter bytes in one block, with a first form of these ops). Eager first-order calls on plain tensors with more than :func:`block_elements` weights
(CPU: 2**15; elsewhere 2**22, where fewer launches matter more) run the rows in blocks, in
place (:func:`_weight_into`, :func:`_grads_into`: about 20 bytes per weight of one block live),
writing into the outputs. Measured (MLP 784-1024-1024-10, batch 256, the profiler's allocator
peak, ``benchmarks/speed.py``): extra peak of a step 0.4× the parameter bytes with blocks of
2**15 (as weight norm), 0.6 (exact) / 0.5 (fast) with 2**16; the map's fwd+bwd at 1024×1024 takes
~10 % longer with 2**15 than with 2**16 (more, smaller ops). A smaller weight, and every call under
``torch.compile``, ``torch.func`` or ``create_graph``, is one out-of-place block (fewest ops; the
compiler fuses the passes; a transform needs one graph).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import direct_apply, exporting, functorch_active, is_plain
from .modes import compute_dtype
from .torch_impl import unit_forward_traced as u_and_prefix
from .torch_impl import batch_first, unit_jvp

__all__ = ["scaled_unit", "weight", "weight_grads", "block_elements"]

_CPU_BLOCK_ELEMENTS = 1 << 15
_OTHER_BLOCK_ELEMENTS = 1 << 22


def block_elements(device: torch.device) -> int:
    """Elements per block of rows for an eager first-order call (Note [Blocks of rows for memory])."""
    return _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _OTHER_BLOCK_ELEMENTS


# Note [The last angle as a latitude]
# With φ'_m = π/2 − θ the row is one uniform latitude row: ``u_k = s'_k·E'_k`` (k ≤ m) and
# ``u_{n-1} = E'_{n-1}``, where ``s' = sin φ'``, ``c' = cos φ'`` and ``E'_k = ∏_{j<k} c'_j``
# (``s'_m = sin(π/2 − θ) = cos θ``, ``c'_m = sin θ``). Forward and backward then run over whole
# rows with no slicing of the last pair: about half the ops of the split form, and the same
# gradient formula for every angle (``∂/∂θ = −∂/∂φ'_m``). ``π/2 − θ`` itself is never formed (it
# would round by half an ulp of θ, 2e-10 for a float64 θ drifted to 3e6, far more in float32):
# the sines and cosines are taken of the angles and the last column's pair is swapped, by a
# ``where`` with a cached mask per fan-in (out of place) or a column copy (in place).
_LAST: Dict[Tuple[int, torch.dtype, torch.device], Tuple[Tensor, Tensor]] = {}


def _last(angles: Tensor) -> Tuple[Tensor, Tensor]:
    """``(last, sign)``: a mask of the last angle and ``(1, …, 1, −1)`` in the angles' dtype."""
    compiling = torch.compiler.is_compiling()  # a traced graph builds them itself (no global state)
    key = (angles.shape[-1], angles.dtype, angles.device)
    got = None if compiling else _LAST.get(key)
    if got is None:
        m = angles.shape[-1] - 1
        like = dict(dtype=angles.dtype, device=angles.device)
        sign = torch.cat([torch.ones(m, **like), torch.full((1,), -1.0, **like)])
        got = (sign < 0, sign)
        if not compiling:
            _LAST[key] = got
    return got


def _parts(angles: Tensor, mode: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(last, sign, s', c', E')`` of Note [The last angle as a latitude]: ``s'``, ``c'``
    ``(..., n-1)`` and ``E'`` ``(..., n)`` in the compute dtype (``s'`` of the latitudes rounded to
    the angles' dtype)."""
    last, sign = _last(angles)
    s = torch.sin(angles)
    c = torch.cos(angles.to(compute_dtype(angles.dtype, mode)))
    s, c = torch.where(last, c, s), torch.where(last, s, c)
    E = torch.cumprod(F.pad(c, (1, 0), value=1.0), -1)
    return last, sign, s, c, E


def _swapped(angles: Tensor, mode: str) -> Tuple[Tensor, Tensor]:
    """``(s', c')`` of one block ``(rows, n-1)`` as new tensors (``s'`` in the angles' dtype)."""
    s = torch.sin(angles)
    c = torch.cos(angles.to(compute_dtype(angles.dtype, mode)))
    sin_theta = s[:, -1:].clone()
    s[:, -1:].copy_(c[:, -1:])
    c[:, -1:].copy_(sin_theta)
    return s, c


def _last_angle_grad(g: Tensor, s: Tensor, E: Tensor) -> Tensor:
    """``∂/∂φ'_m = g_m E'_{m+1} − s'_m g_{m+1} E'_m`` ``(..., 1)``, without the quotient: its
    ``c'_m = sin θ`` is exactly 0 at θ = 0 (Note [Recomputed backward] needs ``c_k ≠ 0``)."""
    return g[..., -2:-1] * E[..., -1:] - s[..., -1:] * g[..., -1:] * E[..., -2:-1]


def weight(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None]·u(angles)`` in the angles' dtype, out of place (one block)."""
    _, _, s, _, E = _parts(angles, mode)
    return (F.pad(s, (0, 1), value=1.0) * E * radius.unsqueeze(-1)).to(angles.dtype)


def weight_grads(radius: Tensor, angles: Tensor, g: Tensor, mode: str) -> Tuple[Tensor, Tensor]:
    """``(∂/∂radius, ∂/∂angles)`` of ``⟨g, w⟩``, recomputed from the inputs (Note [Recomputed
    backward], in the uniform form of Note [The last angle as a latitude])."""
    last, sign, s, c, E = _parts(angles, mode)
    gu = g * (F.pad(s, (0, 1), value=1.0) * E)
    S = gu[..., 1:].flip(-1).cumsum(-1).flip(-1)  # S_k = Σ_{i>k} g_i u_i
    lat = torch.addcmul(g[..., :-1] * E[..., 1:], s / torch.where(last, 1.0, c), S, value=-1)
    grad = torch.cat([lat[..., :-1], _last_angle_grad(g, s, E)], -1)
    grad_angles = grad * (radius.unsqueeze(-1) * sign)
    return gu.sum(-1).to(radius.dtype), grad_angles.to(angles.dtype)


def _blocked(radius: Tensor, angles: Tensor, *more: Tensor) -> Optional[int]:
    """Rows per block when this call takes the in-place blocked path, else ``None`` (one
    out-of-place block: autograd recording, a transform, compile or export)."""
    n = angles.shape[-1] + 1
    if torch.is_grad_enabled() or not is_plain(radius, angles, *more) or exporting():
        return None
    return max(1, block_elements(angles.device) // n)


def _weight_into(radius: Tensor, angles: Tensor, mode: str, out: Tensor) -> None:
    """:func:`weight` of one block of rows ``(rows, n-1)`` written into ``out``; about three
    block-sized temporaries live at a time (Note [Blocks of rows for memory])."""
    s, c = _swapped(angles, mode)
    E = torch.cumprod(F.pad(c, (1, 0), value=1.0), -1)
    del c
    E[:, :-1].mul_(s)
    torch.mul(E, radius.unsqueeze(-1), out=out)


def _grads_into(radius: Tensor, angles: Tensor, g: Tensor, mode: str, grad_r: Tensor, grad_angles: Tensor) -> None:
    """:func:`weight_grads` of one block of rows written into ``grad_r``, ``grad_angles``."""
    _, sign = _last(angles)
    s, c = _swapped(angles, mode)
    E = torch.cumprod(F.pad(c, (1, 0), value=1.0), -1)
    grad = g[:, :-1] * E[:, 1:]  # g_k E'_{k+1}
    lon = _last_angle_grad(g, s, E)
    c[:, -1:].fill_(1.0)  # the last column's quotient is not used (sin θ may be 0)
    tan = c.reciprocal_().mul_(s)  # s'_k / c'_k
    E[:, :-1].mul_(s)
    del s, c
    gu = E.mul_(g)
    grad_r.copy_(gu.sum(-1))
    S = gu[:, 1:].flip(-1)
    del gu, E
    S = S.cumsum_(-1).flip(-1)  # S_k = Σ_{i>k} g_i u_i
    grad.addcmul_(tan, S, value=-1)
    del S, tan
    grad[:, -1:].copy_(lon)
    torch.mul(grad, radius.unsqueeze(-1) * sign, out=grad_angles)


def _forward(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    step = _blocked(radius, angles)
    n = angles.shape[-1] + 1
    if step is None or angles.numel() // (n - 1) <= step:  # one block: out of place, fewer ops
        return weight(radius, angles, mode)
    a, r = angles.reshape(-1, n - 1), radius.reshape(-1)
    w = a.new_empty(a.shape[0], n)
    for a_b, r_b, w_b in zip(a.split(step), r.split(step), w.split(step)):
        _weight_into(r_b, a_b, mode, w_b)
    return w.reshape(angles.shape[:-1] + (n,))


def _backward(radius: Tensor, angles: Tensor, g: Tensor, mode: str) -> Tuple[Tensor, Tensor]:
    step = _blocked(radius, angles, g)
    n = angles.shape[-1] + 1
    if step is None or angles.numel() // (n - 1) <= step:
        return weight_grads(radius, angles, g, mode)
    a, r, gg = angles.reshape(-1, n - 1), radius.reshape(-1), g.reshape(-1, n)
    ga, gr = torch.empty_like(a), torch.empty_like(r)
    for a_b, r_b, g_b, ga_b, gr_b in zip(a.split(step), r.split(step), gg.split(step), ga.split(step), gr.split(step)):
        _grads_into(r_b, a_b, g_b, mode, gr_b, ga_b)
    return gr.reshape(radius.shape), ga.reshape(angles.shape)


def _vmap_rule(fn, info, in_dims, radius: Tensor, angles: Tensor, mode: str):
    """vmap rule (Note [vmap rule] in ``torch_impl.py``), one output."""
    return fn.apply(*batch_first(info, in_dims, radius, angles), mode), 0


class ScaledUnitRecompute(torch.autograd.Function):
    """``(radius (...), angles (..., n-1), mode) → r·u`` saving only its inputs (Note [What the
    recompute saves]); no ``jvp``, so that dynamo traces it (Note [Forward mode and compile] in
    ``georeparam/_map/torch_impl.py``)."""

    @staticmethod
    def forward(radius: Tensor, angles: Tensor, mode: str) -> Tensor:  # type: ignore[override]
        return _forward(radius, angles, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        radius, angles, mode = inputs
        ctx.save_for_backward(radius, angles)
        ctx.mode = mode

    @staticmethod
    def backward(ctx, grad_w: Tensor):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        grad_r, grad_angles = _backward(radius, angles, grad_w, ctx.mode)
        return grad_r, grad_angles, None

    @staticmethod
    def vmap(info, in_dims, radius: Tensor, angles: Tensor, mode: str):  # type: ignore[override]
        return _vmap_rule(ScaledUnitRecompute, info, in_dims, radius, angles, mode)


class ScaledUnitRecomputeFwAD(ScaledUnitRecompute):
    """:class:`ScaledUnitRecompute` with forward-mode AD (eager only)."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ScaledUnitRecompute.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def jvp(ctx, d_radius: Optional[Tensor], d_angles: Optional[Tensor], _):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        u, prefix = u_and_prefix(angles, ctx.mode)
        dw = torch.zeros_like(u) if d_angles is None else radius.unsqueeze(-1) * unit_jvp(d_angles, u, prefix)[0]
        return dw if d_radius is None else dw + d_radius.unsqueeze(-1) * u

    @staticmethod
    def vmap(info, in_dims, radius: Tensor, angles: Tensor, mode: str):  # type: ignore[override]
        return _vmap_rule(ScaledUnitRecomputeFwAD, info, in_dims, radius, angles, mode)


def scaled_unit(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None]·u(angles)`` by the recomputing Function (``n ≥ 2``, tensors already
    promoted to float32/float64, ``mode`` already checked). Under ``torch.export`` / a jit trace:
    plain out-of-place ops without a Function (Note [Export without cumprod] in ``torch_impl.py``)."""
    if exporting():
        return u_and_prefix(angles, mode, radius)[0]
    compiling = torch.compiler.is_compiling()
    fn = ScaledUnitRecompute if compiling else ScaledUnitRecomputeFwAD
    if direct_apply() and not compiling and not functorch_active():
        # Note [Calling the Function] in _compat.py: skip apply's Python argument binding
        return super(torch.autograd.Function, fn).apply(radius, angles, mode)  # type: ignore[misc]
    return fn.apply(radius, angles, mode)
