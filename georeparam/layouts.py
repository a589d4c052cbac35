r"""Where each supported weight keeps its units: the one registry of layer layouts.

A GmP *unit* is one output neuron: the row of a ``(units, fan_in)`` matrix view of the weight.
Each supported layer type says, once, here:

* how its weight maps to that matrix and back (:meth:`Layout.to_units`, :meth:`Layout.from_units`),
* along which dimension of the layer's *output* its units lie (:attr:`Layout.channel_dim`: the
  paper's form multiplies each unit's output by ``sign(r)`` along it).

=============================  ==========================  ==========================  ===========
layer                          weight (bias)               units × fan_in              channel dim
=============================  ==========================  ==========================  ===========
``Linear``                     ``weight (out, in)``        ``(out, in)``               −1
``ConvNd``                     ``weight (out, in/g, *k)``  ``(out, in/g·∏k)``           1
``ConvTransposeNd``            ``weight (in, out/g, *k)``  ``(out, in/g·∏k)``           1
``MultiheadAttention``         ``in_proj_weight (3E, E)``  ``(3E, E)``                 −1
  (separate q/k/v dims)        ``q/k/v_proj_weight``       ``(E, kdim)`` etc.; bias    −1
                                                           stays Cartesian (shared)
Hugging Face ``Conv1D``        ``weight (in, out)``        ``(out, in)``: columns      −1
=============================  ==========================  ==========================  ===========

Adding a layer type is one entry in :data:`LAYOUTS`: which weights (and biases) it has, and
their :class:`Layout`. Hugging Face's ``Conv1D`` is named by its qualified class name, so
``transformers`` is never imported here.

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
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._util import class_name

__all__ = ["Layout", "Entry", "LAYOUTS", "SUPPORTED", "layout_of", "is_supported", "entry_of", "weight_names", "supported_names",
           "input_of", "has_input"]


class Layout:
    """The unit view of one weight tensor: ``(units, fan_in)`` rows, and the output's unit dim."""

    __slots__ = ("shape", "units", "fan_in", "channel_dim", "transposed", "groups", "columns")

    def __init__(self, shape, *, channel_dim: int = -1, transposed: bool = False, groups: int = 1, columns: bool = False):
        self.shape = torch.Size(shape)
        self.channel_dim = int(channel_dim)
        self.transposed = bool(transposed)
        self.groups = int(groups)
        self.columns = bool(columns)  # (in, out) weights: a unit is a column (HF Conv1D)
        if self.columns:
            self.units, self.fan_in = self.shape[1], self.shape[0]
        elif self.transposed:
            in_ch, out_per_group = self.shape[0], self.shape[1]
            self.units = out_per_group * self.groups
            self.fan_in = (in_ch // self.groups) * math.prod(self.shape[2:])
        else:
            self.units = self.shape[0]
            self.fan_in = math.prod(self.shape[1:])

    def to_units(self, weight: Tensor) -> Tensor:
        """Weight tensor → ``(units, fan_in)`` matrix (a view where possible)."""
        if self.columns:
            return weight.t()
        if not self.transposed:
            return weight.reshape(self.units, self.fan_in)
        g, (in_ch, opg), k = self.groups, self.shape[:2], math.prod(self.shape[2:])
        w = weight.reshape(g, in_ch // g, opg, k).permute(0, 2, 1, 3)
        return w.reshape(self.units, self.fan_in)

    def from_units(self, mat: Tensor) -> Tensor:
        """``(units, fan_in)`` matrix → weight tensor; the inverse of :meth:`to_units`."""
        if self.columns:
            return mat.t()
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
        if self.columns:
            s += ", columns=True"
        return s + ")"


class Entry:
    """One supported layer type: its ``(weight, bias)`` name pairs and each weight's :class:`Layout`.

    ``inside``: the units feed an op of the layer itself (attention), never an activation.
    """

    __slots__ = ("weights", "layout", "inside")

    def __init__(self, weights, layout, inside: bool = False):
        self.weights: Callable[[nn.Module], List[Tuple[str, Optional[str]]]] = weights
        self.layout: Callable[[nn.Module, Tensor], Layout] = layout
        self.inside = inside


def _weight_and_bias(module: nn.Module) -> List[Tuple[str, Optional[str]]]:
    return [("weight", "bias")]


def _mha_weights(module: nn.Module) -> List[Tuple[str, Optional[str]]]:
    if module._qkv_same_embed_dim:
        return [("in_proj_weight", "in_proj_bias")]
    # one in_proj_bias serves q, k and v: b = r·λ needs one bias per weight, so it stays Cartesian
    return [("q_proj_weight", None), ("k_proj_weight", None), ("v_proj_weight", None)]


def _rows(module: nn.Module, weight: Tensor) -> Layout:
    return Layout(weight.shape, channel_dim=-1)


def _conv(module: nn.Module, weight: Tensor) -> Layout:
    return Layout(weight.shape, channel_dim=1, transposed=bool(module.transposed), groups=int(module.groups))


def _columns(module: nn.Module, weight: Tensor) -> Layout:
    return Layout(weight.shape, channel_dim=-1, columns=True)


_LINEAR = Entry(_weight_and_bias, _rows)
_CONV = Entry(_weight_and_bias, _conv)

#: One entry per supported layer type (subclasses included), keyed by the type or, for classes
#: of optional packages, by ``"module.QualifiedName"``.
LAYOUTS: Dict[Union[type, str], Entry] = {
    nn.Linear: _LINEAR,
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV,
    nn.ConvTranspose2d: _CONV,
    nn.ConvTranspose3d: _CONV,
    nn.MultiheadAttention: Entry(_mha_weights, _rows, inside=True),
    "transformers.pytorch_utils.Conv1D": Entry(_weight_and_bias, _columns),
}

#: Layer types :func:`georeparam.register` converts by default (and their subclasses); classes of
#: optional packages (Hugging Face ``Conv1D``) are matched by name: use :func:`is_supported`.
SUPPORTED: Tuple[type, ...] = tuple(k for k in LAYOUTS if isinstance(k, type))


def entry_of(module: nn.Module) -> Optional[Entry]:
    """The :data:`LAYOUTS` entry of ``module``'s type or its nearest base, or ``None``."""
    for cls in type(module).__mro__:
        e = LAYOUTS.get(cls) or LAYOUTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if e is not None:
            return e
    return None


def weight_names(module: nn.Module) -> List[Tuple[str, Optional[str]]]:
    """``[(weight name, bias name or None), ...]`` that GmP registers on ``module``."""
    e = entry_of(module)
    return e.weights(module) if e is not None else []


def is_supported(module: nn.Module) -> bool:
    """Whether ``module``'s type (or a base of it) has an entry in :data:`LAYOUTS`."""
    return entry_of(module) is not None


def layout_of(module: nn.Module, name: str = "weight", weight: Optional[Tensor] = None) -> Layout:
    """The :class:`Layout` of ``module``'s weight ``name`` (registered or plain).

    Raises:
        TypeError: ``module`` is not a supported layer type.
    """
    entry = entry_of(module)
    if entry is None:
        raise TypeError(f"georeparam supports {supported_names()} and their subclasses. Got: {class_name(module)}")
    if weight is None:
        weight = getattr(module, name)
    return entry.layout(module, weight)


def has_input(module: nn.Module) -> bool:
    """Whether :func:`input_of` knows ``module``'s input (``Linear``, ``ConvNd``, ``ConvTransposeNd``)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def input_of(module: nn.Module) -> Tuple[int, int]:
    """``(input features, their dim)`` of a layer's input (what input mean normalization centres).

    ``Linear``: ``(in_features, −1)``; ``ConvNd``/``ConvTransposeNd``: ``(in_channels, −(d + 1))``
    for ``d`` spatial dims (so unbatched inputs work too). Others raise ``TypeError``.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, -1
    if has_input(module):
        return module.in_channels, -(len(module.kernel_size) + 1)
    raise TypeError(
        f"input_mean_norm supports nn.Linear, nn.ConvNd and nn.ConvTransposeNd (and subclasses). "
        f"Got: {class_name(module)}"
    )


def supported_names(inside: bool = True) -> str:
    """The supported layer types, for messages; ``inside=False`` leaves out those whose units do
    not feed an activation of their own (:attr:`Entry.inside`: attention's projections)."""
    return ", ".join(
        k.__name__ if isinstance(k, type) else k.rsplit(".", 1)[-1] for k, e in LAYOUTS.items() if inside or not e.inside
    )
