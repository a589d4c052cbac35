r"""The plain hand-back: ``save_pretrained`` of a registered Hugging Face model writes plain weights.

A ``transformers`` model registered with :func:`georeparam.register` holds its weights as GmP
coordinates (``…parametrizations.weight.original0``/``original1``). ``model.save_pretrained(dir)``
used to write exactly those keys, and a plain ``from_pretrained(dir)`` then loaded random weights
for every registered layer (0.34 – 1.34 relative off), with only HF's load report hinting at it.

# Note [save_pretrained writes plain weights]
``register`` gives such a model (duck-typed: a class named ``PreTrainedModel`` in its MRO whose
``save_pretrained`` takes ``state_dict``; transformers is never imported) an instance-level
``save_pretrained`` that, when the caller passes no ``state_dict``, writes
:func:`georeparam.plain_state_dict` instead: the file loads into the plain class and into a model
registered the same way (its load pre-hook converts plain weights). A caller that passes
``state_dict=`` gets exactly that, so ``save_pretrained(dir, state_dict=model.state_dict())`` keeps
the coordinates (what :class:`georeparam.integrations.hf.GmPTrainer` does for resumable
checkpoints). Nothing of torch or transformers is patched: only this model object's attribute,
which ``copy.deepcopy`` rebinds to the copy and which passes through once no GmP layer is left
(after :func:`georeparam.remove`).
"""

from __future__ import annotations

import inspect
import logging
import types

from torch import nn

from .layer import geometric_layers

__all__ = ["install_plain_save", "is_pretrained_model"]

log = logging.getLogger("georeparam")


def is_pretrained_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (duck-typed) whose ``save_pretrained`` takes ``state_dict``."""
    if not any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        return False
    save = getattr(type(model), "save_pretrained", None)
    try:
        return callable(save) and "state_dict" in inspect.signature(save).parameters
    except (TypeError, ValueError):
        return False


def _save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    if state_dict is None and geometric_layers(self):
        from .plain import plain_state_dict

        state_dict = plain_state_dict(self)
        log.info(
            "georeparam: save_pretrained wrote plain weights (plain_state_dict) to %s; pass "
            "state_dict=model.state_dict() to keep the GmP coordinates",
            save_directory,
        )
    return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def install_plain_save(model: nn.Module) -> None:
    """Give a registered HF model the instance ``save_pretrained`` of Note [save_pretrained writes plain weights]."""
    if is_pretrained_model(model) and not isinstance(model.__dict__.get("save_pretrained"), types.MethodType):
        object.__setattr__(model, "save_pretrained", types.MethodType(_save_pretrained, model))
