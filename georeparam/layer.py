r"""One layer: put GmP on it (:func:`geometric`), read it (:func:`geometry`, :func:`is_geometric`),
take it back (:func:`remove_one`), and load a plain checkpoint into it.

Exactness. Registration keeps what a layer computes: the weight is rebuilt from float64
hyperspherical coordinates rounded once, to ≤ 1e-6 relative error (Frobenius) in float32 at every
fan-in up to 25,088 and ≤ 1e-12 in float64 (``tests/test_coords.py``; measured values in
``docs/precision.md``); the bias is ``r · (b / r)`` to one rounding. These bounds are per weight: a
network's output moves by about what rounding each of its plain weights once to float32 moves it,
since the per-weight errors add up over depth; tested ≤ 2× one rounding on ResNet-18s
(``tests/test_robustness.py``). :func:`remove_one` bakes the current weight and bias back
bit-for-bit as computed.

Whole models are :mod:`georeparam.model` (``register``) and :mod:`georeparam.removal` (``remove``).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import imn as _imn
from . import signs as _signs
from .checkpoint import check_layer_form, load_plain_entry, record_form
from .layouts import is_supported, layout_of, supported_names
from ._map import check_mode
from ._util import class_name
from .parametrization import GeometricBias, GeometricWeight, check_radius, check_weight_values, offset_from, unit_radius
from .pickling import make_picklable
from .stale import retire

__all__ = [
    "Geometry",
    "geometric",
    "geometry",
    "is_geometric",
    "geometric_layers",
    "geometric_entries",
    "geometric_entry",
    "validate",
    "register_validated",
    "own_class",
    "orphan_biases",
    "remove_one",
]


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


def geometric_entries(module: nn.Module) -> List[Tuple[str, GeometricWeight]]:
    if not parametrize.is_parametrized(module):
        return []
    return [
        (name, plist[0])
        for name, plist in module.parametrizations.items()
        if len(plist) > 0 and isinstance(plist[0], GeometricWeight)
    ]


def geometric_layers(model: nn.Module) -> List[Tuple[str, nn.Module, str, GeometricWeight]]:
    """``(qualified name, layer, weight name, parametrization)`` of every GmP weight under ``model``."""
    return [(q, m, w, p) for q, m in model.named_modules() for w, p in geometric_entries(m)]


def is_geometric(module: nn.Module) -> bool:
    """Whether ``module`` itself carries a GmP parametrization.

    >>> layer = geometric(nn.Linear(3, 2))
    >>> is_geometric(layer), is_geometric(nn.Linear(3, 2))
    (True, False)
    """
    return len(geometric_entries(module)) > 0


def geometric_entry(module: nn.Module, name: Optional[str]) -> Tuple[str, GeometricWeight]:
    entries = geometric_entries(module)
    if not entries:
        raise ValueError(f"{type(module).__name__} is not GmP-registered. Got: {module!r}")
    if name is None:
        return entries[0]
    for n, p in entries:
        if n == name:
            return n, p
    raise ValueError(f"{type(module).__name__}.{name} is not GmP-registered. Got: registered {[n for n, _ in entries]}")


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
    wname, param = geometric_entry(module, name)
    plist = module.parametrizations[wname]
    offset = None
    if param.bias_name is not None:
        offset = module.parametrizations[param.bias_name].original
    return Geometry(plist.original0, plist.original1, offset)


def validate(module: nn.Module, name: str, bias: Optional[str], mode: str) -> Tuple[Tensor, Optional[Tensor]]:
    """All checks of :func:`geometric`, before anything is changed. Returns (weight, bias)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"geometric expects an nn.Module. Got: {type(module).__name__}")
    check_mode(mode)
    what = class_name(module)
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


def _layout(module: nn.Module, weight: Tensor) -> GeometricWeight:
    return GeometricWeight(layout_of(module, weight=weight))


