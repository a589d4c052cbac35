r"""The paper's form: ``sign(r)`` after the activation.

The paper's unit (official code, ``models.py``: ``DenseReparam``, ``Conv2DReparam``) is
``r·f(uᵀx + λ)`` with ``r`` signed. For a positively homogeneous ``f`` (ReLU, LeakyReLU, PReLU,
RReLU: ``f(c·z) = c·f(z)`` for ``c > 0``) that is ``s·f(|r|·(uᵀx + λ))`` with ``s = sign(r)``: the
layer carries ``|r|`` (its parametrization, see :mod:`georeparam.parametrization`) and ``s``
multiplies each unit's output right after ``f``. :mod:`georeparam.placement` finds that place;
this module puts the sign there and takes it away:

* :class:`SignHook` is the hook: it reads ``r`` live from the layer, so ``deepcopy``,
  ``functional_call``, ``.to()`` and DDP see the right sign.
* :func:`bake` ends it at :func:`georeparam.remove`: the sign goes into the consumer's input
  columns where the path is linear, else it stays as a constant (see Note [A sign no plain layer
  can hold]).

# Note [The gradient at r = 0]
``s`` is computed from ``r`` without gradient, with ``s(0) = +1``, so ``∂|r|/∂r = s`` (where
``torch.abs``/``torch.sign`` give 0 at ``r = 0``). The layer computes ``s·f(|r|·z)``, whose
derivative is ``f′(|r|·z)·z``: the paper's ``f(z)`` for ``r ≠ 0``, but ``f′(0)·z = 0`` at an exact
``r = 0`` (torch's ReLU′(0) = 0), and ``r`` would stick there. So an exact zero radius is carried
as a tiny positive ``t`` (1.1e-19 in float32, 1.5e-154 in float64; why not smaller: Note [A carrier
that survives flush-to-zero] in :mod:`georeparam.parametrization`): the unit
outputs ``t·f(z)`` instead of 0, and ``∂/∂r = f(z)``, the paper's value (tested against the
reference in ``tests/test_paper_form.py``). Under float16 autocast ``t`` rounds to 0 and the old
behaviour returns at that one point.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ._map import functorch_wrapped
from .layouts import Layout, entry_of, is_supported, layout_of
from . import unitpath as up
from .placement import Placement

__all__ = [
    "SignHook",
    "SignGroup",
    "UnitSign",
    "CallSign",
    "RecordShape",
    "apply_sign",
    "unit_sign",
    "readable",
    "smallest",
    "attach",
    "bake",
    "column_signs",
    "live_hooks",
    "detach",
]


def unit_sign(radius: Tensor) -> Tensor:
    """``sign(r)`` with ``sign(0) = +1`` (``-0.0`` too), as a constant (no gradient): Note [The gradient at r = 0]."""
    r = radius.detach()
    return _host_sign(r) if readable(r) else _where_sign(r)


def _where_sign(r: Tensor) -> Tensor:
    """:func:`unit_sign`'s general form, for any detached ``r``."""
    s = torch.where(r < 0, -1.0, 1.0)  # two ops (was four: ~12 → ~8 µs on a small layer)
    return s if s.dtype == r.dtype else s.to(r.dtype)


def _host_sign(r: Tensor) -> Tensor:
    """:func:`unit_sign` of a detached :func:`readable` ``r``: torch's ``sign`` where no entry is 0
    or NaN (Note [Reading a sign on the host]), else the general form."""
    return r.sign() if smallest(r.abs()) > 0 else _where_sign(r)


