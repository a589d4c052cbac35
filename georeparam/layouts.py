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
``Bilinear``                   ``weight (out, in1, in2)``  ``(out, in1·in2)``          −1
=============================  ==========================  ==========================  ===========

Adding a layer type is one :class:`Entry` in :data:`LAYOUTS`: which weights (and biases) it has,
their :class:`Layout`, and optionally its input side (input mean normalization), whether and how
an IMN folds into its bias, and how it takes a sign into its input columns (the paper's form at
``remove``). Nothing outside this file tests for a layer class. Hugging Face's ``Conv1D`` is named
by its qualified class name, so ``transformers`` is never imported here.

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

__all__ = [
    "Layout",
    "Entry",
    "LAYOUTS",
    "SUPPORTED",
    "layout_of",
    "is_supported",
    "entry_of",
    "weight_names",
    "supported_names",
    "input_of",
    "has_input",
]


class Layout:
    """The unit view of one weight tensor: ``(units, fan_in)`` rows, and the output's unit dim."""

    __slots__ = ("shape", "units", "fan_in", "channel_dim", "transposed", "groups", "columns")

    def __init__(
        self, shape, *, channel_dim: int = -1, transposed: bool = False, groups: int = 1, columns: bool = False
    ):
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
    """One supported layer type: everything georeparam knows about it.

    Required:

    * ``weights(module)``: its ``[(weight name, bias name or None), ...]``;
    * ``layout(module, weight)``: each weight's :class:`Layout`.

    Optional (``None``: the feature is refused or falls back, as said):

    * ``inside``: the units feed an op of the layer itself (attention), never an activation.
    * ``unit_axis(module)``: the unit axis of the layer's output counted from the end (default ``−1``).
    * ``inputs(module) -> (features, dim)``: the layer's input side (dim counted from the end), what
      input mean normalization centres; ``None``: ``imn`` refuses the layer.
    * ``foldable(module) -> bool`` and ``shift(module, mean) -> Tensor``: whether folding the IMN's
      running mean into the bias is exact, and then ``f(μ·1) − b`` in float64 (Note [Folding the
      running mean] in :mod:`georeparam.imn`); ``None``: the IMN stays at ``remove``.
    * ``columns(module, w, s, flattened, producer_cd) -> Tensor | None``: the layer, as the
      *consumer* after a GmP layer in the paper's form, takes the producer's unit signs ``s`` into
      its weight ``w``'s input columns at ``remove`` (``flattened``: the units arrive flattened
      with their spatial dims; ``producer_cd``: their dim in the producer's output); ``None``
      where it cannot. ``flattened_columns``: whether it can take flattened units at all.
    """

    __slots__ = (
        "weights",
        "layout",
        "inside",
        "unit_axis",
        "inputs",
        "foldable",
        "shift",
        "columns",
        "flattened_columns",
    )

    def __init__(self, weights, layout, inside: bool = False, *, unit_axis=None, inputs=None, foldable=None, shift=None,
                 columns=None, flattened_columns: bool = False):  # fmt: skip
        self.weights: Callable[[nn.Module], List[Tuple[str, Optional[str]]]] = weights
        self.layout: Callable[[nn.Module, Tensor], Layout] = layout
        self.inside = inside
        self.unit_axis: Callable[[nn.Module], int] = unit_axis or (lambda module: -1)
        self.inputs: Optional[Callable[[nn.Module], Tuple[int, int]]] = inputs
        self.foldable: Optional[Callable[[nn.Module], bool]] = foldable
        self.shift: Optional[Callable[[nn.Module, Tensor], Tensor]] = shift
        self.columns: Optional[Callable[..., Optional[Tensor]]] = columns
        self.flattened_columns = bool(flattened_columns)


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


# -- Linear and ConvNd: input side, IMN fold, sign columns ------------------------------------
def _linear_inputs(module: nn.Module) -> Tuple[int, int]:
    return module.in_features, -1


def _conv_axis(module: nn.Module) -> int:
    return -(len(module.kernel_size) + 1)  # batched or not


def _conv_inputs(module: nn.Module) -> Tuple[int, int]:
    return module.in_channels, _conv_axis(module)


def _always(module: nn.Module) -> bool:
    return True


def _conv_foldable(module: nn.Module) -> bool:
    if not module.transposed:
        return module.padding_mode != "zeros" or all(p == 0 for p in module._reversed_padding_repeated_twice)
    if isinstance(module.padding, str):
        return False
    # output o gets tap k from input o + p − k·d (stride 1): every tap lands inside the input for
    # every output exactly when p ≥ d·(k − 1) + output_padding
    return all(s == 1 for s in module.stride) and all(
        p >= d * (k - 1) + op
        for p, d, k, op in zip(module.padding, module.dilation, module.kernel_size, module.output_padding)
    )


