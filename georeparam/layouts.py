r"""Where each supported weight keeps its units: the one registry of layer layouts.

A GmP *unit* is one output neuron: the row of a ``(units, fan_in)`` matrix view of the weight.
Each supported layer type says, once, here:

* how its weight maps to that matrix and back (:meth:`Layout.to_units`, :meth:`Layout.from_units`),
* along which dimension of the layer's *output* its units lie (:attr:`Layout.channel_dim`: the
  paper's form multiplies each unit's output by ``sign(r)`` along it).

=========================  ======================  ==========================  ===========
layer                      weight                  units × fan_in              channel dim
=========================  ======================  ==========================  ===========
``Linear``                 ``(out, in)``           ``(out, in)``               −1
``ConvNd``                 ``(out, in/g, *k)``     ``(out, in/g·∏k)``           1
``ConvTransposeNd``        ``(in, out/g, *k)``     ``(out, in/g·∏k)``           1
=========================  ======================  ==========================  ===========

Adding a layer type is one entry in :data:`LAYOUTS`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lay = layout_of(nn.ConvTranspose2d(4, 6, 3, groups=2))
    >>> lay
    Layout(units=6, fan_in=18, channel_dim=1, transposed=True, groups=2)
    >>> w = torch.randn(4, 3, 3, 3)
    >>> torch.equal(lay.from_units(lay.to_units(w)), w)
    True
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["Layout", "LAYOUTS", "SUPPORTED", "layout_of", "is_supported"]


class Layout:
    """The unit view of one weight tensor: ``(units, fan_in)`` rows, and the output's unit dim."""

    __slots__ = ("shape", "units", "fan_in", "channel_dim", "transposed", "groups")

    def __init__(self, shape, *, channel_dim: int = -1, transposed: bool = False, groups: int = 1):
        self.shape = torch.Size(shape)
        self.channel_dim = int(channel_dim)
        self.transposed = bool(transposed)
        self.groups = int(groups)
        if self.transposed:
            in_ch, out_per_group = self.shape[0], self.shape[1]
            self.units = out_per_group * self.groups
            self.fan_in = (in_ch // self.groups) * math.prod(self.shape[2:])
        else:
            self.units = self.shape[0]
            self.fan_in = math.prod(self.shape[1:])

    def to_units(self, weight: Tensor) -> Tensor:
        """Weight tensor → ``(units, fan_in)`` matrix (a view where possible)."""
        if not self.transposed:
            return weight.reshape(self.units, self.fan_in)
        g, (in_ch, opg), k = self.groups, self.shape[:2], math.prod(self.shape[2:])
        w = weight.reshape(g, in_ch // g, opg, k).permute(0, 2, 1, 3)
        return w.reshape(self.units, self.fan_in)

    def from_units(self, mat: Tensor) -> Tensor:
        """``(units, fan_in)`` matrix → weight tensor; the inverse of :meth:`to_units`."""
        if not self.transposed:
            return mat.reshape(self.shape)
        g, (in_ch, opg), k = self.groups, self.shape[:2], math.prod(self.shape[2:])
        w = mat.reshape(g, opg, in_ch // g, k).permute(0, 2, 1, 3)
        return w.reshape(self.shape)

    def unit_view(self, ndim: int) -> Tuple[int, ...]:
        """The shape that broadcasts a ``(units,)`` vector along :attr:`channel_dim` of an ``ndim`` output."""
        if self.channel_dim == -1:
            return (self.units,)
        shape = [1] * ndim
        shape[self.channel_dim] = self.units
        return tuple(shape)

    def __repr__(self) -> str:
        s = f"Layout(units={self.units}, fan_in={self.fan_in}, channel_dim={self.channel_dim}"
        if self.transposed:
            s += ", transposed=True"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ")"


def _linear(module: nn.Module, weight: Tensor) -> Layout:
    return Layout(weight.shape, channel_dim=-1)


def _conv(module: nn.Module, weight: Tensor) -> Layout:
    return Layout(weight.shape, channel_dim=1, transposed=bool(module.transposed), groups=int(module.groups))


#: One entry per supported layer type (subclasses included): ``type → (module, weight) → Layout``.
LAYOUTS: Dict[type, Callable[[nn.Module, Tensor], Layout]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv,
    nn.ConvTranspose2d: _conv,
    nn.ConvTranspose3d: _conv,
}

#: Layer types :func:`georeparam.register` converts by default (and their subclasses).
SUPPORTED: Tuple[type, ...] = tuple(LAYOUTS)


def _entry(module: nn.Module) -> Optional[Callable[[nn.Module, Tensor], Layout]]:
    for cls in type(module).__mro__:
        if cls in LAYOUTS:
            return LAYOUTS[cls]
    return None


def is_supported(module: nn.Module) -> bool:
    """Whether ``module``'s type (or a base of it) has an entry in :data:`LAYOUTS`."""
    return _entry(module) is not None


def layout_of(module: nn.Module, name: str = "weight", weight: Optional[Tensor] = None) -> Layout:
    """The :class:`Layout` of ``module``'s weight ``name`` (registered or plain).

    Raises:
        TypeError: ``module`` is not a supported layer type.
    """
    entry = _entry(module)
    if entry is None:
        raise TypeError(
            f"georeparam supports {', '.join(t.__name__ for t in SUPPORTED)} and their subclasses. "
            f"Got: {parametrize.type_before_parametrizations(module).__name__}"
        )
    if weight is None:
        weight = getattr(module, name)
    return entry(module, weight)
