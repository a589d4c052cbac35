r"""EMA and SWA of what a GmP model computes: averages of ``w`` and ``b``, not of ``r``, θ, λ.

``torch.optim.swa_utils.AveragedModel`` on a registered model averages its Parameters, i.e. the
radii, angles and offsets. Angles are not a vector space: across one wrap by
:class:`georeparam.GeometricOptimizer` (θ → θ ± 2π, φ → π − φ) their average points nowhere the
model has been (measured: cosine −0.62 to the true EMA of ``w``); it warns when it wraps a
registered model (:mod:`georeparam.watch`). :class:`WeightAverage` averages
:func:`georeparam.plain_state_dict` instead, the plain weights the model computes, which do not
jump when coordinates are canonicalized.

Example:
    >>> import torch, georeparam
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> _ = georeparam.register(model)
    >>> opt = georeparam.GeometricOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    >>> ema = WeightAverage(model, decay=0.9)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     torch.nn.functional.mse_loss(model(x), y).backward()
    ...     opt.step()
    ...     ema.update(model)
    >>> plain = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> plain.load_state_dict(ema.averaged_state_dict())  # or into a registered model
    <All keys matched successfully>
    >>> ema
    WeightAverage(decay=0.9, updates=20, tensors=4)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .plain import plain_state_dict

__all__ = ["WeightAverage"]


class WeightAverage:
    """A running average of ``plain_state_dict(model)``: EMA with ``decay``, or SWA (equal weights) without.

    Floating-point tensors are averaged in float64 and returned in their own dtype; other entries
    (BatchNorm's ``num_batches_tracked``) take the latest value. As with SWA, BatchNorm running
    statistics of the averaged weights should be recomputed (``torch.optim.swa_utils.update_bn``)
    after loading.

    :meth:`averaged_state_dict` is the average, ready for ``model.load_state_dict``;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the averager itself (the float64
    sums, the count, the decay), so a resumed EMA continues bit for bit, as an optimizer does.

    Args:
        model: a GmP-registered model (or a plain one).
        decay: EMA decay in ``[0, 1)`` (``avg ← decay·avg + (1 − decay)·new``); ``None`` for the
            equal-weight average of every state passed to :meth:`update` and the initial one.
    """

    def __init__(self, model: nn.Module, *, decay: Optional[float] = None):
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0
        ):
            raise ValueError(f"WeightAverage: decay must be a number in [0, 1) or None. Got: {decay!r}")
        self.decay = decay
        self.updates = 0
        self._avg: Dict[str, Tensor] = {}
        self._dtypes: Dict[str, torch.dtype] = {}
        self._avg, self._dtypes = self._folded(plain_state_dict(model), weight=1.0)

    def _folded(self, sd: Dict[str, Tensor], weight: float) -> Tuple[Dict[str, Tensor], Dict[str, torch.dtype]]:
        """The new average with ``sd`` folded in, computed aside: checked first, nothing changed
        in ``self`` (Note [An update that fails changes nothing])."""
        if self._avg and set(sd) != set(self._avg):
            raise ValueError(
                f"WeightAverage.update: the model's plain keys changed. Got: new {sorted(set(sd) - set(self._avg))[:5]}, "
                f"missing {sorted(set(self._avg) - set(sd))[:5]}"
            )
        for k, v in sd.items():
            old = self._avg.get(k)
            if old is not None and (
                tuple(old.shape) != tuple(v.shape) or old.is_floating_point() != v.is_floating_point()
            ):
                raise ValueError(
                    f"WeightAverage.update: {k!r} changed shape or kind since the average began (a different model?). "
                    f"Start a new WeightAverage for it. Got: {tuple(v.shape)} {v.dtype}, average {tuple(old.shape)} "
                    f"{self._dtypes.get(k, old.dtype)}"
                )
        avg, dtypes = {}, dict(self._dtypes)
        for k, v in sd.items():
            v = v.detach()
            if not v.is_floating_point():
                avg[k] = v.clone()
                continue
            dtypes[k] = v.dtype
            new = v.to(torch.float64)
            if k not in self._avg or weight == 1.0:
                avg[k] = new.clone()
            else:
                avg[k] = self._avg[k].mul(1.0 - weight).add_(new.to(self._avg[k].device), alpha=weight)
        return avg, dtypes

    # Note [An update that fails changes nothing]
    # update() used to count the step and fold tensors in one by one, so a model whose tensors no
    # longer matched (same keys, other shapes) raised half-way with the counter moved and some
    # tensors averaged. The new average is now computed aside and swapped in only when complete.
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current plain weights into the average (all or nothing)."""
        weight = 1.0 - self.decay if self.decay is not None else 1.0 / (self.updates + 2)
        avg, dtypes = self._folded(plain_state_dict(model), weight)
        self._avg, self._dtypes = avg, dtypes
        self.updates += 1

    def averaged_state_dict(self) -> Dict[str, Tensor]:
        """The averaged plain state_dict (each tensor in its model's dtype), for ``load_state_dict``
        of a plain model or of one registered the same way."""
        return {k: v.to(self._dtypes[k]) if k in self._dtypes else v.clone() for k, v in self._avg.items()}

    def state_dict(self) -> Dict[str, Any]:
        """The averager's own state, to resume it bit for bit (``torch.save`` it beside the model's
        and the optimizer's): ``decay``, ``updates``, the float64 ``average`` and the ``dtypes``."""
        return {
            "decay": self.decay,
            "updates": self.updates,
            "average": {k: v.clone() for k, v in self._avg.items()},
            "dtypes": {k: str(d).replace("torch.", "") for k, d in self._dtypes.items()},
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Checked whole before anything changes: the same keys
        and shapes as this averager's model, and the same ``decay``."""
        need = {"decay", "updates", "average", "dtypes"}
        if not isinstance(state_dict, dict) or not need <= set(state_dict):
            got = sorted(state_dict)[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"WeightAverage.load_state_dict: expected WeightAverage.state_dict()'s output with keys {sorted(need)} "
                f"(to load averaged weights into a model, use model.load_state_dict(avg.averaged_state_dict())). Got: {got}"
            )
        if state_dict["decay"] != self.decay:
            raise ValueError(
                f"WeightAverage.load_state_dict: saved with decay={state_dict['decay']!r}, this averager has "
                f"decay={self.decay!r}. Build WeightAverage(model, decay={state_dict['decay']!r}) to resume. "
                f"Got: decay={state_dict['decay']!r}"
            )
        avg, updates = state_dict["average"], state_dict["updates"]
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"WeightAverage.load_state_dict: updates must be an int ≥ 0. Got: {updates!r}")
        if not isinstance(avg, dict) or set(avg) != set(self._avg):
            got = sorted(set(avg) ^ set(self._avg))[:5] if isinstance(avg, dict) else type(avg).__name__
            raise ValueError(
                f"WeightAverage.load_state_dict: the saved average is of another model. Got: differing keys {got}"
            )
        for k, v in avg.items():
            if (
                not isinstance(v, Tensor)
                or tuple(v.shape) != tuple(self._avg[k].shape)
                or v.dtype != self._avg[k].dtype
            ):
                raise ValueError(
                    f"WeightAverage.load_state_dict: {k!r} must be a {self._avg[k].dtype} tensor of shape "
                    f"{tuple(self._avg[k].shape)}. Got: {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}"
                )
        dtypes = {k: getattr(torch, d) for k, d in state_dict["dtypes"].items()}
        self._avg = {k: v.clone().to(self._avg[k].device) for k, v in avg.items()}
        self._dtypes = dtypes
        self.updates = updates

    def __repr__(self) -> str:
        return f"WeightAverage(decay={self.decay}, updates={self.updates}, tensors={len(self._avg)})"
