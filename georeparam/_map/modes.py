r"""The table of the map's modes: how each backend rounds (both backends read it).

A mode is one row of :data:`MODES`; adding one is a row here plus what each backend does with its
``float64_product`` (the compiled kernel computes everything in float64 whatever the mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

__all__ = ["Mode", "MODES", "check_mode", "compute_dtype", "work_dtype"]


@dataclass(frozen=True)
class Mode:
    """One row of :data:`MODES`: how the map rounds.

    ``float64_product``: the pure-torch map evaluates the cosines and their running product in
    float64 (Note [Where float64 is needed]); otherwise in the working dtype. The compiled kernel
    computes everything in float64 in both modes.
    ``error``: the bound on the relative error of a float32 unit row against float64 that
    ``tests/test_coords.py`` checks up to fan-in 25,088 (measured values: ``docs/precision.md``).
    """

    name: str
    float64_product: bool
    error: str


MODES: Dict[str, Mode] = {
    "exact": Mode("exact", True, "≤ 2e-7 (kernel and pure torch)"),
    "fast": Mode("fast", False, "≤ 4·√n·eps for fan-in n; with the compiled kernel (CPU) the same as exact"),
}


def check_mode(mode: str) -> Mode:
    """The :class:`Mode` named ``mode``; ``ValueError`` naming the choices otherwise."""
    m = MODES.get(mode) if isinstance(mode, str) else None
    if m is None:
        raise ValueError(f"mode must be one of {tuple(MODES)}. Got: {mode!r}")
    return m


def compute_dtype(dtype: torch.dtype, mode: str) -> torch.dtype:
    """The dtype of the cosines' running product: float64 for ``exact``, float32 or better for ``fast``.

    Everything else (sines, the output, the backward) is evaluated in float32 or better in both
    modes; see Note [Where float64 is needed].
    """
    if check_mode(mode).float64_product:
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the map runs in for parameters of ``dtype``: half precision is evaluated in float32."""
    return torch.promote_types(dtype, torch.float32)
