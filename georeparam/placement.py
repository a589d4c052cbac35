r"""Where ``sign(r)`` goes in a model: reading it for the paper's form.

The paper's form (:mod:`georeparam.signs`) needs, for each registered layer, the place right
after its units' positively homogeneous activation where ``sign(r)`` can act. :func:`plan` reads
the model with ``torch.fx`` and follows each layer's output through the ops that keep its units
identifiable (:mod:`georeparam.unitpath`: view/reshape/flatten/unflatten/unsqueeze/squeeze/
transpose/permute, a product or quotient by a positive number, dropout, average pooling,
``chunk``/``split`` with each part followed on its own) to what ends the path:

* a positively homogeneous activation (ReLU, LeakyReLU, PReLU, RReLU, ``clamp(min=0)``): the
  paper's form, the sign after it, as a forward hook on the activation module when it is called
  once (a direct call of the next layer and a feature read at the activation see the paper's
  unit), else as a forward pre-hook on the one module its output reaches (the report says so:
  a direct call of that module multiplies its input by the signs too);
* a linear layer or map that mixes the units (Linear, conv, matmul, attention) or the model's
  output: no activation of its own, ``r·(uᵀx + λ)`` is the paper's unit as it stands;
* anything else, named in the report, keeps the weight form ``f(r·(uᵀx + λ))``: an activation
  that is not positively homogeneous, a norm, a residual add, a max-pool, a product with a tensor,
  an op the units cannot be followed through, or a module ``torch.fx`` could not trace.

Nothing is changed here.

# Note [Where the sign may act]
The paper's unit is ``r·f(uᵀx + λ)``; with ``|r|`` inside the layer, ``s = sign(r)`` must multiply
the unit's output right after ``f``: ``s·f(P(|r|·z)) = r·f(P(z))`` needs ``P`` to commute with a
positive per-unit scale and to keep each unit's entries apart (reshapes, positive scalings,
dropout, average pooling). A max-pool before ``f`` commutes too, but the paper's model puts the
pool after the unit (``maxpool(r·f(z)) ≠ r·f(maxpool(z))`` for ``r < 0``), so it is not seen through.
After ``f``, a pre-hook on the consumer needs ops that are linear and per unit.

# Note [A norm before the activation]
``conv → BatchNorm → ReLU`` (every torchvision/timm ResNet) keeps the weight form. Measured
(``conv 3→8, 3×3``, ``BatchNorm2d``, ReLU, MSE, float64; ``|∂L/∂r| / |r|``): in train mode
1.2e-5 with the weight form ``ReLU(BN(r·z))`` and 1.2e-5 with the sign after the ReLU
``s·ReLU(BN(|r|·z))`` (BatchNorm is scale-invariant: ``r`` hardly moves in either); with frozen
statistics (eval-mode fine-tuning) 1.6e-1 in both, and then the activation boundary
``|r|·z = μ − β·σ/γ`` moves with ``|r|`` in both: neither is the paper's unit, whose boundary
belongs to θ and λ alone. The sign after the ReLU would only add a hook; the report says
"weight" and names the norm instead of claiming the paper's form.
"""

from __future__ import annotations

import operator
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import unitpath as up
from .fxops import HOMOGENEOUS, NOT_HOMOGENEOUS, describe_node, first_only, is_int, path_op, stop_kind
from .layouts import entry_of, layout_of

__all__ = ["Placement", "Part", "plan", "unit_axis", "path_op", "HOMOGENEOUS", "NOT_HOMOGENEOUS"]


# -------------------------------------------------------------------------------------------------
# the plan
# -------------------------------------------------------------------------------------------------


class Part:
    """One place where some of a layer's units get their sign (a chunk of the units, or all).

    Attributes:
        host: qualified name of the module carrying the hook (the activation, or the consumer).
        pre: the hook is a forward pre-hook on a consumer (else a forward hook on the activation).
        ops: the :mod:`georeparam.unitpath` ops from the layer's output to the host's tensor.
        units: ``(lo, hi)``: the layer's units this part carries.
        consumer: qualified name of the layer the sign is baked into at ``remove``, or ``None``.
        bake: ``(unit axis from the end, flattened)`` at the consumer's input, when it can be baked.
        stays: why no plain layer can hold this sign at ``remove`` (empty when one can).
    """

    __slots__ = ("host", "pre", "ops", "units", "consumer", "bake", "stays")

    def __init__(self, host, pre, ops, units, consumer=None, bake=None, stays=""):
        self.host, self.pre, self.ops, self.units = host, pre, tuple(ops), tuple(units)
        self.consumer, self.bake, self.stays = consumer, bake, stays

    def __repr__(self) -> str:
        return (
            f"Part(host={self.host!r}, pre={self.pre}, ops={self.ops}, units={self.units}, consumer={self.consumer!r})"
        )


