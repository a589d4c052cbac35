r"""Where ``sign(r)`` goes in a model: reading it for the paper's form.

The paper's form (:mod:`georeparam.signs`) needs, for each registered layer, the place right
after its units' positively homogeneous activation where ``sign(r)`` can act. :func:`plan` reads
the model with ``torch.fx`` and decides one :class:`Placement` per layer: the sign after an
activation module called once (a forward hook on it), or before the one layer its output reaches
through sign-commuting ops (a forward pre-hook on that layer); or no activation at all (the weight
form ``r·(uᵀx + λ)`` *is* the paper's unit then); or no exact place (the weight form stays, with
the reason). Nothing is changed here.

# Note [Where the sign may act]
``s`` must multiply each unit's output before anything that does not commute with a per-unit
sign: a max-pool (``max(−a) ≠ −max(a)``), a norm layer with a shift, a residual add. Before the
activation the layer's output may pass ops that commute with a *positive* per-unit scale (dropout,
max/average pooling) since ``|r|`` sits inside the layer; after it, only ops linear and per-unit
(dropout, average pooling, flatten) may stand between the activation and a consumer pre-hook.
"""

from __future__ import annotations

import operator
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import Layout, entry_of, is_supported, layout_of, weight_names

__all__ = ["Placement", "plan", "HOMOGENEOUS", "NOT_HOMOGENEOUS"]


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
_AVG_POOL_FN = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_MAX_POOL_FN = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}


def _describe_node(node, modules) -> str:
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
    """'homogeneous' | 'not homogeneous' | 'linear' | 'unknown' for an op consuming a layer's output."""
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
    return "linear" if _linear_op(node, modules) else "unknown"


# Ops after which a layer's units count as having no activation of their own: r·(uᵀx + λ) is the
# paper's unit there. Anything else unknown keeps the weight form (GELU written out as
# 0.5·x·(1 + tanh(…)) reaches `pow`, say).
_LINEAR_MODULES = (
    nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.Identity, nn.Flatten, nn.Unflatten, nn.MultiheadAttention,
) + _DROPOUT + _AVG_POOL + _MAX_POOL  # fmt: skip
_LINEAR_FN = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.getitem, operator.matmul, operator.neg, torch.add, torch.sub, torch.mul, torch.cat, torch.stack,
    torch.flatten, torch.reshape, torch.matmul, torch.bmm, torch.transpose, torch.permute, torch.chunk, torch.split,
    torch.squeeze, torch.unsqueeze, torch.einsum, F.linear, F.layer_norm, F.batch_norm, F.group_norm,
    F.scaled_dot_product_attention, F.pad,
} | _DROPOUT_FN | _AVG_POOL_FN | _MAX_POOL_FN  # fmt: skip
_LINEAR_METHODS = {
    "view", "reshape", "permute", "transpose", "contiguous", "flatten", "unflatten", "split", "chunk", "size",
    "add", "add_", "sub", "mul", "mul_", "div", "expand", "unsqueeze", "squeeze", "matmul", "view_as", "to", "float",
    "type_as", "narrow", "__getitem__", "neg",
}  # fmt: skip


def _linear_op(node, modules) -> bool:
    if node.op == "output":
        return True
    if node.op == "call_module":
        return isinstance(modules[node.target], _LINEAR_MODULES) or is_supported(modules[node.target])
    if node.op == "call_function":
        return node.target in _LINEAR_FN
    return node.op == "call_method" and node.target in _LINEAR_METHODS


def _passes(node, prev, modules, channel_dim: int, *, before: bool) -> Optional[str]:
    """Whether ``node`` (fed by ``prev`` as its first input) lets the sign through; returns what it is.

    ``before``: between the layer and its activation (positive per-unit scales must commute);
    otherwise between the activation and a consumer (per-unit signs must commute, and the op be
    linear). Returns ``None`` (stop), ``"same"`` or ``"flatten"``.
    """
    if not node.args or node.args[0] is not prev or any(a is prev for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    spatial = channel_dim == 1  # pools act on the dims after the unit dim
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _DROPOUT):
            return "same"
        if spatial and isinstance(m, _AVG_POOL):
            return "same"
        if spatial and before and isinstance(m, _MAX_POOL):
            return "same"
        if spatial and not before and isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        return None
    if node.op == "call_function":
        if node.target in _DROPOUT_FN:
            return "same"
        if spatial and node.target in _AVG_POOL_FN:
            return "same"
        if spatial and before and node.target in _MAX_POOL_FN and not node.kwargs.get("return_indices", False):
            return "same"
        if spatial and not before and node.target is torch.flatten and _flatten_from_1(node):
            return "flatten"
        return None
    if node.op == "call_method":
        if node.target == "contiguous":
            return "same"
        if spatial and not before and node.target == "flatten" and _flatten_from_1(node):
            return "flatten"
    return None


