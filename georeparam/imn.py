r"""Input mean normalization (IMN): centre a layer's input per feature / channel.

The paper pairs GmP with IMN: each GmP layer sees ``x − μ``, where ``μ`` is the batch mean of its
input in training (the gradient flows through the mean, as in BatchNorm) and a running mean in
evaluation. No variance scaling, no learnable parameters.

* ``Linear``: one mean per input feature (the last dimension), over all other dimensions.
* ``ConvNd`` / ``ConvTransposeNd``: one mean per input channel (dimension 1 of a batched input),
  over the batch and all spatial positions.

The normalization is an :class:`InputMeanNorm` submodule named ``imn`` (its ``running_mean`` is a
buffer, saved in ``state_dict`` as ``<layer>.imn.running_mean``) applied by a forward pre-hook,
so the layer keeps its class and its own forward.

# Note [Folding the running mean]
In evaluation the layer computes ``f(x − μ)``. Where ``f`` is affine with a constant response to a
constant input, that is ``f(x) − (f(μ·1) − b)``, and the shift can be folded into the bias:

* ``Linear``: ``b' = b − W·μ``, always exact;
* ``ConvNd``: ``b' = b − Σ_taps W·μ`` — exact when no zero padding is added (``padding = 0`` or
  a ``padding_mode`` of ``reflect`` / ``replicate`` / ``circular``, which pad with input values
  and so commute with centring). Zero padding pads ``x − μ`` with zeros, i.e. ``x`` with ``μ``:
  border outputs differ, so IMN stays in place;
* ``ConvTransposeNd``: an output position receives only some kernel taps unless ``stride = 1``
  and ``padding ≥ dilation·(kernel − 1) + output_padding`` in every dimension (the padding crops
  every output that would miss a tap): exact only then, otherwise IMN stays in place.

A layer without bias gets one when folded (``b' = −W·μ``).

# Note [The official placement]
The official ImageNet32 ``gmp_mn`` model (``imagenet32/imagenet32.py``, ``mean_norm.py``) puts a
``MeanOnlyBatchNormalization`` (``center=False, scale=False``: ``x − μ`` only, Keras momentum
0.99, i.e. ``running_mean ← 0.99·running_mean + 0.01·μ``) *after* each GmP conv's output
``r·ReLU(conv(x, u) + λ)``. Centring the output of one GmP layer is centring the input of the
next only where nothing sits between them; the differences from ``register(imn=True)`` are:
the network's input is not centred; centring happens before a max-pool (which does not
commute with it); the last GmP layer's output is centred too, so the head's input (after
pool and global average) is close to centred; and the running mean moves 10× slower.
:func:`output_mean_norm` gives that placement: put it on the module whose output is the GmP
unit's output (the activation after a registered layer, where the paper form's sign hook sits;
registered *after* ``georeparam.register`` so it runs after the sign).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .layouts import entry_of, input_of

__all__ = [
    "input_mean_norm",
    "InputMeanNorm",
    "has_input_mean_norm",
    "fold_input_mean_norm",
    "is_foldable",
    "output_mean_norm",
    "has_output_mean_norm",
    "OFFICIAL_MOMENTUM",
]

_ATTR = "imn"
_OUT_ATTR = "omn"
#: the official mean-only BatchNorm's running-mean momentum in PyTorch's convention (Keras 0.99)
OFFICIAL_MOMENTUM = 0.01


class InputMeanNorm(nn.Module):
    r"""``x ↦ x − μ`` per feature along ``dim`` (a negative dimension, counted from the end).

    Training: ``μ`` is the mean over every other dimension of this batch (differentiable), and
    ``running_mean ← (1 − momentum)·running_mean + momentum·μ``. Evaluation: ``μ = running_mean``.

    Example:
        >>> imn = InputMeanNorm(2, dim=-1)
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 20.0]])
        >>> imn(x)
        tensor([[-1., -5.],
                [ 1.,  5.]])
        >>> imn.running_mean
        tensor([0.2000, 1.5000])
        >>> imn.eval()(x)
        tensor([[ 0.8000,  8.5000],
                [ 2.8000, 18.5000]])
    """

    def __init__(self, num_features: int, *, dim: int = -1, momentum: float = 0.1, dtype=None, device=None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"InputMeanNorm: num_features must be a positive int. Got: {num_features!r}")
        if not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"InputMeanNorm: dim must be a negative int (counted from the end). Got: {dim!r}")
        _check_momentum(momentum)
        self.num_features = num_features
        self.dim = dim
        self.momentum = float(momentum)
        self.register_buffer("running_mean", torch.zeros(num_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < -self.dim or x.shape[self.dim] != self.num_features:
            raise ValueError(
                f"InputMeanNorm: expected {self.num_features} features in dimension {self.dim} of the input. "
                f"Got: shape {tuple(x.shape)}"
            )
        view = (self.num_features,) + (1,) * (-self.dim - 1)
        if not self.training:
            return x - self.running_mean.to(x.dtype).view(view)
        d = x.dim() + self.dim
        reduce = tuple(i for i in range(x.dim()) if i != d)
        count = x.numel() // self.num_features
        if count < 2:
            raise ValueError(
                f"InputMeanNorm in training needs more than one value per feature (the batch mean of a single "
                f"value is the value itself). Got: input shape {tuple(x.shape)}"
            )
        mean = x.mean(dim=reduce, keepdim=True)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().reshape(self.num_features).to(self.running_mean.dtype), self.momentum)
        return x - mean

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, momentum={self.momentum}"


def _check_momentum(momentum) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0.0 < momentum <= 1.0):
        raise ValueError(f"input_mean_norm: momentum must be a number in (0, 1]. Got: {momentum!r}")


def _imn_pre_hook(module: nn.Module, args: Tuple) -> Tuple:
    # A module-level function (not a closure): deepcopy and pickling keep the hook, and it reads the
    # normalization of whichever module it is called on, so a copy uses its own running mean.
    return (getattr(module, _ATTR)(args[0]),) + tuple(args[1:])


def _input(module: nn.Module) -> Tuple[int, int]:
    """``(number of input features, dim)`` (:func:`georeparam.layouts.input_of`); lazy modules refused."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"input_mean_norm: {type(module).__name__} is not initialized yet (lazy module). Got: {module!r}"
        )
    return input_of(module)


