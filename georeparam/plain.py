r"""Plain checkpoints of a GmP model without stopping training: :func:`plain_state_dict`.

``plain_state_dict(model)`` is the ``state_dict`` the *plain* model (every layer unregistered)
would have, computed from the registered one without changing it: each GmP layer's current
``weight`` and ``bias`` under the plain keys, and, in the paper's form, each ``sign(r)`` baked into
its consumer's input columns (as :func:`georeparam.remove` does). It loads into the plain class
(``strict=True``) and computes what the registered model computes (same tolerance as ``remove``:
the weights are the tensors the parametrization computes; a baked sign multiplies by ±1).

The Hugging Face workflow (load → register → fine-tune → save plain)::

    model = AutoModelForCausalLM.from_pretrained(name)
    georeparam.register(model)                    # tied lm_head / embeddings are skipped, reported
    ...                                           # fine-tune (optimizer built after register)
    model.save_pretrained(out, state_dict=georeparam.plain_state_dict(model))
    AutoModelForCausalLM.from_pretrained(out)     # the plain class, same outputs

Example:
    >>> import torch, georeparam
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> _ = georeparam.register(model)
    >>> with torch.no_grad():
    ...     _ = georeparam.geometry(model[0]).radius.mul_(-1)      # every unit of layer 0 negated
    >>> sd = georeparam.plain_state_dict(model)
    >>> sorted(sd)
    ['0.bias', '0.weight', '2.bias', '2.weight']
    >>> plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> plain.load_state_dict(sd)
    <All keys matched successfully>
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(plain(x), model(x), atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict

import torch
from torch import Tensor, nn

from . import imn as _imn
from . import signs as _signs
from .layer import geometric_layers
from .removal import remove
from .layouts import is_supported

__all__ = ["plain_state_dict"]


def plain_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The plain model's ``state_dict``, computed from a registered ``model`` (which is not changed).

    Raises:
        ValueError: a negative ``sign(r)`` acts where no plain layer can hold it (after a
            max-pool; see Note [A sign no plain layer can hold] in :mod:`georeparam.signs`), so
            no plain checkpoint computes what the model computes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plain_state_dict expects an nn.Module. Got: {type(model).__name__}")
    layers = geometric_layers(model)
    if any(_imn.has_input_mean_norm(m) for _, m, _, _ in layers):
        return _via_remove(model)
    sd = model.state_dict()
    names = {id(m): q for q, m in model.named_modules()}
    with torch.no_grad():
        for q, m, wname, param in layers:
            p = f"{q}." if q else ""
            sd.pop(f"{p}parametrizations.{wname}.original0")
            sd.pop(f"{p}parametrizations.{wname}.original1")
            sd[p + wname] = getattr(m, wname).detach().clone()
            if param.bias_name is not None:
                sd.pop(f"{p}parametrizations.{param.bias_name}.original")
                sd[p + param.bias_name] = getattr(m, param.bias_name).detach().clone()
        stuck = []
        for hook in _signs.live_hooks(model):
            lo, hi = hook.span
            s = hook.sign()
            if bool((s[lo:hi] > 0).all()):
                continue
            new = None
            if (
                hook.consumer is not None
                and id(hook.consumer) in names
                and is_supported(hook.consumer)
                and (lo, hi) == (0, s.numel())
            ):
                key = f"{names[id(hook.consumer)]}.weight".lstrip(".")
                new = _signs.column_signs(hook.consumer, sd[key], s, hook.flattened, hook.channel_dim)
            if new is None:
                stuck.append(
                    f"{names.get(id(hook.layer), '?')} ({int((s[lo:hi] < 0).sum())} units with r < 0, sign at {names.get(id(hook.host), '?')})"
                )
                continue
            sd[key] = new
        if stuck:
            raise ValueError(
                f"plain_state_dict: the sign(r) of these layers acts where no plain layer can hold it (after a max-pool, "
                f"where the activation feeds no single linear layer, or where the units reach it reshaped; the register "
                f"report's footnotes list them): {stuck[:5]}. No plain checkpoint computes what the model computes. "
                f"Either save model.state_dict() (it loads into a model registered the same way), or call "
                f"georeparam.remove on a copy, which keeps those signs as small UnitSign modules (their state_dict has "
                f"them), or register those layers with form='weight' / exclude=[...]. Got: {len(stuck)} such layer(s)"
            )
    return sd


def _via_remove(model: nn.Module) -> Dict[str, Tensor]:
    # IMN folds into the bias only where exact (georeparam.imn): remove on a copy does it, and says
    # when a running mean or a sign had to stay, which a plain checkpoint cannot hold.
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remove(twin)
    kept = [n for n, m in twin.named_modules() if _imn.has_input_mean_norm(m) or hasattr(m, "georeparam_sign")]
    if kept:
        raise ValueError(
            f"plain_state_dict: after baking, these modules still need state a plain layer has no place for "
            f"(an input mean normalization that does not fold into the bias, or a sign after a max-pool): {kept[:5]}. "
            f"Save model.state_dict() instead. Got: {[str(w.message)[:120] for w in caught][:2]}"
        )
    return twin.state_dict()
