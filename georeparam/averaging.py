r"""EMA and SWA of what a GmP model computes: averages of ``w`` and ``b``, not of ``r``, θ, λ.

``torch.optim.swa_utils.AveragedModel`` on a registered model averages its Parameters, i.e. the
radii, angles and offsets. Angles are not a vector space: across one wrap by
:class:`georeparam.GeometricOptimizer` (θ → θ ± 2π, φ → π − φ) their average points nowhere the
model has been (measured: cosine −0.62 to the true EMA of ``w``). :class:`WeightAverage` averages
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
    >>> plain.load_state_dict(ema.state_dict())       # or into a registered model
    <All keys matched successfully>
    >>> ema
    WeightAverage(decay=0.9, updates=20, tensors=4)
"""

from __future__ import annotations

from typing import Dict, Optional

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

    Args:
        model: a GmP-registered model (or a plain one).
        decay: EMA decay in ``[0, 1)`` (``avg ← decay·avg + (1 − decay)·new``); ``None`` for the
            equal-weight average of every state passed to :meth:`update` and the initial one.
    """

    def __init__(self, model: nn.Module, *, decay: Optional[float] = None):
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0):
            raise ValueError(f"WeightAverage: decay must be a number in [0, 1) or None. Got: {decay!r}")
        self.decay = decay
        self.updates = 0
        self._avg: Dict[str, Tensor] = {}
        self._dtypes: Dict[str, torch.dtype] = {}
        self._absorb(plain_state_dict(model), weight=1.0)

    def _absorb(self, sd: Dict[str, Tensor], weight: float) -> None:
        if self._avg and set(sd) != set(self._avg):
            raise ValueError(
                f"WeightAverage.update: the model's plain keys changed. Got: new {sorted(set(sd) - set(self._avg))[:5]}, "
                f"missing {sorted(set(self._avg) - set(sd))[:5]}"
            )
        for k, v in sd.items():
            v = v.detach()
            if not v.is_floating_point():
                self._avg[k] = v.clone()
                continue
            self._dtypes[k] = v.dtype
            new = v.to(torch.float64)
            if k not in self._avg or weight == 1.0:
                self._avg[k] = new.clone()
            else:
                self._avg[k].mul_(1.0 - weight).add_(new, alpha=weight)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current plain weights into the average."""
        self.updates += 1
        weight = 1.0 - self.decay if self.decay is not None else 1.0 / (self.updates + 1)
        self._absorb(plain_state_dict(model), weight)

    def state_dict(self) -> Dict[str, Tensor]:
        """The averaged plain state_dict (each tensor in its model's dtype)."""
        return {k: v.to(self._dtypes[k]) if k in self._dtypes else v.clone() for k, v in self._avg.items()}

    def __repr__(self) -> str:
        return f"WeightAverage(decay={self.decay}, updates={self.updates}, tensors={len(self._avg)})"
