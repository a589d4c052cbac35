r"""Every probe of torch internals the map makes, and the one switch that turns them off.

Nothing else in :mod:`georeparam._map` touches ``torch._C`` or reads the environment for the
switch: a torch upgrade that moves an internal breaks this file alone, and
``GEOREPARAM_NO_FAST_PATHS=1`` shows what is left without it.

# Note [One switch]
``GEOREPARAM_NO_FAST_PATHS=1`` (any value but ``0`` or empty) turns off everything that leans on
more than torch's public API: the compiled kernel, numpy's sines, the helper thread and the direct
C++ ``Function.apply`` (Note [Calling the Function]). It is read once, here, when the package is
imported; setting it later changes nothing in a running process (start a new one). What is left
is the pure-torch map through public ``torch.autograd.Function.apply``; CI runs the map's tests a
second time that way, so a torch upgrade that breaks an internal has a tested fallback.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

FAST_PATHS: bool = os.environ.get("GEOREPARAM_NO_FAST_PATHS", "0") in ("", "0")


def fast_paths() -> bool:
    """False when ``GEOREPARAM_NO_FAST_PATHS`` was set at import (Note [One switch])."""
    return FAST_PATHS


def exporting() -> bool:
    """Under ``torch.export`` (also the first step of ``torch.onnx.export``) or a ``torch.jit``
    trace (the legacy ONNX exporter): the graph must see plain torch ops, not the kernel, numpy
    or writes into preallocated buffers (a trace recorded the kernel's output as a constant)."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)()) or torch.jit.is_tracing()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp …) is active; ``True`` if torch cannot tell."""
    if hasattr(torch._C, "_are_functorch_transforms_active"):
        return bool(torch._C._are_functorch_transforms_active())
    return True  # cannot tell: assume a transform, take the general path


def functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a functorch wrapper (a vmap/grad level); ``True`` if torch cannot tell."""
    fn = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return fn is None or bool(fn(t))


def paired(radius: Tensor, angles: Tensor) -> bool:
    """The contract every specialised backend's ``applies`` checks first (not a torch probe, kept
    beside :func:`is_plain`): ``radius`` of shape ``angles.shape[:-1]``, same dtype and device,
    and at least one row to compute."""
    return (
        radius.dtype == angles.dtype
        and radius.device == angles.device
        and tuple(radius.shape) == tuple(angles.shape)[:-1]
        and angles.numel() > 0
    )


def is_plain(*tensors: Optional[Tensor]) -> bool:
    """Eager, and no tensor is a functorch wrapper (vmap/grad level) or a subclass other than
    Parameter: what a fast path that reads the tensors' values or memory needs."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) in (Tensor, torch.nn.Parameter) and not functorch_wrapped(t)) for t in tensors)


# Note [Calling the Function]
# ``Function.apply`` binds the arguments with ``inspect.signature`` on every call (~40 µs, more
# than the whole map of a small conv layer) before handing over to the C++ ``apply``. Outside
# functorch transforms and compile, with every argument positional, that binding does nothing,
# so the eager path calls the C++ ``apply`` directly; everything else goes through ``apply``.
DIRECT_APPLY: bool = (
    FAST_PATHS and hasattr(torch._C, "_are_functorch_transforms_active") and hasattr(torch._C._FunctionBase, "apply")
)


def direct_apply() -> bool:
    """Whether Function.apply's Python binding may be skipped here (Note [Calling the Function])."""
    return DIRECT_APPLY


def apply_direct(fn, *args):
    """``fn.apply(*args)`` without the Python binding; only where :func:`direct_apply` holds and
    no transform, compile or export is active (the caller checks)."""
    return super(torch.autograd.Function, fn).apply(*args)  # type: ignore[misc]


def call(fn, compiling: bool, *args):
    """``fn.apply(*args)``, by the direct C++ call where that is safe (Note [Calling the Function])."""
    if DIRECT_APPLY and not compiling and not exporting() and not torch._C._are_functorch_transforms_active():
        return super(torch.autograd.Function, fn).apply(*args)  # type: ignore[misc]
    return fn.apply(*args)
