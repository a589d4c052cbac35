r"""Training GmP layers: parameter groups per kind, and an optimizer wrapper that keeps angles canonical.

* :func:`param_groups` splits a model's Parameters into ``angles`` / ``radius`` / ``offset`` /
  ``other`` groups (by identity) with their own learning rate and weight decay.
* :class:`GeometricOptimizer` wraps any supported ``torch.optim`` optimizer and, every ``every``
  steps, maps each GmP unit back to canonical coordinates (latitudes in ``[−π/2, π/2]``, last
  angle in ``(−π, π]``; radius ≥ 0 in the weight form, any sign in the paper's form) *and*
  transforms the optimizer's state with it, so that the trajectory of ``w`` and ``b`` is the one
  the unwrapped optimizer would follow.

# Note [Why the trajectory is unchanged]
Canonicalization maps every coordinate by an affine map ``x ↦ σx + c`` with ``σ = ±1``: a shift
``θ ↦ θ + 2πk`` (σ = +1), a reflection ``φ ↦ ±π − φ`` or ``φ ↦ −φ``, ``r ↦ −r`` and
``λ ↦ −λ`` (σ = −1), chosen so that ``w`` and ``b`` do not change (see
:func:`georeparam.coords.canonical_parts`). In the new coordinates the loss has gradient
``σ·g``. Every state an element-wise optimizer keeps is either odd in the gradient (a sum of
past gradients: momentum, Adam's ``exp_avg``), which becomes ``σ·state``, or even (a sum of
squares or magnitudes: ``exp_avg_sq``, Adagrad's ``sum``, Rprop's step sizes), which stays. With
the state mapped that way, every later update is ``σ`` times the unwrapped one, i.e. the same
step seen through the map: ``w`` and ``b`` follow the same path (up to rounding).

# Note [Canonical form in the paper's form]
In the paper's form (``register(form="paper")``, :mod:`georeparam.signs`) a unit computes
``r·f(uᵀx + λ)``: ``r < 0`` is a state of its own (it negates the unit's output), not the same
point as ``(−r, −u, −λ)``, whose boundary faces the other way. There canonicalization reduces the
angles keeping ``u`` exactly and never touches ``r`` or ``λ``: canonical ranges for the angles,
any sign for the radius.

# Note [Weight decay and canonicalization]
Weight decay pulls a coordinate toward 0, and ``x ↦ σx + c`` commutes with that pull only when
``c = 0``. Radius and offset maps are pure sign flips (``c = 0``), so decay on them is fine. The
angle maps shift by ``π`` or ``2πk``: with decay on angles the wrapped and unwrapped runs differ
(and decay on angles is meaningless anyway: it pulls every direction toward one fixed axis).
:func:`param_groups` gives angles no decay; :class:`GeometricOptimizer` warns when they have
some.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from .layer import geometric_layers, geometry
from .coords import canonical_parts

__all__ = ["param_groups", "GeometricOptimizer", "PARITY"]

_GROUPS = ("angles", "radius", "offset", "other")


_WARNED_PLAIN: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _warn_no_layers(fn: str, model: nn.Module) -> None:
    # Note [A model with no GmP layer]
    # A plain model (register skipped everything, or a config switch turned GmP off) used to raise
    # here. It trains fine as it is, so it is accepted: every Parameter is "other", nothing is
    # canonicalized, and one warning says so (once per model: param_groups and the wrapper on the
    # same model warn once together), since the usual cause is an optimizer built before register
    # (whose Parameters register then replaces) or a register call that never ran.
    if model in _WARNED_PLAIN:
        return
    _WARNED_PLAIN.add(model)
    warnings.warn(
        f"{fn}: {type(model).__name__} has no GmP-registered layer, so every parameter goes to the 'other' group "
        f"and nothing is canonicalized. If you meant to train GmP, call georeparam.register(model) first, then "
        f"build the optimizer (registering replaces the weight and bias Parameters). Got: "
        f"{sum(1 for _ in model.parameters())} plain parameters",
        stacklevel=3,
    )


def _check_rate(fn: str, name: str, value: Any, optional: bool) -> None:
    """A learning rate or decay must be a finite number ≥ 0 (torch's optimizers check ``lr`` and
    ``weight_decay`` in their defaults, but not in per-group options: Adam at lr −0.1 climbs)."""
    if value is None and optional:
        return
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(
            f"{fn}: {name} must be a number (a float such as 1e-3){' or None' if optional else ''}. "
            f"Got: {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{fn}: {name} must be finite and ≥ 0. Got: {value!r}")


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    angle_lr: Optional[float] = None,
    radius_lr: Optional[float] = None,
    offset_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    angle_weight_decay: float = 0.0,
    radius_weight_decay: Optional[float] = None,
    offset_weight_decay: float = 0.0,
    other: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    r"""Parameter groups for a ``torch.optim`` optimizer: angles, radii, offsets, everything else.

    Every Parameter of ``model`` appears in exactly one group, found by identity, so a model
    wrapped in ``DistributedDataParallel`` or ``torch.compile`` works as well. Each group carries
    a ``"name"`` key (``"angles"``, ``"radius"``, ``"offset"``, ``"other"``); empty groups are left
    out.

    Defaults: every group uses ``lr``; ``weight_decay`` applies to the other parameters and (unless
    ``radius_weight_decay`` is given) to the radii. Angles get **no** weight decay by default:
    decay pulls every angle toward 0, i.e. every direction toward one fixed axis (``e_{n-1}`` in
    the latitude convention), which is no regularization of the function, and it would break the
    trajectory identity of :class:`GeometricOptimizer` (Note [Weight decay and
    canonicalization]). Offsets ``λ`` (the boundary's distance from the origin) get none either,
    as biases usually do.

    Args:
        model: a model with GmP-registered layers (possibly wrapped).
        lr: the learning rate of every group without its own.
        angle_lr, radius_lr, offset_lr: per-kind learning rates (default ``lr``).
        weight_decay: decay of the other parameters and, by default, of the radii.
        angle_weight_decay, radius_weight_decay, offset_weight_decay: per-kind decay.
        other: extra options for the ``"other"`` group only, e.g. ``{"lr": 1e-3}``; they override
            ``lr`` and ``weight_decay`` there.

    Returns:
        A list of dicts, ready for ``torch.optim.<Optimizer>(groups, ...)``.

    A model with no GmP layer gets one ``"other"`` group and a warning (Note [A model with no GmP
    layer]).

    Raises:
        TypeError, ValueError: a learning rate or decay that is not a finite number ≥ 0 (checked
            here: torch's optimizers do not check per-group options).

    Example:
        >>> import torch, georeparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> _ = georeparam.register(model, exclude=["2"])
        >>> groups = param_groups(model, lr=0.1, weight_decay=1e-4)
        >>> [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
        [('angles', 1, 0.1, 0.0), ('radius', 1, 0.1, 0.0001), ('offset', 1, 0.1, 0.0), ('other', 2, 0.1, 0.0001)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module. Got: {type(model).__name__}")
    if other is not None and not isinstance(other, dict):
        raise TypeError(f"param_groups: other must be a dict of optimizer options. Got: {type(other).__name__}")
    if other is not None and "params" in other:
        raise ValueError("param_groups: other sets options of the 'other' group, not its params. Got: a 'params' key")
    for name, value, optional in (
        ("lr", lr, False), ("angle_lr", angle_lr, True), ("radius_lr", radius_lr, True), ("offset_lr", offset_lr, True),
        ("weight_decay", weight_decay, False), ("angle_weight_decay", angle_weight_decay, False),
        ("radius_weight_decay", radius_weight_decay, True), ("offset_weight_decay", offset_weight_decay, False),
    ):  # fmt: skip
        _check_rate("param_groups", name, value, optional)
    for key in ("lr", "weight_decay"):
        if other is not None and key in other:
            _check_rate("param_groups", f"other[{key!r}]", other[key], False)
    layers = geometric_layers(model)
    if not layers:
        _warn_no_layers("param_groups", model)
    kinds: Dict[str, List[nn.Parameter]] = {k: [] for k in _GROUPS}
    seen = set()
    for _, m, wname, _ in layers:
        g = geometry(m, wname)
        for kind, p in (("angles", g.angles), ("radius", g.radius), ("offset", g.offset)):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                kinds[kind].append(p)
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            kinds["other"].append(p)
    options = {
        "angles": {"lr": lr if angle_lr is None else angle_lr, "weight_decay": angle_weight_decay},
        "radius": {
            "lr": lr if radius_lr is None else radius_lr,
            "weight_decay": weight_decay if radius_weight_decay is None else radius_weight_decay,
        },
        "offset": {"lr": lr if offset_lr is None else offset_lr, "weight_decay": offset_weight_decay},
        "other": {"lr": lr, "weight_decay": weight_decay, **(other or {})},
    }
    return [{"params": kinds[k], "name": k, **options[k]} for k in _GROUPS if kinds[k]]


# -------------------------------------------------------------------------------------------------
# GeometricOptimizer
# -------------------------------------------------------------------------------------------------

_ADAM = {"step": "scalar", "exp_avg": "odd", "exp_avg_sq": "even", "max_exp_avg_sq": "even"}

#: How each state entry of the supported optimizers transforms under ``x ↦ σx + c``:
#: ``"odd"`` (× σ: linear in past gradients), ``"even"`` (kept: squares, magnitudes, step sizes),
#: ``"scalar"`` (kept: counters and schedules), ``"affine"`` (an averaged iterate: mapped like
#: the parameter itself). Unlisted optimizers are refused: Adafactor (its step is scaled by the
#: parameter's RMS, which a shift changes), LBFGS (state over the flattened parameters), Muon
#: (orthogonalizes the momentum matrix, which a per-entry sign flip does not commute with).
PARITY: Dict[type, Dict[str, str]] = {
    torch.optim.SGD: {"momentum_buffer": "odd"},
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: {"step": "scalar", "mu_product": "scalar", "exp_avg": "odd", "exp_avg_sq": "even"},
    torch.optim.RAdam: {"step": "scalar", "exp_avg": "odd", "exp_avg_sq": "even"},
    torch.optim.Adamax: {"step": "scalar", "exp_avg": "odd", "exp_inf": "even"},
    torch.optim.Adagrad: {"step": "scalar", "sum": "even"},
    torch.optim.Adadelta: {"step": "scalar", "square_avg": "even", "acc_delta": "even"},
    torch.optim.RMSprop: {"step": "scalar", "square_avg": "even", "momentum_buffer": "odd", "grad_avg": "odd"},
    torch.optim.Rprop: {"step": "scalar", "prev": "odd", "step_size": "even"},
    torch.optim.ASGD: {"step": "scalar", "eta": "scalar", "mu": "scalar", "ax": "affine"},
    torch.optim.SparseAdam: {"step": "scalar", "exp_avg": "odd", "exp_avg_sq": "even"},
}

#: Group options that pull parameters toward 0 (see Note [Weight decay and canonicalization]).
_DECAY_KEYS = ("weight_decay", "lambd")
_KINDS = ("odd", "even", "scalar", "affine")


class _Layer:
    """The live coordinates of one GmP layer, and whether they need canonicalizing at all."""

    __slots__ = ("name", "radius", "angles", "offset", "keep_sign")

    def __init__(self, name: str, radius: Tensor, angles: Tensor, offset: Optional[Tensor], keep_sign: bool = False):
        self.name, self.radius, self.angles, self.offset = name, radius, angles, offset
        #: the paper's form: r < 0 is a state of its own (Note [Canonical form in the paper's form])
        self.keep_sign = keep_sign


def _differs(new: Tensor, old: Tensor) -> Tensor:
    """Elementwise ``new != old`` with NaN equal to NaN: a NaN unit stays NaN and is no change
    (counting it made ``units_canonicalized`` grow by every NaN unit on every step)."""
    return (new != old) & ~(torch.isnan(new) & torch.isnan(old))


def _trainable(layer: _Layer) -> bool:
    # Note [Frozen layers are not canonicalized]
    # A layer with any coordinate frozen (requires_grad=False) is left alone: canonicalizing keeps
    # w, but it rewrites angles (and may flip r and λ) the user asked to keep fixed. Checked at
    # every canonicalization, since freezing can happen at any time.
    return all(p.requires_grad for p in (layer.radius, layer.angles, layer.offset) if p is not None)


class GeometricOptimizer(torch.optim.Optimizer):
    r"""Wrap an optimizer so that GmP coordinates stay canonical without changing the trajectory.

    After every ``every`` calls of :meth:`step`, each unit of each GmP layer whose coordinates
    left their canonical ranges (a latitude outside ``[−π/2, π/2]``, the last angle outside
    ``(−π, π]``, or, in the weight form only, radius < 0: Note [Canonical form in the paper's
    form]) is mapped back (:func:`georeparam.coords.canonical_parts`; ``w`` and
    ``b`` are unchanged), and the wrapped optimizer's state for those coordinates is transformed
    with it (Note [Why the trajectory is unchanged]): the model follows the same trajectory it
    would without the wrapper, but its angles never grow to where float32 ``sin``/``cos`` lose
    precision. Units already canonical are not touched (bit for bit).

    It *is* a ``torch.optim.Optimizer`` sharing ``param_groups`` and ``state`` with the wrapped
    one: ``zero_grad``, ``step(closure)``, ``state_dict``/``load_state_dict`` (which also keep
    the step counter) and ``torch.optim.lr_scheduler`` work on it. Call ``load_state_dict`` on
    the wrapper, not on the wrapped optimizer.

    Supported: the optimizers in :data:`PARITY` (SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad,
    Adadelta, RMSprop, Rprop, ASGD, SparseAdam), exact type. Others are refused unless ``parity``
    says how each of their state entries transforms.

    Identity holds for coordinates without weight decay on angles; decay on radius and offset
    is fine (Note [Weight decay and canonicalization]). A warning is issued otherwise.

    Args:
        optimizer: the optimizer to wrap, built from the model's Parameters after registering
            (e.g. from :func:`param_groups`).
        model: the model (possibly wrapped in DDP / ``torch.compile``); its GmP layers whose
            Parameters are all in ``optimizer`` are canonicalized, layers wholly outside it are
            left alone until :meth:`add_param_group` brings all their Parameters in. Layers with
            a frozen coordinate (``requires_grad=False``) are not canonicalized.
        every: canonicalize after every ``every`` steps (``every=1``: after each).
        parity: for an optimizer not in :data:`PARITY` (or a subclass), a dict
            ``{state key: "odd" | "even" | "scalar" | "affine"}``.

    Example:
        >>> import torch, georeparam
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> _ = georeparam.register(model)
        >>> base = torch.optim.Adam(georeparam.param_groups(model, lr=0.3))
        >>> optimizer = GeometricOptimizer(base, model)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> for _ in range(40):
        ...     optimizer.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     optimizer.step()
        ...     scheduler.step()
        >>> g = georeparam.geometry(model[0])
        >>> bool((g.angles[:, :-1].abs() <= torch.pi / 2).all())
        True
        >>> bool((g.angles[:, -1].abs() <= torch.pi).all()), optimizer.param_groups[0]["lr"]
        (True, 0.075)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        every: int = 1,
        parity: Optional[Dict[str, str]] = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GeometricOptimizer wraps a torch.optim.Optimizer. Got: {type(optimizer).__name__}")
        if isinstance(optimizer, GeometricOptimizer):
            raise TypeError("GeometricOptimizer: the optimizer is already wrapped. Got: a GeometricOptimizer")
        if not isinstance(model, nn.Module):
            raise TypeError(f"GeometricOptimizer: model must be an nn.Module. Got: {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GeometricOptimizer: every must be a positive int. Got: {every!r}")
        self.parity = self._parity_for(optimizer, parity)
        layers = geometric_layers(model)
        if not layers:
            _warn_no_layers("GeometricOptimizer", model)
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        status = []
        for qname, m, wname, param in layers:
            g = geometry(m, wname)
            inside = {k: id(p) in in_opt for k, p in g._asdict().items() if p is not None}
            status.append((qname or "<root>", g, inside, param.sign_after))
        if layers and not any(inside["radius"] or inside["angles"] for _, _, inside, _ in status):
            raise ValueError(
                "GeometricOptimizer: none of the model's GmP radii or angles are in the optimizer (was it built "
                "before georeparam.register? then it holds orphans). Got: "
                f"{len(layers)} GmP layers, {len(in_opt)} optimizer parameters"
            )
        self._layers: List[_Layer] = []
        # layers wholly outside the optimizer, tracked once add_param_group brings all of them in
        self._outside: List[_Layer] = []
        for qname, g, inside, keep_sign in status:
            if not any(inside.values()):
                if g.angles.shape[-1] > 0:
                    self._outside.append(_Layer(qname, g.radius, g.angles, g.offset, keep_sign))
            elif all(inside.values()):
                if g.angles.shape[-1] > 0:  # fan-in 1: no angles, the radius carries the sign
                    self._layers.append(_Layer(qname, g.radius, g.angles, g.offset, keep_sign))
            elif any(inside.values()):
                raise ValueError(
                    f"GeometricOptimizer: layer {qname!r} has only some of its GmP Parameters in the optimizer; "
                    f"canonicalizing it would change coordinates whose state the optimizer does not hold. "
                    f"Got: {inside}"
                )
        # validates and sets up the hooks; shallow copies so the wrapped groups are not touched
        super().__init__([dict(group) for group in optimizer.param_groups], optimizer.defaults)
        self.optimizer = optimizer
        self.every = every
        self._steps = 0
        #: units mapped back to canonical coordinates so far (a measure of how much angles drift)
        self.units_canonicalized = 0
        self._added = False
        self._share()
        self._warn_angle_decay()

    # -- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def _parity_for(optimizer: torch.optim.Optimizer, parity: Optional[Dict[str, str]]) -> Dict[str, str]:
        if parity is not None:
            if not isinstance(parity, dict) or not all(isinstance(k, str) and v in _KINDS for k, v in parity.items()):
                raise ValueError(f"GeometricOptimizer: parity maps state keys to one of {_KINDS}. Got: {parity!r}")
            return dict(parity)
        table = PARITY.get(type(optimizer))
        if table is None:
            raise TypeError(
                f"GeometricOptimizer does not know how the state of {type(optimizer).__name__} transforms when "
                f"a coordinate is reflected (odd state flips, even state stays), so it refuses rather than guess. "
                f"Known: {', '.join(t.__name__ for t in PARITY)}. For a subclass that keeps its base's state, pass "
                f"parity=georeparam.optim.PARITY[<base>]. Got: {type(optimizer).__module__}.{type(optimizer).__name__}"
            )
        return table

    def _share(self) -> None:
        # Note [Shared groups and state]
        # The wrapper holds the wrapped optimizer's very param_groups list and state dict, so that a
        # scheduler writing group["lr"] through the wrapper reaches the optimizer that steps.
        # load_state_dict rebinds them in the wrapped optimizer, hence this is called again there.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def _warn_angle_decay(self) -> None:
        angle_ids = {id(layer.angles) for layer in self._layers}
        for i, group in enumerate(self.param_groups):
            if not any(id(p) in angle_ids for p in group["params"]):
                continue
            decay = {k: group[k] for k in _DECAY_KEYS if k in group and float(group[k]) != 0.0}
            if decay:
                warnings.warn(
                    f"GeometricOptimizer: parameter group {group.get('name', i)!r} holds GmP angles with {decay}. "
                    f"Decay pulls angles toward 0, which does not commute with canonicalization (θ → θ + 2π, "
                    f"φ → π − φ): the trajectory will differ from the unwrapped optimizer's. Use "
                    f"georeparam.param_groups (no decay on angles).",
                    stacklevel=3,
                )

    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._share()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"{type(self).__name__}(every={self.every}, layers={len(self._layers)},\n{inner}\n)"

    # -- the optimizer interface ---------------------------------------------------------------
    def step(self, closure=None):  # type: ignore[override]
        """One step of the wrapped optimizer; then, every ``every`` steps, :meth:`canonicalize_`."""
        self._track_added()  # before stepping: a refusal changes nothing
        loss = self.optimizer.step(closure)
        self._steps += 1
        if self._steps % self.every == 0:
            self.canonicalize_()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer. GmP layers of the model whose radius, angles and
        offset are then all in the optimizer are canonicalized from the next :meth:`step` on
        (Note [Groups added later]); a layer left with only some of them is refused there."""
        if not hasattr(self, "optimizer"):  # called by Optimizer.__init__ while building the wrapper
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        self._added = True

    def _track_added(self) -> None:
        # Note [Groups added later]
        # A layer whose coordinates arrive through add_param_group after wrapping used to be
        # stepped and never canonicalized (after 300 SGD steps at lr 1 its latitudes reached 16–25
        # and its radii −3.5…−4.7). The model's GmP layers are remembered at wrapping, and those
        # wholly outside the optimizer then are looked at again before the next step: all their
        # coordinates in → tracked; only some → refused before stepping (several add_param_group
        # calls in a row, one per kind, are fine: nothing is decided until a step).
        if not getattr(self, "_added", False):  # (a wrapper pickled before this existed)
            return
        in_opt = {id(p) for group in self.param_groups for p in group["params"]}
        partial = []
        for layer in self._outside:
            coords = {"radius": layer.radius, "angles": layer.angles, "offset": layer.offset}
            inside = {k: id(p) in in_opt for k, p in coords.items() if p is not None}
            if any(inside.values()) and not all(inside.values()):
                partial.append((layer.name, inside))
        if partial:
            raise ValueError(
                f"GeometricOptimizer: after add_param_group, layer {partial[0][0]!r} has only some of its GmP "
                f"Parameters in the optimizer; canonicalizing it would change coordinates whose state the "
                f"optimizer does not hold. Add the rest (georeparam.geometry(layer) lists radius, angles, "
                f"offset) before stepping. Got: {partial[0][1]}"
            )
        now_in = [layer for layer in self._outside if id(layer.radius) in in_opt]
        self._layers.extend(now_in)
        self._outside = [layer for layer in self._outside if id(layer.radius) not in in_opt]
        self._added = False
        if now_in:
            self._warn_angle_decay()

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state_dict plus ``"geometric": {"steps", "every"}``."""
        sd = self.optimizer.state_dict()
        sd["geometric"] = {"steps": self._steps, "every": self.every}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load the wrapped optimizer's state and the wrapper's step counter.

        Refuses (before loading anything) a state saved by a wrapper with another ``every``: its
        step counter counts toward a different canonicalization schedule, and ignoring that
        silently broke resuming bit for bit.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("geometric", None)
        if extra is not None:
            saved = extra.get("every") if isinstance(extra, dict) else None
            if not isinstance(extra, dict) or not isinstance(extra.get("steps"), int):
                raise ValueError(
                    f"GeometricOptimizer.load_state_dict: state_dict['geometric'] must be a dict with an int 'steps'. "
                    f"Got: {extra!r}"
                )
            if saved is not None and saved != self.every:
                raise ValueError(
                    f"GeometricOptimizer.load_state_dict: the state was saved by a wrapper with every={saved}, this "
                    f"one has every={self.every}. Build GeometricOptimizer(..., every={saved}) to resume exactly, or "
                    f"set state_dict['geometric']['every'] = {self.every} to switch schedules on purpose. "
                    f"Got: every={saved}"
                )
        self.optimizer.load_state_dict(state_dict)
        self._share()
        if extra is not None:
            self._steps = int(extra["steps"])

    # -- canonicalization ----------------------------------------------------------------------
    def _transform(self, param: Tensor, new: Tensor, sign: Tensor) -> None:
        """Map ``param``'s optimizer state for ``param ↦ new`` (elementwise sign ``sign``)."""
        state = self.state.get(param)
        if not state:
            return
        for key, value in state.items():
            kind = self.parity.get(key)
            if kind is None:
                raise RuntimeError(
                    f"GeometricOptimizer: {type(self.optimizer).__name__} keeps a state entry {key!r} whose "
                    f"parity is unknown; refusing to guess. Pass parity={{..., {key!r}: 'odd'|'even'|'scalar'|"
                    f"'affine'}}. Got: state keys {sorted(state)}"
                )
            if kind == "scalar" or not isinstance(value, Tensor):
                continue
            if kind == "even":
                continue
            if value.shape != param.shape:
                raise RuntimeError(
                    f"GeometricOptimizer: state {key!r} ({kind}) has shape {tuple(value.shape)}, not the "
                    f"parameter's {tuple(param.shape)}; cannot map it element-wise"
                )
            s = sign.to(value.dtype)
            if kind == "odd":
                value.mul_(s)
            else:  # affine: ax ↦ σ·ax + c with c = new − σ·old, i.e. new + σ·(ax − old)
                value.copy_(new.to(value.dtype) + s * (value - param.to(value.dtype)))

    @torch.no_grad()
    def canonicalize_(self) -> int:
        """Canonicalize every wrapped GmP layer now (state included). Returns how many units changed.

        Units already canonical come back bit for bit (``canonical_parts`` leaves them alone), and
        their state is untouched (their signs are +1).
        """
        self._track_added()
        changed = 0
        for layer in self._layers:
            r, a = layer.radius, layer.angles
            if not _trainable(layer):  # Note [Frozen layers are not canonicalized]
                continue
            if layer.keep_sign:  # angles only, keeping u: canonical_parts leaves u alone for r ≥ 0
                _, new_a, _, a_sign = canonical_parts(r.abs(), a)
                new_r, r_sign = r, torch.ones_like(r)
            else:
                new_r, new_a, r_sign, a_sign = canonical_parts(r, a)
            rows = _differs(new_r, r) | _differs(new_a, a).any(-1)
            n = int(rows.sum())
            if n == 0:
                continue
            self._transform(r, new_r, r_sign)
            self._transform(a, new_a, a_sign)
            if layer.offset is not None:
                new_o = layer.offset * r_sign
                self._transform(layer.offset, new_o, r_sign)
                layer.offset.copy_(new_o)
            r.copy_(new_r)
            a.copy_(new_a)
            changed += n
        self.units_canonicalized += changed
        return changed
