r"""The ``torch.nn.utils.parametrize`` modules behind :func:`georeparam.geometric`.

* :class:`GeometricWeight` (on the weight): ``(radius, angles) → W`` with one unit per output neuron,
  ``w_i = r_i · u(angles_i)`` (the weight form) or ``w_i = |r_i| · u(angles_i)`` (the paper's form,
  where ``sign(r_i)`` acts after the activation: :mod:`georeparam.signs`); stored as
  ``parametrizations.weight.original0`` (radius, one per unit, signed) and
  ``parametrizations.weight.original1`` (latitude angles, ``units × (fan_in − 1)``).
* :class:`GeometricBias` (on the bias): ``offset → b = r · λ`` (``|r| · λ`` in the paper's form),
  reading the live radius of the same layer; stored as ``parametrizations.bias.original``.

Units: the ``(units, fan_in)`` view of each layer type is :mod:`georeparam.layouts`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._map import check_mode, prepare, scaled_unit
from ._util import class_name
from .coords import row_norms, to_hyperspherical
from .layouts import Layout
from .signs import readable, smallest, unit_sign


class GeometricWeight(nn.Module):
    """``(radius, angles) → weight`` for one layer's weight tensor.

    ``sign_after``: the paper's form (:mod:`georeparam.signs`): the weight is ``|r|·u`` and
    ``sign(r)`` acts after the activation; otherwise the weight form ``w = r·u``.
    """

    def __init__(
        self, shape, *, transposed: bool = False, groups: int = 1, mode: str = "exact", sign_after: bool = False,
        channel_dim: int = -1, memory_format: torch.memory_format = torch.contiguous_format, parameter_order=(),
    ):  # fmt: skip
        super().__init__()
        check_mode(mode)
        install_cast_guard()
        self.layout = (
            shape
            if isinstance(shape, Layout)
            else Layout(shape, channel_dim=channel_dim, transposed=transposed, groups=groups)
        )
        self.mode = mode
        self.sign_after = bool(sign_after)
        if self.sign_after and self.layout.fan_in == 1:  # Note [The official 1-D unit] (set by right_inverse)
            self.register_buffer("direction", torch.ones(self.layout.units))
        self._memory_format_name = str(memory_format).rpartition(".")[2]  # Note [The weight's memory format]
        self._parameter_order = list(parameter_order)
        # set by bind once the layer is registered; see Note [Assigning the weight]
        self._bias_name = None
        self._weight_name = None
        self._hook_handle_id = None
        self._form_hook_id = None
        #: the :class:`georeparam.signs.SignHook` carrying sign(r), in the paper's form
        self.sign_hook = None

    def bind(
        self,
        layer: nn.Module,
        weight_name: str,
        bias_name: Optional[str] = None,
        *,
        load_hook_id: Optional[int] = None,
        form_hook_id: Optional[int] = None,
    ) -> None:
        """Attach this map to ``layer.<weight_name>`` once torch's parametrize has registered it
        (from then on ``right_inverse`` is an assignment: Note [Assigning the weight]).

        ``bias_name``: the layer's GmP bias (``b = r·λ``), if any; ``load_hook_id`` /
        ``form_hook_id``: the ids of the layer's plain-checkpoint load pre-hook and its form
        ``state_dict`` hook, which ``remove`` takes off again.
        """
        object.__setattr__(self, "_layer", layer)  # a plain attribute: Note [How the bias reaches the radius]
        self._weight_name = weight_name
        self._bias_name = bias_name
        self._hook_handle_id = load_hook_id
        self._form_hook_id = form_hook_id

    # getattr with defaults: maps pickled before these existed load too
    layer = property(lambda self: getattr(self, "_layer", None), doc="The layer :meth:`bind` attached, or ``None``.")
    weight_name = property(lambda self: getattr(self, "_weight_name", None), doc="The weight's name on :attr:`layer`.")
    bias_name = property(
        lambda self: getattr(self, "_bias_name", None),
        doc="The name of the layer's GmP bias (``b = r·λ``), or ``None``.",
    )
    load_hook_id = property(
        lambda self: getattr(self, "_hook_handle_id", None), doc="The id of the layer's plain-checkpoint load pre-hook."
    )
    form_hook_id = property(
        lambda self: getattr(self, "_form_hook_id", None), doc="The id of the layer's form ``state_dict`` hook."
    )
    parameter_order = property(
        lambda self: list(getattr(self, "_parameter_order", [])),
        doc="The layer's ``_parameters`` names before registration (``remove`` restores that order).",
    )

    @property
    def memory_format(self) -> torch.memory_format:
        """The original weight's memory format (Note [The weight's memory format]); kept by name
        because a ``torch.memory_format`` does not pickle with ``torch.save``'s protocol 2."""
        return getattr(torch, getattr(self, "_memory_format_name", "contiguous_format"))

    # -- layout (georeparam.layouts) ------------------------------------------------------------
    shape = property(lambda self: self.layout.shape)
    units = property(lambda self: self.layout.units)
    fan_in = property(lambda self: self.layout.fan_in)
    transposed = property(lambda self: self.layout.transposed)
    groups = property(lambda self: self.layout.groups)

    def to_units(self, weight: Tensor) -> Tensor:
        """Weight tensor → ``(units, fan_in)`` matrix (a view where possible)."""
        return self.layout.to_units(weight)

    def from_units(self, mat: Tensor) -> Tensor:
        """``(units, fan_in)`` matrix → weight tensor; the inverse of :meth:`to_units`."""
        return self.layout.from_units(mat)

    def effective_radius(self, radius: Tensor) -> Tensor:
        """The radius the layer's weight carries: ``|r|`` in the paper's form, else ``r``.

        In the paper's form the sign is held constant (``s(0) = +1``) and an exact ``r = 0`` is
        carried as a tiny positive number (Note [The gradient at r = 0] in :mod:`georeparam.signs`;
        Note [A carrier that survives flush-to-zero] for its size).
        """
        if not self.sign_after:
            return radius
        r = radius.detach()
        # Note [The paper form's fixed cost]
        # This runs twice per layer and step (the weight, then the bias b = |r|·λ). Its general
        # form below is five small ops (~20 µs on a 32-unit layer, 1 thread); with the sign hook's
        # check and the backward of the product, the paper's form cost 139 µs per ReLU-followed
        # layer and step over the weight form (MLP of eight 32-wide layers, batch 8; issue 22
        # measured ~216 µs on another host). Where the radii can be read on the host (Note
        # [Reading a sign on the host] in georeparam.signs): all r > 0 means |r| = r, s = +1 and
        # no carrier, so the radius itself is returned (bit-identical: r·1 + 0 = r, ∂/∂r = 1);
        # with no r exactly 0, |r| (torch's abs: ∂/∂r = sign(r) = s there) replaces the five ops.
        # With the sign hook's own shortcuts (georeparam.signs.SignHook._apply), measured by
        # ``benchmarks/speed.py --only paper`` (1 thread, CPU time, 2-core AMD EPYC): 133 · 160 µs
        # → 29–39 · 87–115 µs per layer and step (all r > 0 · every other r < 0; the spread is
        # the host's load).
        if readable(r):
            low = smallest(r)
            if low > 0:
                return radius
            if low < 0 and smallest(r.abs()) > 0:  # some r < 0, none 0 (a NaN makes low NaN: the general form)
                return radius.abs()  # = r·s exactly, and torch's ∂|r|/∂r = sign(r) = s where r ≠ 0
        zero = (r == 0).to(r.dtype).mul_(zero_carrier(r.dtype))  # in r's dtype: float64's carrier is 0 in float32
        return torch.addcmul(zero, radius, unit_sign(r))  # one op with a gradient (∂/∂r = s)

    # -- the map -------------------------------------------------------------------------------
    def forward(self, radius: Tensor, angles: Tensor) -> Tensor:
        # Note [Autocast]
        # Under fp16/bf16 autocast the angles would otherwise be cast before cos/sin/cumprod; the
        # map runs in the parameters' dtype (float32 at least; coords' Note [Where float64 is
        # needed]) and the layer's own op casts the finished weight.
        if angles.is_meta:  # Note [Meta tensors]: shapes only
            return self.from_units(radius.new_empty((self.units, self.fan_in)))
        device = angles.device.type  # entering autocast's context costs more than the map of a small layer
        with torch.autocast(device_type=device, enabled=False) if _autocast_on(device) else contextlib.nullcontext():
            w = scaled_unit(self.effective_radius(radius), angles, self.mode)
            d = getattr(self, "direction", None)
            weight = self.from_units(w if d is None else w * d.to(w.dtype)[:, None])
        # Note [The weight's memory format]
        # A channels_last conv weight makes the conv choose channels_last kernels and output.
        # Handing the conv a contiguous weight instead changed the output's layout (and can
        # change its rounding), so registered and removed layers were not bit-identical.
        fmt = self.memory_format
        return weight if fmt == torch.contiguous_format else weight.contiguous(memory_format=fmt)

    def right_inverse(self, weight: Tensor) -> Tuple[Tensor, Tensor]:
        # Note [Assigning the weight]
        # ``layer.weight = W`` ends here. The bias b = r·λ must keep its value, so λ is rescaled to
        # b / r_new. In the paper's form W is |r|·u and each unit keeps its sign(r). This is the
        # only place that sees both the old and the new radius.
        # Everything is checked before the offset is touched: PyTorch's own checks of our result
        # (dtype) run after this returns, when the rescaled offset would already be written.
        layer = self.layer
        what = "weight"
        if layer is not None:  # an assignment (at registration the layer is not attached yet)
            what = f"{class_name(layer)}.{self._weight_name}"
            current = layer.parametrizations[self._weight_name].original0
            _check_assigned(weight, current, what)
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"{what} must have shape {tuple(self.shape)}. Got: {tuple(weight.shape)}")
        check_weight_values(weight, what)
        prepare(weight)  # the CPU kernel, loaded now for a torch.compile graph traced later
        with torch.no_grad():
            radius, angles = unit_coordinates(self.to_units(weight))
            check_radius(radius, what)
            if getattr(self, "direction", None) is not None:
                # Note [The official 1-D unit]
                # At fan-in 1 the direction ±1 would be the sign of r, and sign(r) after f would
                # leave no unit with r·f(−x + λ). The official 1-D unit r·ReLU(s·x + λ) freezes the
                # direction s = sign(w) in a buffer (in the state dict, baked into w = |r|·s at
                # remove); assigning a weight sets it anew. r = |w| here, signed from then on.
                direction = unit_sign(radius)  # stored below, once nothing can refuse
                radius = radius * direction
            if layer is not None:
                old_radius = layer.parametrizations[self._weight_name].original0
                if self._bias_name is not None:
                    bias_list = layer.parametrizations[self._bias_name]
                    bias = self.effective_radius(old_radius).to(torch.float64) * bias_list.original.to(torch.float64)
                    offset = offset_from(bias, radius, f"{what} (keeping {self._bias_name})")
                    bias_list.original.copy_(offset)
                if self.sign_after:  # the weight is |r|·u: each unit keeps its sign(r) after the activation
                    radius = radius * unit_sign(old_radius)
            if getattr(self, "direction", None) is not None:
                self.direction = direction
        return radius, angles

    def _apply(self, fn, recurse=True):
        # Note [Casting a registered layer]
        # ``model.half()`` casts radius and offset separately: a row whose entries fit float16 can
        # have a norm that does not (r = inf, w = inf·u, where the plain float16 layer is finite),
        # and a tiny row's r can round to 0, taking b = r·λ with it. The whole model is checked
        # before anything is cast (Note [An atomic cast]); this per-layer check only runs where
        # that did not (a ParametrizationList cast on its own).
        layer = self.layer
        if layer is not None and self._weight_name is not None and not _CAST.depth:
            _check_cast(layer, self._weight_name, self._bias_name, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        s = f"units={self.units}, fan_in={self.fan_in}, mode={self.mode!r}"
        if self.sign_after:
            s += ", sign_after=True"
        if self.transposed:
            s += ", transposed=True"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s


class GeometricBias(nn.Module):
    """``offset → bias = radius · offset``, the radius read live from the layer's weight.

    # Note [How the bias reaches the radius]
    The layer is held as a plain attribute, not a submodule: a submodule would put the radius
    into the state_dict twice and make a cycle in ``named_modules``. Reading it at call time
    (``layer.parametrizations[weight].original0``) is what makes ``copy.deepcopy`` (the memo maps
    the layer to its copy), ``torch.func.functional_call`` (a swapped radius is seen), ``.to()``
    and DDP work: the bias never holds a tensor of its own.
    """

    def __init__(self, layer: nn.Module, weight_name: str):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_weight_list", layer.parametrizations[weight_name])
        self.weight_name = weight_name

    def _radius(self) -> Tensor:
        """The radius the weight carries (``|r|`` in the paper's form)."""
        plists = self._layer.parametrizations
        if self.weight_name in plists:
            plist = plists[self.weight_name]
        else:
            # Note [torch's remover on a GmP weight]
            # ``parametrize.remove_parametrizations(layer, "weight")`` bakes w and drops the weight's
            # ParametrizationList, radius included, while this bias still reads r. The bias keeps
            # that list (a plain attribute, not a submodule: nothing is duplicated in state_dict)
            # and goes on with the radius's last value, so the layer computes what it computed;
            # the radius no longer trains. ``georeparam.remove`` bakes the bias too.
            plist = self._weight_list
            if not getattr(self, "_warned", False):
                object.__setattr__(self, "_warned", True)
                warnings.warn(
                    f"{class_name(self._layer)}.{self.weight_name}: its GmP "
                    f"parametrization was removed with torch's remove_parametrizations, but the bias b = r·λ reads "
                    f"r; the bias keeps r's last value (r no longer trains). Call georeparam.remove(layer) to bake "
                    f"the bias too, or use georeparam.remove instead of torch's remover",
                    stacklevel=2,
                )
        return plist[0].effective_radius(plist.original0)

    def forward(self, offset: Tensor) -> Tensor:
        return self._radius() * offset

    def right_inverse(self, bias: Tensor) -> Tensor:
        radius = self._radius()
        what = f"{class_name(self._layer)}.bias"
        _check_assigned(bias, radius, what)
        if tuple(bias.shape) != tuple(radius.shape):  # b = r·λ would broadcast silently
            raise ValueError(f"{what} must have shape {tuple(radius.shape)}, one per unit. Got: {tuple(bias.shape)}")
        check_weight_values(bias, what)
        with torch.no_grad():
            return offset_from(bias, radius, what)

    def extra_repr(self) -> str:
        return f"radius_from={self.weight_name!r}"


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def unit_coordinates(units: Tensor) -> Tuple[Tensor, Tensor]:
    """``(radius, latitude angles)`` of a ``(units, fan_in)`` matrix; shapes only for a meta tensor."""
    if units.is_meta:  # Note [Meta tensors] (in offset_from)
        return units.new_empty(units.shape[:1]), units.new_empty((units.shape[0], units.shape[1] - 1))
    return to_hyperspherical(units)


def unit_radius(units: Tensor) -> Tensor:
    """``‖row‖`` of a ``(units, fan_in)`` matrix in one pass (the checks before registration need
    no angles); shape only for a meta tensor."""
    if units.is_meta:
        return units.new_empty(units.shape[:1])
    return row_norms(units)


def _check_assigned(value, like: Tensor, what: str) -> None:
    """An assigned weight/bias must be a tensor of the stored coordinates' dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be assigned a Tensor. Got: {type(value).__name__}")
    if value.dtype != like.dtype or value.device != like.device:
        raise TypeError(
            f"{what} must be assigned a tensor of dtype {like.dtype} on {like.device}. "
            f"Got: dtype {value.dtype} on {value.device}"
        )


def check_weight_values(t: Tensor, what: str) -> None:
    if not t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be a real floating-point tensor. Got: dtype={t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{what} must not be empty. Got: shape {tuple(t.shape)}")
    if t.is_meta:  # Note [Meta tensors]: no values to check
        return
    lo, hi = torch.aminmax(t.detach())  # one pass; NaN and ±inf show in the extremes
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{what} must be finite. Got: {bad} NaN/Inf entries")


def check_radius(radius: Tensor, what: str) -> None:
    """Refuse rows whose norm ``r = ‖w‖`` overflows the dtype (each entry finite, the norm not).

    Without this a float32 row of entries near 1e38 became ``r = inf`` and ``w = inf·u``: a
    finite layer silently turned into Inf/NaN outputs.
    """
    if radius.is_meta:  # Note [Meta tensors]
        return
    bad = ~torch.isfinite(radius)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{what}: the norm of the weight rows of units {idx} overflows {radius.dtype} (largest "
            f"{torch.finfo(radius.dtype).max:.3g}), so GmP's radius r = ‖w‖ cannot hold it. Scale the "
            f"layer down or use a wider dtype. Got: {int(bad.sum())} such units"
        )


def zero_carrier(dtype: torch.dtype) -> float:
    """The positive number that carries ``|r|`` at an exact ``r = 0`` in the paper's form.

    # Note [A carrier that survives flush-to-zero]
    The carrier ``t`` makes the activation see ``t·z`` instead of ``0·z`` (whose derivative is
    0: Note [The gradient at r = 0] in :mod:`georeparam.signs`). It was the smallest normal
    number (1.2e-38 in float32): then ``t·u_i`` and ``t·z`` are subnormal for ``|z| < 1``, and
    under ``torch.set_flush_denormal(True)`` (FTZ/DAZ, also set by some libraries and compilers)
    they flushed to 0, so the gradient at ``r = 0`` was 0 again. ``t = 2^⌊e/2⌋`` with
    ``tiny = 2^e`` (1.1e-19 in float32 and bfloat16, 1.5e-154 in float64) keeps ``t·z`` normal
    for every ``|z| ≥ √tiny``; the unit outputs ``t·f(z)`` instead of 0, nineteen orders of
    magnitude (float32) below any activation of order 1e-12. float16 keeps its smallest normal
    (6.1e-5; its ``√tiny`` would be 7.8e-3), as before.
    """
    tiny = torch.finfo(dtype).tiny
    if dtype == torch.float16:
        return tiny
    return 2.0 ** (math.frexp(tiny)[1] // 2)


# Note [An atomic cast]
# ``Module._apply`` casts children first, one module at a time: a refusal raised by one GmP layer
# (Note [Casting a registered layer]) came after every module visited before it had been cast,
# so a refused ``model.half()`` left earlier layers in float16 and the model no longer ran. No
# module of ours runs before the first child is cast, so the check has to sit on ``Module._apply``
# itself: the first registration wraps it once (other modules' casts pass straight through, at the
# cost of one walk over the modules of each outermost cast). The outermost call checks every GmP
# layer under the module being cast, then casts; nested calls (the recursion) only cast.


class _CastState(threading.local):
    depth = 0


_CAST = _CastState()
_PLAIN_APPLY = None


def install_cast_guard() -> None:
    """Wrap ``nn.Module._apply`` once so that a cast is checked for every GmP layer before any
    tensor is cast (Note [An atomic cast])."""
    global _PLAIN_APPLY
    if _PLAIN_APPLY is not None:
        return
    _PLAIN_APPLY = nn.Module._apply

    @functools.wraps(_PLAIN_APPLY)
    def _apply(self, fn, recurse=True):
        if _CAST.depth:
            return _PLAIN_APPLY(self, fn, recurse)
        for m in self.modules() if recurse else (self,):
            plists = m._modules.get("parametrizations") if isinstance(m._modules, dict) else None
            if plists is None:
                continue
            for name, plist in plists.items():
                if len(plist) and isinstance(plist[0], GeometricWeight) and plist[0].layer is m:
                    _check_cast(m, name, plist[0].bias_name, fn)
        _CAST.depth += 1
        try:
            return _PLAIN_APPLY(self, fn, recurse)
        finally:
            _CAST.depth -= 1

    nn.Module._apply = _apply


def _check_cast(layer: nn.Module, weight_name: str, bias_name, fn) -> None:
    """Refuse a dtype cast (``fn`` of ``Module._apply``) under which the radius overflows, or
    rounds to 0 under a non-zero offset, or the offset overflows. Device moves are not checked."""
    plists = getattr(layer, "parametrizations", {})
    if weight_name not in plists:  # Note [torch's remover on a GmP weight]
        return
    radius = plists[weight_name].original0.detach()
    if radius.is_meta or not radius.is_floating_point():
        return
    new_r = fn(radius)
    if not isinstance(new_r, Tensor) or new_r.dtype == radius.dtype or not new_r.is_floating_point():
        return
    what = f"{class_name(layer)}.{weight_name}"
    r, nr = radius.to(torch.float64).cpu(), new_r.to(torch.float64).cpu()
    bad = torch.isfinite(r) & ~torch.isfinite(nr)
    kind = f"its radius r = ‖w‖ overflows {new_r.dtype} (largest {torch.finfo(new_r.dtype).max:.3g})"
    if bias_name is not None and not bool(bad.any()):
        offset = layer.parametrizations[bias_name].original.detach()
        o, no = offset.to(torch.float64).cpu(), fn(offset).to(torch.float64).cpu()
        bad = (r != 0) & (nr == 0) & (o != 0)
        kind = f"its radius rounds to 0 in {new_r.dtype}, which would zero the bias b = r·λ"
        if not bool(bad.any()):
            bad = torch.isfinite(o) & ~torch.isfinite(no)
            kind = f"its offset λ = b/r overflows {new_r.dtype}"
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{what}: cannot cast this GmP layer from {radius.dtype} to {new_r.dtype}: for units {idx} {kind}, "
            f"although the plain layer's entries may fit. Nothing was cast (no layer of the model). Keep it in "
            f"{radius.dtype} and use torch.autocast for {new_r.dtype} compute (GmP computes the weight in the "
            f"parameters' dtype under autocast), or call georeparam.remove first. Got: radius {r[idx].tolist()}"
        )


def offset_from(bias: Tensor, radius: Tensor, what: str) -> Tensor:
    """``λ = b / r`` computed in float64 and rounded once to ``bias.dtype``.

    Raises ``ValueError`` where a unit has ``r = 0`` and ``b ≠ 0`` (a constant unit, which
    ``b = r·λ`` cannot represent) or where ``λ`` would overflow.
    """
    if bias.is_meta or radius.is_meta:
        # Note [Meta tensors]
        # A model built under ``torch.device("meta")`` has shapes and no values: registration
        # makes coordinates of the right shapes and checks nothing; ``to_empty`` then
        # allocates them and a plain checkpoint's load_state_dict converts its values (checked
        # there).
        return torch.empty_like(bias)
    b = bias.to(torch.float64)
    r = radius.to(torch.float64)
    zero = r == 0
    const = zero & (b != 0)
    if bool(const.any()):
        idx = const.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{what}: GmP writes b = r·λ, which cannot represent a unit with a zero weight row and "
            f"a non-zero bias. Got: units {idx} have weight 0 and bias {b[const][:5].tolist()}"
        )
    offset = torch.where(zero, torch.zeros_like(b), b / torch.where(zero, torch.ones_like(r), r))
    out = offset.to(bias.dtype)
    if not bool(torch.isfinite(out).all()):
        idx = (~torch.isfinite(out)).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{what}: λ = b / r overflows {bias.dtype} for units {idx} (their weight rows are tiny "
            f"next to their bias). Got: radius {r[idx].tolist()}"
        )
    return out
