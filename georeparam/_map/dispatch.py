r"""The one place that chooses how the GmP map ``(radius, angles) → r·u`` is computed.

One contract, several backends (values and gradients agree to rounding; ``tests/test_map_cpu.py``):
:data:`BACKENDS` lists the specialised ones in order of preference, each a name, a predicate on
the promoted ``(radius, angles)`` and the function that computes ``r·u``; the first whose
predicate holds runs, and the pure-torch map (:mod:`georeparam._map.torch_impl`: every device,
``torch.compile``, ``torch.func``, higher-order gradients, tensor subclasses) takes everything
else. ``GEOREPARAM_NO_FAST_PATHS=1``, read once at import (Note [One switch] in ``_compat.py``),
leaves only the pure-torch map. A new backend (say a GPU kernel) is one more row of
:data:`BACKENDS`; tests pick one with :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import build, cpu, cpu_op, recompute, torch_impl, triton_impl
from ._compat import fast_paths
from .build import kernel_status
from .modes import check_mode, work_dtype

__all__ = ["BACKENDS", "Backend", "unit", "scaled_unit", "use_backend", "backend_for", "kernel_status", "prepare"]

# (name, applies(radius, angles) -> bool, scaled_unit(radius, angles, mode) -> Tensor), called on
# tensors promoted to the working dtype with n ≥ 2; "torch" is the fallback and not listed
Backend = Tuple[str, Callable[[Tensor, Tensor], bool], Callable[[Tensor, Tensor, str], Tensor]]
BACKENDS: List[Backend] = [
    ("cpu", cpu.applies, cpu.scaled_unit),
    ("cpu_compiled", cpu_op.applies, cpu_op.scaled_unit),  # the same kernel inside torch.compile
    ("triton", lambda r, a: triton_impl.applies(r, a), lambda r, a, m: triton_impl.scaled_unit(r, a, m)),
    # every device but the CPU (Note [Which pure-torch map]); on CPU only with use_backend("recompute")
    ("recompute", lambda r, a: _only == "recompute" or a.device.type != "cpu", recompute.scaled_unit),
]

# Note [Which pure-torch map]
# Two pure-torch maps agree to rounding (tests/test_map_dispatch.py): ``torch_impl`` saves ``u``
# and the cosines' prefix (8 bytes per float32 weight for the whole step), ``recompute`` saves only
# its inputs and recomputes the sines and float64 cosines in the backward. Measured on CPU
# (docs/speed.md, 1 thread): recompute's extra peak memory of an MLP step is 0.4x the parameter
# bytes against 2.8x, but its map fwd+bwd takes ~2x the CPU time (the second float64 cosine pass,
# ~3 ns per weight, is compute the CPU has to spend). So the CPU keeps ``torch_impl`` (and CPU
# users mostly get the compiled kernel anyway). On an accelerator the map is memory-bound, the
# saved tensors were most of its traffic and of its memory, and elementwise sines are cheap next
# to them: every non-CPU device (CUDA without Triton, and CUDA under torch.compile / torch.func,
# MPS, XPU, ...) gets ``recompute``. That choice is reasoned, not timed: no GPU has been lent
# yet, and benchmarks/gpu_check.py times both maps (``use_backend``) where one is.

_only: Optional[str] = None  # set by use_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block only backend ``name`` runs where it applies, the pure-torch map elsewhere;
    ``"torch"`` runs the pure-torch map everywhere. For tests and benchmarks.

    Example:
        >>> with use_backend("torch"):
        ...     backend_for(torch.zeros(2), torch.zeros(2, 3))
        'torch'
    """
    names = ["torch"] + [b[0] for b in BACKENDS]
    if name not in names:
        raise ValueError(f"use_backend: name must be one of {names}. Got: {name!r}")
    global _only
    saved, _only = _only, name
    try:
        yield
    finally:
        _only = saved


def prepare(t: Tensor) -> None:
    """Load what the backends for tensors like ``t`` need, eagerly (registration calls it): the
    compiled CPU kernel for a CPU tensor, so that a ``torch.compile`` graph traced before any eager
    call can use it (Note [The kernel in a compiled graph] in ``cpu_op.py``: the trace cannot load
    it). Never raises; a no-op under compile and elsewhere."""
    if fast_paths() and t.device.type == "cpu" and not torch.compiler.is_compiling():
        build.load()  # cached after the first call


def _choose(radius: Tensor, angles: Tensor) -> Optional[Backend]:
    for backend in BACKENDS:
        if (_only is None or backend[0] == _only) and backend[1](radius, angles):
            return backend
    return None


def backend_for(radius: Tensor, angles: Tensor) -> str:
    """The name of the backend :func:`scaled_unit` would use for these (promoted) tensors."""
    chosen = _choose(radius, angles)
    return "torch" if chosen is None else chosen[0]


def _resolved(t: Tensor) -> Tensor:
    """``t`` with torch's negative bit resolved.

    # Note [Negative bit]
    A view such as ``x.conj().imag`` carries torch's negative bit: its values are the negation of
    the memory it points at. The kernels read memory (``data_ptr()``) and numpy refuses such
    tensors, so the bit is resolved before any backend sees it: a differentiable copy where it is
    set, nothing otherwise (not even an op in a trace). Real tensors cannot carry the conjugate bit.
    A compiled graph computes on values (and dynamo cannot trace ``is_neg``): nothing to do there.
    """
    if torch.compiler.is_compiling():
        return t
    return t.resolve_neg() if t.is_neg() else t


def unit(angles: Tensor, mode: str = "exact") -> Tensor:
    """Latitude angles (..., n-1) → unit vectors (..., n) in the dtype of ``angles``; ``n = 1`` gives ones.

    Half-precision angles are evaluated in float32 and the result is cast back. Always the
    pure-torch map (training runs :func:`scaled_unit`).
    """
    check_mode(mode)
    n = angles.shape[-1] + 1
    if n == 1:
        return torch.ones(angles.shape[:-1] + (1,), dtype=angles.dtype, device=angles.device)
    return torch_impl.unit(_resolved(angles.to(work_dtype(angles.dtype))), mode).to(angles.dtype)


def scaled_unit(radius: Tensor, angles: Tensor, mode: str = "exact") -> Tensor:
    """``radius[..., None] · u(angles)``, the rows of a GmP weight, in the dtype of ``angles``.

    Same values as ``radius.unsqueeze(-1) * unit(angles, mode)`` with a cheaper backward, by the
    first of :data:`BACKENDS` that applies, else the pure-torch map.

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
    r, a = _resolved(radius.to(work)), _resolved(angles.to(work))
    chosen = _choose(r, a)
    if chosen is not None:
        return chosen[2](r, a, mode).to(angles.dtype)
    return torch_impl.scaled_unit(r, a, mode).to(angles.dtype)
