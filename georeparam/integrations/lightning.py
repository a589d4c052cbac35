r"""GmP with Lightning: :class:`GmPCallback` (needs ``lightning``).

* ``setup``: registers the ``LightningModule`` (``register_kwargs`` for
  :func:`georeparam.register`) unless it already has GmP layers; Lightning calls ``setup`` before
  ``configure_optimizers``, so an optimizer built there from ``self.parameters()`` or, better,
  ``georeparam.param_groups(self, lr=...)`` holds the GmP Parameters.
* ``on_fit_start``: one line saying what it did; a warning if an optimizer decays angles.
* with ``ema_decay``: a :class:`georeparam.WeightAverage` of ``w`` and ``b`` (not of r, θ, λ, as
  Lightning's ``StochasticWeightAveraging`` / ``WeightAveraging`` would), updated after every
  training batch and saved in / restored from Lightning checkpoints (bit for bit).
* with ``export``: at ``on_fit_end``, ``torch.save`` of the plain weights
  (:func:`georeparam.plain_state_dict`) to that path, and of the EMA's to ``<export>.ema.pt``.

Checkpoints keep the GmP coordinates (resume as usual).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch

import georeparam
from georeparam.layer import geometric_layers

__all__ = ["GmPCallback"]


class GmPCallback(pl.Callback):
    """Register in ``setup``, EMA of ``w`` and ``b``, plain export (module docstring)."""

    def __init__(
        self,
        *,
        register_kwargs: Optional[Dict[str, Any]] = None,
        ema_decay: Optional[float] = None,
        export: Optional[str] = None,
    ):
        super().__init__()
        self.register_kwargs = dict(register_kwargs or {})
        self.ema_decay = ema_decay
        self.export = export
        self.ema: Optional[georeparam.WeightAverage] = None
        self._registered = 0
        self._pending_ema: Optional[Dict[str, Any]] = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not geometric_layers(pl_module):
            self._registered = len(georeparam.register(pl_module, **self.register_kwargs))

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.ema_decay is not None and self.ema is None:
            self.ema = georeparam.WeightAverage(pl_module, decay=self.ema_decay)
            if self._pending_ema is not None:
                self.ema.load_state_dict(self._pending_ema)
                self._pending_ema = None
        angles = {id(georeparam.geometry(m, w).angles) for _, m, w, _ in geometric_layers(pl_module)}
        for opt in trainer.optimizers:
            for i, group in enumerate(opt.param_groups):
                if float(group.get("weight_decay", 0.0)) != 0.0 and any(id(p) in angles for p in group["params"]):
                    print(
                        f"georeparam: warning: optimizer group {group.get('name', i)!r} decays GmP angles "
                        f"(weight_decay={group['weight_decay']}); build it from georeparam.param_groups(self, lr=...)",
                        file=sys.stderr,
                    )
        n = len(geometric_layers(pl_module))
        print(
            f"georeparam: {'registered' if self._registered else 'training'} {n} GmP layer(s)"
            + (f"; EMA of w and b (decay {self.ema_decay})" if self.ema_decay is not None else "")
            + (f"; plain weights to {self.export} at the end" if self.export else ""),
            file=sys.stderr,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["georeparam_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if "georeparam_ema" in checkpoint:
            self._pending_ema = checkpoint["georeparam_ema"]

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.export and trainer.is_global_zero:
            torch.save(georeparam.plain_state_dict(pl_module), self.export)
            if self.ema is not None:
                torch.save(self.ema.averaged_state_dict(), f"{self.export}.ema.pt")