def _linear_shift(module: nn.Module, mean: Tensor) -> Tensor:
    return module.weight.detach().to(torch.float64) @ mean.to(torch.float64)


def _conv_shift(module: nn.Module, mean: Tensor) -> Tensor:
    w = module.weight.detach().to(torch.float64)
    mu = mean.to(torch.float64)
    g = module.groups
    taps = w.flatten(2).sum(-1)  # conv (out, in/g); transposed (in, out/g)
    if not module.transposed:
        out, in_g = taps.shape
        mu_out = mu.view(g, in_g).repeat_interleave(out // g, dim=0)
        return (taps * mu_out).sum(-1)
    in_ch, out_g = taps.shape
    per_group = taps.view(g, in_ch // g, out_g) * mu.view(g, in_ch // g, 1)
    return per_group.sum(1).reshape(g * out_g)


def _linear_columns(consumer: nn.Module, w: Tensor, s: Tensor, flattened: bool, producer_cd: int) -> Optional[Tensor]:
    units = s.numel()
    if flattened and consumer.in_features % units == 0:
        cols = s.repeat_interleave(consumer.in_features // units)
    elif not flattened and producer_cd == -1 and consumer.in_features == units:
        cols = s
    else:
        return None
    return w * cols.to(w.dtype)


def _conv_columns(consumer: nn.Module, w: Tensor, s: Tensor, flattened: bool, producer_cd: int) -> Optional[Tensor]:
    if flattened or producer_cd != 1 or consumer.in_channels != s.numel():
        return None
    if consumer.transposed:  # (in, out/g, *k): dim 0 is the input channel
        return w * s.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
    in_per_group, out_per_group = consumer.in_channels // consumer.groups, consumer.out_channels // consumer.groups
    idx = (torch.arange(w.shape[0], device=w.device) // out_per_group)[:, None] * in_per_group
    idx = idx + torch.arange(in_per_group, device=w.device)[None, :]
    return w * s.to(w.dtype)[idx].reshape(idx.shape + (1,) * (w.dim() - 2))


_LINEAR = Entry(_weight_and_bias, _rows, inputs=_linear_inputs, foldable=_always, shift=_linear_shift,
                columns=_linear_columns, flattened_columns=True)  # fmt: skip
_CONV = Entry(_weight_and_bias, _conv, unit_axis=_conv_axis, inputs=_conv_inputs, foldable=_conv_foldable,
              shift=_conv_shift, columns=_conv_columns)  # fmt: skip

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
    # a unit k is x₁ᵀW_k x₂ + b_k = vec(W_k)ᵀ(x₁⊗x₂) + b_k: a row of the (out, in1·in2) matrix
    nn.Bilinear: Entry(_weight_and_bias, _rows),
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
    """Whether :func:`input_of` knows ``module``'s input (its entry's ``inputs``: ``Linear``,
    ``ConvNd``, ``ConvTransposeNd``)."""
    e = entry_of(module)
    return e is not None and e.inputs is not None


def input_of(module: nn.Module) -> Tuple[int, int]:
    """``(input features, their dim)`` of a layer's input (what input mean normalization centres).

    ``Linear``: ``(in_features, −1)``; ``ConvNd``/``ConvTransposeNd``: ``(in_channels, −(d + 1))``
    for ``d`` spatial dims (so unbatched inputs work too). Others raise ``TypeError``.
    """
    e = entry_of(module)
    if e is None or e.inputs is None:
        names = ", ".join(
            (f"nn.{k.__name__}" if getattr(nn, k.__name__, None) is k else k.__name__) if isinstance(k, type) else k.rsplit(".", 1)[-1]
            for k, v in LAYOUTS.items() if v.inputs
        )  # fmt: skip
        raise TypeError(f"input_mean_norm supports {names} (and subclasses). Got: {class_name(module)}")
    return e.inputs(module)


def supported_names(inside: bool = True) -> str:
    """The supported layer types, for messages; ``inside=False`` leaves out those whose units do
    not feed an activation of their own (:attr:`Entry.inside`: attention's projections)."""
    return ", ".join(
        k.__name__ if isinstance(k, type) else k.rsplit(".", 1)[-1]
        for k, e in LAYOUTS.items()
        if inside or not e.inside
    )
