r"""Small knowledge several modules need, kept once.

:func:`class_name`: what messages call a layer. A registered layer's class is the subclass
``torch.nn.utils.parametrize`` injected (``ParametrizedLinear``); the user wrote ``Linear``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["class_name"]


def class_name(module: nn.Module) -> str:
    """The class name ``module`` had before parametrization (``Linear``, not ``ParametrizedLinear``).

    Example:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(2, 2)
        >>> parametrize.register_parametrization(layer, "weight", torch.nn.Identity())
        ParametrizedLinear(...)
        >>> type(layer).__name__, class_name(layer)
        ('ParametrizedLinear', 'Linear')
    """
    return parametrize.type_before_parametrizations(module).__name__