def has_input_mean_norm(module: nn.Module) -> bool:
    """Whether ``module`` carries an input mean normalization.

    >>> layer = nn.Linear(3, 2)
    >>> has_input_mean_norm(layer), has_input_mean_norm(input_mean_norm(layer))
    (False, True)
    """
    return isinstance(getattr(module, _ATTR, None), InputMeanNorm) and any(
        h is _imn_pre_hook for h in module._forward_pre_hooks.values()
    )


def check_input_mean_norm(module: nn.Module, what: str = "input_mean_norm") -> None:
    """Every check of :func:`input_mean_norm`, changing nothing (used by ``register(imn=True)``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} expects an nn.Module. Got: {type(module).__name__}")
    _input(module)
    if has_input_mean_norm(module):
        raise ValueError(
            f"{what}: {type(module).__name__} already has an input mean normalization. Got: {module.imn!r}"
        )
    if hasattr(module, _ATTR):
        raise ValueError(
            f"{what}: {type(module).__name__} already has an attribute {_ATTR!r}. Got: {getattr(module, _ATTR)!r}"
        )


def input_mean_norm(module: nn.Module, momentum: float = 0.1) -> nn.Module:
    r"""Centre ``module``'s input by its batch mean (training) / running mean (evaluation).

    Adds an :class:`InputMeanNorm` submodule ``module.imn`` (buffer ``running_mean``, zeros at
    first, in ``state_dict``) and a forward pre-hook that applies it; the layer keeps its class.
    ``georeparam.register(model, imn=True)`` does this for every registered layer, and
    ``georeparam.remove`` folds it into the bias where that is exact (Note [Folding the running
    mean]).

    Args:
        module: an ``nn.Linear``, ``nn.ConvNd`` or ``nn.ConvTransposeNd`` (GmP-registered or not).
        momentum: ``running_mean ← (1 − momentum)·running_mean + momentum·batch_mean``.

    Returns:
        ``module``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = input_mean_norm(nn.Linear(3, 2))
        >>> x = torch.randn(8, 3) + 5
        >>> torch.allclose(layer(x), nn.functional.linear(x - x.mean(0), layer.weight, layer.bias))
        True
        >>> sorted(layer.state_dict())
        ['bias', 'imn.running_mean', 'weight']
    """
    check_input_mean_norm(module)
    _check_momentum(momentum)
    features, dim = _input(module)
    ref = module.weight
    norm = InputMeanNorm(features, dim=dim, momentum=momentum, dtype=ref.dtype, device=ref.device)
    module.add_module(_ATTR, norm)
    module.register_forward_pre_hook(_imn_pre_hook)
    return module


def _remove(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if h is _imn_pre_hook]:
        del module._forward_pre_hooks[key]
    delattr(module, _ATTR)


def drop_input_mean_norm(module: nn.Module) -> None:
    """Take ``module``'s IMN off without folding its running mean (``register``'s rollback, before
    any step has moved the mean)."""
    if has_input_mean_norm(module):
        _remove(module)


def is_foldable(module: nn.Module) -> bool:
    """Whether folding ``module``'s IMN into its bias is exact (Note [Folding the running mean]).

    >>> is_foldable(nn.Conv2d(2, 3, 3)), is_foldable(nn.Conv2d(2, 3, 3, padding=1))
    (True, False)
    >>> is_foldable(nn.ConvTranspose1d(2, 3, 3, padding=2)), is_foldable(nn.ConvTranspose1d(2, 3, 3, padding=1))
    (True, False)
    """
    e = entry_of(module)
    return e is not None and e.foldable is not None and e.shift is not None and bool(e.foldable(module))


def _shift(module: nn.Module, mean: Tensor) -> Tensor:
    """``f(μ·1) − b`` of a foldable layer, in float64: one value per output unit (its entry's ``shift``)."""
    return entry_of(module).shift(module, mean)


def fold_input_mean_norm(module: nn.Module) -> bool:
    r"""Fold the running mean of ``module``'s IMN into its bias and drop the IMN, where exact.

    ``b' = b − s`` with ``s = f(μ·1) − b`` (``W·μ`` for ``Linear``), computed in float64 and
    rounded once (Note [Folding the running
    mean]). Evaluation outputs are kept; training-mode outputs change (there is no batch mean any
    more). Where folding would not be exact (zero-padded convolutions, most transposed ones) the
    IMN stays in place and ``False`` is returned. The layer's weight must be a plain Parameter
    (``georeparam.remove`` calls this after baking GmP back).

    Returns:
        whether the IMN was folded.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = input_mean_norm(nn.Linear(3, 2))
        >>> _ = layer(torch.randn(16, 3) + 2)   # a training step updates the running mean
        >>> x = torch.randn(4, 3)
        >>> before = layer.eval()(x)
        >>> fold_input_mean_norm(layer), has_input_mean_norm(layer)
        (True, False)
        >>> torch.allclose(layer(x), before, atol=1e-6)
        True
    """
    if not has_input_mean_norm(module):
        raise ValueError(
            f"fold_input_mean_norm: {type(module).__name__} has no input mean normalization. Got: {module!r}"
        )
    if not isinstance(module._parameters.get("weight", None), nn.Parameter):
        raise ValueError(
            f"fold_input_mean_norm: {type(module).__name__}.weight must be a plain Parameter (remove GmP first). "
            f"Got: {type(module).__name__} with parametrizations"
        )
    if not is_foldable(module):
        return False
    norm = getattr(module, _ATTR)
    with torch.no_grad():
        shift = _shift(module, norm.running_mean)
        bias = module._parameters.get("bias", None)
        if bias is None:
            weight = module.weight
            module.bias = nn.Parameter((-shift).to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            if not isinstance(bias, nn.Parameter):
                raise ValueError(
                    f"fold_input_mean_norm: {type(module).__name__}.bias must be a plain Parameter. Got: {type(bias).__name__}"
                )
            bias.copy_((bias.to(torch.float64) - shift).to(bias.dtype))
    _remove(module)
    return True


def _omn_hook(module: nn.Module, args: Tuple, output: Tensor) -> Tensor:
    # module-level like _imn_pre_hook: deepcopy/pickle keep it and a copy uses its own running mean
    return getattr(module, _OUT_ATTR)(output)


def has_output_mean_norm(module: nn.Module) -> bool:
    """Whether ``module`` carries an output mean normalization (:func:`output_mean_norm`)."""
    return isinstance(getattr(module, _OUT_ATTR, None), InputMeanNorm) and any(
        h is _omn_hook for h in module._forward_hooks.values()
    )


def output_mean_norm(
    module: nn.Module, num_features: int, *, dim: int = -1, momentum: float = OFFICIAL_MOMENTUM, dtype=None, device=None
) -> nn.Module:
    r"""Centre ``module``'s *output* per feature: the official ``gmp_mn`` placement.

    Adds an :class:`InputMeanNorm` submodule ``module.omn`` (``running_mean`` in ``state_dict``)
    and a forward hook that returns ``output − μ`` (batch mean in training, running mean in
    evaluation). Put it on the activation after a GmP layer, after ``georeparam.register``
    (Note [The official placement]); ``dim=-3`` for a conv's ``(N, C, H, W)`` output.

    Args:
        module: any module whose output has ``num_features`` entries along ``dim``.
        num_features: the number of output features (channels).
        dim: the feature dimension, negative (``-1`` for ``Linear``, ``-3`` for ``Conv2d``).
        momentum: running-mean momentum (default :data:`OFFICIAL_MOMENTUM`, Keras' 0.99).
        dtype, device: of ``running_mean`` (default: those of ``module``'s first parameter, else
            PyTorch's defaults — pass the model's dtype for a parameter-free activation).

    Returns:
        ``module``.

    Example:
        >>> relu = output_mean_norm(nn.ReLU(), 2)
        >>> relu(torch.tensor([[1.0, -1.0], [3.0, 4.0]]))
        tensor([[-1., -2.],
                [ 1.,  2.]])
        >>> relu.omn.running_mean
        tensor([0.0200, 0.0200])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"output_mean_norm expects an nn.Module. Got: {type(module).__name__}")
    if hasattr(module, _OUT_ATTR):
        raise ValueError(
            f"output_mean_norm: {type(module).__name__} already has an attribute {_OUT_ATTR!r}. Got: {getattr(module, _OUT_ATTR)!r}"
        )
    _check_momentum(momentum)
    ref = next(iter(module.parameters()), None)
    dtype = dtype if dtype is not None else (None if ref is None else ref.dtype)
    device = device if device is not None else (None if ref is None else ref.device)
    norm = InputMeanNorm(num_features, dim=dim, momentum=momentum, dtype=dtype, device=device)
    module.add_module(_OUT_ATTR, norm)
    module.register_forward_hook(_omn_hook)
    return module
