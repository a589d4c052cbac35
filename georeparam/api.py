r"""Register, inspect and remove GmP on existing models.

Exactness. Registration keeps what a layer computes: the weight is rebuilt from float64
hyperspherical coordinates rounded once, to ≤ 1e-6 relative error (Frobenius) in float32 at every
fan-in up to 25,088 (measured ~6e-8) and ≤ 1e-12 in float64; the bias is ``r · (b / r)`` to one
rounding. These bounds are per weight: a network's output moves by about what rounding each of its
plain weights once to float32 moves it, since the per-weight errors add up over depth (ResNet-18s
at initialisation, eval mode: 1.3e-7 to 3.7e-7, 0.7–1.2× one rounding; an audit measured 2.2e-6 on
one whose weights' rounding moves it 2.75e-6); tested ≤ 2× one rounding (``tests/test_robustness.py``).
``remove`` bakes the current
weight and bias back bit-for-bit as computed.
"""

from __future__ import annotations

import warnings
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import imn as _imn
from . import placement as _placement
from . import signs as _signs
from .checkpoint import check_forms, check_layer_form, load_plain_entry, record_form
from .pickling import make_picklable
from .stale import retire, unretire
from ._map import check_mode
from .layouts import SUPPORTED, has_input, is_supported, layout_of, supported_names, weight_names
from .parametrization import _Geometric, _GeometricBias, check_radius, check_weight_values, offset_from, unit_radius
from .report import LayerReport, Report
from . import selection as _selection
from .selection import Selector

__all__ = ["geometric", "register", "remove", "is_geometric", "geometry", "Geometry", "SUPPORTED", "FORMS"]

#: The forms :func:`register` knows (see :mod:`georeparam.report`).
FORMS = ("paper", "weight")


class Geometry(NamedTuple):
    """The live Parameters of a GmP layer (``geometry(layer)``).

    Attributes:
        radius: ``(units,)`` radial parameters ``r``.
        angles: ``(units, fan_in − 1)`` angles in the latitude convention (see
            :mod:`georeparam.coords`; ``latitude_to_polar`` gives the paper's θ).
        offset: ``(units,)`` signed offsets ``λ`` with ``b = r·λ``, or ``None`` without bias.
    """

    radius: nn.Parameter
    angles: nn.Parameter
    offset: Optional[nn.Parameter]


# -------------------------------------------------------------------------------------------------
# queries
# -------------------------------------------------------------------------------------------------


def _geometric_entries(module: nn.Module) -> List[Tuple[str, _Geometric]]:
    if not parametrize.is_parametrized(module):
        return []
    return [
        (name, plist[0])
        for name, plist in module.parametrizations.items()
        if len(plist) > 0 and isinstance(plist[0], _Geometric)
    ]


def geometric_layers(model: nn.Module) -> List[Tuple[str, nn.Module, str, _Geometric]]:
    """``(qualified name, layer, weight name, parametrization)`` of every GmP weight under ``model``."""
    return [(q, m, w, p) for q, m in model.named_modules() for w, p in _geometric_entries(m)]


def is_geometric(module: nn.Module) -> bool:
    """Whether ``module`` itself carries a GmP parametrization.

    >>> layer = geometric(nn.Linear(3, 2))
    >>> is_geometric(layer), is_geometric(nn.Linear(3, 2))
    (True, False)
    """
    return len(_geometric_entries(module)) > 0


def _entry(module: nn.Module, name: Optional[str]) -> Tuple[str, _Geometric]:
    entries = _geometric_entries(module)
    if not entries:
        raise ValueError(f"{type(module).__name__} is not GmP-registered. Got: {module!r}")
    if name is None:
        return entries[0]
    for n, p in entries:
        if n == name:
            return n, p
    raise ValueError(
        f"{type(module).__name__}.{name} is not GmP-registered. Got: registered {[n for n, _ in entries]}"
    )


def geometry(module: nn.Module, name: Optional[str] = None) -> Geometry:
    """The live ``radius``, ``angles`` and ``offset`` Parameters of a GmP layer.

    Example:
        >>> layer = geometric(nn.Linear(5, 3))
        >>> g = geometry(layer)
        >>> tuple(g.radius.shape), tuple(g.angles.shape), tuple(g.offset.shape)
        ((3,), (3, 4), (3,))
        >>> torch.allclose(g.radius, layer.weight.norm(dim=1))
        True
    """
    wname, param = _entry(module, name)
    plist = module.parametrizations[wname]
    offset = None
    if param._bias_name is not None:
        offset = module.parametrizations[param._bias_name].original
    return Geometry(plist.original0, plist.original1, offset)