class Placement:
    """Where a layer's ``sign(r)`` goes.

    Attributes:
        form: ``"paper"`` or ``"weight"``.
        sign: whether sign hooks are needed (the paper's form after an activation).
        where: human-readable place (paper's form), or ``why``: the reason for the weight form.
        parts: one :class:`Part` per place a sign acts (several after a ``chunk``/``split``).
        axis: the unit axis of the layer's output, counted from the end (−1; ``−(d+1)`` for ConvNd).
        stays: why some sign cannot be baked into a plain layer at ``remove`` (empty otherwise).
    """

    __slots__ = ("form", "sign", "where", "why", "parts", "axis", "stays")

    def __init__(self, form, *, sign=False, where="", why="", parts=(), axis=-1):
        self.form, self.sign, self.where, self.why = form, sign, where, why
        self.parts, self.axis = list(parts), axis
        self.stays = "; ".join(p.stays for p in self.parts if p.stays)

    # the first part's fields (one part in all but chunked layers)
    host = property(lambda self: self.parts[0].host if self.parts else None)
    pre = property(lambda self: self.parts[0].pre if self.parts else False)
    consumer = property(lambda self: self.parts[0].consumer if self.parts else None)

    def __repr__(self) -> str:
        return f"Placement(form={self.form!r}, where={self.where!r}, why={self.why!r})"


