r"""Characteristic activation boundaries, and monitors that follow them during training.

A unit ``z = g(wᵀx + b)`` with an increasing activation (ReLU) is active on one side of the
hyperplane ``{x : wᵀx + b = 0}``, its *characteristic activation boundary*. Every unit is read
from the layer's **effective** weight and bias (what ``layer.weight`` and ``layer.bias`` hold,
whatever parameterization produces them) as

.. code-block:: text

    wᵀx + b = s · (dᵀx + λ)        s = ‖w‖,  d = w/‖w‖,  λ = b/‖w‖

* the boundary **direction** is the unit normal pointing into the active side, ``d = w/‖w‖``;
* the **characteristic point** is the point of the boundary nearest the origin, ``φ = −λ·d``.

A layer with input mean normalization (:func:`georeparam.input_mean_norm`, ``register(imn=True)``)
sees ``x − μ``; the boundary is read in the coordinates of ``x`` with the running mean ``μ``
(what the layer uses in evaluation): ``λ`` becomes ``λ − dᵀμ``.

# Note [Directions follow the form]
GmP has two forms (the README's "The paper's form"). In the paper's form a unit computes
``r·g(uᵀx + λ)`` with ``r`` signed: the layer's effective weight is ``|r|·u``, so ``d = u`` whatever
the sign of ``r``, and a sign change of ``r`` negates the unit's output without moving its
boundary. In the weight form (``register(form="weight")``, ``geometric(layer)``) the layer computes
``g(r(uᵀx + λ))``, its effective weight is ``r·u``, and ``r < 0`` makes the active side the other
one: ``d = −u``, a flip by π. Reading the effective weight is right in both forms; reading
``geometry(layer).radius · u`` would be wrong in the paper's form. The canonicalization of
``GeometricOptimizer`` never changes the effective weight, so it is never seen as a turn.
In ``python -m georeparam demo`` the weight form's flips > π/2 are exactly its sign changes of r,
and the paper's form changes sign without a flip (``tests/test_demo.py`` checks both; the
README's demo table has the counts).

# Note [Degenerate units]
A unit with ``w = 0`` has no boundary (its pre-activation is the constant ``b``): a Cartesian unit
gives NaN. A GmP unit with ``r = 0`` keeps its angles and offset: its direction is ``u(θ)`` and its
point ``−λ·u`` (the boundary it has as soon as ``r`` moves; the sign of 0 counts as +).

Everything here reads layers and never changes them. The figures are in :mod:`georeparam.plot`
(the only module that needs matplotlib); the paper's Figure 1 is ``benchmarks/figure1.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._util import class_name
from .layer import geometry, is_geometric
from .coords import to_cartesian
from .selection import Selector
from .imn import has_input_mean_norm
from .layouts import entry_of, layout_of, supported_names

__all__ = ["characteristic_points", "angle_between", "AngularDrift", "PointsRecorder"]

# -- characteristic points -------------------------------------------------------------------------


def _to_units(layer: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` (shaped like the layer's weight) as ``(units, fan_in)`` rows (:mod:`georeparam.layouts`)."""
    return layout_of(layer, weight=weight).to_units(weight)


def _input_channels(layer: nn.Module, weight: Tensor) -> Tensor:
    """``(units, fan_in)``: the input feature / channel each entry of a unit's weight reads."""
    lay = layout_of(layer, weight=weight)
    if lay.channel_dim == -1:  # Linear-like: column j reads feature j
        return torch.arange(lay.fan_in).expand(lay.units, lay.fan_in)
    idx = torch.zeros(weight.shape, dtype=torch.int64)
    if not lay.transposed:  # (out, in/groups, *k); output o is in group o // (out/groups)
        out, in_g = weight.shape[0], weight.shape[1]
        group = torch.arange(out) // (out // lay.groups)
        idx += (group[:, None] * in_g + torch.arange(in_g)).view(out, in_g, *([1] * (weight.dim() - 2)))
    else:  # (in, out/groups, *k): entry [i, …] reads input channel i
        idx += torch.arange(weight.shape[0]).view(-1, *([1] * (weight.dim() - 1)))
    return lay.to_units(idx)


