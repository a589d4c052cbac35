r"""A warning when an optimizer steps Parameters that :func:`register` or :func:`remove` replaced.

# Note [Optimizers that hold replaced Parameters]
``register`` replaces a layer's ``weight`` and ``bias`` Parameters by its coordinates, and
``remove`` replaces the coordinates by a plain ``weight`` and ``bias``. An optimizer built before
either call still holds the old objects: they no longer affect the model, its steps change
nothing there, and training goes on without an error. (PyTorch's own ``register_parametrization``
reuses a single-output original, so the old *bias* object used to become ``λ`` and keep training
on its own; ``register`` now gives ``λ`` a new Parameter, so an old optimizer holds only
orphans.)

The signal: the replaced Parameters are remembered weakly (:func:`retire`), and a global
optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``) warns once
when an optimizer about to step holds one of them. Each optimizer is checked once per call of
:func:`retire` (a counter), so a step costs one dictionary lookup otherwise; nothing is checked
while compiling. Parameters nobody holds are forgotten with them.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["retire", "unretire"]

# id → (Parameter, "what it was"); entries vanish when the Parameter is freed
_retired: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
_what: "dict[int, str]" = {}
_generation = 0
_checked: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
_hook = None


def retire(params: Iterable[Tuple[torch.Tensor, str]]) -> None:
    """Remember Parameters that no longer belong to the model (``(parameter, description)``)."""
    global _generation, _hook
    for p, what in params:
        if p is None:
            continue
        _retired[id(p)] = p
        _what[id(p)] = what
        weakref.finalize(p, _what.pop, id(p), None)
    _generation += 1
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def unretire(params: Iterable[torch.Tensor]) -> None:
    """Forget Parameters that belong to the model again (``register`` rolled back)."""
    for p in params:
        if p is not None and _retired.get(id(p)) is p:
            del _retired[id(p)]


def _check(optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling() or _checked.get(optimizer) == _generation:
        return
    if isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        return  # a wrapper (GeometricOptimizer): the wrapped optimizer it steps is checked
    _checked[optimizer] = _generation
    held = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if _retired.get(id(p)) is p:
                held.append(_what.get(id(p), "?"))
    if held:
        warnings.warn(
            f"{type(optimizer).__name__} is stepping {len(held)} Parameters that georeparam.register or "
            f"georeparam.remove replaced: they no longer affect the model, so this optimizer trains nothing "
            f"there. Build the optimizer after register/remove (e.g. from georeparam.param_groups(model)). "
            f"Got: {held[:5]}",
            UserWarning,
            stacklevel=3,
        )
