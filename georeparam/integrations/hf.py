r"""GmP with the Hugging Face ``Trainer``: :class:`GmPTrainer` (needs ``transformers``).

A stock ``Trainer`` on a registered model resumes bit for bit, but its default optimizer decays
all GmP angles (decay on angles pulls every direction toward one axis) and ``save_model`` wrote
the GmP coordinates, which a plain ``from_pretrained`` cannot load (0.44 relative off).
:class:`GmPTrainer` changes exactly three things:

* the optimizer: ``args.optim``'s class and options over :func:`georeparam.param_groups`
  (no decay on angles or offsets, ``args.weight_decay`` on radii and on the parameters HF decays),
  wrapped in :class:`georeparam.GeometricOptimizer` when that knows the class;
* ``save_model`` (what ``trainer.save_model()`` and the end of training write for use) writes the
  plain weights, :func:`georeparam.plain_state_dict`: ``AutoModel.from_pretrained(dir)`` of the
  plain class loads them;
* checkpoints (``checkpoint-N/``, written by ``save_steps``) keep the GmP coordinates, so
  ``trainer.train(resume_from_checkpoint=True)`` continues bit for bit with the optimizer state.

It registers the model first if it has no GmP layer (``register_kwargs`` are passed to
:func:`georeparam.register`), and prints one line at the start of training saying what it did.

Example (not run here: it trains)::

    from georeparam.integrations.hf import GmPTrainer
    trainer = GmPTrainer(model=model, args=TrainingArguments("out", weight_decay=0.01), train_dataset=ds,
                         register_kwargs={"exclude": ["lm_head"]})
    trainer.train()
    trainer.save_model("final")          # plain weights: GPT2LMHeadModel.from_pretrained("final")
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import transformers
from torch import nn

import georeparam
from georeparam.layer import geometric_layers

__all__ = ["GmPTrainer", "gmp_param_groups"]


def gmp_param_groups(
    model: nn.Module, lr: float, weight_decay: float, decay_names: Optional[List[str]] = None
) -> List[Dict[str, Any]]:
    """:func:`georeparam.param_groups` with HF's rule for the rest: of the ``"other"`` parameters,
    only those in ``decay_names`` (HF: not biases, not norms) get ``weight_decay``. Frozen
    parameters are left out, as HF's optimizer does."""
    groups = georeparam.param_groups(model, lr=lr, weight_decay=weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if g["name"] != "other" or decay_names is None:
            if params:
                out.append({**g, "params": params})
            continue
        decay = [p for p in params if names.get(id(p)) in decay_names]
        rest = [p for p in params if names.get(id(p)) not in decay_names]
        if decay:
            out.append({**g, "name": "other", "params": decay, "weight_decay": weight_decay})
        if rest:
            out.append({**g, "name": "other_no_decay", "params": rest, "weight_decay": 0.0})
    return out


class GmPTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for GmP models (module docstring)."""

    def __init__(self, *args, register_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        self._gmp_registered_here = False
        if isinstance(model, nn.Module) and not geometric_layers(model):
            georeparam.register(model, **(register_kwargs or {}))
            self._gmp_registered_here = True
        self._gmp_plain_save = False
        super().__init__(*args, **kwargs)

    # -- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = dict(kwargs)
            kwargs.pop("params", None)
            kwargs.pop("model", None)
            groups = gmp_param_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay, self.get_decay_parameter_names(opt_model)
            )
            optimizer = cls(groups, **kwargs)
            if type(optimizer) in georeparam.optim.PARITY and geometric_layers(opt_model):
                optimizer = georeparam.GeometricOptimizer(optimizer, opt_model)
            self.optimizer = optimizer
        return self.optimizer

    # -- saving ------------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """For use (``_internal_call=False``): the plain weights. For checkpoints: the GmP coordinates."""
        self._gmp_plain_save = not _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._gmp_plain_save = False

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if state_dict is None:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            state_dict = georeparam.plain_state_dict(model) if self._gmp_plain_save else model.state_dict()
        super()._save(output_dir, state_dict=state_dict)

    # -- the one line --------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        n = len(geometric_layers(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)))
        print(
            f"georeparam: {'registered' if self._gmp_registered_here else 'training'} {n} GmP layer(s); optimizer groups "
            f"angles/offset without decay, radius/other with weight_decay={self.args.weight_decay}; save_model writes "
            f"plain weights, checkpoints keep GmP coordinates for resume",
            file=sys.stderr,
        )
        return super().train(*args, **kwargs)