def _analyzable(module: nn.Module) -> bool:
    # a layer of the registry whose units feed an activation (not attention's in-projection)
    entry = entry_of(module)
    return entry is not None and not entry.inside


def _check_layer(layer: nn.Module, what: str = "layer") -> None:
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{what} must be an nn.Module. Got: {type(layer).__name__}")
    if not _analyzable(layer):
        raise TypeError(
            f"{what} must be a layer whose units feed an activation: {supported_names(inside=False)} "
            f"(or a subclass). Got: {class_name(layer)}"
        )
    if isinstance(layer._parameters.get("weight", None), nn.parameter.UninitializedParameter):
        raise ValueError(f"{what} ({class_name(layer)}) is not initialized yet (lazy module): run a forward pass first")


@torch.no_grad()
def _directions(layer: nn.Module) -> Tuple[Tensor, Tensor]:
    """``(‖w‖, d)`` in float64 from the effective weight; zero rows as in Note [Degenerate units]."""
    w = _to_units(layer, layer.weight.detach()).to(torch.float64)
    s = torch.linalg.vector_norm(w, dim=1)
    zero = (s == 0).unsqueeze(1)
    d = w / torch.where(zero, torch.ones_like(w), s.unsqueeze(1))
    if bool(zero.any()):
        if is_geometric(layer):
            fallback = to_cartesian(geometry(layer).angles.detach().to(torch.float64))
        else:
            fallback = torch.full_like(w, math.nan)
        d = torch.where(zero, fallback, d)
    return s, d


def _unit_form(layer: nn.Module) -> Tuple[Tensor, Tensor, Tensor]:
    """``(s, d, λ)`` in float64 with pre-activation ``s·(dᵀx + λ)`` in evaluation mode."""
    with torch.no_grad():
        s, d = _directions(layer)
        zero = s == 0
        bias = (
            layer.bias.detach().to(torch.float64) if getattr(layer, "bias", None) is not None else torch.zeros_like(s)
        )
        lam = bias / torch.where(zero, torch.ones_like(s), s)
        if bool(zero.any()) and is_geometric(layer):  # Note [Degenerate units]; a Cartesian d is NaN
            offset = geometry(layer).offset
            lam = torch.where(zero, offset.detach().to(torch.float64) if offset is not None else 0.0, lam)
        if has_input_mean_norm(layer):  # the layer reads x − μ
            mu = layer.imn.running_mean.detach().to(torch.float64)
            lam = lam - (d * mu[_input_channels(layer, layer.weight)]).sum(1)
    return s, d, lam


def _fold_norm(s: Tensor, lam: Tensor, norm: nn.Module, units: int) -> Tuple[Tensor, Tensor]:
    # BN(z) = γ (z − μ)/σ + β with z = s(dᵀx + λ)  →  (γ s/σ)·(dᵀx + λ − μ/s + β σ/(γ s))
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"norm must be a BatchNorm1d/2d/3d following the layer. Got: {type(norm).__name__}")
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f"norm must track running statistics (its evaluation-mode boundary is what is folded). Got: {norm!r}"
        )
    if norm.num_features != units:
        raise ValueError(f"norm must have one feature per unit ({units}). Got: num_features={norm.num_features}")
    with torch.no_grad():
        mu = norm.running_mean.to(torch.float64)
        sigma = torch.sqrt(norm.running_var.to(torch.float64) + norm.eps)
        gamma = norm.weight.detach().to(torch.float64) if norm.weight is not None else torch.ones_like(mu)
        beta = norm.bias.detach().to(torch.float64) if norm.bias is not None else torch.zeros_like(mu)
        return gamma * s / sigma, lam - mu / s + beta * sigma / (gamma * s)