def _flatten_from_1(node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


# -------------------------------------------------------------------------------------------------
# the plan
# -------------------------------------------------------------------------------------------------


class Placement:
    """Where a layer's ``sign(r)`` goes.

    Attributes:
        form: ``"paper"`` or ``"weight"``.
        sign: whether a sign hook is needed (paper's form after an activation).
        where: human-readable place (paper's form), or ``why``: the reason for the weight form.
        host: qualified name of the module carrying the hook (the activation, or the consumer).
        pre: the hook is a forward pre-hook on a consumer (else a forward hook on the activation).
        consumer: qualified name of the layer the sign could be baked into at removal, if any.
        flattened: the path to the consumer flattens the unit dim with the spatial dims.
    """

    __slots__ = ("form", "sign", "where", "why", "host", "pre", "consumer", "flattened")

    def __init__(self, form, *, sign=False, where="", why="", host=None, pre=False, consumer=None, flattened=False):
        self.form, self.sign, self.where, self.why = form, sign, where, why
        self.host, self.pre, self.consumer, self.flattened = host, pre, consumer, flattened

    def __repr__(self) -> str:
        return f"Placement(form={self.form!r}, where={self.where!r}, why={self.why!r})"


# A fan-in-1 unit has no angles: its direction ±1 is the sign of r itself (coords: "n = 1").
_FAN_IN_1 = Placement("weight", why="fan-in 1: the direction ±1 is the sign of r itself, so no sign can act after f")


def _linear(where: str) -> Placement:
    return Placement("paper", where=where)


def _weight(why: str) -> Placement:
    return Placement("weight", why=why)


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, qualname)


def plan(model: nn.Module, names: Sequence[str]) -> Dict[str, Placement]:
    """For each qualified layer name, where its sign goes in the paper's form (nothing is changed)."""
    modules = dict(model.named_modules())
    out: Dict[str, Placement] = {}
    if "" in names:
        out[""] = _linear("no activation follows (the model's output)")
    for n in names:
        if n in out:
            continue
        e = entry_of(modules[n])
        if e is not None and e.inside:
            out[n] = _linear("inside attention: no activation follows")
        elif layout_of(modules[n], weight_names(modules[n])[0][0]).fan_in == 1:
            out[n] = _FAN_IN_1
    rest = [n for n in names if n not in out]
    if not rest:
        return out
    leaves = {id(modules[n]) for n in rest}
    whole = _Scope.trace(model, leaves, "", None)
    if whole.error is None:
        for name in rest:
            out[name] = whole.place(name, layout_of(modules[name]))
        return out
    # Note [Tracing around a layer]
    # The whole model did not trace (data-dependent control flow, HF models, ...). Each layer is
    # then read inside the closest enclosing module that traces; what follows that module's
    # output is unknown (the weight form stays there), and a host or consumer must appear once in
    # the module tree, since calls from outside the traced module cannot be seen.
    why = f"could not trace {type(model).__name__} with torch.fx ({whole.error.split('. ')[0].rstrip('.')})"
    counts: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    scopes: Dict[str, _Scope] = {}
    for name in rest:
        parts, place = name.split("."), None
        for k in range(len(parts) - 1, 0, -1):
            anc = ".".join(parts[:k])
            if anc not in scopes:
                scopes[anc] = _Scope.trace(modules[anc], leaves, anc, counts)
            if scopes[anc].error is None:
                place = scopes[anc].place(".".join(parts[k:]), layout_of(modules[name]))
                break
        out[name] = place or _weight(f"{why}, nor any module around this layer, so it keeps the weight form")
    return out


