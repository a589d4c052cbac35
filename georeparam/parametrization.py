r"""The ``torch.nn.utils.parametrize`` modules behind :func:`georeparam.geometric`.

* :class:`_Geometric` (on the weight): ``(radius, angles) → W`` with one unit per output neuron,
  ``w_i = r_i · u(angles_i)``; stored as ``parametrizations.weight.original0`` (radius, one per
  unit) and ``parametrizations.weight.original1`` (latitude angles, ``units × (fan_in − 1)``).
* :class:`_GeometricBias` (on the bias): ``offset → b = r · λ``, reading the live radius of the
  same layer; stored as ``parametrizations.bias.original``.

Units. A weight is viewed as a matrix ``(units, fan_in)``:

* ``Linear (out, in)`` as is; ``ConvNd (out, in/groups, *k)`` → ``(out, in/groups·∏k)``;
* ``ConvTransposeNd (in, out/groups, *k)``: each *output* channel is a unit →
  ``(out, in/groups·∏k)``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .coords import _check_mode, _scaled_unit, to_hyperspherical


class _Geometric(nn.Module):
    """``(radius, angles) → weight`` for one layer's weight tensor."""

    def __init__(self, shape: torch.Size, *, transposed: bool = False, groups: int = 1, mode: str = "exact"):
        super().__init__()
        _check_mode(mode)
        self.shape = torch.Size(shape)
        self.transposed = bool(transposed)
        self.groups = int(groups)
        self.mode = mode
        if self.transposed:
            in_ch, out_per_group = self.shape[0], self.shape[1]
            self.units = out_per_group * self.groups
            self.fan_in = (in_ch // self.groups) * math.prod(self.shape[2:])
        else:
            self.units = self.shape[0]
            self.fan_in = math.prod(self.shape[1:])
        # set by api.geometric once the bias is registered; see Note [Assigning the weight]
        self._bias_name = None
        self._weight_name = None

    # -- layout ------------------------------------------------------------------------------
    def to_units(self, weight: Tensor) -> Tensor:
        """Weight tensor → ``(units, fan_in)`` matrix (a view where possible)."""
        if not self.transposed:
            return weight.reshape(self.units, self.fan_in)
        g = self.groups
        in_ch, opg = self.shape[0], self.shape[1]
        k = math.prod(self.shape[2:])
        w = weight.reshape(g, in_ch // g, opg, k).permute(0, 2, 1, 3)
        return w.reshape(self.units, self.fan_in)

    def from_units(self, mat: Tensor) -> Tensor:
        """``(units, fan_in)`` matrix → weight tensor; the inverse of :meth:`to_units`."""
        if not self.transposed:
            return mat.reshape(self.shape)
        g = self.groups
        in_ch, opg = self.shape[0], self.shape[1]
        k = math.prod(self.shape[2:])
        w = mat.reshape(g, opg, in_ch // g, k).permute(0, 2, 1, 3)
        return w.reshape(self.shape)

    # -- the map -------------------------------------------------------------------------------
    def forward(self, radius: Tensor, angles: Tensor) -> Tensor:
        # Note [Autocast]
        # Under fp16/bf16 autocast the angles would otherwise be cast before cos/sin/cumprod; the
        # map runs in the parameters' dtype (float32 at least; coords' Note [Where float64 is
        # needed]) and the layer's own op casts the finished weight.
        with torch.autocast(device_type=angles.device.type, enabled=False):
            return self.from_units(_scaled_unit(radius, angles, self.mode))

    def right_inverse(self, weight: Tensor) -> Tuple[Tensor, Tensor]:
        # Note [Assigning the weight]
        # ``layer.weight = W`` ends here. The bias b = r·λ must keep its value, so λ is rescaled to
        # b / r_new. This is the only place that sees both the old and the new radius.
        # Everything is checked before the offset is touched: PyTorch's own checks of our result
        # (dtype) run after this returns, when the rescaled offset would already be written.
        layer = getattr(self, "_layer", None)
        what = "weight"
        if layer is not None:  # an assignment (at registration the layer is not attached yet)
            what = f"{parametrize.type_before_parametrizations(layer).__name__}.{self._weight_name}"
            current = layer.parametrizations[self._weight_name].original0
            _check_assigned(weight, current, what)
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"{what} must have shape {tuple(self.shape)}. Got: {tuple(weight.shape)}")
        _check_weight_values(weight, what)
        with torch.no_grad():
            radius, angles = to_hyperspherical(self.to_units(weight))
            _check_radius(radius, what)
            if self._bias_name is not None:
                layer = self._layer
                bias_list = layer.parametrizations[self._bias_name]
                old_radius = layer.parametrizations[self._weight_name].original0
                bias = old_radius.to(torch.float64) * bias_list.original.to(torch.float64)
                offset = offset_from(bias, radius, f"{what} (keeping {self._bias_name})")
                bias_list.original.copy_(offset)
        return radius, angles

    def extra_repr(self) -> str:
        s = f"units={self.units}, fan_in={self.fan_in}, mode={self.mode!r}"
        if self.transposed:
            s += ", transposed=True"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s


class _GeometricBias(nn.Module):
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
        self.weight_name = weight_name

    def _radius(self) -> Tensor:
        return self._layer.parametrizations[self.weight_name].original0

    def forward(self, offset: Tensor) -> Tensor:
        return self._radius() * offset

    def right_inverse(self, bias: Tensor) -> Tensor:
        radius = self._radius()
        what = f"{parametrize.type_before_parametrizations(self._layer).__name__}.bias"
        _check_assigned(bias, radius, what)
        if tuple(bias.shape) != tuple(radius.shape):  # b = r·λ would broadcast silently
            raise ValueError(f"{what} must have shape {tuple(radius.shape)}, one per unit. Got: {tuple(bias.shape)}")
        _check_weight_values(bias, what)
        with torch.no_grad():
            return offset_from(bias, radius, what)

    def extra_repr(self) -> str:
        return f"radius_from={self.weight_name!r}"


def _check_assigned(value, like: Tensor, what: str) -> None:
    """An assigned weight/bias must be a tensor of the stored coordinates' dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be assigned a Tensor. Got: {type(value).__name__}")
    if value.dtype != like.dtype or value.device != like.device:
        raise TypeError(
            f"{what} must be assigned a tensor of dtype {like.dtype} on {like.device}. "
            f"Got: dtype {value.dtype} on {value.device}"
        )


def _check_weight_values(t: Tensor, what: str) -> None:
    if not t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be a real floating-point tensor. Got: dtype={t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{what} must not be empty. Got: shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{what} must be finite. Got: {bad} NaN/Inf entries")


def _check_radius(radius: Tensor, what: str) -> None:
    """Refuse rows whose norm ``r = ‖w‖`` overflows the dtype (each entry finite, the norm not).

    Without this a float32 row of entries near 1e38 became ``r = inf`` and ``w = inf·u``: a
    finite layer silently turned into Inf/NaN outputs.
    """
    bad = ~torch.isfinite(radius)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{what}: the norm of the weight rows of units {idx} overflows {radius.dtype} (largest "
            f"{torch.finfo(radius.dtype).max:.3g}), so GmP's radius r = ‖w‖ cannot hold it. Scale the "
            f"layer down or use a wider dtype. Got: {int(bad.sum())} such units"
        )


def offset_from(bias: Tensor, radius: Tensor, what: str) -> Tensor:
    """``λ = b / r`` computed in float64 and rounded once to ``bias.dtype``.

    Raises ``ValueError`` where a unit has ``r = 0`` and ``b ≠ 0`` (a constant unit, which
    ``b = r·λ`` cannot represent) or where ``λ`` would overflow.
    """
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