def characteristic_points(layer: nn.Module, *, norm: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
    r"""Characteristic points and boundary directions of every unit of ``layer``.

    Works on ``nn.Linear``, ``nn.ConvNd`` and ``nn.ConvTransposeNd``, read through the layer's
    effective ``weight`` and ``bias``: plain, GmP in either form (Note [Directions follow the
    form]), weight norm or any other parametrization. Units follow the library's layout: Linear
    rows, Conv output channels over ``in/groups·∏kernel`` inputs, ConvTranspose *output* channels.
    An input mean normalization on the layer is taken into account with its running mean.

    Args:
        layer: the layer.
        norm: optionally a ``BatchNorm`` applied to the layer's output; its running statistics and
            affine parameters are folded in, giving the boundary the pair computes in evaluation
            mode.

    Returns:
        ``(points, directions)``, both ``(units, fan_in)`` in the weight's dtype, computed in
        float64: ``points[i]`` is the point of unit ``i``'s boundary nearest the origin, where the
        layer in evaluation mode gives pre-activation 0 (to ~1e-6 relative in float32, ~1e-12 in
        float64, tested); ``directions[i]`` is the unit normal on the active side, ``w/‖w‖``.
        Units with ``w = 0``: Note [Degenerate units].

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.0, 2.0]])); _ = layer.bias.fill_(-4.0)
        >>> points, directions = characteristic_points(layer)   # 2·x₂ − 4 = 0  →  x₂ = 2
        >>> points, directions
        (tensor([[0., 2.]]), tensor([[0., 1.]]))
        >>> from georeparam import geometric
        >>> torch.allclose(characteristic_points(geometric(layer))[0], points, atol=1e-6)
        True
    """
    _check_layer(layer)
    s, d, lam = _unit_form(layer)
    if norm is not None:
        s, lam = _fold_norm(s, lam, norm, s.shape[0])
    points = -lam.unsqueeze(1) * d
    directions = torch.where((s < 0).unsqueeze(1), -d, d)  # a BN with γ < 0 swaps the active side
    dtype = layer.weight.dtype
    return points.to(dtype), directions.to(dtype)


def angle_between(a: Tensor, b: Tensor) -> Tensor:
    r"""Angle in ``[0, π]`` between the rows of ``a`` and ``b`` (any norm; float64 result).

    Uses ``2·atan2(‖â − b̂‖, ‖â + b̂‖)``, accurate for tiny and for near-π angles alike (``acos`` of
    a dot product loses half the digits near 0). Rows that are zero or NaN give NaN.

    >>> angle_between(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, -3.0]]))
    tensor([1.5708], dtype=torch.float64)
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    a = a / torch.where(na == 0, torch.full_like(na, math.nan), na)
    b = b / torch.where(nb == 0, torch.full_like(nb, math.nan), nb)
    return 2 * torch.atan2(torch.linalg.vector_norm(a - b, dim=-1), torch.linalg.vector_norm(a + b, dim=-1))


# -- selecting layers ------------------------------------------------------------------------------


def _select_layers(model: nn.Module, layers, exclude, what: str) -> List[Tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module. Got: {type(model).__name__}")
    named = [(n, m) for n, m in model.named_modules() if ".parametrizations." not in f".{n}."]
    by_name = dict(named)

    def split(spec, argname):  # the one selector parser (georeparam.selection), modules allowed here
        if spec is None:
            return None
        return Selector(spec, argname, what, modules_allowed=True).bind(by_name)

    def matches(n, m, sel):
        return sel.matches(n, m)

    inc = split(layers, "layers")
    exc = split(exclude, "exclude") or Selector(None, "exclude", what)
    chosen = []
    for n, m in named:
        if inc is None:
            if not _analyzable(m):
                continue
        elif not (inc.explicit(n, m) or (_analyzable(m) and inc.matches(n, m))):
            continue  # names, types and modules ask for a layer; suffixes and patterns pick analyzable ones
        if matches(n, m, exc):
            continue
        _check_layer(m, f"{what}: layer {n or '<root>'!r}")
        chosen.append((n, m))
    if inc is not None:
        for mod in inc.modules:
            if not any(mod is m for _, m in named):
                raise ValueError(f"{what}: a module given in layers is not part of the model. Got: {class_name(mod)}")
    if not chosen:
        raise ValueError(
            f"{what}: no Linear/Conv layer selected in {type(model).__name__}. Got: layers={layers!r}, exclude={exclude!r}"
        )
    return chosen


# -- angular drift ---------------------------------------------------------------------------------

# Note [Drift histogram]
# Pooled quantiles over every (step, unit) would need every angle. Instead each layer keeps a
# histogram with 64 log-spaced bins per decade from 1e-12 to π (quantiles to ~±1.8 % relative;
# angles below 1e-12, including exact zeros, fall into one bin reported as 0) plus the exact max
# and flip count. Memory is O(layers) regardless of steps; per-step summaries are O(steps).
_BINS_PER_DECADE = 64
_LOG_LO = -12.0
_LOG_HI = math.log10(math.pi)
_NBINS = int(math.ceil((_LOG_HI - _LOG_LO) * _BINS_PER_DECADE))


def _bin_index(angles: Tensor) -> Tensor:
    lg = torch.log10(angles.clamp_min(1e-300))
    idx = torch.floor((lg - _LOG_LO) * _BINS_PER_DECADE).to(torch.int64) + 1  # 0 = underflow
    return idx.clamp(0, _NBINS)


def _bin_value(idx: int) -> float:
    if idx == 0:
        return 0.0
    lo = _LOG_LO + (idx - 1) / _BINS_PER_DECADE
    return min(10 ** (lo + 0.5 / _BINS_PER_DECADE), math.pi)


def _hist_quantile(hist: Tensor, q: float) -> float:
    total = int(hist.sum())
    if total == 0:
        return math.nan
    target = q * (total - 1)  # the (linear-interpolation) rank torch.quantile would use
    cum = torch.cumsum(hist, 0)
    idx = int(torch.searchsorted(cum, torch.tensor(math.floor(target) + 1, dtype=cum.dtype)))
    return _bin_value(idx)


def _stats(angles: Tensor) -> Dict[str, float]:
    ok = angles[~torch.isnan(angles)]
    if ok.numel() == 0:
        return {"median": math.nan, "p99": math.nan, "max": math.nan, "flip_fraction": math.nan}
    q = torch.quantile(ok, torch.tensor([0.5, 0.99], dtype=ok.dtype))
    return {
        "median": float(q[0]),
        "p99": float(q[1]),
        "max": float(ok.max()),
        "flip_fraction": float((ok > math.pi / 2).to(torch.float64).mean()),
    }


@dataclass
class _Track:
    name: str
    layer: nn.Module
    before: Optional[Tensor] = None
    hist: Tensor = field(default_factory=lambda: torch.zeros(_NBINS + 1, dtype=torch.int64))
    count: int = 0
    flips: int = 0
    undefined: int = 0
    max: float = 0.0
    history: List[Tensor] = field(default_factory=list)


class _OptimizerHooks:
    """``attach``'s bookkeeping, shared by the monitors: optimizer step hooks, ``detach`` and
    ``with monitor.attach(optimizer):`` (which detaches on exit)."""

    _handles: list

    def _hook(self, optimizer: torch.optim.Optimizer, *, pre=None, post=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach expects a torch.optim.Optimizer. Got: {type(optimizer).__name__}")
        if pre is not None:
            self._handles.append(optimizer.register_step_pre_hook(pre))
        if post is not None:
            self._handles.append(optimizer.register_step_post_hook(post))
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (recorded data is kept)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


class AngularDrift(_OptimizerHooks):
    r"""Records how far each unit's boundary direction turns in every optimizer step.

    For each monitored layer and each step the angle between a unit's direction before and
    after the step (``w/‖w‖`` of the effective weight, see :func:`characteristic_points`)
    is measured in float64. Works for any parameterization that ends in a Linear/Conv
    ``weight``: standard, ``torch.nn.utils.parametrizations.weight_norm``, layers followed by
    batch norm (the layer's own direction) and GmP.

    Two ways to drive it:

    * ``with AngularDrift(model).attach(optimizer) as drift:`` — optimizer step hooks snapshot
      before and record after every ``optimizer.step()``; leaving the block removes the hooks.
    * ``drift = AngularDrift(model)`` then ``drift.step()`` after each update: records the change
      since the previous ``step()`` (or since construction).

    Memory is bounded: per-step summaries (4 floats per step) and a fixed-size histogram per
    layer (Note [Drift histogram]); ``history=True`` also keeps every angle, which makes
    :meth:`summary` exact.

    A GmP step turns ``u(θ)`` by at most ``‖δθ‖``. In the weight form a flip (> π/2) can
    also come from ``r`` changing sign, which swaps the unit's active side; in the paper's form it
    cannot (Note [Directions follow the form]). ``python -m georeparam demo`` shows both at lr 0.1.
    Canonicalization (``GeometricOptimizer``) leaves the recorded angles unchanged.

    Args:
        model: the model (or a single layer).
        layers: module names, modules or types to monitor (default: every Linear/Conv layer).
        exclude: module names, modules or types to skip (e.g. the output layer).
        history: keep the full per-step, per-unit angles (``(units,)`` float32 per layer per step).

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with AngularDrift(model, exclude=["2"]).attach(optimizer) as drift:
        ...     for _ in range(3):
        ...         optimizer.zero_grad()
        ...         model(torch.randn(16, 2)).pow(2).mean().backward()
        ...         optimizer.step()
        >>> s = drift.summary()
        >>> s["steps"], s["units"], 0 < s["median"] <= s["p99"] <= s["max"] < math.pi / 2
        (3, 8, True)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Optional[Iterable[Union[str, nn.Module, type]]] = None,
        *,
        exclude: Iterable[Union[str, nn.Module, type]] = (),
        history: bool = False,
    ):
        self._tracks = [
            _Track(n or type(m).__name__, m) for n, m in _select_layers(model, layers, exclude, "AngularDrift")
        ]
        self.keep_history = bool(history)
        self._per_step: Dict[str, List[float]] = {"median": [], "p99": [], "max": [], "flip_fraction": []}
        self._handles: list = []
        self.snapshot()

    # -- driving -------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Remember the current directions as the "before" of the next :meth:`step`."""
        for t in self._tracks:
            t.before = _directions(t.layer)[1]

    def step(self) -> Tensor:
        """Record the change since the last snapshot, then snapshot. Returns this step's angles
        (all monitored units, concatenated in layer order, float64)."""
        all_angles = []
        for t in self._tracks:
            after = _directions(t.layer)[1]
            if t.before is None or t.before.shape != after.shape:
                raise RuntimeError(f"AngularDrift: layer {t.name!r} changed shape or was never snapshotted")
            ang = angle_between(t.before, after)
            t.before = after
            nan = torch.isnan(ang)
            ok = ang[~nan]
            t.undefined += int(nan.sum())
            t.count += ok.numel()
            t.flips += int((ok > math.pi / 2).sum())
            if ok.numel():
                t.max = max(t.max, float(ok.max()))
                t.hist += torch.bincount(_bin_index(ok), minlength=_NBINS + 1)
            if self.keep_history:
                t.history.append(ang.to(torch.float32))
            all_angles.append(ang)
        angles = torch.cat(all_angles)
        for k, v in _stats(angles).items():
            self._per_step[k].append(v)
        return angles

    def attach(self, optimizer: torch.optim.Optimizer) -> "AngularDrift":
        """Hook into ``optimizer``: snapshot before and record after every ``step()``."""
        return self._hook(
            optimizer,
            pre=lambda opt, args, kwargs: self.snapshot(),
            post=lambda opt, args, kwargs: self.step(),
        )

    # -- results -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self._per_step["median"])

    @property
    def per_step(self) -> Dict[str, Tensor]:
        """Per-step summaries over all monitored units: ``median``, ``p99``, ``max``,
        ``flip_fraction``, each a float64 tensor of length :attr:`steps`."""
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in self._per_step.items()}

    def history(self, layer: Optional[str] = None) -> Tensor:
        """``(steps, units)`` angles of one layer (default: the first), if ``history=True``."""
        if not self.keep_history:
            raise RuntimeError("AngularDrift was created with history=False; pass history=True to keep every angle")
        t = self._track(layer)
        if not t.history:
            return torch.empty(0, 0)
        return torch.stack(t.history)

    def _track(self, layer: Optional[str]) -> _Track:
        if layer is None:
            return self._tracks[0]
        for t in self._tracks:
            if t.name == layer:
                return t
        raise ValueError(f"AngularDrift: layer {layer!r} is not monitored. Got: {[t.name for t in self._tracks]}")

    @staticmethod
    def _summarize(tracks: Sequence[_Track], exact: bool) -> Dict[str, float]:
        count = sum(t.count for t in tracks)
        out = dict(steps=None, units=None, median=math.nan, p99=math.nan, max=math.nan, flip_fraction=math.nan)
        out["undefined"] = sum(t.undefined for t in tracks)
        if count == 0:
            return out
        if exact:
            angles = torch.cat([torch.stack(t.history).flatten() for t in tracks if t.history]).to(torch.float64)
            out.update(_stats(angles))
            return out
        hist = sum(t.hist for t in tracks)
        out["median"] = _hist_quantile(hist, 0.5)
        out["p99"] = _hist_quantile(hist, 0.99)
        out["max"] = max(t.max for t in tracks)
        out["flip_fraction"] = sum(t.flips for t in tracks) / count
        return out

    def summary(self, per_layer: bool = False) -> Dict:
        """Pooled over every recorded (step, unit): ``median``, ``p99``, ``max`` angle (radians),
        ``flip_fraction`` (share of unit-steps turning by more than π/2), ``undefined`` (unit-steps
        with a zero weight row), ``steps`` and ``units`` (monitored units per step).

        Quantiles come from the histogram (±1.8 % relative, Note [Drift histogram]) unless
        ``history=True``, where they are exact. ``per_layer=True`` returns ``{layer name: summary}``.
        """
        exact = self.keep_history
        units = [t.before.shape[0] if t.before is not None else 0 for t in self._tracks]
        if per_layer:
            res = {}
            for t, u in zip(self._tracks, units):
                s = self._summarize([t], exact)
                s["steps"], s["units"] = self.steps, u
                res[t.name] = s
            return res
        s = self._summarize(self._tracks, exact)
        s["steps"], s["units"] = self.steps, sum(units)
        return s

    def __repr__(self) -> str:
        return f"AngularDrift(layers={[t.name for t in self._tracks]}, steps={self.steps}, history={self.keep_history})"


