r"""Initialization of GmP layers: sample, convert to ``(r, θ)``, set ``λ = 0``, write in place.

Registration keeps a layer's current values (that is what makes :func:`georeparam.register`
exact). Re-initialising is an explicit second step, :func:`init_geometric_`.

# Note [nn.init on a parametrized weight]
On a registered layer ``layer.weight`` is *computed* from the radius and angles on every access:
``torch.nn.init.xavier_uniform_(layer.weight)`` fills that temporary tensor and throws it away,
so the layer silently keeps its old values (pytorch#180968)::

    >>> import torch, georeparam
    >>> layer = georeparam.geometric(torch.nn.Linear(3, 2))
    >>> before = layer.weight.detach().clone()
    >>> _ = torch.nn.init.xavier_uniform_(layer.weight)       # does nothing
    >>> torch.equal(layer.weight, before)
    True
    >>> _ = georeparam.init_geometric_(layer)                # does what was meant
    >>> torch.equal(layer.weight, before)
    False

# Note [The official draw]
The official initializer (``models.py``, ``GlorotUniformHyperSpherical``, used by both
``DenseReparam`` and ``Conv2DReparam``) draws a ``(n, units)`` matrix ``U(±√(6/(n + units)))``
where ``n`` is the unit's fan-in — for a convolution ``cin·k²``, so the bound counts ``cout``
outputs where PyTorch's Glorot counts ``cout·k²``: on VGG-6 the radii are 1.3–2.8× PyTorch's
Glorot radii per layer. Its inverse (``utils.cartesian_to_hyperspherical``) computes the last
angle from ``atan2(x_{n−1} + √(x_{n−1}² + x_n²), |x_n|)``: the denominator is ``|x_n|``, so
the sign of ``x_n`` is lost and every initial direction has ``u_n ≥ 0`` (the last coordinate in
both layouts is the same kernel tap, ``[cin−1, k−1, k−1]``). ``scheme="official"`` gives the
first; ``sign_loss=True`` adds the second, as a labelled option (it is a defect of the
conversion, not a design choice).

# Note [Writing in place]
:func:`init_geometric_` copies into the live Parameters (``radius``, ``angles``, ``offset``) under
``no_grad`` instead of assigning ``layer.weight = …``: the Parameter objects stay the same, so an
optimizer built before keeps optimizing them (its state, e.g. Adam's moments, is *not* reset).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._util import class_name
from .layer import geometric_layers, geometry
from .coords import to_hyperspherical
from .parametrization import GeometricWeight

__all__ = ["init_geometric_", "SCHEMES"]

#: The schemes :func:`init_geometric_` knows.
SCHEMES = ("glorot_uniform", "kaiming_uniform", "uniform_sphere", "official")


def _torch_fans(shape: torch.Size) -> Tuple[int, int]:
    """``(fan_in, fan_out)`` as ``torch.nn.init`` computes them from a weight tensor's shape.

    For ``ConvTransposeNd`` these are PyTorch's (``size(1)·∏k``, ``size(0)·∏k``), not the unit
    layout's, so that the Cartesian schemes sample exactly what ``torch.nn.init`` samples on the
    plain layer.
    """
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def glorot_radius(param: GeometricWeight) -> float:
    """Root-mean-square norm of one unit under ``glorot_uniform``: ``√(2n / (fan_in + fan_out))``.

    Each of a unit's ``n`` weights is ``U(±a)`` with ``a² = 6 / (fan_in + fan_out)``, so
    ``E‖w‖² = n·a²/3``. This is the radius ``uniform_sphere`` uses by default.

    >>> from georeparam.parametrization import GeometricWeight
    >>> glorot_radius(GeometricWeight(torch.Size([32, 64])))   # √(2·64/96)
    1.1547005383792515
    """
    fan_in, fan_out = _torch_fans(param.shape)
    return math.sqrt(2.0 * param.fan_in / (fan_in + fan_out))


def official_bound(param: GeometricWeight) -> float:
    """The official ``GlorotUniformHyperSpherical`` bound ``√(6 / (n + units))``, ``n`` a unit's fan-in.

    For ``Linear`` that is Glorot's; for a convolution the official code counts ``cin·k²`` inputs
    and ``cout`` outputs (PyTorch's Glorot: ``cout·k²`` outputs), so its weights are larger. See
    Note [The official draw].

    >>> from georeparam.parametrization import GeometricWeight
    >>> round(official_bound(GeometricWeight(torch.Size([128, 64, 3, 3]))), 6)   # √(6/(576 + 128))
    0.092319
    """
    return math.sqrt(6.0 / (param.fan_in + param.units))


def _official(param: GeometricWeight, dtype: torch.dtype, device: torch.device, generator, sign_loss: bool) -> Tensor:
    # drawn in the layer's own shape like torch.nn.init (for Linear: xavier_uniform_'s very values)
    a = official_bound(param)
    w = param.to_units(
        torch.empty(param.shape, dtype=dtype, device=device).uniform_(-a, a, generator=generator)
    ).clone()
    if sign_loss and param.fan_in >= 2:
        w[:, -1] = w[:, -1].abs()
    return w


def _cartesian(scheme: str, param: GeometricWeight, dtype: torch.dtype, device: torch.device, generator) -> Tensor:
    """A weight sampled by ``torch.nn.init`` in the layer's own shape, as a ``(units, fan_in)`` matrix."""
    w = torch.empty(param.shape, dtype=dtype, device=device)
    if scheme == "glorot_uniform":
        nn.init.xavier_uniform_(w, generator=generator)
    else:  # PyTorch's default reset_parameters() for Linear / ConvNd / ConvTransposeNd
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    return param.to_units(w)


def _sphere(
    param: GeometricWeight, radius: float, dtype: torch.dtype, device: torch.device, generator
) -> Tuple[Tensor, Tensor]:
    """Uniform directions (normalized Gaussians) with radius ``radius``: ``(radius, angles)``."""
    z = torch.randn(param.units, param.fan_in, dtype=dtype, device=device, generator=generator)
    r, angles = to_hyperspherical(z)
    if param.fan_in == 1:  # S⁰ = {±1}: the radius carries the direction
        sign = torch.where(r < 0, -1.0, 1.0).to(dtype)
        return radius * sign, angles
    return torch.full_like(r, radius), angles


def init_geometric_(
    model_or_module: nn.Module,
    scheme: str = "glorot_uniform",
    *,
    generator: Optional[torch.Generator] = None,
    radius: Optional[float] = None,
    sign_loss: bool = False,
) -> nn.Module:
    r"""Re-initialise every GmP layer of ``model_or_module`` in place.

    Schemes (the offset is ``λ = 0`` in all of them, i.e. ``b = 0``):

    * ``"glorot_uniform"`` (the paper's): ``w ~ U(±√(6/(fan_in + fan_out)))`` sampled in
      Cartesian space exactly as ``torch.nn.init.xavier_uniform_`` samples the plain weight, then
      converted to ``(r, θ)``. ``E r² = n·a²/3`` for a unit with ``n`` inputs.
    * ``"kaiming_uniform"``: PyTorch's default layer initialization of the weight
      (``kaiming_uniform_(w, a=√5)``, i.e. ``U(±1/√fan_in)``), converted; ``E r² = n/(3·fan_in)``.
    * ``"uniform_sphere"``: each unit's direction uniform on the sphere ``S^{n-1}`` (a normalized
      Gaussian), and every radius equal to ``radius`` (default: the Glorot scheme's
      root-mean-square norm :func:`glorot_radius`). For fan-in 1 the direction is a random sign,
      carried by the radius.
    * ``"official"``: the official code's ``GlorotUniformHyperSpherical`` draw,
      ``w ~ U(±√(6/(n + units)))`` with ``n`` a unit's fan-in (``cin·k²`` for a convolution:
      larger than PyTorch's Glorot there, identical for ``Linear``), converted. With
      ``sign_loss=True`` also the official conversion's loss of the sign of each unit's last
      coordinate (every initial direction has ``u_n ≥ 0``; fan-in ≥ 2 only). See
      Note [The official draw].

    Only GmP-registered layers are touched: plain layers and a bias left Cartesian
    (``geometric(..., bias=None)``) keep their values. Frozen layers (no coordinate requires
    grad, e.g. a pretrained backbone) are skipped and keep their values too; a layer with only
    some coordinates frozen is refused (Note [Frozen layers]). The Parameters are written in place (see
    Note [Writing in place]), so optimizers built before stay valid. ``torch.nn.init.*`` on a
    registered weight silently does nothing; this is the way to re-initialise one.

    Args:
        model_or_module: a registered layer, or a model containing registered layers.
        scheme: one of :data:`SCHEMES`.
        generator: a ``torch.Generator`` for reproducible draws (layers are drawn in
            ``modules()`` order); default: the global RNG of the parameters' device.
        radius: ``uniform_sphere`` only: a positive radius for every unit.
        sign_loss: ``official`` only: reproduce the official inverse's ``u_n ≥ 0``.

    Returns:
        ``model_or_module``.

    Raises:
        ValueError: no GmP-registered layer, only frozen ones, a partly frozen layer, an unknown
            scheme, or a bad ``radius``. Nothing is written then.

    Example:
        >>> import georeparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        >>> _ = georeparam.register(model, exclude=["2"])
        >>> _ = init_geometric_(model, "uniform_sphere", generator=torch.Generator().manual_seed(0))
        >>> g = georeparam.geometry(model[0])
        >>> torch.allclose(g.radius, torch.tensor(glorot_radius(model[0].parametrizations.weight[0])))
        True
        >>> bool((g.offset == 0).all()), torch.allclose(model[0].weight.norm(dim=1), g.radius)
        (True, True)
    """
    if not isinstance(model_or_module, nn.Module):
        raise TypeError(f"init_geometric_ expects an nn.Module. Got: {type(model_or_module).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"init_geometric_: scheme must be one of {SCHEMES}. Got: {scheme!r}")
    if radius is not None:
        if scheme != "uniform_sphere":
            raise ValueError(
                f"init_geometric_: radius is only used by scheme='uniform_sphere' (the Cartesian schemes "
                f"take the sampled norm). Got: radius={radius!r} with scheme={scheme!r}"
            )
        if (
            isinstance(radius, bool)
            or not isinstance(radius, (int, float))
            or not (math.isfinite(radius) and radius > 0)
        ):
            raise ValueError(f"init_geometric_: radius must be a positive finite number. Got: {radius!r}")
    if not isinstance(sign_loss, bool):
        raise TypeError(f"init_geometric_: sign_loss must be a bool. Got: {sign_loss!r}")
    if sign_loss and scheme != "official":
        raise ValueError(
            f"init_geometric_: sign_loss reproduces the official draw; it needs scheme='official'. Got: sign_loss=True with scheme={scheme!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"init_geometric_: generator must be a torch.Generator. Got: {type(generator).__name__}")
    targets = geometric_layers(model_or_module)
    if not targets:
        raise ValueError(
            f"init_geometric_: {class_name(model_or_module)} has no GmP-registered layer; call "
            f"georeparam.register (or geometric) first. Got: {type(model_or_module).__name__}"
        )
    # Note [Frozen layers]
    # requires_grad=False says "keep these values": re-initialising a frozen layer silently threw
    # away what it held. A partly frozen layer has no right answer (r, θ and λ are drawn together),
    # so it is refused; all checks come before the first write.
    chosen = []
    for qname, module, wname, param in targets:
        g = geometry(module, wname)
        grads = {k: p.requires_grad for k, p in g._asdict().items() if p is not None}
        if all(grads.values()):
            chosen.append((module, wname, param))
        elif any(grads.values()):
            raise ValueError(
                f"init_geometric_: layer {qname or '<root>'!r} has some GmP coordinates frozen and others not; "
                f"re-initialising draws all of them. Freeze or unfreeze the whole layer first. Got: requires_grad {grads}"
            )
    if not chosen:
        raise ValueError(
            f"init_geometric_: every GmP layer of {class_name(model_or_module)} is frozen (requires_grad=False), "
            f"and frozen layers keep their values. Unfreeze the layers to re-initialise (requires_grad_(True)). "
            f"Got: {len(targets)} frozen layers"
        )
    for module, wname, param in chosen:
        g = geometry(module, wname)
        dtype = g.radius.dtype
        device = generator.device if generator is not None else g.radius.device
        if scheme == "uniform_sphere":
            r_val = glorot_radius(param) if radius is None else float(radius)
            r, angles = _sphere(param, r_val, dtype, device, generator)
        elif scheme == "official":
            r, angles = to_hyperspherical(_official(param, dtype, device, generator, sign_loss))
        else:
            r, angles = to_hyperspherical(_cartesian(scheme, param, dtype, device, generator))
        with torch.no_grad():
            g.radius.copy_(r)
            g.angles.copy_(angles)
            if g.offset is not None:
                g.offset.zero_()
    return model_or_module
