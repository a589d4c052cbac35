r"""The GmP map ``(radius, latitude angles) → r·u``: the library's hot path, one contract, several backends.

:mod:`georeparam.coords` holds the public, pure maps; :mod:`georeparam.parametrization` calls
:func:`scaled_unit`. Inside:

* ``dispatch.py``: the one backend choice (:func:`scaled_unit`, :func:`use_backend`);
* ``modes.py``: the table of modes both backends read;
* ``torch_impl.py``: the pure-torch map that saves ``u`` (CPU without the kernel, ``torch.func``);
* ``cpu.py``, ``build.py``, ``kernel/``: the compiled CPU kernel, its build and its C source;
  ``cpu_op.py``: the same kernel as ``torch.library`` custom ops, for ``torch.compile``;
* ``recompute.py``: the recomputing pure-torch map (every device but the CPU);
* ``triton_impl.py``, ``triton_kernels.py``: the fused GPU map;
* ``_compat.py``: every probe of torch internals, and the switch ``GEOREPARAM_NO_FAST_PATHS``.
"""

from ._compat import fast_paths, functorch_wrapped, is_plain
from .dispatch import backend_for, kernel_status, prepare, scaled_unit, unit, use_backend
from .modes import MODES, Mode, check_mode, compute_dtype

__all__ = [
    "MODES",
    "Mode",
    "check_mode",
    "compute_dtype",
    "unit",
    "scaled_unit",
    "kernel_status",
    "fast_paths",
    "functorch_wrapped",
    "is_plain",
    "use_backend",
    "backend_for",
    "prepare",
]
