r"""Pickling a GmP-registered layer (``torch.save(model, path)``, ``pickle.dumps``).

# Note [Pickling a registered layer]
PyTorch refuses to pickle any parametrized module: the class parametrize injects
(``ParametrizedLinear``) lives in no importable module, and its ``__getstate__`` raises. That
refusal came too late to be harmless: ``torch.save(model, path)`` opens (truncates) ``path`` before
pickling starts, so a refused save destroyed the checkpoint already there (3,593 → 668 bytes, no
longer loadable). No code of ours runs before that open, so instead of refusing, a GmP layer
pickles, as "make an empty layer of the original class, inject the parametrized class and its
properties again, then set the state". The state holds the coordinates, the parametrizations and
their references back to the layer (pickle's memo resolves the cycle), and the hooks.
``copy.deepcopy`` does not come here (the injected class defines ``__deepcopy__``). Loading needs
``torch.load(..., weights_only=False)``, like any pickled model; a state dict remains the portable
checkpoint. The two ``parametrize`` helpers used to inject are private to PyTorch (present from
1.9 to 2.13 at least); ``tests/test_robustness.py`` exercises them.
"""

from __future__ import annotations

from typing import Tuple

from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

__all__ = ["make_picklable", "rebuild_registered"]


def make_picklable(cls: type) -> None:
    """Give a class that parametrize injected the pickling of Note [Pickling a registered layer]."""
    cls.__reduce_ex__ = _reduce_registered
    cls.__setstate__ = _setstate_registered


def _reduce_registered(self, protocol):
    names = tuple(self.parametrizations.keys())
    return rebuild_registered, (parametrize.type_before_parametrizations(self), names), dict(self.__dict__)


def rebuild_registered(cls: type, names: Tuple[str, ...]) -> nn.Module:
    """An empty ``cls`` with the parametrized class and the properties ``names`` injected;
    pickle then sets its state (Note [Pickling a registered layer])."""
    module = cls.__new__(cls)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    make_picklable(type(module))
    return module


def _setstate_registered(self, state: dict) -> None:
    type(self).__bases__[0].__setstate__(self, state)  # the original class (parametrize injected a subclass)
    # Hooks keep the ids they had in the pickling process, while a new process counts from 0: a
    # later hook given the same id would replace ours (the sign hook on the activation, the
    # plain-checkpoint hook on the layer) without a word.
    ids = []
    for plist in self.parametrizations.values():
        p = plist[0] if len(plist) else None
        ids += [getattr(p, "load_hook_id", None), getattr(getattr(p, "sign_hook", None), "handle_id", None)]
    ids = [i for i in ids if isinstance(i, int)]
    if ids:
        RemovableHandle.next_id = max(RemovableHandle.next_id, max(ids) + 1)
