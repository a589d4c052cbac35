r"""Take GmP off a model or a layer: :func:`remove` bakes every GmP layer's current ``w`` and ``b``
back into plain Parameters, and each sign of the paper's form into a plain neighbour (or a
``UnitSign`` module where none can hold it).
"""

from __future__ import annotations

import warnings
from typing import Sequence

from torch import nn
from torch.nn.utils import parametrize

from . import signs as _signs
from ._util import class_name
from .layer import is_geometric, orphan_biases, own_class, remove_one

__all__ = ["remove"]


def remove(model_or_module: nn.Module) -> nn.Module:
    r"""Bake every GmP layer's current ``w`` and ``b`` back into plain Parameters.

    Restores the original classes (``ParametrizedLinear`` → ``Linear``). The new weight and bias
    are exactly the tensors the parametrization computed, so outputs do not change. Works on a
    single layer or on a whole model; modules sharing a parametrized class with this one (a
    ``copy.deepcopy``) stay registered.

    Input mean normalization (``register(..., imn=True)``) is folded into the bias where that is
    exact (``Linear``; ``ConvNd`` without zero padding; ``ConvTransposeNd`` with stride 1 and
    padding ≥ ``dilation·(kernel − 1) + output_padding``), keeping evaluation outputs (≤ 1e-6
    relative); otherwise the normalization stays in place on the plain layer (see
    :mod:`georeparam.imn`).

    Returns:
        the same object.

    Example:
        >>> import torch
        >>> from georeparam import geometric
        >>> layer = geometric(nn.Linear(3, 2))
        >>> w = layer.weight.detach().clone()
        >>> layer = remove(layer)
        >>> type(layer).__name__, torch.equal(layer.weight, w)
        ('Linear', True)
    """
    if not isinstance(model_or_module, nn.Module):
        raise TypeError(f"remove expects an nn.Module. Got: {type(model_or_module).__name__}")
    # Note [torch's remover on a GmP weight]: finish what torch's remover left (bias, sign)
    orphans = [(m, names) for m in model_or_module.modules() for names in [orphan_biases(m)] if names]
    signs = [(h, h.sign().detach().clone()) for h in _signs.live_hooks(model_or_module) if h.orphaned()]
    for m, names in orphans:
        for bname in names:
            own_class(m)
            parametrize.remove_parametrizations(m, bname, leave_parametrized=True)
    targets = [m for m in model_or_module.modules() if is_geometric(m)]
    if (orphans or signs) and not targets:
        _bake_all(signs)
        return model_or_module
    if not targets:
        raise ValueError(
            f"remove: {class_name(model_or_module)} has no GmP-registered layer. Got: {type(model_or_module).__name__}"
        )
    _refuse_sharded(targets)
    pending = signs
    for m in targets:
        pending += remove_one(m)
    _bake_all(pending)
    return model_or_module


def _bake_all(pending) -> None:
    # the signs go last: a consumer that was GmP is plain by now (or stays GmP and keeps its own sign)
    kept = [msg for hook, s in pending for msg in [_signs.bake(hook, s)] if msg]
    if kept:
        warnings.warn("georeparam.remove: " + "; ".join(kept), stacklevel=3)


def _refuse_sharded(targets: Sequence[nn.Module]) -> None:
    # Note [remove under FSDP2]
    # fully_shard swaps each layer's class for ``FSDP<cls>`` (bases: FSDPModule, ParametrizedLinear)
    # and its Parameters for sharded DTensors. remove_parametrizations restores ``__bases__[0]``,
    # which is then FSDPModule: the layer broke half-way with an AttributeError, its weights
    # sharded. Refuse before touching anything and say how to get a plain model.
    names = []
    for m in targets:
        if any(type(p).__name__ == "DTensor" for p in m.parameters()) or any(
            c.__name__ == "FSDPModule" for c in type(m).__mro__
        ):
            names.append(type(m).__name__)
    if names:
        raise ValueError(
            "remove: these GmP layers are sharded (FSDP2 fully_shard / DTensor parameters), and removing in "
            "place would break them half-way. Gather a full state_dict instead (e.g. "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True))), load it into an unsharded model registered the same way, and call "
            f"georeparam.remove on that. Got: {names[:5]}"
        )
