r"""Characteristic activation boundaries: points, directions, angular drift, stability, plots.

A unit ``z = g(wᵀx + b)`` with an increasing activation (ReLU) is active on one side of the
hyperplane ``{x : wᵀx + b = 0}``, its *characteristic activation boundary*. Every unit is read as

.. code-block:: text

    wᵀx + b = s · (dᵀx + λ)        ‖d‖ = 1

(Cartesian layers: ``s = ‖w‖``, ``d = w/‖w‖``, ``λ = b/‖w‖``; GmP layers: ``s = r``,
``d = u(θ)``, ``λ`` the stored offset). From that:

* the boundary **direction** is the unit normal pointing into the active side,
  ``sign(s)·d`` (``= w/‖w‖``);
* the **characteristic point** is the point of the boundary nearest the origin,
  ``φ = −λ·d = −b·w/‖w‖²``.

# Note [Oriented directions]
Directions are *oriented* by what the layer computes, not by how it is stored: a GmP unit with
``r < 0`` has direction ``−u(θ)``. georeparam's layers compute ``g(r(uᵀx + λ))`` (an exact
reparameterization of ``g(wᵀx + b)``), so the sign of ``r`` decides which side is active, and
canonicalization (``r → −r``, ``u → −u``) must not look like a flip. The paper's form
``r·ReLU(uᵀx + λ)`` keeps the active side when ``r`` changes sign; the two agree for ``r > 0``.

# Note [Degenerate units]
A Cartesian unit with ``w = 0`` has no boundary (its pre-activation is the constant ``b``): its
direction and point are NaN. A GmP unit with ``r = 0`` keeps its angles and offset, so its
direction ``u(θ)`` and point ``−λ·u`` stay defined (the sign of 0 counts as +).

Everything here reads layers and never changes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .api import SUPPORTED, _layout, geometry, is_geometric
from .coords import _unit

__all__ = [
    "characteristic_points",
    "AngularDrift",
    "PointsRecorder",
    "stability_experiment",
    "StabilityResult",
    "plot_boundaries_2d",
    "plot_points_1d",
    "angle_between",
]


# -------------------------------------------------------------------------------------------------
# characteristic points
# -------------------------------------------------------------------------------------------------


def _describe(module: nn.Module) -> str:
    from torch.nn.utils import parametrize

    return parametrize.type_before_parametrizations(module).__name__


def _check_layer(layer: nn.Module, what: str = "layer") -> None:
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{what} must be an nn.Module. Got: {type(layer).__name__}")
    if not isinstance(layer, SUPPORTED):
        raise TypeError(
            f"{what} must be one of {', '.join(t.__name__ for t in SUPPORTED)} (or a subclass). "
            f"Got: {_describe(layer)}"
        )
    if not is_geometric(layer):
        w = layer._parameters.get("weight", None) if "weight" in layer._parameters else None
        if isinstance(w, nn.parameter.UninitializedParameter):
            raise ValueError(f"{what} ({_describe(layer)}) is not initialized yet (lazy module): run a forward pass first")


def _unit_form(layer: nn.Module) -> Tuple[Tensor, Tensor, Tensor]:
    """``(s, d, λ)`` in float64 with ``wᵀx + b = s·(dᵀx + λ)``; shapes (units,), (units, fan_in), (units,)."""
    with torch.no_grad():
        if is_geometric(layer):
            g = geometry(layer)
            s = g.radius.detach().to(torch.float64)
            d = _unit(g.angles.detach().to(torch.float64))
            if g.offset is None:
                lam = torch.zeros_like(s)
            else:
                lam = g.offset.detach().to(torch.float64)
            return s, d, lam
        weight = layer.weight.detach()
        w = _layout(layer, weight).to_units(weight).to(torch.float64)
        s = torch.linalg.vector_norm(w, dim=1)
        zero = s == 0
        safe = torch.where(zero, torch.ones_like(s), s)
        d = torch.where(zero.unsqueeze(1), torch.full_like(w, math.nan), w / safe.unsqueeze(1))
        bias = getattr(layer, "bias", None)
        if bias is None:
            lam = torch.zeros_like(s)
        else:
            lam = torch.where(zero, torch.full_like(s, math.nan), bias.detach().to(torch.float64) / safe)
        return s, d, lam


def _fold_norm(s: Tensor, lam: Tensor, norm: nn.Module, units: int) -> Tuple[Tensor, Tensor]:
    # BN(z) = γ (z − μ)/σ + β with z = s(dᵀx + λ)  →  (γ s/σ)·(dᵀx + λ − μ/s + β σ/(γ s))
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"norm must be a BatchNorm1d/2d/3d following the layer. Got: {type(norm).__name__}")
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            f"norm must track running statistics (its evaluation-mode boundary is what is folded). "
            f"Got: {norm!r}"
        )
    if norm.num_features != units:
        raise ValueError(f"norm must have one feature per unit ({units}). Got: num_features={norm.num_features}")
    with torch.no_grad():
        mu = norm.running_mean.to(torch.float64)
        sigma = torch.sqrt(norm.running_var.to(torch.float64) + norm.eps)
        gamma = norm.weight.detach().to(torch.float64) if norm.weight is not None else torch.ones_like(mu)
        beta = norm.bias.detach().to(torch.float64) if norm.bias is not None else torch.zeros_like(mu)
        scale = gamma * s / sigma
        lam = lam - mu / s + beta * sigma / (gamma * s)
    return scale, lam


def _oriented(s: Tensor, d: Tensor) -> Tensor:
    return torch.where((s < 0).unsqueeze(1), -d, d)


def characteristic_points(layer: nn.Module, *, norm: Optional[nn.Module] = None) -> Tuple[Tensor, Tensor]:
    r"""Characteristic points and boundary directions of every unit of ``layer``.

    Works on ``nn.Linear``, ``nn.ConvNd`` and ``nn.ConvTransposeNd``, GmP-registered or not (any
    other parametrization, e.g. weight norm, is read through ``layer.weight``). Units follow the
    library's layout: Linear rows, Conv output channels over ``in/groups·∏kernel`` inputs,
    ConvTranspose *output* channels.

    Args:
        layer: the layer.
        norm: optionally a ``BatchNorm`` applied to the layer's output; its running statistics and
            affine parameters are folded in, giving the boundary the pair computes in evaluation
            mode.

    Returns:
        ``(points, directions)``, both ``(units, fan_in)`` in the weight's dtype: ``points[i]`` is
        the point of unit ``i``'s boundary nearest the origin, ``−λ·u`` for GmP and
        ``−b·w/‖w‖²`` otherwise (computed from the stored coordinates, in float64);
        ``directions[i]`` is the unit normal on the active side, ``w/‖w‖``. See
        Note [Oriented directions]; units with ``w = 0`` give NaN (Note [Degenerate units]).

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
    directions = _oriented(s, d)
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