# -------------------------------------------------------------------------------------------------
# geometric
# -------------------------------------------------------------------------------------------------


def describe(module: nn.Module) -> str:
    """The class name a layer had before parametrization (``Linear``, not ``ParametrizedLinear``)."""
    return parametrize.type_before_parametrizations(module).__name__


def _validate(module: nn.Module, name: str, bias: Optional[str], mode: str) -> Tuple[Tensor, Optional[Tensor]]:
    """All checks of :func:`geometric`, before anything is changed. Returns (weight, bias)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"geometric expects an nn.Module. Got: {type(module).__name__}")
    check_mode(mode)
    what = describe(module)
    if not is_supported(module):
        raise TypeError(f"geometric supports {supported_names()} and their subclasses. Got: {what}")
    if is_geometric(module):
        raise ValueError(
            f"{what} is already GmP-registered. To register the rest of a model, leave this layer out "
            f"(register(model, exclude=[its name])); to register it again with other options, call "
            f"georeparam.remove on it first. Got: {module!r}"
        )
    if parametrize.is_parametrized(module, name):
        others = [type(p).__name__ for p in module.parametrizations[name]]
        raise ValueError(f"{what}.{name} already carries the parametrizations {others}. Got: {module!r}")
    weight = module._parameters.get(name, None)
    if not isinstance(weight, nn.Parameter):
        params = [n for n, p in module._parameters.items() if p is not None]
        raise ValueError(f"'{name}' is not a parameter of {what}. Got: parameters {params}")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{what}.{name} is not initialized yet (lazy module): run a forward pass first. "
            f"Got: an UninitializedParameter"
        )
    if weight.dim() < 2:
        raise ValueError(f"{what}.{name} must have at least 2 dimensions. Got: shape {tuple(weight.shape)}")
    check_weight_values(weight, f"{what}.{name}")
    layout = _layout(module, weight)
    with torch.no_grad():
        radius = unit_radius(layout.to_units(weight.detach()))  # the angles come later, in right_inverse
    # finite entries can still have a row norm that overflows the dtype (r = inf)
    check_radius(radius, f"{what}.{name}")
    b = None
    if bias is not None:
        if bias in module._parameters and module._parameters[bias] is not None:
            b = module._parameters[bias]
        elif bias not in module._parameters and bias != "bias":
            params = [n for n, p in module._parameters.items() if p is not None]
            raise ValueError(f"'{bias}' is not a parameter of {what}. Got: parameters {params}")
    if b is not None:
        if parametrize.is_parametrized(module, bias):
            raise ValueError(f"{what}.{bias} is already parametrized. Got: {module.parametrizations[bias]!r}")
        if b.dtype != weight.dtype:
            raise TypeError(f"{what}.{bias} must have the weight's dtype {weight.dtype}. Got: {b.dtype}")
        check_weight_values(b, f"{what}.{bias}")
        if b.shape != (layout.units,):
            raise ValueError(f"{what}.{bias} must have shape ({layout.units},), one per unit. Got: {tuple(b.shape)}")
        if b.requires_grad:  # a frozen bias stays plain: Note [A frozen bias]
            with torch.no_grad():
                offset_from(b.detach(), radius, f"{what}.{bias}")
    return weight, b


def _layout(module: nn.Module, weight: Tensor, mode: str = "exact", sign_after: bool = False) -> _Geometric:
    return _Geometric(layout_of(module, weight=weight), mode=mode, sign_after=sign_after)


def geometric(module: nn.Module, name: str = "weight", *, bias: Optional[str] = "bias", mode: str = "exact") -> nn.Module:
    r"""Register Geometric Parameterization on ``module.<name>`` (and its bias).

    Writes each unit (output neuron) as ``w = r·u(θ)`` and ``b = r·λ``. The coordinates are
    initialised from the layer's current values, so the layer computes what it computed before
    (its weight to ≤ 1e-6 relative in float32, ≤ 1e-12 in float64; a whole network's output to about
    one rounding of its weights, see the module docstring). A bias with ``requires_grad=False``
    stays a plain frozen Parameter (Note [A frozen bias]). The class stays a subclass of the original
    (``isinstance(layer, nn.Linear)`` holds); the new Parameters live under
    ``layer.parametrizations`` and are returned by :func:`geometry`.

    Build optimizers *after* registering: the old ``weight``/``bias`` Parameters are replaced.

    Args:
        module: an ``nn.Linear``, ``nn.ConvNd`` or ``nn.ConvTransposeNd`` (or a subclass).
        name: the weight parameter's name.
        bias: the bias parameter's name, or ``None`` to leave the bias Cartesian. A layer without
            bias simply gets none.
        mode: ``"exact"`` (the cosines' running product in float64; ~4e-8 relative in float32) or
            ``"fast"`` (all in the parameters' dtype; 5.6e-6 at fan-in 25,088 in float32; faster,
            see ``docs/speed.md``).

    Returns:
        ``module``, registered.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> layer = nn.Linear(4, 3)
        >>> x = torch.randn(2, 4)
        >>> before = layer(x)
        >>> layer = geometric(layer)
        >>> layer
        ParametrizedLinear(
          in_features=4, out_features=3, bias=True
          (parametrizations): ModuleDict(
            (weight): ParametrizationList(
              (0): _Geometric(units=3, fan_in=4, mode='exact')
            )
            (bias): ParametrizationList(
              (0): _GeometricBias(radius_from='weight')
            )
          )
        )
        >>> torch.allclose(layer(x), before, rtol=1e-6, atol=1e-7)
        True
    """
    _validate(module, name, bias, mode)
    _register_validated(module, name, bias, mode)
    return module


def _register_validated(module: nn.Module, name: str, bias: Optional[str], mode: str, sign_after: bool = False) -> None:
    original_weight = module._parameters[name]
    # Note [A frozen bias]
    # b = r·λ moves whenever the trainable r does, so a bias the user froze (requires_grad=False)
    # would still change in training. A frozen bias is left a plain Parameter (the same object):
    # the unit is r·u(θ)ᵀx + b (|r|·u(θ)ᵀx + b in the paper's form), b does not move, and remove
    # leaves it untouched.
    has_bias = bias is not None and module._parameters.get(bias, None) is not None and module._parameters[bias].requires_grad
    original_bias = module._parameters[bias] if has_bias else None
    param = _layout(module, original_weight, mode, sign_after)
    param._memory_format = _memory_format(original_weight)  # restored by remove
    param._parameter_order = list(module._parameters)  # restored by remove (optimizer state follows the order)
    # unsafe: shape and dtype are checked in _validate; skips one evaluation of the whole map
    parametrize.register_parametrization(module, name, param, unsafe=True)
    try:
        # attached after the weight's registration: from now on right_inverse is an assignment
        object.__setattr__(param, "_layer", module)
        param._weight_name = name
        if has_bias:  # λ gets a new Parameter: Note [Optimizers that hold replaced Parameters]
            module._parameters[bias] = nn.Parameter(original_bias.detach().clone(), original_bias.requires_grad)
            parametrize.register_parametrization(module, bias, _GeometricBias(module, name))
            param._bias_name = bias
        param._hook_handle_id = module._register_load_state_dict_pre_hook(_load_plain_state, with_module=True).id
        param._form_hook_id = module._register_state_dict_hook(record_form).id  # Note [The form is part of the state]
        make_picklable(type(module))  # the class parametrize injected: Note [Pickling a registered layer]
    except BaseException:
        if parametrize.is_parametrized(module, bias) if has_bias else False:
            parametrize.remove_parametrizations(module, bias, leave_parametrized=True)
        if has_bias:
            module._parameters[bias] = original_bias
        _own_class(module)
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        module._parameters[name] = original_weight
        _restore_order(module._parameters, param._parameter_order)
        raise
    retire((p, f"{describe(module)}.{n} (replaced by register)") for p, n in ((original_weight, name), (original_bias, bias)))


def _memory_format(weight: Tensor) -> torch.memory_format:
    """The memory format of a conv weight (channels_last kept through register → remove)."""
    if weight.dim() in (4, 5) and not weight.is_contiguous():
        fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        if weight.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


# -------------------------------------------------------------------------------------------------
# register (a whole model)
# -------------------------------------------------------------------------------------------------


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
    modules = {q: m for q, m in model.named_modules() if not (".parametrizations." in f".{q}." or q.endswith("parametrizations"))}
    inc = Selector(include, "include", "register").bind(modules)  # names, suffixes, globs, regexes, types: georeparam.selection
    exc = Selector(exclude, "exclude", "register").bind(modules)
    tied = _tied(model)
    chosen, entries = [], {}
    for qname, m in modules.items():
        kind = describe(m)
        supported = is_supported(m)
        # names and types ask for a layer (an unsupported one is an error below); suffixes,
        # patterns and regexes pick the supported layers among what they match
        selected = (inc.explicit(qname, m) or (supported and inc.matches(qname, m))) if include is not None else supported
        own = {n: p for n, p in m._parameters.items() if p is not None}
        if not selected:
            if supported or any(p.dim() >= 2 for p in own.values()):
                why = "not included" if supported else f"unsupported type {kind}"
                entries[qname] = LayerReport(qname, kind, None, why=why)
            continue
        if exc.matches(qname, m):
            entries[qname] = LayerReport(qname, kind, None, why="excluded")
            continue
        already = _selection.foreign_parametrization(m, lambda p: isinstance(p, (_Geometric, _GeometricBias)))
        if not already and qname.endswith("base_layer") and _selection.is_peft_tuner_layer(modules.get(qname.rpartition(".")[0])):
            already = _selection.PEFT_BASE
        if already:
            entries[qname] = LayerReport(qname, kind, None, why=already)
            continue
        shared = [f"{n} with {', '.join(x for x in tied[id(p)] if x != (f'{qname}.{n}' if qname else n))}" for n, p in own.items() if id(p) in tied]
        if shared:
            entries[qname] = LayerReport(qname, kind, None, why=f"tied: {'; '.join(shared)} (one set of coordinates each would untie them)")
            continue
        chosen.append((qname, m))
    for qname, m in chosen:
        pairs = weight_names(m) if is_supported(m) else [("weight", "bias")]
        for wname, bname in pairs:
            try:
                _validate(m, wname, bname, mode)
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
    done = []
    try:
        for qname, m in chosen:
            original = {n: m._parameters.get(n, None) for pair in weight_names(m) for n in pair if n is not None}
            done.append((m, original))
            for wname, bname in weight_names(m):
                _register_validated(m, wname, bname, mode, sign_after=places[qname].sign)
    except BaseException:
        for m, original in reversed(done):
            if is_geometric(m):
                _remove_one(m)
            unretire(original.values())
            for n, p in original.items():
                if p is not None:
                    m._parameters[n] = p
        raise
    for qname, m in chosen:
        place = places[qname]
        if place.sign:
            _entry(m, "weight")[1].sign_hook = _signs.attach(modules, m, "weight", place)
        where = place.where + (" (no IMN: attention or HF Conv1D)" if imn and (qname, m) not in with_imn else "")
        entries[qname] = LayerReport(qname, describe(m), place.form, where=where, why=place.why, stays=place.stays)
    for _, m in with_imn:
        _imn.input_mean_norm(m)
    if not any(getattr(h, "hook", h) is check_forms for h in model._load_state_dict_pre_hooks.values()):
        model._register_load_state_dict_pre_hook(check_forms, with_module=True)  # Note [The form is part of the state]
    from .handback import install_plain_save  # (both import this module)
    from .watch import watch_wrappers

    watch_wrappers()  # AveragedModel and PEFT around a GmP model: Note [Watching wrappers]
    if chosen:
        install_plain_save(model)  # Note [save_pretrained writes plain weights]
    return Report([entries[q] for q in modules if q in entries])


# -------------------------------------------------------------------------------------------------
# remove
# -------------------------------------------------------------------------------------------------


def _own_class(module: nn.Module) -> None:
    # Note [Shared parametrized class]
    # parametrize injects one class per registration (``ParametrizedLinear``), and deepcopy gives
    # the copy that very class. Removing deletes the property from the class, which would break
    # every other module sharing it (an EMA copy, say). Removing from a private clone of the
    # class keeps the others intact; its base is still the original class that gets restored.
    cls = module.__class__
    clone = type(cls.__name__, cls.__bases__, {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
    module.__class__ = clone


def _orphan_biases(module: nn.Module) -> List[str]:
    """Biases still GmP-parametrized whose weight was unregistered by torch's own remover."""
    if not parametrize.is_parametrized(module):
        return []
    weights = {n for n, _ in _geometric_entries(module)}
    return [
        n for n, plist in module.parametrizations.items()
        if len(plist) and isinstance(plist[0], _GeometricBias) and plist[0].weight_name not in weights
    ]  # fmt: skip


def _remove_one(module: nn.Module) -> List[Tuple["_signs.SignHook", Tensor]]:
    """Bake one layer back; returns its live sign hooks with their signs, for :func:`_signs.bake`."""
    pending = []
    # the order before the first registration (a later one on the same layer saw fewer names)
    order = max((getattr(p, "_parameter_order", []) for _, p in _geometric_entries(module)), key=len, default=[])
    for wname, param in _geometric_entries(module):
        if param.sign_hook is not None:
            pending.append((param.sign_hook, param.sign_hook.sign().detach().clone()))
            param.sign_hook = None
        bname = param._bias_name
        with torch.no_grad():
            g = geometry(module, wname)
            weight = getattr(module, wname).detach().clone(memory_format=getattr(param, "_memory_format", torch.preserve_format))
            bias = getattr(module, bname).detach().clone() if bname is not None else None
        _own_class(module)
        if bname is not None:
            parametrize.remove_parametrizations(module, bname, leave_parametrized=True)
            module._parameters[bname] = nn.Parameter(bias, requires_grad=g.offset.requires_grad)
        parametrize.remove_parametrizations(module, wname, leave_parametrized=True)
        module._parameters[wname] = nn.Parameter(weight, requires_grad=g.radius.requires_grad or g.angles.requires_grad)
        retire((p, f"{describe(module)}.{wname} {k} (replaced by remove)") for k, p in g._asdict().items())
        hid = getattr(param, "_hook_handle_id", None)
        if hid is not None:
            module._load_state_dict_pre_hooks.pop(hid, None)
        module._state_dict_hooks.pop(getattr(param, "_form_hook_id", None), None)
    _restore_order(module._parameters, order)
    # fold the running mean into the (now plain) bias where exact, else keep it --
    if _imn.has_input_mean_norm(module) and not is_geometric(module):
        _imn.fold_input_mean_norm(module)
    return pending


def _restore_order(params: dict, order: Sequence[str]) -> None:
    """Put ``params`` (a module's ``_parameters``) back in its order before registration
    (parametrize re-adds the baked tensors last): an optimizer's saved state is matched to
    ``parameters()`` by position."""
    rank = {n: i for i, n in enumerate(order)}
    items = sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    params.clear()
    params.update(items)


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
        >>> layer = geometric(nn.Linear(3, 2))
        >>> w = layer.weight.detach().clone()
        >>> layer = remove(layer)
        >>> type(layer).__name__, torch.equal(layer.weight, w)
        ('Linear', True)
    """
    if not isinstance(model_or_module, nn.Module):
        raise TypeError(f"remove expects an nn.Module. Got: {type(model_or_module).__name__}")
    # Note [torch's remover on a GmP weight]: finish what torch's remover left (bias, sign)
    orphans = [(m, names) for m in model_or_module.modules() for names in [_orphan_biases(m)] if names]
    signs = [(h, h.sign().detach().clone()) for h in _signs.live_hooks(model_or_module) if h.orphaned()]
    for m, names in orphans:
        for bname in names:
            _own_class(m)
            parametrize.remove_parametrizations(m, bname, leave_parametrized=True)
    targets = [m for m in model_or_module.modules() if is_geometric(m)]
    if (orphans or signs) and not targets:
        _bake_all(signs)
        return model_or_module
    if not targets:
        raise ValueError(
            f"remove: {describe(model_or_module)} has no GmP-registered layer. Got: {type(model_or_module).__name__}"
        )
    _refuse_sharded(targets)
    pending = signs
    for m in targets:
        pending += _remove_one(m)
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


# -------------------------------------------------------------------------------------------------
# loading plain checkpoints
# -------------------------------------------------------------------------------------------------


def _load_plain_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: converts a plain ``weight``/``bias`` into GmP coordinates (:mod:`georeparam.checkpoint`)."""
    check_layer_form(module, prefix, local_metadata)
    for wname, param in _geometric_entries(module):
        refused = len(error_msgs)
        load_plain_entry(module, wname, param, state_dict, prefix, missing_keys, error_msgs)
        if len(error_msgs) > refused:
            # Refused: the layer keeps its values. Without this the plain keys stayed in the
            # checkpoint and PyTorch listed false "Missing key(s) … original0 / Unexpected key(s)
            # … weight" lines before the reason. The layer's own coordinates stand in for them.
            for name in (wname, param._bias_name):
                if name is not None:
                    state_dict.pop(prefix + name, None)
                    state_dict.update(module.parametrizations[name].state_dict(prefix=f"{prefix}parametrizations.{name}."))
