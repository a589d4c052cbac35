r"""The compiled CPU kernel inside ``torch.compile``: two ``torch.library`` custom ops.

Dynamo cannot trace the kernel's ``ctypes`` call, so a compiled graph used to run the pure-torch
map instead (float64 cosines, ``cumprod``/``cumsum`` fallbacks). Registered as the opaque ops
``georeparam::gmp_forward`` / ``georeparam::gmp_backward`` with shape-only fake kernels and an
autograd formula, the kernel runs inside the compiled graph too (inductor calls it as an external
kernel, like a matmul) and the rest of the step is still compiled around it.

Public (internal) names: :func:`available`, :func:`applies`, :func:`scaled_unit`.

# Note [The kernel in a compiled graph]
Measured (MLP 784-1024-1024-10, batch 256, SGD step, 1 thread, thread CPU time, inductor,
11 interleaved rounds, on the loaded 2-core AMD EPYC; ``/work``-style scratch script kept in
docs/speed.md): compiled GmP / compiled standard 2.08 → 1.54 in the paper's form and 1.26 in the
weight form, where eager GmP / eager standard reads 1.25–1.32; the cold compile of the GmP model
18 s → 10 s (paper form) and 4.6 s (weight form). Only first-order gradients: a compiled graph is
not differentiated twice (AOTAutograd does not support it), and ``torch.func`` transforms,
``torch.export`` and float64 keep the pure-torch map (Note [float64 stays on the pure-torch map]
in ``cpu.py``). Needs ``torch.library.custom_op`` (torch ≥ 2.4); older torch keeps the pure-torch
map under compile.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import build, cpu
from ._compat import FAST_PATHS, exporting, functorch_active

__all__ = ["available", "applies", "scaled_unit"]

_OPS = FAST_PATHS and hasattr(torch.library, "custom_op")

if _OPS:

    @torch.library.custom_op("georeparam::gmp_forward", mutates_args=())
    def gmp_forward(radius: Tensor, angles: Tensor) -> Tensor:
        """``r·u`` ``(rows, n)`` of ``radius`` ``(rows,)`` and ``angles`` ``(rows, n-1)`` by the kernel."""
        return cpu.kernel_forward(build.load(), radius.contiguous(), angles.contiguous())

    @gmp_forward.register_fake
    def _(radius: Tensor, angles: Tensor) -> Tensor:
        return angles.new_empty(angles.shape[0], angles.shape[1] + 1)

    @torch.library.custom_op("georeparam::gmp_backward", mutates_args=())
    def gmp_backward(radius: Tensor, angles: Tensor, grad_w: Tensor) -> Tuple[Tensor, Tensor]:
        """``(∂/∂radius, ∂/∂angles)`` of ``⟨grad_w, r·u⟩`` by the kernel."""
        return cpu.kernel_backward(build.load(), radius.contiguous(), angles.contiguous(), grad_w)

    @gmp_backward.register_fake
    def _(radius: Tensor, angles: Tensor, grad_w: Tensor) -> Tuple[Tensor, Tensor]:
        return radius.new_empty(radius.shape), angles.new_empty(angles.shape)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])

    def _backward(ctx, grad_w: Tensor):
        radius, angles = ctx.saved_tensors
        return gmp_backward(radius, angles, grad_w)

    gmp_forward.register_autograd(_backward, setup_context=_setup_context)


def available() -> bool:
    """Whether the custom ops exist (torch ≥ 2.4, fast paths on) and the kernel is loaded."""
    return _OPS and build.is_loaded()


def applies(radius: Tensor, angles: Tensor) -> bool:
    """Inside ``torch.compile`` (not export, not a ``torch.func`` transform), for CPU tensors of a
    kernel dtype with matching shapes, once the kernel is loaded (registering a CPU layer loads it)."""
    if not _OPS or not torch.compiler.is_compiling() or exporting() or functorch_active():
        return False
    if angles.device.type != "cpu" or angles.dtype not in cpu.KERNEL_DTYPES or radius.dtype != angles.dtype:
        return False
    if radius.device != angles.device or tuple(radius.shape) != tuple(angles.shape)[:-1]:
        return False
    return build.is_loaded()


def scaled_unit(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None] · u(angles)`` by the kernel's custom op (``n ≥ 2``; both modes run the
    same float64 kernel, as eagerly)."""
    n = angles.shape[-1] + 1
    lead = angles.shape[:-1]
    w = gmp_forward(radius.reshape(-1), angles.reshape(-1, n - 1))
    return w.reshape(lead + (n,))
