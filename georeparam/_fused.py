r"""The GmP map ``(radius, latitude angles) → r·u`` as autograd Functions: the library's hot path.

:mod:`georeparam.coords` holds the public, pure maps; this module makes them fast and is what
:mod:`georeparam.parametrization` calls (:func:`scaled_unit`, :func:`check_mode`).

Two implementations, one contract (values and gradients agree to rounding; ``tests/test_kernel.py``):

* the compiled kernel (:mod:`georeparam._kernel`, Note [The kernel]) through
  :class:`_ScaledUnitKernel` below: plain CPU float32 tensors in eager mode, first-order
  gradients. Everything in float64 inside, one pass forward, one recomputing pass backward, no
  saved activations besides the inputs.
* the pure-torch map (:mod:`georeparam._torch_map`, with the table of modes): everything else (CUDA and other devices, ``torch.compile``,
  ``torch.func`` transforms, higher-order gradients, tensor subclasses), and everywhere when
  the kernel cannot be built or ``GEOREPARAM_NO_FAST_PATHS=1`` is set.

# Note [One switch]
``GEOREPARAM_NO_FAST_PATHS=1`` turns off, at import, everything that leans on more than torch's
public API: the compiled kernel, numpy's sines, the helper thread and the direct C++
``Function.apply`` (Note [Calling the Function]). What is left is the pure-torch map through
public ``torch.autograd.Function.apply``; CI runs the map's tests a second time that way, so a
torch upgrade that breaks an internal has a tested fallback.
"""


from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _kernel
from ._torch_map import (
    MODES,
    Mode,
    check_mode,
    compute_dtype,
    direct_apply,
    exporting,
    fast_paths,
    functorch_active,
    is_plain,
    scaled_unit_torch,
    u_and_prefix,
    unit_backward,
    unit_jvp,
    unit_torch,
    work_dtype,
)

__all__ = ["MODES", "Mode", "check_mode", "compute_dtype", "unit", "scaled_unit", "kernel_status", "fast_paths"]

_USE_KERNEL = fast_paths()  # tests turn the kernel off alone to exercise the pure-torch map
# Note [float64 stays on the pure-torch map]
# The kernel has a float64 variant (tested to agree within 1e-12), but float64 parameters keep
# the pure-torch map: float64 runs are the library's references (the optimizer wrapper's
# trajectory identity is tested to 1e-8 after 200 chaotic SGD steps, where any change of
# rounding, 1 ulp at a step, grows to 5e-9 … 1.5e-8), and float32 is where speed matters.
_KERNEL_DTYPES: Tuple[torch.dtype, ...] = (torch.float32,)


def unit(angles: Tensor, mode: str = "exact") -> Tensor:
    """Latitude angles (..., n-1) → unit vectors (..., n) in the dtype of ``angles``; ``n = 1`` gives ones.

    Half-precision angles are evaluated in float32 and the result is cast back. Always the
    pure-torch map (training runs :func:`scaled_unit`).
    """
    check_mode(mode)
    n = angles.shape[-1] + 1
    if n == 1:
        return torch.ones(angles.shape[:-1] + (1,), dtype=angles.dtype, device=angles.device)
    return unit_torch(angles.to(work_dtype(angles.dtype)), mode).to(angles.dtype)


# ---------------------------------------------------------------------------------------------
# The compiled kernel's autograd Function
# ---------------------------------------------------------------------------------------------

# Note [Kernel threads]
# Below 2**16 weights one thread does it all (handing over costs more than it saves). Above,
# the rows are split over torch.get_num_threads() threads:
# * where the kernel was built with OpenMP (Linux, GCC: the library then needs libgomp.so.1,
#   which resolves to the copy torch's CPU build already loaded), inside one call, on torch's own
#   OpenMP pool. Measured with Python threads instead (2 threads, wall time): a matmul's OpenMP
#   workers keep spinning for a while after it, and Python threads started right then competed
#   with them for the two cores: the map after weight norm's took 3.7× its time, after itself 2.2×;
# * otherwise on a small pool of Python threads (ctypes releases the GIL; the caller runs one
#   range itself), created on first use and forgotten in a forked child.
# Every split gives the same bits (rows are independent; tests/test_kernel.py).
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_PARALLEL_MIN_ELEMENTS = 1 << 16
_USE_OPENMP = True  # tests turn it off to exercise the Python pool


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="georeparam-kernel")
        _POOL_SIZE = workers
    return _POOL


