r"""The compiled CPU kernel as a backend: its autograd Function, and rows split over threads.

:mod:`georeparam._map.build` compiles and loads the C source (``kernel/gmp.c``); this module calls
it on the tensors' memory through :mod:`ctypes`. :func:`applies` says where it runs (plain CPU
float32 tensors in eager mode: Note [float64 stays on the pure-torch map]); first-order
gradients by the kernel, double backward and forward mode by the pure-torch formulas.

# Note [The kernel]
Everything in float64 whatever the storage dtype, rounded once:

* sines and cosines by own branch-free polynomials in a loop the compiler vectorizes: float64
  angles by fdlibm's kernel after a three-part Cody–Waite reduction (|error| ≤ ~2e-16), float32
  angles in float with the cosine carried as 1 − cos (Note [float32 angles] in ``kernel/gmp.c``);
  a chunk of angles all within ±π/4 skips the reduction (Note [Small angles]); a row with an
  angle beyond the polynomial's range (1e6, float32: 4096) or not finite takes libm's
  ``sin``/``cos`` instead;
* forward, one row at a time in chunks of 256 angles (their sines and cosines stay in L1):
  ``E_k = ∏_{j<k} cos φ_j`` by a running product on blocks of eight (Note [Blocks of eight]),
  ``w_k = r·sin φ_k·E_k`` (then the last pair ``r·E_m·(cos θ, sin θ)``), written straight out;
* backward recomputes the sines/cosines and ``E`` (nothing is saved but the inputs: extra memory
  like weight norm's) and runs one reverse recurrence ``R_{k-1} = g_k sin φ_k + cos φ_k R_k``
  (``R_{m-1} = g_m cos θ + g_{m+1} sin θ``), so that
  ``∂/∂φ_k = r·E_k·(g_k cos φ_k − sin φ_k R_k)``, ``∂/∂θ = r·E_m·(g_{m+1} cos θ − g_m sin θ)``
  and ``∂/∂r = R_{-1} = Σ g_i u_i``. There is no division: the pole's ``1/cos φ`` of the
  ``tan φ`` form never appears, so the gradient is exact next to the poles too.

Measured (``benchmarks/speed.py``, 1 thread): the first version ran the two scans as scalar
chains, four rows side by side, over float64 scratch rows; the scan was then about a third of
the forward. Blocks of eight and chunks took the kernel from ~2.7 + 4.1 ns to ~1.4 + 2.1 ns per
weight (forward + backward, 512×4608, uniform angles), the float32 reduction ~0.3 ns of that;
on random-init rows (1024×784) it runs at ~1.0 + 1.6 ns with Note [Small angles].
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import build
from ._compat import FAST_PATHS, apply_direct, direct_apply, exporting, functorch_active, is_plain, paired
from .pool import LazyPool
from .torch_impl import unit_backward, unit_forward_traced, unit_jvp

__all__ = ["applies", "takes", "scaled_unit", "ScaledUnitKernel", "kernel_dtypes", "KERNEL_DTYPES"]

# Note [float64 stays on the pure-torch map]
# The kernel has a float64 variant (tested to agree within 1e-12), but float64 parameters keep
# the pure-torch map: float64 runs are the library's references (the optimizer wrapper's
# trajectory identity is tested to 1e-8 after 200 chaotic SGD steps, where any change of
# rounding, 1 ulp at a step, grows to 5e-9 … 1.5e-8), and float32 is where speed matters.
KERNEL_DTYPES: Tuple[torch.dtype, ...] = (torch.float32,)


@contextlib.contextmanager
def kernel_dtypes(*dtypes: torch.dtype) -> Iterator[None]:
    """Within the block the kernel takes these dtypes (tests run its float64 variant this way)."""
    global KERNEL_DTYPES
    saved, KERNEL_DTYPES = KERNEL_DTYPES, tuple(dtypes)
    try:
        yield
    finally:
        KERNEL_DTYPES = saved


# Note [Kernel threads]
# Below 2**16 weights one thread does it all (handing over costs more than it saves). Above,
# the rows are split over torch.get_num_threads() threads:
# * where the kernel was built with OpenMP (Linux, GCC: the library then needs libgomp.so.1,
#   which resolves to the copy torch's CPU build already loaded), inside one call, on torch's own
#   OpenMP pool. Measured with Python threads instead (2 threads, wall time): a matmul's OpenMP
#   workers keep spinning for a while after it, and Python threads started right then competed
#   with them for the two cores: the map after weight norm's took 3.7× its time, after itself 2.2×;
# * otherwise on a small pool of Python threads (ctypes releases the GIL; the caller runs one
#   range itself), created on first use and forgotten in a forked child (Note [Pools and fork]).
# Every split gives the same bits (rows are independent; tests/test_map_cpu.py).
PARALLEL_MIN_ELEMENTS = 1 << 16
USE_OPENMP = True  # tests turn it off to exercise the Python pool
_POOL = LazyPool("georeparam-kernel")


def _over_rows(lib, call, rows: int, n: int) -> None:
    """``call(r0, r1, threads)`` over ``[0, rows)`` (Note [Kernel threads])."""
    threads = min(torch.get_num_threads(), max(1, rows // 4))
    if threads <= 1 or rows * n < PARALLEL_MIN_ELEMENTS:
        threads = 1
    if threads == 1 or (USE_OPENMP and lib.gmp_openmp()):
        if call(0, rows, threads):
            raise MemoryError("georeparam's kernel could not allocate its scratch rows")
        return
    per = -(-rows // threads)
    per += (-per) % 4  # ranges of whole multiples of four rows (any split is exact)
    bounds = [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]
    futures = [_POOL.get(len(bounds) - 1).submit(call, r0, r1, 1) for r0, r1 in bounds[1:]]
    bad = call(*bounds[0], 1)
    bad = any([f.result() for f in futures]) or bad
    if bad:
        raise MemoryError("georeparam's kernel could not allocate its scratch rows")


def kernel_forward(lib, radius: Tensor, angles: Tensor) -> Tensor:
    """``r·u`` ``(rows, n)`` of contiguous ``radius`` ``(rows,)`` and ``angles`` ``(rows, n-1)``."""
    rows, n = angles.shape[0], angles.shape[1] + 1
    w = angles.new_empty(rows, n)
    fn = lib.gmp_forward_f32 if angles.dtype == torch.float32 else lib.gmp_forward_f64
    a, r, o = angles.data_ptr(), radius.data_ptr(), w.data_ptr()
    _over_rows(lib, lambda r0, r1, th: fn(a, r, o, r0, r1, n, th), rows, n)
    return w


def kernel_backward(lib, radius: Tensor, angles: Tensor, grad_w: Tensor) -> Tuple[Tensor, Tensor]:
    """``(∂/∂radius, ∂/∂angles)`` of ``⟨grad_w, r·u⟩`` (same shapes as :func:`kernel_forward`'s)."""
    rows, n = grad_w.shape
    g = grad_w.to(angles.dtype).contiguous()
    ga = torch.empty_like(angles)
    gr = torch.empty_like(radius)
    fn = lib.gmp_backward_f32 if angles.dtype == torch.float32 else lib.gmp_backward_f64
    a, r, gp, gap, grp = angles.data_ptr(), radius.data_ptr(), g.data_ptr(), ga.data_ptr(), gr.data_ptr()
    _over_rows(lib, lambda r0, r1, th: fn(a, r, gp, gap, grp, r0, r1, n, th), rows, n)
    return gr, ga


class ScaledUnitKernel(torch.autograd.Function):
    """``(radius (rows,), angles (rows, n-1)) → r·u`` by the compiled kernel (Note [The kernel]).

    Saves only its inputs; the backward recomputes. A backward that is itself differentiated
    (``create_graph=True``) and forward-mode AD run the pure-torch formulas on the same inputs.
    """

    @staticmethod
    def forward(ctx, radius: Tensor, angles: Tensor, mode: str, lib) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(radius, angles)
        ctx.save_for_forward(radius, angles)
        ctx.mode, ctx.lib = mode, lib
        return kernel_forward(lib, radius, angles)

    @staticmethod
    def backward(ctx, grad_w: Tensor):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable formulas (Note [Backward without the cumprod graph])
            u, prefix = unit_forward_traced(angles, ctx.mode)
            grad_angles, grad_r = unit_backward(grad_w, None, u, prefix, scale=radius)
            return grad_r, grad_angles, None, None
        grad_r, grad_angles = kernel_backward(ctx.lib, radius, angles, grad_w)
        return grad_r, grad_angles, None, None

    @staticmethod
    def jvp(ctx, d_radius: Optional[Tensor], d_angles: Optional[Tensor], *_):  # type: ignore[override]
        radius, angles = ctx.saved_tensors
        u, prefix = unit_forward_traced(angles, ctx.mode)
        dw = torch.zeros_like(u) if d_angles is None else radius.unsqueeze(-1) * unit_jvp(d_angles, u, prefix)[0]
        return dw if d_radius is None else dw + d_radius.unsqueeze(-1) * u


def takes(radius: Tensor, angles: Tensor) -> bool:
    """Whether the kernel can compute these (already promoted) tensors, eagerly or inside a
    compiled graph: fast paths on, CPU tensors of a kernel dtype (:data:`KERNEL_DTYPES`),
    :func:`paired`, and neither export nor a ``torch.func`` transform."""
    if not FAST_PATHS or angles.device.type != "cpu" or angles.dtype not in KERNEL_DTYPES:
        return False
    return paired(radius, angles) and not functorch_active() and not exporting()


def applies(radius: Tensor, angles: Tensor) -> bool:
    """Whether the kernel runs for these (already promoted) tensors: :func:`takes`, plain eager
    tensors, and the kernel built here."""
    return takes(radius, angles) and is_plain(radius, angles) and build.load() is not None


def scaled_unit(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None] · u(angles)`` by the kernel, where :func:`applies` holds (``n ≥ 2``)."""
    lib = build.load()
    n = angles.shape[-1] + 1
    lead = angles.shape[:-1]
    flat = angles.dim() != 2
    a, r = angles, radius
    if flat:
        rows = math.prod(lead)
        a, r = a.reshape(rows, n - 1), r.reshape(rows)
    a, r = a.contiguous(), r.contiguous()
    if direct_apply():
        w = apply_direct(ScaledUnitKernel, r, a, mode, lib)
    else:
        w = ScaledUnitKernel.apply(r, a, mode, lib)
    return w.reshape(lead + (n,)) if flat else w