# -- characteristic points over training -----------------------------------------------------------


class PointsRecorder(_OptimizerHooks):
    r"""Collects one layer's characteristic points (and directions) during training.

    Call :meth:`record` yourself or ``attach(optimizer)`` to record after every ``every``-th
    optimizer step; :attr:`points` is then ``(records, units, fan_in)`` (float32, CPU), ready for
    :func:`georeparam.plot.plot_points_1d` or the ``trajectories`` of
    :func:`georeparam.plot.plot_boundaries_2d`. The state before
    training is recorded at construction (``record_initial=True``).

    Example:
        >>> layer = nn.Linear(1, 4)
        >>> rec = PointsRecorder(layer)
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> with rec.attach(optimizer):
        ...     for _ in range(2):
        ...         optimizer.zero_grad(); layer(torch.randn(8, 1)).sum().backward(); optimizer.step()
        >>> tuple(rec.points.shape), rec.steps
        ((3, 4, 1), [0, 1, 2])
    """

    def __init__(
        self, layer: nn.Module, *, every: int = 1, norm: Optional[nn.Module] = None, record_initial: bool = True
    ):
        _check_layer(layer)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int. Got: {every!r}")
        self.layer = layer
        self.norm = norm
        self.every = every
        self._points: List[Tensor] = []
        self._directions: List[Tensor] = []
        self.steps: List[int] = []
        self._step = 0
        self._handles: list = []
        if record_initial:
            self.record(0)

    def record(self, step: Optional[int] = None) -> None:
        """Append the layer's current points/directions, labelled ``step`` (default: the step count)."""
        p, d = characteristic_points(self.layer, norm=self.norm)
        self._points.append(p.detach().to("cpu", torch.float32))
        self._directions.append(d.detach().to("cpu", torch.float32))
        self.steps.append(self._step if step is None else int(step))

    def _after_step(self, *_):
        self._step += 1
        if self._step % self.every == 0:
            self.record(self._step)

    def attach(self, optimizer: torch.optim.Optimizer) -> "PointsRecorder":
        """Hook into ``optimizer``: record after every ``every``-th ``step()``."""
        return self._hook(optimizer, post=self._after_step)

    @property
    def points(self) -> Tensor:
        return torch.stack(self._points) if self._points else torch.empty(0)

    @property
    def directions(self) -> Tensor:
        return torch.stack(self._directions) if self._directions else torch.empty(0)

    def __len__(self) -> int:
        return len(self._points)
