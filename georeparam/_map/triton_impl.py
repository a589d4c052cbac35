r"""A fused GPU map in Triton: one forward and one recomputing backward kernel per layer
(issue 22, item 2).

``(radius (rows,), angles (rows, n-1)) → w = r·u(angles)``: one program per row, the fan-in in
blocks of ``BLOCK`` angles, the cosines' running product carried from block to block as a scan.
Everything in float64 inside whatever the storage dtype (both modes, as the CPU kernel: Note [The
kernel] in ``georeparam/_kernel.py``), rounded once on the store. The graph saves only the
inputs; the backward recomputes.

Public (internal) names: :func:`available`, :func:`applies`, :func:`scaled_unit`,
:func:`status`. The dispatcher calls ``scaled_unit`` where ``applies(radius, angles)``; otherwise
(no Triton, not CUDA, ``torch.compile``, ``torch.func``, export, subclasses) the pure-torch
recomputing map (:mod:`georeparam._map.recompute`) runs.

# Note [The Triton kernels]
Both kernels use the uniform row of Note [The last angle as a latitude] (``recompute.py``):
``u_k = s'_k E'_k`` for ``k < n-1`` and ``u_{n-1} = E'_{n-1}`` with ``E'_k = ∏_{j<k} c'_j``, where
``(s', c')`` are the latitudes' ``(sin, cos)`` and, for the last angle θ, ``(cos θ, sin θ)``
(computed once per row as scalars). A program handles output positions ``k0 … k0+BLOCK-1`` of a row
at a time: it loads the angles at ``k`` (for ``s'_k``) and at ``k-1`` (for the exclusive product's
factor), takes ``E' = carry · cumprod(cos φ'_{k-1})`` in the block and carries the last lane on.

* forward: one pass, ``w_k = r·s'_k·E'_k`` stored straight out.
* backward: pass 1 walks the blocks forward and stores each block's incoming ``E'`` (one float64
  per block and row: 1/BLOCK of the weight); pass 2 walks them backward, recomputes ``E'`` from
  that carry, and runs the reverse scan ``S_k = Σ_{i>k} g_i u_i`` as an in-block reverse
  ``cumsum`` of the next position's terms plus a running suffix, so ``S_k`` is accurate relative
  to its own size (as the CPU kernel's reverse recurrence; an ``inclusive − own`` or
  ``total − prefix`` form cancels next to a pole or the end of a row). Then
  ``∂/∂φ'_k = r·(g_k E'_{k+1} − (s'_k / c'_k)·S_k)`` (Note [Recomputed backward]), the last angle
  by its own formula without the quotient and with its sign flipped, and ``∂/∂r = Σ g_i u_i``.
  Four sines/cosines per weight (the forward two).

# Note [What the interpreter shows]
``TRITON_INTERPRET=1`` runs these kernels in numpy on CPU tensors; ``tests/test_map_triton.py``
checks values and gradients against the pure-torch map that way. It cannot show: speed, the
generated GPU code (register pressure, vectorization, libdevice's float64 sin/cos and its
accuracy on the device), float64 throughput (1/64 of float32 on consumer GPUs), or anything
about concurrency (the kernels use no atomics: one program owns a row). Those need a GPU:
``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import recompute
from ._compat import exporting, fast_paths, functorch_active, is_plain, paired

_KERNELS = None  # the module georeparam._map.triton_kernels once imported
_IMPORT_ERROR: Optional[str] = None
_ENABLED = fast_paths()  # GEOREPARAM_NO_FAST_PATHS=1 leaves only the pure-torch map (Note [One switch])


def _kernels():
    """The kernels module, imported on first use; ``None`` (and the reason kept) without triton."""
    global _KERNELS, _IMPORT_ERROR
    if _KERNELS is None and _IMPORT_ERROR is None:
        try:
            from . import triton_kernels
        except Exception as e:  # ImportError, or a broken install
            _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        else:
            _KERNELS = triton_kernels
    return _KERNELS


__all__ = ["available", "applies", "scaled_unit", "status", "set_enabled"]

BLOCK: Optional[int] = None  # angles per block; None: min(1024, next power of two ≥ n). Tests set it.
_DTYPES = (torch.float32, torch.float64)
_HALF_PI = math.pi / 2


def available() -> bool:
    """Whether triton imports (importing it on the first call)."""
    return _kernels() is not None


def set_enabled(on: bool) -> bool:
    """Turn the Triton map on or off for :func:`applies` (benchmarks time both GPU paths); returns
    the previous setting."""
    global _ENABLED
    was, _ENABLED = _ENABLED, bool(on)
    return was


def status() -> str:
    """One line: used for CUDA tensors, or why not."""
    if _kernels() is None:
        return f"off (triton is not importable: {_IMPORT_ERROR}): the pure-torch map runs on CUDA"
    mode = " (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    off = "" if _ENABLED else ", turned off by set_enabled(False)"
    return f"triton {_KERNELS.triton.__version__}{mode}: used for CUDA float32/float64 tensors{off}"


def applies(radius: Tensor, angles: Tensor) -> bool:
    """Whether :func:`scaled_unit` takes these (already promoted) tensors: Triton present, CUDA,
    float32/float64, ``radius`` of shape ``angles.shape[:-1]`` on the same device and dtype, eager
    and plain (no ``torch.compile``, ``torch.func`` transform, export or subclass)."""
    if not _ENABLED or angles.device.type != "cuda" or angles.dtype not in _DTYPES:
        return False
    if angles.shape[-1] < 1 or not paired(radius, angles):
        return False
    if functorch_active() or exporting() or not is_plain(radius, angles):
        return False
    return _kernels() is not None


def _block(n: int) -> int:
    return BLOCK if BLOCK is not None else min(1024, 1 << max(0, n - 1).bit_length())


def _forward(radius: Tensor, angles: Tensor) -> Tensor:
    rows, n = angles.shape[0], angles.shape[1] + 1
    w = angles.new_empty(rows, n)
    if rows:
        _KERNELS.gmp_fwd[(rows,)](angles, radius, w, n, BLOCK=_block(n))
    return w


def _backward(radius: Tensor, angles: Tensor, grad_w: Tensor):
    rows, n = grad_w.shape
    g = grad_w.to(angles.dtype).contiguous()
    ga, gr = torch.empty_like(angles), torch.empty_like(radius)
    block = _block(n)
    n_blocks = -(-n // block)
    carry = torch.empty(rows, n_blocks, dtype=torch.float64, device=angles.device)
    if rows:
        _KERNELS.gmp_bwd[(rows,)](angles, radius, g, ga, gr, carry, n, n_blocks, BLOCK=block)
    return gr, ga


class _ScaledUnitTriton(torch.autograd.Function):
    """``(radius (rows,), angles (rows, n-1), mode) → r·u`` by the Triton kernels; saves only its
    inputs. A backward that is itself differentiated (``create_graph``) and forward-mode AD run
    the pure-torch recomputing formulas on the same inputs."""

    @staticmethod
    def forward(ctx, radius: Tensor, angles: Tensor, mode: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(radius, angles)
        ctx.save_for_forward(radius, angles)
        ctx.mode = mode
        return _forward(radius, angles)

    @staticmethod
    def backward(ctx, grad_w: Tensor):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable formulas
            grad_r, grad_angles = recompute.weight_grads(radius, angles, grad_w, ctx.mode)
        else:
            grad_r, grad_angles = _backward(radius, angles, grad_w)
        return grad_r, grad_angles, None

    @staticmethod
    def jvp(ctx, d_radius: Optional[Tensor], d_angles: Optional[Tensor], _):  # type: ignore[override]
        return recompute.ScaledUnitRecomputeFwAD.jvp(ctx, d_radius, d_angles, _)


def scaled_unit(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None]·u(angles)`` by the Triton kernels (``n ≥ 2``; promoted float32/float64
    tensors; ``mode`` checked: both modes compute in float64). Any device Triton can launch on
    (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); :func:`applies` says when to call it."""
    if _kernels() is None:
        raise RuntimeError(
            f"georeparam's Triton map needs triton. Got: {_IMPORT_ERROR}. Install triton or use the pure-torch map."
        )
    n = angles.shape[-1] + 1
    lead = angles.shape[:-1]
    rows = math.prod(lead)
    a = angles.reshape(rows, n - 1).contiguous()
    r = radius.reshape(rows).contiguous()
    return _ScaledUnitTriton.apply(r, a, mode).reshape(lead + (n,))
