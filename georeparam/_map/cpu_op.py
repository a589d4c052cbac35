r"""The compiled CPU kernel inside ``torch.compile``: two ``torch.library`` custom ops.

Dynamo cannot trace the kernel's ``ctypes`` call, so a compiled graph used to run the pure-torch
map instead (float64 cosines, ``cumprod``/``cumsum`` fallbacks). Registered as the opaque ops
``georeparam::gmp_forward`` / ``georeparam::gmp_backward`` with shape-only fake kernels and an
autograd formula, the kernel runs inside the compiled graph too (inductor calls it as an external
kernel, like a matmul) and the rest of the step is still compiled around it.

Public (internal) names: :func:`applies`, :func:`scaled_unit`.

# Note [The kernel in a compiled graph]
Measured (``benchmarks/speed.py --threads 1 --cpu-time --only compile --repeats 11``: MLP
784-1024-1024-10, batch 256, SGD step, inductor, on a 2-core AMD EPYC, docs/speed.md *EPYC-24*),
compiled GmP / compiled standard with the pure-torch map traced → with these ops: 1.87 → 1.48 in
the paper's form, 1.64 → 1.23 in the weight form (eager GmP / eager standard 1.24–1.26); the
first compiled step (a cold compile) 24.2 → 9.4 s and 10.1 → 3.1 s. Only first-order gradients: a compiled graph is
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
from ._compat import FAST_PATHS

__all__ = ["applies", "scaled_unit"]

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


def applies(radius: Tensor, angles: Tensor) -> bool:
    """Inside ``torch.compile``, where the kernel takes the tensors (:func:`georeparam._map.cpu.takes`)
    and is loaded already (registering a CPU layer loads it; a trace cannot)."""
    return _OPS and torch.compiler.is_compiling() and cpu.takes(radius, angles) and build.is_loaded()


def scaled_unit(radius: Tensor, angles: Tensor, mode: str) -> Tensor:
    """``radius[..., None] · u(angles)`` by the kernel's custom op (``n ≥ 2``; both modes run the
    same float64 kernel, as eagerly)."""
    n = angles.shape[-1] + 1
    lead = angles.shape[:-1]
    w = gmp_forward(radius.reshape(-1), angles.reshape(-1, n - 1))
    return w.reshape(lead + (n,))
