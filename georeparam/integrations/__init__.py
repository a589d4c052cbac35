"""Integrations with the tools people train with; each module imports its library, so import it
only where that library is installed (``import georeparam`` imports none of them).

* :mod:`georeparam.integrations.hf`: ``GmPTrainer``, a ``transformers.Trainer`` for GmP models.
* :mod:`georeparam.integrations.lightning`: ``GmPCallback`` for ``lightning`` (register in
  ``setup``, the groups, plain export, an EMA of ``w`` and ``b``).

PEFT needs no module: apply LoRA first, then ``georeparam.register`` (docs/ecosystem.md).
"""
