r"""Wrappers that would silently mishandle a GmP model, caught when they wrap it.

* ``torch.optim.swa_utils.AveragedModel`` (and Lightning's ``WeightAveraging``, built on it)
  averages Parameters, i.e. ``r``, θ, λ of a registered model, not the ``w`` and ``b`` it
  computes: a warning points to :class:`georeparam.WeightAverage`.
* A PEFT tuner layer (LoRA …) wrapping a GmP layer as its ``base_layer``: ``merge_and_unload``
  adds the update to ``base_layer.weight.data``, which for a GmP layer is a tensor recomputed from
  the coordinates on every access, so the merge is lost without a word (merged vs trained: 1.02
  relative on a 3-layer MLP). Refused at ``get_peft_model`` time, before the model is changed,
  with the order that works (LoRA first, then ``register``, which skips the base layers).

# Note [Watching wrappers]
Both wrappers assign the model (or layer) as a submodule: ``AveragedModel.__init__`` does
``self.module = deepcopy(model)``, a PEFT layer ``self.base_layer = target``. torch's public global
hook for submodule assignment (``torch.nn.modules.module.register_module_module_registration_hook``)
sees that assignment, with no patching of torch or of the wrappers. The hook is installed by the
first :func:`georeparam.register` call, so a process that never registers GmP pays nothing; after
that it costs two isinstance/name checks per submodule assignment.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from .layer import is_geometric
from .selection import is_peft_tuner_layer

__all__ = ["watch_wrappers"]

_HANDLE: List[Any] = []


def _on_submodule(module: nn.Module, name: str, submodule: Optional[nn.Module]):
    if submodule is None:
        return None
    if name == "base_layer" and is_geometric(submodule) and is_peft_tuner_layer(module):
        raise TypeError(
            f"PEFT is wrapping a GmP-registered layer ({type(module).__name__} around {type(submodule).__name__}): "
            f"merge_and_unload would add the adapter's update to a weight that GmP recomputes from its coordinates, "
            f"and the merge would be lost. Apply PEFT first and register after it (get_peft_model(model, config), "
            f"then georeparam.register(peft_model): the frozen base layers are skipped, the adapters get GmP), or "
            f"call georeparam.remove(model) before get_peft_model. Got: base_layer {type(submodule).__name__}"
        )
    if isinstance(module, torch.optim.swa_utils.AveragedModel) and any(is_geometric(m) for m in submodule.modules()):
        warnings.warn(
            "torch.optim.swa_utils.AveragedModel wraps a GmP-registered model: it averages the coordinates r, θ, λ, "
            "not the weights w and b the model computes, and angles are no vector space (measured 8e-2 from the true "
            "EMA once they wrap). Use georeparam.WeightAverage(model, decay=...) instead; it averages "
            f"plain_state_dict(model). Got: AveragedModel({type(submodule).__name__})",
            stacklevel=4,
        )
    return None


def watch_wrappers() -> None:
    """Install the hook of Note [Watching wrappers] (idempotent; called by :func:`georeparam.register`)."""
    if not _HANDLE:
        _HANDLE.append(register_module_module_registration_hook(_on_submodule))
