r"""Which modules a selector names: the one parser behind ``register(include=, exclude=)`` and the
analysis tools' ``layers=`` / ``exclude=``.

A selector is one item or a list of items, each one of:

* a qualified module name (``"encoder.layer.0.attention.self.query"``): that module;
* a name suffix (``"q_proj"``, ``"attn.c_attn"``), as PEFT's ``target_modules`` reads it: every
  module whose qualified name ends with ``"." + suffix``. A string that is some module's exact
  qualified name means that module only (``exclude=["2"]`` on a ``Sequential`` does not also
  exclude ``"features.2"``);
* a glob pattern (any of ``* ? [``), matched against the whole qualified name with
  :func:`fnmatch.fnmatchcase` (``"*.mlp.*"``, ``"layers.[0-3].*"``);
* a compiled regular expression (``re.compile(r".*\.(q|v)_proj")``), matched with ``fullmatch``
  (PEFT reads a *string* ``target_modules`` as a regex; here a plain string is a name or pattern,
  so pass ``re.compile(...)`` for a regex);
* an ``nn.Module`` type (every instance) or, where the caller allows it, a module object.

Every string and regex must match at least one module: a typo is an error, not an empty selection.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)))
    >>> sel = Selector(["1.*", torch.nn.ReLU], "include", "register")
    >>> [n for n, m in model.named_modules() if sel.matches(n, m)]
    ['1.0', '1.1']
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable, List, Tuple

from torch import nn

__all__ = ["Selector"]

_GLOB = set("*?[")


class Selector:
    """A parsed selector (module docstring). ``explicit(name, module)`` says whether the module was
    named or typed exactly (a request the caller may refuse with an error) rather than caught by
    a suffix, pattern or regex (which only ever pick supported layers)."""

    def __init__(self, spec, argname: str, what: str, *, modules_allowed: bool = False):
        self.argname, self.what = argname, what
        self.names: List[str] = []
        self.patterns: List[str] = []
        self.regexes: List["re.Pattern[str]"] = []
        self.types: Tuple[type, ...] = ()
        self.modules: List[nn.Module] = []
        self.empty = spec is None
        self._exact: set = set()
        if spec is None:
            return
        if isinstance(spec, (str, type, re.Pattern, nn.Module)):
            spec = [spec]
        kinds = "qualified module names, name suffixes (PEFT's target_modules), glob patterns, re.compile(...) regexes"
        kinds += ", nn.Module types" + (" and modules" if modules_allowed else "")
        try:
            items = list(spec)
        except TypeError:
            raise TypeError(
                f"{what}: {argname} takes {kinds}: one of them or a list. Got: {spec!r} ({type(spec).__name__}). "
                f"For example {argname}=['0', '*.mlp.*', 'q_proj', nn.Conv2d]"
            ) from None
        types = []
        for s in items:
            if isinstance(s, str):
                (self.patterns if _GLOB & set(s) else self.names).append(s)
            elif isinstance(s, re.Pattern):
                self.regexes.append(s)
            elif isinstance(s, type) and issubclass(s, nn.Module):
                types.append(s)
            elif modules_allowed and isinstance(s, nn.Module):
                self.modules.append(s)
            else:
                raise TypeError(f"{what}: {argname} takes {kinds}. Got: {s!r} ({type(s).__name__}) in {argname}")
        self.types = tuple(types)

    def bind(self, names: Iterable[str]) -> "Selector":
        """Check every string and regex against the model's qualified names (``ValueError`` naming the
        first that matches nothing); returns ``self``."""
        names = list(names)
        present = set(names)
        self._exact = {n for n in self.names if n in present}
        for s in self.names:
            if s not in present and not any(n.endswith("." + s) for n in names):
                raise ValueError(
                    f"{self.what}: {self.argname}: no module named {s!r}, nor one whose name ends in {'.' + s!r}. "
                    f"Got: modules {sorted(present)[:20]}"
                )
        for p in self.patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(
                    f"{self.what}: {self.argname} pattern {p!r} matches no module. Got: modules {sorted(present)[:20]}"
                )
        for r in self.regexes:
            if not any(r.fullmatch(n) for n in names):
                raise ValueError(
                    f"{self.what}: {self.argname} regex {r.pattern!r} matches no module. Got: modules {sorted(present)[:20]}"
                )
        return self

    def explicit(self, name: str, module: nn.Module) -> bool:
        return (
            name in self._exact
            or (bool(self.types) and isinstance(module, self.types))
            or any(module is m for m in self.modules)
        )

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.empty:
            return False
        if self.explicit(name, module):
            return True
        if any(name.endswith("." + s) for s in self.names if s not in self._exact):
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns) or any(r.fullmatch(name) for r in self.regexes)


def foreign_parametrization(module: nn.Module, is_own) -> str:
    """Why ``register`` skips ``module`` because something else already reparametrizes its weights
    (``""`` if nothing does). ``is_own(p)`` tells GmP's own parametrizations apart.

    # Note [Pre-parametrized layers]
    A layer under ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` /
    ``orthogonal`` (or any ``parametrize`` parametrization), or under the old hook-based
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (HF Wav2Vec2's positional conv), has no plain
    ``weight`` Parameter to put in hyperspherical coordinates: the weight is computed from
    ``weight_g``/``weight_v`` or ``original``. Stacking GmP on top would need torch to chain a
    two-tensor parametrization after another, which it does not. Like a tied weight, such a layer is
    skipped and reported, and the rest of the model is registered.
    """
    found = []
    plists = getattr(module, "parametrizations", None)
    if isinstance(plists, nn.ModuleDict):
        for tname, plist in plists.items():
            others = [type(p).__name__ for p in plist if not is_own(p)]
            if others:
                found.append(f"{tname} by {', '.join(others)} (torch.nn.utils.parametrize)")
    for hook in module._forward_pre_hooks.values():
        cls = type(hook)
        if cls.__module__.startswith("torch.nn.utils") and cls.__name__ in ("WeightNorm", "SpectralNorm"):
            found.append(
                f"{getattr(hook, 'name', 'weight')} by the hook-based torch.nn.utils.{cls.__name__.lower().replace('norm', '_norm')}"
            )
    if not found:
        return ""
    return (
        f"already reparametrized: {'; '.join(found)}; GmP cannot stack on it (remove that first to register this "
        f"layer; GmP's r already is a weight norm)"
    )


#: Why a PEFT tuner layer's ``base_layer`` is skipped (Note [Watching wrappers] in :mod:`georeparam.watch`).
PEFT_BASE = (
    "the frozen base layer of a PEFT adapter: merge_and_unload adds the adapter's update to this weight, which "
    "GmP would recompute from its coordinates and so lose; the adapter's own layers are registered"
)


def is_peft_tuner_layer(module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (LoRA, IA³, …: it holds a ``base_layer``), without importing peft."""
    return module is not None and any(
        c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(module).__mro__
    )