def _forget_pool() -> None:
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _over_rows(lib, call, rows: int, n: int) -> None:
    """``call(r0, r1, threads)`` over ``[0, rows)`` (Note [Kernel threads])."""
    threads = min(torch.get_num_threads(), max(1, rows // 4))
    if threads <= 1 or rows * n < _PARALLEL_MIN_ELEMENTS:
        threads = 1
    if threads == 1 or (_USE_OPENMP and lib.gmp_openmp()):
        if call(0, rows, threads):
            raise MemoryError("georeparam's kernel could not allocate its scratch rows")
        return
    per = -(-rows // threads)
    per += (-per) % 4  # ranges of whole multiples of four rows (any split is exact)
    bounds = [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]
    futures = [_pool(len(bounds) - 1).submit(call, r0, r1, 1) for r0, r1 in bounds[1:]]
    bad = call(*bounds[0], 1)
    bad = any([f.result() for f in futures]) or bad
    if bad:
        raise MemoryError("georeparam's kernel could not allocate its scratch rows")


def _kernel_forward(lib, radius: Tensor, angles: Tensor) -> Tensor:
    rows, n = angles.shape[0], angles.shape[1] + 1
    w = angles.new_empty(rows, n)
    fn = lib.gmp_forward_f32 if angles.dtype == torch.float32 else lib.gmp_forward_f64
    a, r, o = angles.data_ptr(), radius.data_ptr(), w.data_ptr()
    _over_rows(lib, lambda r0, r1, th: fn(a, r, o, r0, r1, n, th), rows, n)
    return w


def _kernel_backward(lib, radius: Tensor, angles: Tensor, grad_w: Tensor) -> Tuple[Tensor, Tensor]:
    rows, n = grad_w.shape
    g = grad_w.to(angles.dtype).contiguous()
    ga = torch.empty_like(angles)
    gr = torch.empty_like(radius)
    fn = lib.gmp_backward_f32 if angles.dtype == torch.float32 else lib.gmp_backward_f64
    a, r, gp, gap, grp = angles.data_ptr(), radius.data_ptr(), g.data_ptr(), ga.data_ptr(), gr.data_ptr()
    _over_rows(lib, lambda r0, r1, th: fn(a, r, gp, gap, grp, r0, r1, n, th), rows, n)
    return gr, ga


class _ScaledUnitKernel(torch.autograd.Function):
    """``(radius (rows,), angles (rows, n-1)) → r·u`` by the compiled kernel (Note [The kernel]).

    Saves only its inputs; the backward recomputes. A backward that is itself differentiated
    (``create_graph=True``) and forward-mode AD run the pure-torch formulas on the same inputs.
    """

    @staticmethod
    def forward(ctx, radius: Tensor, angles: Tensor, mode: str, lib) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(radius, angles)
        ctx.save_for_forward(radius, angles)
        ctx.mode, ctx.lib = mode, lib
        return _kernel_forward(lib, radius, angles)

    @staticmethod
    def backward(ctx, grad_w: Tensor):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable formulas (Note [Backward without the cumprod graph])
            u, prefix = u_and_prefix(angles, ctx.mode)
            grad_angles, grad_r = unit_backward(grad_w, None, u, prefix, scale=radius)
            return grad_r, grad_angles, None, None
        grad_r, grad_angles = _kernel_backward(ctx.lib, radius, angles, grad_w)
        return grad_r, grad_angles, None, None

    @staticmethod
    def jvp(ctx, d_radius: Optional[Tensor], d_angles: Optional[Tensor], *_):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        u, prefix = u_and_prefix(angles, ctx.mode)
        dw = torch.zeros_like(u) if d_angles is None else radius.unsqueeze(-1) * unit_jvp(d_angles, u, prefix)[0]
        return dw if d_radius is None else dw + d_radius.unsqueeze(-1) * u


def _kernel_for(radius: Tensor, angles: Tensor):
    """The loaded kernel if it applies to these (already promoted) tensors, else ``None``."""
    if not _USE_KERNEL or angles.device.type != "cpu" or angles.dtype not in _KERNEL_DTYPES:
        return None
    if radius.dtype != angles.dtype or radius.device != angles.device or tuple(radius.shape) != tuple(angles.shape)[:-1]:
        return None
    if angles.numel() == 0 or functorch_active() or exporting() or not is_plain(radius, angles):
        return None
    return _kernel.load()


def kernel_status() -> str:
    """Whether the compiled kernel is used, and if not, why (one line)."""
    if not fast_paths():
        return "off (GEOREPARAM_NO_FAST_PATHS is set): the pure-torch map is used"
    _kernel.load()
    return _kernel.status()


def scaled_unit(radius: Tensor, angles: Tensor, mode: str = "exact") -> Tensor:
    """``radius[..., None] · u(angles)``, the rows of a GmP weight, in the dtype of ``angles``.

    Same values as ``radius.unsqueeze(-1) * unit(angles, mode)`` with a cheaper backward: the
    compiled kernel where it applies (:func:`_kernel_for`), else the pure-torch map
    (:func:`georeparam._torch_map.scaled_unit_torch`).

    Example:
        >>> r, a = torch.tensor([2.0]), torch.tensor([[0.0, 0.0]])
        >>> scaled_unit(r, a)   # φ = 0, θ = 0: the direction e_2
        tensor([[0., 2., 0.]])
    """
    check_mode(mode)
    n = angles.shape[-1] + 1
    if n == 1:
        return radius.unsqueeze(-1).to(angles.dtype)
    work = work_dtype(torch.promote_types(angles.dtype, radius.dtype))
    r, a = radius.to(work), angles.to(work)
    lib = _kernel_for(r, a)
    if lib is not None:
        lead = a.shape[:-1]
        flat = a.dim() != 2
        if flat:
            rows = math.prod(lead)
            a, r = a.reshape(rows, n - 1), r.reshape(rows)
        a, r = a.contiguous(), r.contiguous()
        if direct_apply():
            w = super(torch.autograd.Function, _ScaledUnitKernel).apply(r, a, mode, lib)  # type: ignore[misc]
        else:
            w = _ScaledUnitKernel.apply(r, a, mode, lib)
        return (w.reshape(lead + (n,)) if flat else w).to(angles.dtype)
    return scaled_unit_torch(r, a, mode).to(angles.dtype)
