r"""The paper's form: ``sign(r)`` after the activation.

The paper's unit (official code, ``models.py``: ``DenseReparam``, ``Conv2DReparam``) is
``r·f(uᵀx + λ)`` with ``r`` signed. For a positively homogeneous ``f`` (ReLU, LeakyReLU, PReLU,
RReLU: ``f(c·z) = c·f(z)`` for ``c > 0``) that is ``s·f(|r|·(uᵀx + λ))`` with ``s = sign(r)``: the
layer carries ``|r|`` (its parametrization, see :mod:`georeparam.parametrization`) and ``s``
multiplies each unit's output right after ``f``. This module finds that place in a model and
puts the sign there:

* :func:`plan` reads the model (``torch.fx`` tracing; a plain ``nn.Sequential`` walk when tracing
  fails) and decides, per layer, one :class:`Placement`: the sign after an activation module
  called once (a forward hook on it), or before the one layer its output reaches through
  sign-commuting ops (a forward pre-hook on that layer); or no activation at all (the weight
  form ``r·(uᵀx + λ)`` *is* the paper's unit then); or no exact place (the weight form stays,
  with the reason).
* :class:`SignHook` is the hook: it reads ``r`` live from the layer, so ``deepcopy``,
  ``functional_call``, ``.to()`` and DDP see the right sign.
* :func:`bake` ends it at :func:`georeparam.remove`: the sign goes into the consumer's input
  columns where the path is linear, else it stays as a constant (see Note [A sign no plain layer
  can hold]).

# Note [Where the sign may act]
``s`` must multiply each unit's output before anything that does not commute with a per-unit
sign: a max-pool (``max(−a) ≠ −max(a)``), a norm layer with a shift, a residual add. Before the
activation the layer's output may pass ops that commute with a *positive* per-unit scale (dropout,
max/average pooling) since ``|r|`` sits inside the layer; after it, only ops linear and per-unit
(dropout, average pooling, flatten) may stand between the activation and a consumer pre-hook.

# Note [The gradient at r = 0]
``s`` is computed from ``r`` without gradient, with ``s(0) = +1``, so ``∂|r|/∂r = s`` (where
``torch.abs``/``torch.sign`` give 0 at ``r = 0``). The layer computes ``s·f(|r|·z)``, whose
derivative is ``f′(|r|·z)·z``: the paper's ``f(z)`` for ``r ≠ 0``, but ``f′(0)·z = 0`` at an exact
``r = 0`` (torch's ReLU′(0) = 0), and ``r`` would stick there. So an exact zero radius is carried
as the dtype's smallest normal number ``t`` (1.2e-38 in float32, 2.2e-308 in float64): the unit
outputs ``t·f(z)`` instead of 0, and ``∂/∂r = f(z)``, the paper's value (tested against the
reference in ``tests/test_paper_form.py``). Under float16 autocast ``t`` rounds to 0 and the old
behaviour returns at that one point.
"""

from __future__ import annotations

import operator
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layouts import Layout, entry_of, is_supported, layout_of, weight_names

__all__ = [
    "Placement", "SignHook", "plan", "unit_sign", "attach", "bake", "column_signs", "live_hooks", "HOMOGENEOUS",
    "NOT_HOMOGENEOUS",
]  # fmt: skip


def unit_sign(radius: Tensor) -> Tensor:
    """``sign(r)`` with ``sign(0) = +1``, as a constant (no gradient): Note [The gradient at r = 0]."""
    r = radius.detach()
    return 1 - 2 * (r < 0).to(r.dtype)


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
    why = f"torch.fx could not trace {type(model).__name__} ({whole.error})"
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
        out[name] = place or _weight(f"{why}, and no module around the layer could be traced")
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


# -------------------------------------------------------------------------------------------------
# the hook
# -------------------------------------------------------------------------------------------------

_BUFFER = "georeparam_sign"