# -------------------------------------------------------------------------------------------------
# selecting layers
# -------------------------------------------------------------------------------------------------


def _select_layers(model: nn.Module, layers, exclude, what: str) -> List[Tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module. Got: {type(model).__name__}")
    named = [(n, m) for n, m in model.named_modules() if ".parametrizations." not in f".{n}."]
    by_name = dict(named)

    def split(spec, argname):
        if spec is None:
            return None
        if isinstance(spec, (str, type, nn.Module)):
            spec = [spec]
        names, mods, types = [], [], []
        for s in spec:
            if isinstance(s, str):
                if s not in by_name:
                    raise ValueError(f"{what}: no module named {s!r} in {type(model).__name__}. Got: {sorted(by_name)[:20]}")
                names.append(s)
            elif isinstance(s, nn.Module):
                mods.append(s)
            elif isinstance(s, type) and issubclass(s, nn.Module):
                types.append(s)
            else:
                raise TypeError(f"{what}: {argname} takes module names, modules and nn.Module types. Got: {s!r}")
        return names, mods, tuple(types)

    def matches(n, m, sel):
        names, mods, types = sel
        return n in names or any(m is x for x in mods) or (bool(types) and isinstance(m, types))

    inc = split(layers, "layers")
    exc = split(exclude, "exclude") or ([], [], ())
    chosen = []
    for n, m in named:
        if inc is None:
            if not isinstance(m, SUPPORTED):
                continue
        elif not matches(n, m, inc):
            continue
        if matches(n, m, exc):
            continue
        _check_layer(m, f"{what}: layer {n or '<root>'!r}")
        chosen.append((n, m))
    if inc is not None:
        for mod in inc[1]:
            if not any(mod is m for _, m in named):
                raise ValueError(f"{what}: a module given in layers is not part of the model. Got: {_describe(mod)}")
    if not chosen:
        raise ValueError(f"{what}: no Linear/Conv layer selected in {type(model).__name__}. Got: layers={layers!r}, exclude={exclude!r}")
    return chosen


# -------------------------------------------------------------------------------------------------
# angular drift
# -------------------------------------------------------------------------------------------------

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
    after the step (``w/‖w‖``, see :func:`characteristic_points` and Note [Oriented directions])
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

    For a GmP layer a step turns ``u(θ)`` by at most ``‖δθ‖``; a flip (> π/2) can then only come
    from the radius changing sign, which reverses the active side of ``g(r(uᵀx + λ))`` (Note
    [Oriented directions]). In ``python -m georeparam demo`` (Adam, lr 0.1) all 208 flips of the
    GmP hidden layer were radius sign changes. Canonicalization (``GeometricOptimizer``) leaves
    the recorded angles unchanged.

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
        self._tracks = [_Track(n or type(m).__name__, m) for n, m in _select_layers(model, layers, exclude, "AngularDrift")]
        self.keep_history = bool(history)
        self._per_step: Dict[str, List[float]] = {"median": [], "p99": [], "max": [], "flip_fraction": []}
        self._handles: list = []
        self.snapshot()

    # -- driving -------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Remember the current directions as the "before" of the next :meth:`step`."""
        for t in self._tracks:
            t.before = _oriented(*_unit_form(t.layer)[:2])

    def step(self) -> Tensor:
        """Record the change since the last snapshot, then snapshot. Returns this step's angles
        (all monitored units, concatenated in layer order, float64)."""
        all_angles = []
        for t in self._tracks:
            after = _oriented(*_unit_form(t.layer)[:2])
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
        out = {
            "steps": None,
            "units": None,
            "median": math.nan,
            "p99": math.nan,
            "max": math.nan,
            "flip_fraction": math.nan,
            "undefined": sum(t.undefined for t in tracks),
        }
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


# -------------------------------------------------------------------------------------------------
# characteristic points over training
# -------------------------------------------------------------------------------------------------


class PointsRecorder(_OptimizerHooks):
    r"""Collects one layer's characteristic points (and directions) during training.

    Call :meth:`record` yourself or ``attach(optimizer)`` to record after every ``every``-th
    optimizer step; :attr:`points` is then ``(records, units, fan_in)`` (float32, CPU), ready for
    :func:`plot_points_1d` or the ``trajectories`` of :func:`plot_boundaries_2d`. The state before
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

    def __init__(self, layer: nn.Module, *, every: int = 1, norm: Optional[nn.Module] = None, record_initial: bool = True):
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


# -------------------------------------------------------------------------------------------------
# Figure 1: stability of the boundary under a parameter perturbation
# -------------------------------------------------------------------------------------------------

STABILITY_METHODS = ("SP", "WN", "BN", "GmP")


class StabilityResult(NamedTuple):
    """What :func:`stability_experiment` measured, per method, ε and trial (float64).

    Attributes:
        methods: method names, in row order.
        eps: the perturbation sizes.
        direction: ``(methods, eps, trials)`` angle (rad) between the boundary direction before
            and after the perturbation.
        point: ``(methods, eps, trials)`` distance the characteristic point moved.
        angle_step: ``(eps, trials)`` ``‖δθ‖``, the size of GmP's angular perturbation.
        perturbation: ``"ones"`` or ``"random"``.
    """

    methods: Tuple[str, ...]
    eps: Tuple[float, ...]
    direction: Tensor
    point: Tensor
    angle_step: Tensor
    perturbation: str

    def table(self) -> str:
        """Markdown: median direction change (rad) / median point shift per method and ε."""
        head = "| method | " + " | ".join(f"ε = {e:g}" for e in self.eps) + " |"
        lines = [head, "|---" * (len(self.eps) + 1) + "|"]
        for i, m in enumerate(self.methods):
            cells = [
                f"{self.direction[i, j].nanmedian().item():.3g} / {self.point[i, j].nanmedian().item():.3g}"
                for j in range(len(self.eps))
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _direction_2d(w: Tensor) -> Tensor:
    return w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)


def stability_experiment(
    eps: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    *,
    trials: int = 1000,
    seed: int = 0,
    scale: float = 1e-3,
    perturbation: str = "ones",
    methods: Sequence[str] = STABILITY_METHODS,
) -> StabilityResult:
    r"""The paper's Figure 1: perturb a small 2-D ReLU unit and measure how its boundary moves.

    Each trial draws ``w ∈ R², b ~ N(0, scale²)`` (``scale = 1e-3`` as in the paper), writes the
    unit in each parameterization, adds ``δ`` to *every* parameter and compares the boundary
    before and after (float64):

    * **SP** ``ReLU(wᵀx + b)``: ``(w, b) + δ``.
    * **WN** ``ReLU(g·vᵀx/‖v‖ + b)`` with ``v = w``, ``g = ‖w‖``: ``(v, g, b) + δ`` (the official
      code's formula).
    * **BN** ``ReLU(γ·(z − E z)/std z + β)`` with ``z = wᵀx + b``, population statistics of
      standardized inputs (``E x = 0``, ``Cov x = I``, so ``E z = b``, ``std z = ‖w‖``; BN's
      variance ε left out) and ``γ = ‖w‖``, ``β = b``, so that it computes exactly the SP unit
      before the step: ``(w, b, γ, β) + δ``. ``b`` cancels; the direction change equals SP's
      (normalizing rescales ``w``, it does not turn it), only ``φ = −(β/γ)·w/‖w‖`` differs.
    * **GmP** ``r·ReLU(uᵀx + λ)`` (the paper's form) with ``r = ‖w‖``, ``θ = atan2(w₂, w₁)``,
      ``λ = b/‖w‖``: ``(r, θ, λ) + δ``; ``r`` does not enter the boundary, and the direction turns
      by exactly ``|δθ|`` (mod 2π).

    Args:
        eps: perturbation sizes ε.
        trials: independent units per ε.
        seed: seeds the units and random perturbations.
        scale: standard deviation of ``w`` and ``b``.
        perturbation: ``"ones"`` — ``δ = ε·1`` (the official code); ``"random"`` —
            ``δ = ε·ξ``, ``ξ ~ N(0, I)`` per parameter.
        methods: a subset of ``("SP", "WN", "BN", "GmP")``.

    Returns:
        a :class:`StabilityResult` (``.table()`` gives the Markdown summary).

    Example:
        >>> res = stability_experiment((1e-4, 1e-1), trials=200)
        >>> bool((res.direction[res.methods.index("GmP")] <= res.angle_step + 1e-12).all())
        True
        >>> sp = res.direction[res.methods.index("SP")]
        >>> round(sp[0].median().item(), 2), round(sp[1].median().item(), 2)  # ε ≫ ‖w‖: direction lost
        (0.08, 1.6)
    """
    if perturbation not in ("ones", "random"):
        raise ValueError(f"perturbation must be 'ones' or 'random'. Got: {perturbation!r}")
    methods = tuple(methods)
    bad = [m for m in methods if m not in STABILITY_METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {STABILITY_METHODS}. Got: {methods}")
    eps = tuple(float(e) for e in eps)
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise ValueError(f"eps must be non-empty, finite and ≥ 0. Got: {eps}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int. Got: {trials!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite. Got: {scale!r}")

    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(trials, 2, generator=gen, dtype=f64) * scale
    b = torch.randn(trials, generator=gen, dtype=f64) * scale
    norm_w = torch.linalg.vector_norm(w, dim=1)
    d0 = _direction_2d(w)
    p0 = -(b / norm_w).unsqueeze(1) * d0  # the same unit in every parameterization

    direction = torch.empty(len(methods), len(eps), trials, dtype=f64)
    point = torch.empty_like(direction)
    angle_step = torch.empty(len(eps), trials, dtype=f64)

    for j, e in enumerate(eps):
        # one draw of ξ per trial and parameter slot, shared by all methods (at most 5 parameters)
        if perturbation == "ones":
            xi = torch.ones(trials, 5, dtype=f64)
        else:
            xi = torch.randn(trials, 5, generator=gen, dtype=f64)
        dl = e * xi
        for i, m in enumerate(methods):
            if m == "SP":
                w1, b1 = w + dl[:, :2], b + dl[:, 2]
                d1 = _direction_2d(w1)
                p1 = -(b1 / torch.linalg.vector_norm(w1, dim=1)).unsqueeze(1) * d1
            elif m == "WN":
                v1 = w + dl[:, :2]
                g1 = norm_w + dl[:, 2]
                b1 = b + dl[:, 3]
                w1 = g1.unsqueeze(1) * _direction_2d(v1)
                d1 = _direction_2d(w1)  # oriented: g < 0 flips the active side
                p1 = -(b1 / torch.linalg.vector_norm(w1, dim=1)).unsqueeze(1) * d1
            elif m == "BN":
                w1 = w + dl[:, :2]  # b + δ cancels in z − E z
                gamma1 = norm_w + dl[:, 3]
                beta1 = b + dl[:, 4]
                what = _direction_2d(w1)
                d1 = torch.where((gamma1 < 0).unsqueeze(1), -what, what)
                p1 = -(beta1 / gamma1).unsqueeze(1) * what
            else:  # GmP
                theta1 = torch.atan2(w[:, 1], w[:, 0]) + dl[:, 1]
                lam1 = b / norm_w + dl[:, 2]
                d1 = torch.stack([torch.cos(theta1), torch.sin(theta1)], dim=1)
                p1 = -lam1.unsqueeze(1) * d1
                angle_step[j] = dl[:, 1].abs()
            direction[i, j] = angle_between(d0, d1)
            point[i, j] = torch.linalg.vector_norm(p1 - p0, dim=1)
        if "GmP" not in methods:
            angle_step[j] = dl[:, 1].abs()
    return StabilityResult(methods, eps, direction, point, angle_step, perturbation)


# -------------------------------------------------------------------------------------------------
# plots
# -------------------------------------------------------------------------------------------------


def _figure(ax, figsize=(5.0, 5.0)):
    """``ax`` or a fresh Axes on an Agg-backed Figure (pyplot's global state is left alone)."""
    if ax is not None:
        return ax
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "georeparam's plots need matplotlib: pip install matplotlib (or georeparam[plot])"
        ) from e
    fig = Figure(figsize=figsize)
    return fig.add_subplot(1, 1, 1)


def _default_input_layer(model: nn.Module, fan_in: int) -> nn.Module:
    for _, m in model.named_modules():
        if isinstance(m, SUPPORTED):
            _, d, _ = _unit_form(m)
            if d.shape[1] == fan_in:
                return m
            break
    raise ValueError(
        f"no first Linear/Conv layer with fan-in {fan_in} in {type(model).__name__}; pass layer= explicitly"
    )


def _as_points_history(trajectories) -> Tensor:
    if isinstance(trajectories, PointsRecorder):
        return trajectories.points
    if isinstance(trajectories, Tensor):
        return trajectories.detach().to("cpu", torch.float32)
    raise TypeError(f"expected a PointsRecorder or a (steps, units, fan_in) tensor. Got: {type(trajectories).__name__}")


def plot_boundaries_2d(
    model: nn.Module,
    x: Tensor,
    y: Optional[Tensor] = None,
    ax=None,
    layer: Optional[nn.Module] = None,
    trajectories=None,
    *,
    resolution: int = 200,
    padding: float = 0.1,
    boundaries: bool = True,
    title: Optional[str] = None,
):
    r"""2-D data, the model's decision regions and boundary, and a layer's characteristic points.

    Args:
        model: maps ``(N, 2)`` inputs to ``(N,)``/``(N, 1)`` logits (binary, boundary at 0) or
            ``(N, C)`` class scores (argmax). Evaluated under ``no_grad`` in eval mode (its mode
            is restored afterwards).
        x: ``(N, 2)`` inputs; ``y``: optional ``(N,)`` labels for the scatter colours.
        ax: a matplotlib Axes (default: a new Agg figure, ``ax.figure.savefig(path)`` saves it).
        layer: whose characteristic points to draw (default: the model's first Linear/Conv
            layer, which must have fan-in 2 so its boundaries live in the data plane).
        trajectories: a :class:`PointsRecorder` of ``layer`` or a ``(steps, units, 2)`` tensor of
            points over training, drawn as paths ending at the current points.
        resolution: grid points per axis for the regions.
        padding: relative margin around the data.
        boundaries: also draw each unit's boundary line (thin) through its point.

    Returns:
        the Axes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module. Got: {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be an (N, 2) tensor. Got: {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    ax = _figure(ax)
    if layer is None:
        layer = _default_input_layer(model, 2)
    else:
        _check_layer(layer)
    points, directions = characteristic_points(layer)
    if points.shape[1] != 2:
        raise ValueError(f"layer must have fan-in 2 to draw its boundaries in the data plane. Got: fan-in {points.shape[1]}")

    xc = x.detach().to("cpu", torch.float64)
    lo, hi = xc.min(0).values, xc.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    lo, hi = lo - padding * span, hi + padding * span
    gx = torch.linspace(float(lo[0]), float(hi[0]), resolution, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), resolution, dtype=torch.float64)
    mx, my = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([mx.flatten(), my.flatten()], 1)
    p0 = next(iter(model.parameters()), None)
    gdtype = p0.dtype if p0 is not None else x.dtype
    gdevice = p0.device if p0 is not None else x.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(grid.to(gdevice, gdtype)).detach().to("cpu", torch.float64)
    finally:
        model.train(was_training)
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        score = out.reshape(-1)
        sc = score.reshape(mx.shape).numpy()
        big = float(score.abs().max()) + 1.0
        ax.contourf(mx.numpy(), my.numpy(), sc, levels=[-big, 0.0, big], colors=["#2166ac", "#b2182b"], alpha=0.22)
        ax.contour(mx.numpy(), my.numpy(), sc, levels=[0.0], colors="k", linewidths=1.5)
    elif out.dim() == 2:
        regions = out.argmax(1).to(torch.float64)
        ax.contourf(mx.numpy(), my.numpy(), regions.reshape(mx.shape).numpy(), levels=out.shape[1], cmap="tab10", alpha=0.3)
    else:
        raise ValueError(f"model output must be (N,), (N, 1) or (N, C). Got: {tuple(out.shape)}")

    if y is not None:
        ax.scatter(xc[:, 0].numpy(), xc[:, 1].numpy(), c=y.detach().cpu().numpy(), cmap="RdBu_r", s=6, alpha=0.6, edgecolors="none")
    else:
        ax.scatter(xc[:, 0].numpy(), xc[:, 1].numpy(), s=6, c="0.3", alpha=0.6, edgecolors="none")

    pts = points.detach().to("cpu", torch.float64)
    dirs = directions.detach().to("cpu", torch.float64)
    if trajectories is not None:
        hist = _as_points_history(trajectories)
        if hist.dim() != 3 or hist.shape[1:] != pts.shape:
            raise ValueError(f"trajectories must be (steps, {pts.shape[0]}, 2). Got: {tuple(hist.shape)}")
        for k in range(hist.shape[1]):
            ax.plot(hist[:, k, 0].numpy(), hist[:, k, 1].numpy(), color="tab:green", lw=0.6, alpha=0.45)
        ax.scatter(hist[0, :, 0].numpy(), hist[0, :, 1].numpy(), marker=".", s=10, color="tab:green", alpha=0.6)
    if boundaries:
        diag = float(torch.linalg.vector_norm(hi - lo))
        for k in range(pts.shape[0]):
            if not bool(torch.isfinite(pts[k]).all() and torch.isfinite(dirs[k]).all()):
                continue
            t = torch.tensor([-dirs[k, 1], dirs[k, 0]], dtype=torch.float64)  # along the line
            a, c = pts[k] - 2 * diag * t, pts[k] + 2 * diag * t
            ax.plot([float(a[0]), float(c[0])], [float(a[1]), float(c[1])], color="0.35", lw=0.4, alpha=0.3)
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), marker="*", s=40, color="gold", edgecolors="k", linewidths=0.5, zorder=5, label="characteristic points")
    ax.set_xlim(float(lo[0]), float(hi[0]))
    ax.set_ylim(float(lo[1]), float(hi[1]))
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    return ax


def plot_points_1d(history, ax=None, *, steps: Optional[Sequence[int]] = None, x_range: Optional[Tuple[float, float]] = None, title: Optional[str] = None):
    r"""Evolution of a 1-D layer's characteristic points over training (one line per unit).

    Args:
        history: a :class:`PointsRecorder` of a fan-in-1 layer, or a ``(records, units)`` /
            ``(records, units, 1)`` tensor.
        ax: a matplotlib Axes (default: a new Agg figure).
        steps: the step of each record (default: the recorder's steps, or 0, 1, …).
        x_range: the data's input range, shaded for reference.

    Returns:
        the Axes.
    """
    if isinstance(history, PointsRecorder):
        steps = history.steps if steps is None else steps
        hist = history.points
    elif isinstance(history, Tensor):
        hist = history.detach().to("cpu", torch.float32)
    else:
        raise TypeError(f"history must be a PointsRecorder or a tensor. Got: {type(history).__name__}")
    if hist.dim() == 3:
        if hist.shape[2] != 1:
            raise ValueError(f"plot_points_1d needs fan-in 1 points. Got: history of shape {tuple(hist.shape)}")
        hist = hist[:, :, 0]
    if hist.dim() != 2 or hist.shape[0] == 0:
        raise ValueError(f"history must be (records, units) or (records, units, 1), non-empty. Got: {tuple(hist.shape)}")
    t = torch.arange(hist.shape[0]) if steps is None else torch.as_tensor(list(steps))
    if t.numel() != hist.shape[0]:
        raise ValueError(f"steps must give one step per record ({hist.shape[0]}). Got: {t.numel()}")
    ax = _figure(ax, figsize=(6.0, 4.0))
    if x_range is not None:
        ax.axhspan(float(x_range[0]), float(x_range[1]), color="0.9", zorder=0, label="data range")
    for k in range(hist.shape[1]):
        ax.plot(t.numpy(), hist[:, k].numpy(), lw=0.7, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("characteristic point φ")
    if x_range is not None:
        lo, hi = float(x_range[0]), float(x_range[1])
        pad = 0.5 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    if title:
        ax.set_title(title)
    return ax
