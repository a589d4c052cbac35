r"""What the reproductions share: the methods as the official code builds them, a training loop
with Keras' callback semantics, the official splits, statistics and tables.

# Note [The official protocol]
The official code (GitHub ``Wenlin-Chen/geometric-parameterization``, TensorFlow 2 / Keras) is
followed by default in every detail that decides an outcome:

* float64 everywhere (``tf.keras.backend.set_floatx('float64')``);
* Keras' initial values: Glorot-uniform weights and zero biases in every ``Dense``; GmP layers
  start from the same Glorot draw converted to ``(r, θ)`` with ``λ = 0``
  (``GlorotUniformHyperSpherical``, here :func:`georeparam.init_geometric_`); WN layers
  (``DenseWN``) start from the same Glorot ``v`` with ``g = ‖v‖`` and a zero bias, on *both*
  layers; BN is ``Dense → BatchNormalization → ReLU`` with Keras' momentum 0.99 and ε = 1e-3;
* Adam with Keras' ε = 1e-7 (learning rate 0.1 for GmP, 0.01 for the others);
* ``ReduceLROnPlateau`` (×0.1, ``min_delta = 1e-4``, its own counter) and ``EarlyStopping``
  (``min_delta = 0``, ``restore_best_weights=True``) as Keras 2 implements them
  (:class:`KerasCallbacks`): the best weights are restored when early stopping fires;
* a fresh shuffle of the training rows every epoch, the last batch partial.

All methods of one seed start from the same Glorot draw (SP, WN and the GmP variants compute the
same function at step 0), so seeds give *paired* comparisons. The official script draws each
model separately; pairing only removes noise from the comparison.

# Note [Validation, never the test set]
The official scripts pass the test split as ``validation_data``: early stopping and the plateau
rule read the test split. By default every such decision here reads a validation split carved
from the training data (the official one is available as ``--monitor test``, labelled as such in
every report). Test metrics are computed once, on the final (restored) weights.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import georeparam

from .tables import (  # noqa: F401 - the experiments reach everything through common
    fmt_mean_std,
    fmt_p,
    markdown_table,
    mean_std,
    paired_wins,
    parse_markdown_table,
    progress_bar,
    pyplot,
    savefig,
    sign_test,
    wins_cell,
    write_json,
)

METHODS: Tuple[str, ...] = ("SP", "WN", "BN", "GmP", "GmP-w", "GmP+IMN")
#: what each method is called in the tables
LABELS = {
    "SP": "SP",
    "WN": "WN",
    "BN": "BN",
    "GmP": "GmP (paper form)",
    "GmP-w": "GmP (weight form)",
    "GmP+IMN": "GmP+IMN (paper form)",
}
KERAS_ADAM_EPS = 1e-7
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPS = 1e-3


class DataMissing(RuntimeError):
    """An experiment's data files are not there; the experiment is skipped with this message."""


def paper_lr(method: str) -> float:
    """The paper's learning rate: 0.1 for the GmP variants, 0.01 for the others.

    >>> paper_lr("GmP+IMN"), paper_lr("BN")
    (0.1, 0.01)
    """
    check_method(method)
    return 0.1 if method.startswith("GmP") else 0.01


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}. Got: {method!r}")


def parse_methods(text: str) -> List[str]:
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"reproduce: --methods takes a subset of {','.join(METHODS)}. Got: {text!r}")
    return methods


def parse_seeds(text: str) -> List[int]:
    """``"5"`` → seeds 0..4; ``"0,3,7"`` → those seeds.

    >>> parse_seeds("3"), parse_seeds("4,9")
    ([0, 1, 2], [4, 9])
    """
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise ValueError(f"--seeds takes a count (5) or a comma-separated list (0,3,7). Got: {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds must name at least one seed. Got: {text!r}")
    return seeds


# -------------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------------


