r"""What the ``torch.fx`` ops between a layer and its activation are, for :mod:`georeparam.placement`.

* :func:`path_op`: an op the units can be followed through, as a :mod:`georeparam.unitpath` op
  (reshapes, transposes, positive scalings, dropout, average pooling, ``chunk``/``split``);
* :func:`stop_kind`: what else ends a unit's path: a positively homogeneous activation (the
  paper's form), one that is not, a linear layer or map mixing the units, or another op (a norm,
  a residual add, a max-pool, a product with a tensor: the weight form, with the reason).
"""

from __future__ import annotations

import math
import operator
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import unitpath as up
from .layouts import is_supported

__all__ = ["HOMOGENEOUS", "NOT_HOMOGENEOUS", "describe_node", "path_op", "stop_kind", "first_only", "is_int"]

# -------------------------------------------------------------------------------------------------
# what the ops are
# -------------------------------------------------------------------------------------------------

#: Activation modules with ``f(c·z) = c·f(z)`` for ``c > 0``.
HOMOGENEOUS: Tuple[type, ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU)
_HOMOGENEOUS_FN = {F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.leaky_relu_, F.prelu, torch.prelu, F.rrelu}
_HOMOGENEOUS_METHOD = {"relu", "relu_"}

#: Activation modules that are not positively homogeneous: the weight form stays.
NOT_HOMOGENEOUS: Tuple[type, ...] = (
    nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.Threshold, nn.GLU,
)  # fmt: skip
_NOT_HOMOGENEOUS_FN = {
    F.gelu, F.silu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.relu6, F.elu, F.selu, F.celu, F.softplus,
    F.mish, F.hardswish, F.hardtanh, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink, F.softshrink,
    F.hardshrink, F.threshold, F.glu, torch.sin, torch.cos, torch.exp, torch.square, torch.erf,
}  # fmt: skip
_NOT_HOMOGENEOUS_METHOD = {"tanh", "sigmoid", "exp", "sin", "cos", "square", "erf", "gelu", "silu"}

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_DROPOUT_FN = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_AVG_POOL_FN = {
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_MAX_POOL_FN = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}


def describe_node(node, modules) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the model's output"
    return str(node.target)


def _kind(node, modules) -> str:
    """'homogeneous' | 'not homogeneous' | 'other' for an op consuming a layer's output."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, HOMOGENEOUS):
            return "homogeneous"
        if isinstance(m, NOT_HOMOGENEOUS):
            return "not homogeneous"
    elif node.op == "call_function":
        if node.target in _HOMOGENEOUS_FN:
            return "homogeneous"
        if node.target in _NOT_HOMOGENEOUS_FN:
            return "not homogeneous"
    elif node.op == "call_method":
        if node.target in _HOMOGENEOUS_METHOD:
            return "homogeneous"
        if node.target in _NOT_HOMOGENEOUS_METHOD:
            return "not homogeneous"
    return "other"


# Ops after which a unit's output is mixed linearly with other units (it has no activation of its
# own): the paper's unit is r·(uᵀx + λ) there, in either form. Modules: every layer type of the
# registry (georeparam.layouts.LAYOUTS) is one.
_MIXING_FN = {
    operator.matmul,
    torch.matmul,
    torch.bmm,
    torch.einsum,
    F.linear,
    F.scaled_dot_product_attention,
    F.conv1d,
    F.conv2d,
    F.conv3d,
}
_MIXING_METHODS = {"matmul", "bmm"}
_NORM_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
_NORM_FN = (
    {F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.normalize, F.rms_norm}
    if hasattr(F, "rms_norm")
    else {F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.normalize}
)
_ADD_FN = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_POOL_DIMS = {
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
_POOL_FN_DIMS = {
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
}


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


def _arg(node, i: int, key: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _homogeneous_clamp(node, prev) -> bool:
    """``x.clamp(min=0)`` / ``torch.clamp(x, 0)`` / ``x.clamp_min(0)``: a ReLU written another way."""
    if node.op == "call_method" and node.target in ("clamp", "clamp_", "clamp_min", "clamp_min_"):
        pass
    elif node.op == "call_function" and node.target in (torch.clamp, torch.clamp_min, torch.clip):
        pass
    else:
        return False
    if not node.args or node.args[0] is not prev:
        return False
    lo = _arg(node, 1, "min", None)
    hi = None if "min" in str(node.target) else _arg(node, 2, "max", None)
    return isinstance(lo, (int, float)) and not isinstance(lo, bool) and lo == 0 and hi is None


def first_only(node, prev) -> bool:
    """``prev`` is ``node``'s first argument and none of its others."""
    if not node.args or node.args[0] is not prev:
        return False
    return not any(a is prev for a in list(node.args[1:]) + list(node.kwargs.values()))