def readable(*tensors: Tensor) -> bool:
    """Whether the values of these tensors can steer Python without a device sync or a traced
    branch: plain CPU tensors (not subclasses, not functorch wrappers), eagerly."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # a loop, not all(generator): this runs several times per layer and step
        if type(t) is not Tensor or t.device.type != "cpu" or functorch_wrapped(t):
            return False
    return True


def smallest(r: Tensor) -> float:
    """``min(r)`` as a Python float (``inf`` for an empty ``r``; NaN if any entry is NaN), for
    :func:`readable` tensors.

    # Note [Reading a sign on the host]
    ``r.min().item()`` costs ~1.3 µs on a small CPU tensor where ``bool(r.min() >= 0)`` costs
    ~4.2 µs and ``torch.where(r < 0, -1.0, 1.0)`` ~6.3 µs (1 thread, thread CPU time, torch
    2.13): a comparison with a Python number wraps the number in a tensor first. The paper's
    form pays these per layer and step (Note [The paper form's fixed cost] in
    :mod:`georeparam.parametrization`).
    """
    return r.min().item() if r.numel() else math.inf


# -------------------------------------------------------------------------------------------------
# the hook
# -------------------------------------------------------------------------------------------------

_BUFFER = "georeparam_sign"  # the child module a sign no plain layer can hold stays in (Note [A sign no plain layer can hold])


def apply_sign(x: Tensor, s: Tensor, axis: int, ops, span, shape) -> Tensor:
    """``x`` times each unit's sign ``s`` (one per unit of the layer), on the entries the unit owns.

    ``axis``: the unit axis of the layer's output counted from the end (so batched and unbatched
    conv inputs both work); ``ops``: the :mod:`georeparam.unitpath` ops from the layer's output to
    ``x``; ``span``: the units ``x`` carries; ``shape``: the layer's output shape (needed only
    when ``ops`` reshape).
    """
    lo, hi = span
    if up.is_trivial(ops):
        dim = x.dim() + axis
        if dim < 0:
            raise RuntimeError(f"GmP sign: expected a tensor with a unit axis {axis}. Got: shape {tuple(x.shape)}")
        sub = s if (lo, hi) == (0, s.shape[0]) else s[lo:hi]
        size = x.shape[dim]
        if size != sub.numel():
            raise RuntimeError(f"GmP sign: expected {sub.numel()} units along dim {dim}. Got: shape {tuple(x.shape)}")
        return x * (sub if axis == -1 else sub.reshape((size,) + (1,) * (x.dim() - dim - 1)))
    if shape is None:
        raise RuntimeError(
            "GmP sign: the layer's output shape was not recorded (was the layer called before its activation?)"
        )
    try:
        st = up.follow(shape, axis, s.numel(), ops)
    except up.Lost as e:
        raise RuntimeError(
            f"GmP sign: the units of a layer of output shape {tuple(shape)} cannot be followed at run time ({e}); "
            f"register that layer with form='weight' (or exclude it). Got: ops {list(ops)}"
        ) from None
    return x * up.broadcast(s, st, x)


class SignHook:
    """Multiplies each unit's output by ``sign(r)`` of ``layer`` (read live), where the unit is.

    Used as a forward hook on the activation (``pre=False``) or a forward pre-hook on the one
    consumer (``pre=True``). ``ops`` (:mod:`georeparam.unitpath`) say how the units got from the
    layer's output to the host's tensor; when they reshape, a forward hook on the layer records
    its output's shape (:class:`RecordShape`).

    A callable object, not a closure: ``copy.deepcopy`` of the model maps ``layer`` to the copy's
    layer (a closure would keep reading the original's radius).
    """

    def __init__(
        self, layer: nn.Module, weight_name: str, layout: Layout, *, pre: bool, host: nn.Module,
        consumer: Optional[nn.Module] = None, axis: int = -1, ops=(), span=None, bake=None,
    ):  # fmt: skip
        self.layer = layer
        # the weight's ParametrizationList, kept for Note [torch's remover on a GmP weight]
        self._weight_list = layer.parametrizations[weight_name]
        self.weight_name = weight_name
        self.units = layout.units
        self.axis = axis
        self.ops = tuple(ops)
        self.span = tuple(span) if span is not None else (0, layout.units)
        # baking into the consumer's input columns (plain.py, bake): only where its columns can take it
        self.consumer = consumer if bake is not None else None
        self.flattened = bool(bake[1]) if bake is not None else False
        self.channel_dim = (-1 if bake[0] == -1 else 1) if bake is not None else layout.channel_dim
        self.pre = pre
        self.host = host
        self.shape = None  # the layer's output shape, when ops reshape
        self.handle_id: Optional[int] = None
        self.record_id: Optional[int] = None

    def _values(self) -> Tensor:
        """The layer's signed radius, read live and without gradient."""
        plists = getattr(self.layer, "parametrizations", None)
        plist = getattr(plists, self.weight_name, None) if plists is not None else None
        return (self._weight_list if plist is None else plist).original0.detach()

    def sign(self) -> Tensor:
        return unit_sign(self._values())

    def orphaned(self) -> bool:
        """Whether torch's own remover took the layer's GmP weight away (the sign lives on)."""
        plists = getattr(self.layer, "parametrizations", {})
        return self.weight_name not in plists or plists[self.weight_name] is not self._weight_list

    def _apply(self, x: Tensor) -> Tensor:
        v = self._values()
        lo, hi = self.span
        if x.device.type == "cpu" and readable(v) and not functorch_wrapped(x):
            # Note [Skipping an all-positive sign]
            # Multiplying every activation by ``s`` costs one elementwise pass forward and one
            # backward, as the official code's ``r * relu(z)`` does. Measured on a training step
            # of a 3-conv VGG-style CNN (32-64-128, 32×32, batch 64, 1 thread, thread CPU time,
            # over standard parameterization): weight form 1.04, paper form with one r < 0 per
            # layer 1.27, paper form with all r ≥ 0 and this skip 1.09. While no unit of the part
            # has ``r < 0`` the pass is the identity, gradient included, so on CPU in eager mode
            # it is skipped after one reduction of the ``(units,)`` radii (a NaN radius is not
            # skipped; its sign is +1 anyway). On an accelerator the check would synchronize the
            # device, and under ``torch.compile``/``vmap`` it would be a data-dependent branch:
            # there the multiply always runs.
            if smallest(v if (lo, hi) == (0, v.shape[0]) else v[lo:hi]) >= 0:
                return x
            s = _host_sign(v)
        else:
            s = unit_sign(v)
        return apply_sign(x, s if s.dtype == x.dtype else s.to(x.dtype), self.axis, self.ops, self.span, self.shape)

    def __call__(self, module: nn.Module, args, output=None):
        if self.pre:
            return (self._apply(args[0]),) + tuple(args[1:])
        return self._apply(output)

    def __repr__(self) -> str:
        return f"SignHook(units={self.units}, axis={self.axis}, pre={self.pre}, ops={list(self.ops)}, span={self.span})"


class RecordShape:
    """Forward hook on a layer: keeps its output's shape on ``target`` (a :class:`SignHook` or :class:`UnitSign`)."""

    def __init__(self, target):
        self.target = target

    def __call__(self, module, args, output):
        self.target.shape = tuple(output.shape)


class UnitSign(nn.Module):
    """A constant per-unit sign that no plain layer could absorb at :func:`georeparam.remove`.

    A child ``georeparam_sign`` of the activation (or consumer) it acts at, with the signs as a
    buffer, so ``state_dict``, ``load_state_dict``, ``torch.save(model)`` and ``deepcopy`` carry it
    (Note [A sign no plain layer can hold]).
    """

    def __init__(self, sign: Tensor, axis: int, ops=(), span=None):
        super().__init__()
        self.register_buffer("sign", sign.detach().clone())
        self.axis, self.ops = int(axis), tuple(ops)
        self.span = tuple(span) if span is not None else (0, sign.numel())
        self.shape = None

    def forward(self, x: Tensor) -> Tensor:
        return apply_sign(x, self.sign.to(x.dtype), self.axis, self.ops, self.span, self.shape)

    def extra_repr(self) -> str:
        neg = int((self.sign[self.span[0] : self.span[1]] < 0).sum())
        return f"units={self.span[1] - self.span[0]}, negative={neg}, axis={self.axis}"


class CallSign:
    """The host's hook that calls its child ``georeparam_sign`` (a picklable object, not a closure)."""

    def __init__(self, pre: bool):
        self.pre = pre

    def __call__(self, module, args, output=None):
        sign = getattr(module, _BUFFER)
        if self.pre:
            return (sign(args[0]),) + tuple(args[1:])
        return sign(output)


class SignGroup(list):
    """The sign hooks of one layer whose units were split (``chunk``/``split``) to several activations."""

    def sign(self) -> Tensor:
        return self[0].sign()


def attach(model_modules: Dict[str, nn.Module], layer: nn.Module, weight_name: str, placement: Placement):
    """Put the hooks of ``placement`` on their hosts; returns the :class:`SignHook` (a :class:`SignGroup`
    for several parts), which the layer keeps for :func:`bake`."""
    lay = layout_of(layer, weight_name)
    hooks = SignGroup()
    for part in placement.parts:
        host = model_modules[part.host]
        consumer = model_modules.get(part.consumer) if part.consumer else None
        hook = SignHook(
            layer, weight_name, lay, pre=part.pre, host=host, consumer=consumer, axis=placement.axis, ops=part.ops,
            span=part.units, bake=part.bake,
        )  # fmt: skip
        if part.pre:
            handle = host.register_forward_pre_hook(hook, prepend=True)  # before IMN centres the input
        else:
            handle = host.register_forward_hook(hook, prepend=True)
        hook.handle_id = handle.id
        if not up.is_trivial(part.ops):
            hook.record_id = layer.register_forward_hook(RecordShape(hook)).id
        hooks.append(hook)
    return hooks[0] if len(hooks) == 1 else hooks


def live_hooks(model: nn.Module):
    """Every live :class:`SignHook` on ``model``'s modules."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for h in list(hooks.values()):
                if isinstance(h, SignHook):
                    yield h


def detach(hook: SignHook) -> None:
    hooks = hook.host._forward_pre_hooks if hook.pre else hook.host._forward_hooks
    hooks.pop(hook.handle_id, None)
    if hook.record_id is not None:
        hook.layer._forward_hooks.pop(hook.record_id, None)


def column_signs(consumer: nn.Module, w: Tensor, s: Tensor, flattened: bool, producer_cd: int) -> Optional[Tensor]:
    """``consumer``'s weight ``w`` times the producer's unit signs ``s`` on its input side; None if no layer can.

    ``flattened``: the producer's units reach ``consumer`` flattened with their spatial dims
    (channel-major); ``producer_cd``: the unit dim of the producer's output (``Layout.channel_dim``).
    """
    e = entry_of(consumer)
    if e is None or e.columns is None:
        return None
    return e.columns(consumer, w, s, flattened, producer_cd)


def bake(hook, s: Tensor) -> Optional[str]:
    """End a live sign ``s`` (its layer was removed): into the consumer's columns, else a :class:`UnitSign`.

    Returns a warning message when the sign had to stay as a module on its host, else ``None``.

    # Note [A sign no plain layer can hold]
    After a max-pool, where the activation's output reaches no single linear consumer, or where
    the units reach it reshaped or in part, a negative ``r`` cannot be folded into any plain layer
    (``maxpool(−a) ≠ −maxpool(a)``). The function is kept exactly by a small real module,
    :class:`UnitSign` (the signs as a buffer), added as the child ``georeparam_sign`` of the host
    with a hook that calls it: ``state_dict`` holds the signs (a plain model loading it reports an
    unexpected key instead of silently computing another function), and ``torch.save(model)`` and
    ``deepcopy`` carry it. ``register``'s report says up front where this can happen.
    """
    if isinstance(hook, SignGroup):
        msgs = [m for h in hook for m in [bake(h, s)] if m]
        return "; ".join(msgs) or None
    detach(hook)
    lo, hi = hook.span
    part = s[lo:hi]
    if bool((part > 0).all()):
        return None
    consumer = hook.consumer
    if consumer is not None and is_supported(consumer) and (lo, hi) == (0, s.numel()):
        new = column_signs(consumer, consumer.weight.detach(), s, hook.flattened, hook.channel_dim)
        if new is not None:
            with torch.no_grad():
                if "weight" in getattr(consumer, "parametrizations", {}):
                    consumer.weight = new  # GmP: its own sign is kept (see right_inverse)
                else:
                    consumer.weight.copy_(new)
            return None
    host = hook.host
    if hasattr(host, _BUFFER):
        raise RuntimeError(f"remove: {type(host).__name__} already holds a constant GmP sign; cannot hold a second")
    unit = UnitSign(s, hook.axis, hook.ops, hook.span)
    host.add_module(_BUFFER, unit)
    (host.register_forward_pre_hook if hook.pre else host.register_forward_hook)(CallSign(hook.pre), prepend=True)
    if not up.is_trivial(hook.ops):
        hook.layer.register_forward_hook(RecordShape(unit))
    return (
        f"the signs of {int((part < 0).sum())} units with r < 0 stay on {type(host).__name__} as a module "
        f"(its child {_BUFFER!r}, a UnitSign with the signs in state_dict): no plain layer can hold a sign after a "
        f"max-pool, where the activation feeds no single linear layer, or where the units reach it reshaped "
        f"(Note [A sign no plain layer can hold])"
    )