def glorot_(layer: nn.Module, generator: torch.Generator) -> nn.Module:
    """Keras' ``Dense`` defaults on a plain layer: Glorot-uniform weight, zero bias."""
    with torch.no_grad():
        nn.init.xavier_uniform_(layer.weight, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def register_gmp(model: nn.Module, hidden: Sequence[str], method: str, seed: int):
    """The GmP variants on ``model``'s hidden layers, initialised as the official layers are.

    ``GmP`` and ``GmP+IMN``: the paper's form ``r·ReLU(uᵀx + λ)``; ``GmP-w``: the weight form
    ``ReLU(r·(uᵀx + λ))``. Returns ``georeparam.register``'s report. When every hidden layer
    has fan-in ≥ 2 they are re-drawn by ``init_geometric_(model, "glorot_uniform")`` from a
    generator seeded like the one the plain model was drawn from, hidden layers first: that gives
    the plain model's weights again with ``λ = 0`` (the official ``GlorotUniformHyperSpherical``),
    so the runs stay paired. A fan-in-1 layer keeps its registered values: ``r = |w|``, direction
    ``sign(w)``, ``λ = 0``, the official ``GlorotUniformHyperSpherical1D``.
    """
    form = "weight" if method == "GmP-w" else "paper"
    report = georeparam.register(model, include=list(hidden), imn=(method == "GmP+IMN"), form=form)
    if all(_fan_in(model.get_submodule(h)) >= 2 for h in hidden):
        georeparam.init_geometric_(model, "glorot_uniform", generator=torch.Generator().manual_seed(seed))
    return report


def _fan_in(layer: nn.Module) -> int:
    return math.prod(layer.weight.shape[1:])


def apply_method(model: nn.Module, method: str, hidden: Sequence[str], output: str, seed: int) -> nn.Module:
    """Turn a plain, Glorot-initialised model (built with BatchNorm layers for ``BN``) into
    ``method``'s version: WN on the hidden and the output layers (``DenseWN`` everywhere, as the
    official code), the GmP variants on the hidden layers (:func:`register_gmp`)."""
    check_method(method)
    if method == "WN":
        from torch.nn.utils.parametrizations import weight_norm

        for name in list(hidden) + [output]:
            weight_norm(model.get_submodule(name))
    elif method.startswith("GmP"):
        register_gmp(model, hidden, method, seed)
    return model


def bn(units: int, dtype=torch.float64, dims: int = 1) -> nn.Module:
    """Keras' ``BatchNormalization()``: momentum 0.99 (PyTorch's 0.01), ε = 1e-3."""
    cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return cls(units, momentum=1 - KERAS_BN_MOMENTUM, eps=KERAS_BN_EPS, dtype=dtype)


def mlp(method: str, n_in: int, widths: Sequence[int], n_out: int, seed: int, *, dtype=torch.float64) -> nn.Sequential:
    """The official fully connected networks: ``Dense(w, relu)`` per width, then ``Dense(n_out)``
    (``Dense → BatchNormalization → ReLU`` for BN), Glorot weights and zero biases drawn from
    ``seed``, then the method (see Note [The official protocol]).

    >>> [type(m).__name__ for m in mlp("BN", 2, [10], 1, 0)]
    ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    """
    check_method(method)
    g = torch.Generator().manual_seed(seed)
    layers: List[nn.Module] = []
    hidden: List[str] = []
    width_in = n_in
    for w in widths:
        hidden.append(str(len(layers)))
        layers.append(glorot_(nn.Linear(width_in, w, dtype=dtype), g))
        if method == "BN":
            layers.append(bn(w, dtype))
        layers.append(nn.ReLU())
        width_in = w
    layers.append(glorot_(nn.Linear(width_in, n_out, dtype=dtype), g))
    return apply_method(nn.Sequential(*layers), method, hidden, str(len(layers) - 1), seed)


# -------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------


def data_root(override: Optional[str] = None) -> Path:
    """``override`` (``--data-dir``), else ``$GEOREPARAM_DATA``, else ``<repo>/../shared/data``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("GEOREPARAM_DATA")
    if env:
        return Path(env).expanduser()
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def find_data(root: Path, subdir: str, filename: str, what: str) -> Path:
    """``root/subdir/filename`` or ``root/filename`` (``--data-dir`` may name either level)."""
    for cand in (root / subdir / filename, root / filename):
        if cand.is_file():
            return cand
    raise DataMissing(
        f"{what}: data not found (looked for {root / subdir / filename} and {root / filename}). Pass --data-dir or set GEOREPARAM_DATA."
    )


def train_test_split_indices(n: int, test_size: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` row indices exactly as ``sklearn.model_selection.train_test_split(…,
    test_size=test_size, random_state=seed)`` picks them (``ShuffleSplit``: one permutation from
    ``RandomState(seed)``, the first ``ceil(test_size·n)`` rows are the test split).

    >>> [len(p) for p in train_test_split_indices(10, 0.2, 0)]
    [8, 2]
    """
    n_test = int(math.ceil(test_size * n))
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def carve_validation(train_idx: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split training indices into ``(fit, validation)``; the test rows are never involved."""
    perm = np.random.RandomState(seed + 7919).permutation(len(train_idx))
    n_val = int(round(fraction * len(train_idx)))
    return train_idx[perm[n_val:]], train_idx[perm[:n_val]]


def monitored_split(
    n: int, seed: int, monitor: str, val_fraction: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train, test, fit, monitored)`` row indices: the official 80/20 split, then either a
    validation split carved from the training rows (``monitor="val"``) or the test rows
    themselves (``monitor="test"``, the official scripts' choice) for early stopping."""
    train_idx, test_idx = train_test_split_indices(n, 0.2, seed)
    if monitor == "test":
        return train_idx, test_idx, train_idx, test_idx
    if monitor == "val":
        return (train_idx, test_idx) + carve_validation(train_idx, val_fraction, seed)
    raise ValueError(f"monitor must be 'val' or 'test'. Got: {monitor!r}")


def normalizer(train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Keras' ``Normalization`` adapted on ``train``: ``(x − mean) / max(std, 1e-7)`` with the
    population std (constant columns map to 0)."""
    mean = train.mean(axis=0)
    std = np.maximum(np.sqrt(train.var(axis=0)), 1e-7)
    return lambda a: (a - mean) / std


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------


class KerasCallbacks:
    """``ReduceLROnPlateau`` and ``EarlyStopping`` with Keras 2's semantics, one value per epoch.

    * Plateau: improvement means better than its own best by more than ``min_delta`` (default
      1e-4); after ``plateau_patience`` epochs without one, every learning rate ×``factor`` and
      its counter restarts.
    * Early stopping: improvement means strictly better than the best (``min_delta = 0``); the
      weights of the best epoch are kept; after ``patience`` epochs without one (and not on the
      first epoch), training stops and those weights are restored. Keras 2 restores them only when
      it stops early; so does this (``restore_at_end`` changes that).
    * NaN never improves.
    """

    def __init__(
        self, mode: str, *, patience=None, plateau_patience=None, factor=0.1, min_delta=1e-4, restore_at_end=False
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Got: {mode!r}")
        self.sign = 1.0 if mode == "min" else -1.0
        self.patience, self.plateau_patience = patience, plateau_patience
        self.factor, self.min_delta, self.restore_at_end = factor, min_delta, restore_at_end
        self.best = self.plateau_best = math.inf
        self.wait = self.plateau_wait = 0
        self.epoch = -1
        self.best_epoch = -1
        self.best_state = None
        self.stopped = False

    def update(self, value: float, model: Optional[nn.Module] = None, optimizer=None) -> bool:
        """Record one epoch's monitored ``value``; returns True when training must stop."""
        self.epoch += 1
        v = self.sign * float(value) if value == value else math.inf
        if self.plateau_patience is not None:
            if v < self.plateau_best - self.min_delta:
                self.plateau_best, self.plateau_wait = v, 0
            else:
                self.plateau_wait += 1
                if self.plateau_wait >= self.plateau_patience and optimizer is not None:
                    for group in optimizer.param_groups:
                        group["lr"] *= self.factor
                    self.plateau_wait = 0
        if self.best_state is None and model is not None:
            self.best_state = copy.deepcopy(model.state_dict())
        self.wait += 1
        if v < self.best:
            self.best, self.best_epoch, self.wait = v, self.epoch, 0
            if model is not None:
                self.best_state = copy.deepcopy(model.state_dict())
        if self.patience is not None and self.wait >= self.patience and self.epoch > 0:
            self.stopped = True
            return True
        return False

    @property
    def best_value(self) -> float:
        return self.sign * self.best if math.isfinite(self.best) else math.nan

    def finish(self, model: nn.Module) -> bool:
        """Restore the best weights where Keras would; returns whether it did."""
        if self.best_state is not None and (self.stopped or self.restore_at_end):
            model.load_state_dict(self.best_state)
            return True
        return False


@dataclass
class FitConfig:
    """How :func:`fit` trains. ``patience``/``plateau_patience`` of ``None`` switch the rule off."""

    lr: float
    epochs: int
    batch_size: Optional[int] = None  # None: full batch
    mode: str = "min"
    patience: Optional[int] = None
    plateau_patience: Optional[int] = None
    plateau_min_delta: float = 1e-4
    optimizer: str = "adam"  # "adam" (Keras eps) or "sgd" (momentum 0.9)
    restore_at_end: bool = False


@dataclass
class FitResult:
    epochs: int = 0
    steps: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    restored: bool = False
    nonfinite: bool = False
    best_monitored: float = math.nan
    history: Dict[str, List[float]] = field(
        default_factory=lambda: {"epoch": [], "train_loss": [], "monitored": [], "lr": []}
    )


def make_optimizer(model: nn.Module, cfg: FitConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=KERAS_ADAM_EPS)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd'. Got: {cfg.optimizer!r}")


def fit(
    model: nn.Module,
    train: Tuple[Tensor, Tensor],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    cfg: FitConfig,
    monitor: Optional[Callable[[nn.Module, float], float]] = None,
    seed: int = 0,
    batch_fn: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None,
    on_epoch: Optional[Callable[[int, nn.Module], None]] = None,
    on_step: Optional[Callable[[nn.Module], None]] = None,
    progress=None,
) -> FitResult:
    """Train ``model`` on two in-memory tensors as ``keras.Model.fit`` with the two callbacks does.

    Every epoch draws a permutation (a generator seeded with ``seed``) and steps through its
    slices of ``cfg.batch_size`` rows, the last one partial. ``monitor(model, epoch_train_loss)``
    gives the epoch's monitored value; it runs in eval mode without gradients (``None``: the
    training loss, as ``monitor='loss'``). ``batch_fn`` maps a raw batch to the model's input
    (e.g. uint8 images → floats with augmentation). ``on_epoch(epoch, model)`` observes (eval
    mode, no gradients) and never steers training; ``on_step(model)`` likewise after every
    optimizer step (no gradients, the model stays in training mode). A non-finite training loss ends the run: with
    early stopping on, Keras would restore the best weights once ``patience`` NaN epochs have
    passed, which is what happens here at once; without it the run is marked and stops.
    """
    x, y = train
    n = x.shape[0]
    bs = n if cfg.batch_size is None else min(int(cfg.batch_size), n)
    gen = torch.Generator().manual_seed(int(seed))
    opt = make_optimizer(model, cfg)
    cb = KerasCallbacks(
        cfg.mode,
        patience=cfg.patience,
        plateau_patience=cfg.plateau_patience,
        min_delta=cfg.plateau_min_delta,
        restore_at_end=cfg.restore_at_end,
    )
    res = FitResult()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        if bs >= n:
            slices = [None]
        else:
            slices = list(torch.randperm(n, generator=gen).split(bs))
            if len(slices) > 1 and len(slices[-1]) == 1:  # BatchNorm cannot train on one row
                slices[-2] = torch.cat(slices[-2:])
                slices.pop()
        total, count = 0.0, 0
        for idx in slices:
            xb, yb = (x, y) if idx is None else (x[idx.to(x.device)], y[idx.to(y.device)])
            if batch_fn is not None:
                xb, yb = batch_fn(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            res.steps += 1
            if on_step is not None:
                with torch.no_grad():
                    on_step(model)
            lv = float(loss.detach())
            total += lv * xb.shape[0]
            count += xb.shape[0]
            if not math.isfinite(lv):
                res.nonfinite = True
                break
        res.epochs = epoch
        if res.nonfinite:
            res.stopped_early = cfg.patience is not None
            cb.stopped = cb.stopped or res.stopped_early
            break
        train_loss = total / max(count, 1)
        model.eval()
        with torch.no_grad():
            value = train_loss if monitor is None else float(monitor(model, train_loss))
            if on_epoch is not None:
                on_epoch(epoch, model)
        model.train()
        res.history["epoch"].append(epoch)
        res.history["train_loss"].append(train_loss)
        res.history["monitored"].append(value)
        res.history["lr"].append(opt.param_groups[0]["lr"])
        stop = cb.update(value, model if (cfg.patience is not None or cfg.restore_at_end) else None, opt)
        if progress is not None and epoch % 50 == 0:
            progress.set_postfix_str(f"epoch {epoch} monitored={value:.4g}", refresh=False)
        if stop:
            res.stopped_early = True
            break
    res.best_epoch = cb.best_epoch + 1
    res.best_monitored = cb.best_value
    res.restored = cb.finish(model)
    model.eval()
    return res