def path_op(node, prev, modules, sizes):
    """``node`` as an op of :mod:`georeparam.unitpath` on ``prev`` (its first input), or ``None``.

    ``sizes(n)``: the ``("dim", step, k)`` reference of a size node ``n`` read from a tensor on
    the path, or ``None``.
    """
    E = (up.ELEMENTWISE,)
    if node.op in ("call_function", "call_method") and node.target in (
        operator.mul,
        torch.mul,
        "mul",
        operator.truediv,
        torch.div,
        "div",
    ):
        if len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if a is prev and b is not prev and _positive_number(b):
                return E
            if b is prev and node.target in (operator.mul, torch.mul) and _positive_number(a):
                return E
        return None
    if not first_only(node, prev):
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _DROPOUT):
            return E
        for cls, k in _POOL_DIMS.items():
            if type(m) is cls:
                return ("pool", k)
        if isinstance(m, nn.Flatten):
            return ("flatten", m.start_dim, m.end_dim)
        if isinstance(m, nn.Unflatten) and is_int(m.dim):
            return ("unflatten", m.dim, tuple(m.unflattened_size))
        return None
    t = node.target
    if node.op == "call_function":
        if t in _DROPOUT_FN:
            return E
        if t in _POOL_FN_DIMS:
            return ("pool", _POOL_FN_DIMS[t])
        rest = list(node.args[1:])
        if t is torch.flatten:
            return ("flatten", _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if t is torch.reshape:
            return _view_op(_arg(node, 1, "shape", None), sizes)
        if t is torch.transpose and len(rest) == 2 and all(is_int(d) for d in rest):
            return ("transpose", rest[0], rest[1])
        if t is torch.permute:
            dims = _arg(node, 1, "dims", None)
            return (
                ("permute", tuple(dims)) if isinstance(dims, (tuple, list)) and all(is_int(d) for d in dims) else None
            )
        if t is torch.unsqueeze and is_int(_arg(node, 1, "dim", None)):
            return ("unsqueeze", _arg(node, 1, "dim", None))
        if t is torch.squeeze:
            d = _arg(node, 1, "dim", None)
            return ("squeeze", None if d is None else ((d,) if is_int(d) else tuple(d)))
        if t in (torch.chunk, torch.split):
            return _split_op("chunk" if t is torch.chunk else "split", node)
        return None
    if node.op == "call_method":
        rest = list(node.args[1:])
        if t in ("contiguous", "clone", "float", "double", "half", "bfloat16", "detach"):
            return E if not rest else None
        if t in ("view", "reshape"):
            if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                rest = list(rest[0])
            return _view_op(rest, sizes)
        if t == "flatten":
            return ("flatten", _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if t == "unflatten" and len(rest) == 2 and is_int(rest[0]) and all(is_int(v) for v in rest[1]):
            return ("unflatten", rest[0], tuple(rest[1]))
        if t in ("transpose", "swapaxes") and len(rest) == 2 and all(is_int(d) for d in rest):
            return ("transpose", rest[0], rest[1])
        if t == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            return ("permute", tuple(dims)) if dims and all(is_int(d) for d in dims) else None
        if t == "unsqueeze" and len(rest) == 1 and is_int(rest[0]):
            return ("unsqueeze", rest[0])
        if t == "squeeze":
            d = _arg(node, 1, "dim", None)
            if d is None:
                return ("squeeze", None)
            return ("squeeze", (d,) if is_int(d) else tuple(d)) if is_int(d) or all(is_int(v) for v in d) else None
        if t in ("chunk", "split"):
            return _split_op(t, node)
    return None


def _view_op(shape, sizes):
    if not isinstance(shape, (tuple, list)):
        return None
    out = []
    for v in shape:
        if is_int(v):
            out.append(v)
        elif isinstance(v, torch.fx.Node):
            ref = sizes(v)
            out.append(ref)  # None: known only at run time
        else:
            return None
    return ("view", tuple(out))


def _split_op(kind, node):
    what = _arg(node, 1, "chunks" if kind == "chunk" else "split_size_or_sections", None)
    if what is None and kind == "split":
        what = node.kwargs.get("split_size", None)
    dim = _arg(node, 2, "dim", 0)
    if not is_int(dim):
        return None
    if kind == "chunk" and is_int(what) and what > 0:
        return ("chunk", what, dim)
    if kind == "split" and (
        is_int(what) and what > 0 or isinstance(what, (tuple, list)) and all(is_int(v) for v in what)
    ):
        return ("split", what if is_int(what) else tuple(what), dim)
    return None


def stop_kind(node, prev, modules) -> Tuple[str, str]:
    """What ends a unit's path: ``(kind, why)`` with kind 'homogeneous', 'not homogeneous', 'mixing' or 'other'."""
    if _homogeneous_clamp(node, prev):
        return "homogeneous", ""
    k = _kind(node, modules)
    if k in ("homogeneous", "not homogeneous"):
        return k, ""
    if node.op == "call_module":
        m = modules[node.target]
        if is_supported(m):
            return "mixing", "a linear layer"
        if isinstance(m, _NORM_MODULES):
            return "other", "a norm: its shift and statistics see r (Note [A norm before the activation])"
        if isinstance(m, _MAX_POOL):
            return "other", "a max-pool before the activation: maxpool(r·f(z)) ≠ r·f(maxpool(z)) for r < 0"
    if node.op == "call_function":
        if node.target in _MIXING_FN:
            return "mixing", "a linear map"
        if node.target in _NORM_FN:
            return "other", "a norm: its shift and statistics see r (Note [A norm before the activation])"
        if node.target in _MAX_POOL_FN:
            return "other", "a max-pool before the activation: maxpool(r·f(z)) ≠ r·f(maxpool(z)) for r < 0"
        if node.target in _ADD_FN:
            return "other", "a residual add: the unit's output is mixed with another tensor before what follows"
        if node.target in (operator.mul, torch.mul, operator.truediv, torch.div):
            return "other", "a product with a tensor or a non-positive number"
    if node.op == "call_method":
        if node.target in _MIXING_METHODS:
            return "mixing", "a linear map"
        if node.target in _ADD_METHODS:
            return "other", "a residual add: the unit's output is mixed with another tensor before what follows"
    return "other", "an op the unit axis cannot be followed through"