class SignHook:
    """Multiplies each unit's output by ``sign(r)`` of ``layer`` (read live), along the unit dim.

    Used as a forward hook on the activation (``pre=False``) or a forward pre-hook on the one
    consumer (``pre=True``; then a flattened input repeats each unit's sign over its block).
    After :func:`bake` left a sign no plain layer can hold, it reads the constant buffer
    ``georeparam_sign`` of its host instead.

    A callable object, not a closure: ``copy.deepcopy`` of the model maps ``layer`` to the copy's
    layer (a closure would keep reading the original's radius).
    """

    def __init__(
        self, layer: Optional[nn.Module], weight_name: str, layout: Layout, *, pre: bool, host: nn.Module,
        consumer: Optional[nn.Module] = None, flattened: bool = False,
    ):  # fmt: skip
        self.layer = layer
        # the weight's ParametrizationList, kept for Note [torch's remover on a GmP weight]
        self._weight_list = layer.parametrizations[weight_name] if layer is not None else None
        self.consumer = consumer
        self.flattened = flattened
        self.weight_name = weight_name
        self.units = layout.units
        self.channel_dim = layout.channel_dim
        self.pre = pre
        self.host = host
        self.handle_id: Optional[int] = None

    def sign(self) -> Tensor:
        if self.layer is None:
            return getattr(self.host, _BUFFER)
        plists = self.layer.parametrizations if hasattr(self.layer, "parametrizations") else {}
        plist = plists[self.weight_name] if self.weight_name in plists else self._weight_list
        return unit_sign(plist.original0)

    def orphaned(self) -> bool:
        """Whether torch's own remover took the layer's GmP weight away (the sign lives on)."""
        if self.layer is None:
            return False
        plists = getattr(self.layer, "parametrizations", {})
        return self.weight_name not in plists or plists[self.weight_name] is not self._weight_list

    def _apply(self, x: Tensor) -> Tensor:
        s = self.sign()
        if _skippable(s, x):
            return x
        s = s.to(x.dtype)
        dim = self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim
        size = x.shape[dim]
        if size != self.units:  # flattened: each unit's block of size // units entries
            s = s.repeat_interleave(size // self.units)
        shape = [1] * (x.dim() - dim)
        shape[0] = size
        return x * s.reshape(shape)

    def __call__(self, module: nn.Module, args, output=None):
        if self.pre:
            return (self._apply(args[0]),) + tuple(args[1:])
        return self._apply(output)

    def __repr__(self) -> str:
        return f"SignHook(units={self.units}, channel_dim={self.channel_dim}, pre={self.pre}, constant={self.layer is None})"


def _skippable(s: Tensor, x: Tensor) -> bool:
    """All signs +1, known without a device sync or a traced branch: the multiply can be skipped.

    # Note [Skipping an all-positive sign]
    Multiplying every activation by ``s`` costs one elementwise pass forward and one backward,
    as the official code's ``r * relu(z)`` does. Measured on a training step of a 3-conv VGG-style
    CNN (32-64-128, 32×32, batch 64, 1 thread, thread CPU time, over standard parameterization):
    weight form 1.04, paper form with one r < 0 per layer 1.27, paper form with all r ≥ 0 and
    this skip 1.09. While no unit of the layer has ``r < 0`` the pass is the identity, gradient
    included, so on CPU in eager mode it is skipped after one check of the ``(units,)`` signs. On an accelerator the
    check would synchronize the device, and under ``torch.compile``/``vmap`` it would be a
    data-dependent branch: there the multiply always runs.
    """
    if x.device.type != "cpu" or s.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if type(s) is not Tensor or _wrapped(s) or _wrapped(x):
        return False
    return bool((s > 0).all())


def _wrapped(t: Tensor) -> bool:
    fn = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return fn is None or bool(fn(t))


def attach(model_modules: Dict[str, nn.Module], layer: nn.Module, weight_name: str, placement: Placement) -> SignHook:
    """Put the hook of ``placement`` on its host; returns it (the layer keeps it for :func:`bake`)."""
    host = model_modules[placement.host]
    lay = layout_of(layer, weight_name)
    consumer = model_modules.get(placement.consumer) if placement.consumer else None
    hook = SignHook(layer, weight_name, lay, pre=placement.pre, host=host, consumer=consumer, flattened=placement.flattened)
    if placement.pre:
        handle = host.register_forward_pre_hook(hook, prepend=True)  # before IMN centres the input
    else:
        handle = host.register_forward_hook(hook, prepend=True)
    hook.handle_id = handle.id
    return hook


def live_hooks(model: nn.Module):
    """Every live :class:`SignHook` on ``model``'s modules."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for h in list(hooks.values()):
                if isinstance(h, SignHook) and h.layer is not None:
                    yield h


def detach(hook: SignHook) -> None:
    hooks = hook.host._forward_pre_hooks if hook.pre else hook.host._forward_hooks
    hooks.pop(hook.handle_id, None)


def column_signs(consumer: nn.Module, w: Tensor, s: Tensor, flattened: bool, producer_cd: int) -> Optional[Tensor]:
    """``consumer``'s weight ``w`` times the producer's unit signs ``s`` on its input side; None if no layer can.

    ``flattened``: the producer's units reach ``consumer`` flattened with their spatial dims
    (channel-major); ``producer_cd``: the unit dim of the producer's output (``Layout.channel_dim``).
    """
    units = s.numel()
    if isinstance(consumer, nn.Linear):
        if flattened and consumer.in_features % units == 0:
            cols = s.repeat_interleave(consumer.in_features // units)
        elif not flattened and producer_cd == -1 and consumer.in_features == units:
            cols = s
        else:
            return None
        return w * cols.to(w.dtype)
    if isinstance(consumer, nn.modules.conv._ConvNd) and not flattened and producer_cd == 1 and consumer.in_channels == units:
        if consumer.transposed:  # (in, out/g, *k): dim 0 is the input channel
            return w * s.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
        in_per_group, out_per_group = consumer.in_channels // consumer.groups, consumer.out_channels // consumer.groups
        idx = (torch.arange(w.shape[0], device=w.device) // out_per_group)[:, None] * in_per_group
        idx = idx + torch.arange(in_per_group, device=w.device)[None, :]
        return w * s.to(w.dtype)[idx].reshape(idx.shape + (1,) * (w.dim() - 2))
    return None


def bake(hook: SignHook, s: Tensor) -> Optional[str]:
    """End a live sign ``s`` (its layer was removed): into the consumer's columns, else a constant.

    Returns a warning message when the sign had to stay as a constant on its host, else ``None``.

    # Note [A sign no plain layer can hold]
    After a max-pool (or where the activation's output reaches no single linear consumer) a
    negative ``r`` cannot be folded into any plain layer: ``maxpool(−a) ≠ −maxpool(a)``. The
    function is kept exactly by leaving the hook in place with the signs as a non-persistent
    buffer ``georeparam_sign`` of its host (it moves with ``.to()`` and deep-copies, but is not
    in ``state_dict``): :func:`georeparam.remove` warns when that happens.
    """
    hook.layer = None
    if bool((s > 0).all()):
        detach(hook)
        return None
    consumer = hook.consumer
    if consumer is not None and is_supported(consumer):
        new = column_signs(consumer, consumer.weight.detach(), s, hook.flattened, hook.channel_dim)
        if new is not None:
            with torch.no_grad():
                if "weight" in getattr(consumer, "parametrizations", {}):
                    consumer.weight = new  # GmP: its own sign is kept (see right_inverse)
                else:
                    consumer.weight.copy_(new)
            detach(hook)
            return None
    if hasattr(hook.host, _BUFFER):
        raise RuntimeError(f"remove: {type(hook.host).__name__} already holds a constant GmP sign; cannot hold a second")
    hook.host.register_buffer(_BUFFER, s, persistent=False)
    return (
        f"the signs of {int((s < 0).sum())} units with r < 0 stay on {type(hook.host).__name__} as a constant "
        f"(buffer {_BUFFER!r}, not in state_dict): no plain layer can hold a sign after a max-pool or where the "
        f"activation feeds no single linear layer (Note [A sign no plain layer can hold])"
    )
