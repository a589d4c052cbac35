r"""A whole model: :func:`register` GmP on every supported layer, validated before anything
changes, with the paper's form placed where the model allows it and a report of what was done.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

from torch import nn

from . import imn as _imn
from . import placement as _placement
from . import selection as _selection
from . import signs as _signs
from .checkpoint import check_forms
from .handback import install_plain_save
from ._util import class_name
from .layer import geometric_entry, is_geometric, register_validated, remove_one, validate
from ._map import check_mode
from .layouts import has_input, is_supported, weight_names
from .parametrization import GeometricBias, GeometricWeight
from .report import LayerReport, Report
from .selection import Selector
from .stale import unretire
from .watch import watch_wrappers

__all__ = ["register", "FORMS"]

#: The forms :func:`register` knows (see :mod:`georeparam.report`).
FORMS = ("paper", "weight")


def _tied(model: nn.Module) -> dict:
    """``id(Parameter) → qualified names`` for Parameters held by more than one module object."""
    holders: dict = {}
    for qname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                mods, names = holders.setdefault(id(p), (set(), []))
                mods.add(id(m))
                names.append(f"{qname}.{pname}" if qname else pname)
    return {k: names for k, (mods, names) in holders.items() if len(mods) > 1}


def register(
    model: nn.Module,
    *,
    include: Optional[Iterable[Union[str, type]]] = None,
    exclude: Iterable[Union[str, type]] = (),
    mode: str = "exact",
    imn: bool = False,
    form: str = "paper",
) -> Report:
    r"""Apply GmP to every supported layer of ``model``, in the paper's form where the model allows it.

    All layers are validated before any is changed: on error the model is left as it was.
    Registration changes nothing the model computes beyond rounding: each weight to ≤ 1e-6 relative
    in float32 (≤ 1e-12 in float64, as :func:`geometric`), the output to about what one float32
    rounding of the plain weights changes (not 1e-6: the per-weight errors add up over depth).

    The paper's form (``form="paper"``, the default; :mod:`georeparam.signs`) trains the paper's
    unit ``r·f(uᵀx + λ)`` with ``r`` signed: where a layer's units feed a positively homogeneous
    activation (ReLU, LeakyReLU, PReLU, RReLU) the layer carries ``|r|`` and ``sign(r)`` acts right
    after the activation (a hook that ``register`` places by reading the model with ``torch.fx``).
    Where no activation follows, ``r·(uᵀx + λ)`` already is that unit. Where no exact place for
    the sign exists (GELU/SiLU/Tanh, an activation shared or applied as a function with no single
    consumer, an untraceable model outside ``nn.Sequential``) the layer keeps the weight form
    ``f(r·(uᵀx + λ))``, which differs once ``r`` crosses zero; the returned report says so.
    ``form="weight"`` gives the weight form everywhere.

    A Parameter shared by several modules (tied weights, e.g. an ``lm_head`` tied to the
    embedding) is skipped and reported: separate coordinates would untie it. So is a layer whose
    weight something else already reparametrizes (``weight_norm``, ``spectral_norm``,
    ``orthogonal``, old or new style; Note [Pre-parametrized layers] in :mod:`georeparam.selection`).
    Only ties through Parameters are seen: a module holding another's weight outside its Parameters
    (in a list or dict attribute, or as a view) is not detected, and after registering it silently
    keeps the old tensor; ``exclude`` such layers.

    Args:
        model: any ``nn.Module``.
        include: what to convert (default: every layer of a :data:`SUPPORTED` type): qualified
            module names, name suffixes as PEFT's ``target_modules`` (``"q_proj"``), glob patterns
            (``"*.mlp.*"``), ``re.compile(...)`` regexes and/or ``nn.Module`` types
            (:mod:`georeparam.selection`). Names and types must be supported layers; suffixes,
            patterns and regexes pick the supported layers among the modules they match.
        exclude: the same kinds of selector, for layers to skip (e.g. the output layer).
        mode: see :func:`geometric`.
        imn: also centre each registered layer's input (:func:`georeparam.input_mean_norm`,
            momentum 0.1), as the paper pairs GmP with IMN.
        form: ``"paper"`` or ``"weight"``.

    Returns:
        A :class:`georeparam.Report`: iterating it yields the registered layers' qualified names;
        printed, it is a table of each layer's form and why. ``model`` is changed in place; the
        report is not the model, and using it as one (``model = register(model)``, then
        ``model(x)``) raises at once, saying so (Note [What register returns] in
        :mod:`georeparam.report`).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> register(model, exclude=["2"])
        GmP: 1 layer registered (1 in the paper's form, 0 in the weight form), 1 skipped
          layer  type    form   where / why
          0      Linear  paper  sign(r) after 1 (ReLU)
          2      Linear  -      skipped: excluded
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"register expects an nn.Module. Got: {type(model).__name__}")
    check_mode(mode)
    if form not in FORMS:
        raise ValueError(f"register: form must be one of {FORMS}. Got: {form!r}")
    modules = {
        q: m
        for q, m in model.named_modules()
        if not (".parametrizations." in f".{q}." or q.endswith("parametrizations"))
    }
    inc = Selector(include, "include", "register").bind(
        modules
    )  # names, suffixes, globs, regexes, types: georeparam.selection
    exc = Selector(exclude, "exclude", "register").bind(modules)
    tied = _tied(model)
    chosen, entries = [], {}
    for qname, m in modules.items():
        kind = class_name(m)
        supported = is_supported(m)
        # names and types ask for a layer (an unsupported one is an error below); suffixes,
        # patterns and regexes pick the supported layers among what they match
        selected = (
            (inc.explicit(qname, m) or (supported and inc.matches(qname, m))) if include is not None else supported
        )
        own = {n: p for n, p in m._parameters.items() if p is not None}
        if not selected:
            if supported or any(p.dim() >= 2 for p in own.values()):
                why = "not included" if supported else f"unsupported type {kind}"
                entries[qname] = LayerReport(qname, kind, None, why=why)
            continue
        if exc.matches(qname, m):
            entries[qname] = LayerReport(qname, kind, None, why="excluded")
            continue
        already = _selection.foreign_parametrization(m, lambda p: isinstance(p, (GeometricWeight, GeometricBias)))
        if (
            not already
            and qname.endswith("base_layer")
            and _selection.is_peft_tuner_layer(modules.get(qname.rpartition(".")[0]))
        ):
            already = _selection.PEFT_BASE
        if already:
            entries[qname] = LayerReport(qname, kind, None, why=already)
            continue
        shared = [
            f"{n} with {', '.join(x for x in tied[id(p)] if x != (f'{qname}.{n}' if qname else n))}"
            for n, p in own.items()
            if id(p) in tied
        ]
        if shared:
            entries[qname] = LayerReport(
                qname, kind, None, why=f"tied: {'; '.join(shared)} (one set of coordinates each would untie them)"
            )
            continue
        chosen.append((qname, m))
    for qname, m in chosen:
        pairs = weight_names(m) if is_supported(m) else [("weight", "bias")]
        for wname, bname in pairs:
            try:
                validate(m, wname, bname, mode)
            except (TypeError, ValueError) as e:
                raise type(e)(f"register: layer {qname or '<root>'!r}: {e}") from None
    if not isinstance(imn, bool):
        raise TypeError(f"register: imn must be a bool. Got: {imn!r}")
    with_imn = [(q, m) for q, m in chosen if has_input(m)] if imn else []
    for qname, m in with_imn:
        try:
            _imn.check_input_mean_norm(m, "register(imn=True)")
        except (TypeError, ValueError) as e:
            raise type(e)(f"register: layer {qname or '<root>'!r}: {e}") from None
    if form == "paper":
        places = _placement.plan(model, [q for q, _ in chosen])
    else:
        places = {q: _placement.Placement("weight", why='form="weight" requested') for q, _ in chosen}
    # Note [A rollback that covers everything]
    # Every change register makes to the model happens inside the try: the parametrizations, the
    # sign hooks of the paper's form and the IMN hooks. A failure in any of them (a hook that
    # cannot be placed, an interrupt) takes all of it back, so the model is as it was.
    done = []
    try:
        for qname, m in chosen:
            original = {n: m._parameters.get(n, None) for pair in weight_names(m) for n in pair if n is not None}
            done.append((m, original))
            for wname, bname in weight_names(m):
                register_validated(m, wname, bname, mode, sign_after=places[qname].sign)
        for qname, m in chosen:
            place = places[qname]
            if place.sign:
                geometric_entry(m, "weight")[1].sign_hook = _signs.attach(modules, m, "weight", place)
        for _, m in with_imn:
            _imn.input_mean_norm(m)
    except BaseException:
        for _, m in with_imn:
            _imn.drop_input_mean_norm(m)
        for m, original in reversed(done):
            if is_geometric(m):
                for hook, _ in remove_one(m):
                    _signs.detach(hook)
            unretire(original.values())
            for n, p in original.items():
                if p is not None:
                    m._parameters[n] = p
        raise
    for qname, m in chosen:
        place = places[qname]
        where = place.where + (" (no IMN: attention or HF Conv1D)" if imn and (qname, m) not in with_imn else "")
        entries[qname] = LayerReport(qname, class_name(m), place.form, where=where, why=place.why, stays=place.stays)
    if not any(getattr(h, "hook", h) is check_forms for h in model._load_state_dict_pre_hooks.values()):
        model._register_load_state_dict_pre_hook(check_forms, with_module=True)  # Note [The form is part of the state]
    watch_wrappers()  # AveragedModel and PEFT around a GmP model: Note [Watching wrappers]
    if chosen:
        install_plain_save(model)  # Note [save_pretrained writes plain weights]
    return Report([entries[q] for q in modules if q in entries])
