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

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .layouts import Layout, is_supported, layout_of
from .placement import Placement

__all__ = ["SignHook", "unit_sign", "attach", "bake", "column_signs", "live_hooks", "detach"]


def unit_sign(radius: Tensor) -> Tensor:
    """``sign(r)`` with ``sign(0) = +1`` (``-0.0`` too), as a constant (no gradient): Note [The gradient at r = 0]."""
    r = radius.detach()
    s = torch.where(r < 0, -1.0, 1.0)  # two ops (was four: ~12 → ~8 µs on a small layer)
    return s if s.dtype == r.dtype else s.to(r.dtype)


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

    def _values(self) -> Tensor:
        """What the sign comes from, without gradient: the layer's signed radius read live, or the
        baked constant signs (±1, which :func:`unit_sign` leaves as they are)."""
        if self.layer is None:
            return getattr(self.host, _BUFFER)
        plists = self.layer.parametrizations if hasattr(self.layer, "parametrizations") else {}
        plist = plists[self.weight_name] if self.weight_name in plists else self._weight_list
        return plist.original0.detach()

    def sign(self) -> Tensor:
        return unit_sign(self._values())

    def orphaned(self) -> bool:
        """Whether torch's own remover took the layer's GmP weight away (the sign lives on)."""
        if self.layer is None:
            return False
        plists = getattr(self.layer, "parametrizations", {})
        return self.weight_name not in plists or plists[self.weight_name] is not self._weight_list

    def _apply(self, x: Tensor) -> Tensor:
        v = self._values()
        if _skippable(v, x):  # all ≥ 0 (all s = +1): one reduction, no sign tensor
            return x
        s = unit_sign(v).to(x.dtype)
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
    """All of ``s`` (signs, or the radii they come from) ``≥ 0``, known without a device sync or a
    traced branch: the multiply can be skipped.

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
    return s.numel() == 0 or bool(s.min() >= 0)  # a NaN radius is not skipped (its sign is +1 anyway)


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