class _Scope:
    """One traced graph: the whole model (``prefix == ""``, ``counts is None``) or a module inside it."""

    def __init__(self, root, graph, prefix: str, counts, error: Optional[str]):
        self.root, self.prefix, self.counts, self.error = root, prefix, counts, error
        self.modules = dict(root.named_modules())
        self.calls: Dict[str, List] = {}
        for node in graph.nodes if graph is not None else ():
            if node.op == "call_module":
                self.calls.setdefault(node.target, []).append(node)

    @classmethod
    def trace(cls, root: nn.Module, leaves, prefix: str, counts) -> "_Scope":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _Tracer(leaves).trace(root)
        except Exception as e:  # noqa: BLE001 -- any failure to trace means "read it another way"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return cls(root, None, prefix, counts, first[:120])
        return cls(root, graph, prefix, counts, None)

    def full(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def describe(self, node) -> str:
        if node.op == "call_module":
            return f"{self.full(node.target)} ({type(self.modules[node.target]).__name__})"
        if node.op == "output" and self.prefix:
            return f"the output of {self.prefix} ({type(self.root).__name__})"
        return _describe_node(node, self.modules)

    def once(self, target: str) -> bool:
        """Called once here, and (inside a module) held once in the whole model's tree."""
        if len(self.calls.get(target, [])) != 1:
            return False
        return self.counts is None or self.counts.get(id(self.modules[target]), 0) == 1

    def place(self, name: str, layout: Layout) -> Placement:
        nodes = self.calls.get(name, [])
        if len(nodes) != 1:
            if not nodes:
                return _linear("not called in the traced forward")
            return _weight(f"called {len(nodes)} times in forward: one sign per unit cannot follow each call")
        return self._place(nodes[0], layout)

    def _place(self, node, layout: Layout) -> Placement:
        modules, cd = self.modules, layout.channel_dim
        prev = node
        while True:  # through ops that commute with a positive per-unit scale
            users = list(prev.users)
            if len(users) == 1 and _passes(users[0], prev, modules, cd, before=True) == "same":
                prev = users[0]
                continue
            break
        if not users:
            return _linear("no activation follows (output unused)")
        kinds = [_kind(u, modules) if not (u.op == "output" and self.prefix) else "unknown" for u in users]
        if "not homogeneous" in kinds:
            act = users[kinds.index("not homogeneous")]
            return _weight(f"followed by {self.describe(act)}, not positively homogeneous: computes f(r·(uᵀx+λ))")
        if "unknown" in kinds:
            op = users[kinds.index("unknown")]
            if op.op == "output":
                return _weight(f"its output leaves {self.prefix} ({type(self.root).__name__}); what follows could not be traced")
            return _weight(f"output feeds {self.describe(op)}, neither a known activation nor a linear op")
        if "homogeneous" not in kinds:
            if len(users) == 1 and users[0].op == "output":
                return _linear("no activation follows (the model's output)")
            return _linear(f"no activation follows (output feeds {', '.join(self.describe(u) for u in users[:3])})")
        if len(users) > 1:
            return _weight(f"output feeds an activation and {len(users) - 1} other op(s): no single place for sign(r)")
        act = users[0]
        if act.args[0] is not prev:
            return _weight(f"the activation {self.describe(act)} does not take the layer's output as its input")
        consumer, flattened = self._consumer(act, cd)
        if act.op == "call_module" and self.once(act.target):
            return Placement(
                "paper", sign=True, where=f"sign(r) after {self.describe(act)}", host=self.full(act.target),
                consumer=consumer, flattened=flattened,
            )  # fmt: skip
        if consumer is not None:
            return Placement(
                "paper", sign=True, host=consumer, pre=True, consumer=consumer, flattened=flattened,
                where=f"sign(r) after {self.describe(act)}, applied at the input of {consumer}",
            )  # fmt: skip
        what = "is a function" if act.op != "call_module" else "module is called more than once"
        return _weight(
            f"the activation {self.describe(act)} {what}, and its output reaches no single layer through "
            f"sign-commuting ops (dropout, average pooling, flatten)"
        )

    def _consumer(self, act, cd) -> Tuple[Optional[str], bool]:
        """The one module ``act``'s output reaches through linear per-unit ops: ``(full name or None, flattened)``."""
        prev, flattened = act, False
        while True:
            users = list(prev.users)
            if len(users) != 1:
                return None, flattened
            u = users[0]
            what = _passes(u, prev, self.modules, 1 if flattened else cd, before=False)
            if what is None:
                break
            if what == "flatten":
                if flattened:
                    return None, flattened
                flattened = True
            prev = u
        if u.op != "call_module" or not self.once(u.target) or not u.args or u.args[0] is not prev:
            return None, flattened
        if any(a is prev for a in list(u.args[1:]) + list(u.kwargs.values())):
            return None, flattened
        return self.full(u.target), flattened