def unit_axis(layer: nn.Module) -> int:
    """The unit axis of ``layer``'s output counted from the end: ``−(d+1)`` for a ``d``-d conv
    (batched or not), else ``−1``."""
    e = entry_of(layer)
    return e.unit_axis(layer) if e is not None else -1


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
    rest = [n for n in names if n not in out]
    if not rest:
        return out
    leaves = {id(modules[n]) for n in rest}
    whole = _Scope.trace(model, leaves, "", None)
    if whole.error is None:
        for name in rest:
            out[name] = whole.place(name, modules[name])
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
                place = scopes[anc].place(".".join(parts[k:]), modules[name])
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
        return describe_node(node, self.modules)

    def once(self, target: str) -> bool:
        """Called once here, and (inside a module) held once in the whole model's tree."""
        if len(self.calls.get(target, [])) != 1:
            return False
        return self.counts is None or self.counts.get(id(self.modules[target]), 0) == 1

    def place(self, name: str, layer: nn.Module) -> Placement:
        nodes = self.calls.get(name, [])
        if len(nodes) != 1:
            if not nodes:
                return _linear("not called in the traced forward")
            return _weight(f"called {len(nodes)} times in forward: one sign per unit cannot follow each call")
        axis, units = unit_axis(layer), layout_of(layer).units
        try:
            st = up.start(up.probe_shape(axis, units), axis, units)
        except up.Lost as e:  # pragma: no cover - probe shapes always have the axis
            return _weight(str(e))
        ends: List[tuple] = []
        self._walk(nodes[0], [], [st.shape], {nodes[0]: 0}, st, ends)
        weights = [e for e in ends if e[0] == "weight"]
        if weights:
            return _weight(weights[0][1])
        acts = [e for e in ends if e[0] == "act"]
        if not acts:
            return _linear("; ".join(dict.fromkeys(e[1] for e in ends)))
        if len(acts) != len(ends):
            lin = next(e for e in ends if e[0] != "act")
            return _weight(f"some units reach an activation and others none ({lin[1]}): one layer carries one form")
        parts, wheres = [], []
        for _, act, ops, st_act in acts:
            part, where = self._host(act, ops, st_act, units)
            if part is None:
                return _weight(where)
            parts.append(part)
            wheres.append(where)
        return Placement("paper", sign=True, where="; ".join(wheres), parts=parts, axis=axis)

    def _walk(self, node, ops, shapes, steps, st, ends) -> None:
        """Follow ``node``'s output (units ``st``) to what ends each branch; append to ``ends``:
        ``("act", node, ops, state)``, ``("linear", where)`` or ``("weight", why)``."""
        users = list(node.users)
        if not users:
            ends.append(("linear", "no activation follows (output unused)"))
            return
        if len(users) > 1:
            names = ", ".join(self.describe(u) for u in users[:3])
            ends.append(("weight", f"output feeds {len(users)} ops ({names}): no single place for sign(r)"))
            return
        u = users[0]

        def sizes(n):
            # x.size(k) / x.shape[k] of a tensor on the path: read at run time
            if (
                n.op == "call_method"
                and n.target == "size"
                and len(n.args) == 2
                and n.args[0] in steps
                and is_int(n.args[1])
            ):
                return ("dim", steps[n.args[0]], n.args[1])
            if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and is_int(n.args[1]):
                g = n.args[0]
                if (
                    isinstance(g, torch.fx.Node)
                    and g.op == "call_function"
                    and g.target is getattr
                    and g.args[0] in steps
                ):
                    return ("dim", steps[g.args[0]], n.args[1])
            return None

        op = path_op(u, node, self.modules, sizes)
        if op is not None and op[0] in ("chunk", "split"):
            parts = list(u.users)
            if not parts or any(
                p.op != "call_function" or p.target is not operator.getitem or not is_int(p.args[1]) for p in parts
            ):
                ends.append(("weight", f"output is {self.describe(u)}, and its parts are not taken one by one"))
                return
            for p in parts:
                sub = op + (p.args[1],)
                try:
                    st2 = up.step(st, sub, shapes)
                except up.Lost as e:
                    ends.append(("weight", f"output feeds {self.describe(u)}: {e}"))
                    continue
                self._walk(p, ops + [sub], shapes + [st2.shape], {**steps, p: len(shapes)}, st2, ends)
            return
        if op is not None:
            try:
                st2 = up.step(st, op, shapes)
            except up.Lost as e:
                ends.append(("weight", f"output feeds {self.describe(u)}: {e}, so its units cannot be followed"))
                return
            self._walk(u, ops + [op], shapes + [st2.shape], {**steps, u: len(shapes)}, st2, ends)
            return
        if u.op == "output":
            if self.prefix:
                ends.append(
                    (
                        "weight",
                        f"its output leaves {self.prefix} ({type(self.root).__name__}); what follows could not be traced",
                    )
                )
            else:
                ends.append(("linear", "no activation follows (the model's output)"))
            return
        kind, why = stop_kind(u, node, self.modules)
        if kind == "not homogeneous":
            ends.append(
                ("weight", f"followed by {self.describe(u)}, not positively homogeneous: computes f(r·(uᵀx+λ))")
            )
        elif kind == "homogeneous":
            if not first_only(u, node):
                ends.append(
                    ("weight", f"the activation {self.describe(u)} does not take the units as its only tensor input")
                )
            else:
                ends.append(("act", u, ops, st))
        elif kind == "mixing":
            ends.append(("linear", f"no activation of its own: output feeds {self.describe(u)} ({why})"))
        else:
            ends.append(("weight", f"output feeds {self.describe(u)} before any activation: {why}"))

    def _host(self, act, ops, st, units) -> Tuple[Optional[Part], str]:
        """The hook's place for one activation: ``(Part, where)``, or ``(None, why not)``."""
        path = "".join(f"{self.describe_op(o)} → " for o in ops if o[0] != up.ELEMENTWISE)
        consumer, post, st_c, stop = self._consumer(act, st)
        bake, stays = None, ""
        if consumer is not None:
            std = up.standard(st_c, units) if st_c is not None else None
            m = self.modules[self._local(consumer)]
            e = entry_of(m)
            takes = e is not None and e.columns is not None and e.inputs is not None  # the layer's input columns
            if takes and std is not None and std[0] == e.inputs(m)[1] and (e.flattened_columns or not std[1]):
                bake = std
            elif takes:
                stays = f"sign cannot be baked at remove: its units reach {consumer} reshaped or in part"
            else:
                stays = f"sign cannot be baked at remove: feeds {consumer} ({type(m).__name__}), which holds no sign"
        else:
            stays = f"sign cannot be baked at remove: {stop}"
        lo_hi = (st.lo, st.hi)
        chunk = f" (units {st.lo}–{st.hi - 1})" if lo_hi != (0, units) else ""
        if act.op == "call_module" and self.once(act.target):
            part = Part(self.full(act.target), False, ops, lo_hi, consumer, bake, stays)
            return part, f"sign(r){chunk} after {path}{self.describe(act)}"
        if consumer is not None:
            part = Part(consumer, True, list(ops) + post, lo_hi, consumer, bake, stays)
            return part, (
                f"sign(r){chunk} after {path}{self.describe(act)}, applied at the input of {consumer} "
                f"(a direct call {consumer}(z) multiplies z by it too)"
            )
        what = "is a function" if act.op != "call_module" else "module is called more than once"
        return None, (
            f"the activation {self.describe(act)} {what}, and its output reaches no single module through "
            f"ops the sign can follow ({stop}): no place for a hook"
        )

    def _local(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def describe_op(self, op) -> str:
        return {"view": ".view()", "pool": "pool", "chunk": ".chunk()", "split": ".split()"}.get(op[0], f".{op[0]}()")

    def _consumer(self, act, st) -> Tuple[Optional[str], list, Optional[up.UnitAxes], str]:
        """The one module ``act``'s output reaches through unit-keeping linear ops:
        ``(full name or None, ops, units there, why none)``."""
        prev, ops, shapes = act, [], [st.shape]
        while True:
            users = list(prev.users)
            if len(users) != 1:
                return None, ops, None, f"{self.describe(prev)} feeds {len(users)} ops"
            u = users[0]
            op = path_op(u, prev, self.modules, lambda n: None)
            if op is None or op[0] in ("chunk", "split"):
                break
            try:
                st = up.step(st, op, shapes)
            except up.Lost as e:
                return None, ops, None, str(e)
            ops.append(op)
            shapes.append(st.shape)
            prev = u
        if u.op != "call_module" or not self.once(u.target) or not first_only(u, prev):
            return None, ops, None, f"it feeds {self.describe(u)}"
        return self.full(u.target), ops, st, ""