def geometric(
    module: nn.Module, name: str = "weight", *, bias: Optional[str] = "bias", mode: str = "exact"
) -> nn.Module:
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
        mode: ``"exact"`` (the cosines' running product in float64; ≤ 2e-7 relative in float32) or
            ``"fast"`` (all in the parameters' dtype; ≤ 4·√n·eps at fan-in n in float32; faster, see
            ``docs/speed.md``); tested up to fan-in 25,088, measured in ``docs/precision.md``.

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
              (0): GeometricWeight(units=3, fan_in=4, mode='exact')
            )
            (bias): ParametrizationList(
              (0): GeometricBias(radius_from='weight')
            )
          )
        )
        >>> torch.allclose(layer(x), before, rtol=1e-6, atol=1e-7)
        True
    """
    validate(module, name, bias, mode)
    register_validated(module, name, bias, mode)
    return module


def register_validated(module: nn.Module, name: str, bias: Optional[str], mode: str, sign_after: bool = False) -> None:
    original_weight = module._parameters[name]
    # Note [A frozen bias]
    # b = r·λ moves whenever the trainable r does, so a bias the user froze (requires_grad=False)
    # would still change in training. A frozen bias is left a plain Parameter (the same object):
    # the unit is r·u(θ)ᵀx + b (|r|·u(θ)ᵀx + b in the paper's form), b does not move, and remove
    # leaves it untouched.
    has_bias = (
        bias is not None and module._parameters.get(bias, None) is not None and module._parameters[bias].requires_grad
    )
    original_bias = module._parameters[bias] if has_bias else None
    # the memory format and the parameter order are restored by remove (optimizer state follows the order)
    param = GeometricWeight(
        layout_of(module, weight=original_weight), mode=mode, sign_after=sign_after,
        memory_format=_memory_format(original_weight), parameter_order=list(module._parameters),
    )  # fmt: skip
    # unsafe: shape and dtype are checked in validate; skips one evaluation of the whole map
    parametrize.register_parametrization(module, name, param, unsafe=True)
    try:
        if has_bias:  # λ gets a new Parameter: Note [Optimizers that hold replaced Parameters]
            module._parameters[bias] = nn.Parameter(original_bias.detach().clone(), original_bias.requires_grad)
            parametrize.register_parametrization(module, bias, GeometricBias(module, name))
        load_id = module._register_load_state_dict_pre_hook(_load_plain_state, with_module=True).id
        form_id = module._register_state_dict_hook(record_form).id  # Note [The form is part of the state]
        # bound after the weight's registration: from now on right_inverse is an assignment
        param.bind(module, name, bias if has_bias else None, load_hook_id=load_id, form_hook_id=form_id)
        make_picklable(type(module))  # the class parametrize injected: Note [Pickling a registered layer]
    except BaseException:
        if parametrize.is_parametrized(module, bias) if has_bias else False:
            parametrize.remove_parametrizations(module, bias, leave_parametrized=True)
        if has_bias:
            module._parameters[bias] = original_bias
        own_class(module)
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        module._parameters[name] = original_weight
        _restore_order(module._parameters, param.parameter_order)
        raise
    retire(
        (p, f"{class_name(module)}.{n} (replaced by register)")
        for p, n in ((original_weight, name), (original_bias, bias))
    )


def _memory_format(weight: Tensor) -> torch.memory_format:
    """The memory format of a conv weight (channels_last kept through register → remove)."""
    if weight.dim() in (4, 5) and not weight.is_contiguous():
        fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        if weight.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def own_class(module: nn.Module) -> None:
    # Note [Shared parametrized class]
    # parametrize injects one class per registration (``ParametrizedLinear``), and deepcopy gives
    # the copy that very class. Removing deletes the property from the class, which would break
    # every other module sharing it (an EMA copy, say). Removing from a private clone of the
    # class keeps the others intact; its base is still the original class that gets restored.
    cls = module.__class__
    clone = type(
        cls.__name__, cls.__bases__, {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    )
    module.__class__ = clone


def orphan_biases(module: nn.Module) -> List[str]:
    """Biases still GmP-parametrized whose weight was unregistered by torch's own remover."""
    if not parametrize.is_parametrized(module):
        return []
    weights = {n for n, _ in geometric_entries(module)}
    return [
        n for n, plist in module.parametrizations.items()
        if len(plist) and isinstance(plist[0], GeometricBias) and plist[0].weight_name not in weights
    ]  # fmt: skip


def remove_one(module: nn.Module) -> List[Tuple["_signs.SignHook", Tensor]]:
    """Bake one layer back; returns its live sign hooks with their signs, for :func:`_signs.bake`."""
    pending = []
    # the order before the first registration (a later one on the same layer saw fewer names)
    order = max((p.parameter_order for _, p in geometric_entries(module)), key=len, default=[])
    for wname, param in geometric_entries(module):
        if param.sign_hook is not None:
            pending.append((param.sign_hook, param.sign_hook.sign().detach().clone()))
            param.sign_hook = None
        bname = param.bias_name
        with torch.no_grad():
            g = geometry(module, wname)
            weight = getattr(module, wname).detach().clone(memory_format=param.memory_format)
            bias = getattr(module, bname).detach().clone() if bname is not None else None
        own_class(module)
        if bname is not None:
            parametrize.remove_parametrizations(module, bname, leave_parametrized=True)
            module._parameters[bname] = nn.Parameter(bias, requires_grad=g.offset.requires_grad)
        parametrize.remove_parametrizations(module, wname, leave_parametrized=True)
        module._parameters[wname] = nn.Parameter(weight, requires_grad=g.radius.requires_grad or g.angles.requires_grad)
        retire((p, f"{class_name(module)}.{wname} {k} (replaced by remove)") for k, p in g._asdict().items())
        if param.load_hook_id is not None:
            module._load_state_dict_pre_hooks.pop(param.load_hook_id, None)
        module._state_dict_hooks.pop(param.form_hook_id, None)
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


def _load_plain_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: converts a plain ``weight``/``bias`` into GmP coordinates (:mod:`georeparam.checkpoint`)."""
    check_layer_form(module, prefix, local_metadata)
    for wname, param in geometric_entries(module):
        refused = len(error_msgs)
        load_plain_entry(module, wname, param, state_dict, prefix, missing_keys, error_msgs)
        if len(error_msgs) > refused:
            # Refused: the layer keeps its values. Without this the plain keys stayed in the
            # checkpoint and PyTorch listed false "Missing key(s) … original0 / Unexpected key(s)
            # … weight" lines before the reason. The layer's own coordinates stand in for them.
            for name in (wname, param.bias_name):
                if name is not None:
                    state_dict.pop(prefix + name, None)
                    state_dict.update(
                        module.parametrizations[name].state_dict(prefix=f"{prefix}parametrizations.{name}.")
                    )
