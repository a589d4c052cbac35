r"""What every reproduction shares: the five methods, model builders, the training loop with early
stopping and learning-rate plateaus, seeds, data location, and Markdown tables.

Methods (the paper's comparison):

* ``SP`` — standard parameterization, nothing changed;
* ``WN`` — ``torch.nn.utils.parametrizations.weight_norm`` on the hidden layers;
* ``BN`` — ``BatchNorm`` after each hidden linear/conv layer, before the ReLU;
* ``GmP`` — :func:`georeparam.register` on the hidden layers (the output layer stays standard);
* ``GmP+IMN`` — ``georeparam.register(model, imn=True, exclude=[output])``: GmP plus input mean
  normalization of every GmP layer's input.

Paper protocol: Adam with learning rate 0.1 for the GmP variants and 0.01 for the others
(:func:`paper_lr`).

# Note [Validation, never the test set]
Every decision taken during training — keeping the best weights, stopping early, dividing the
learning rate on a plateau — reads a validation split carved from the *training* data (or the
training loss itself, where the experiment says so). The official scripts of the paper monitor
the test split; we do not. Test metrics are computed once, after training, on the restored weights
(observers such as a steps-to-target curve may read the test set; they never steer training).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "paper_lr",
    "apply_method",
    "imn_available",
    "mlp",
    "FitConfig",
    "FitResult",
    "fit",
    "Monitor",
    "seed_everything",
    "data_root",
    "DataMissing",
    "mean_std",
    "fmt_mean_std",
    "markdown_table",
    "parse_markdown_table",
]

METHODS: Tuple[str, ...] = ("SP", "WN", "BN", "GmP", "GmP+IMN")


class DataMissing(RuntimeError):
    """An experiment's data files are not there; the experiment is skipped with this message."""


def paper_lr(method: str) -> float:
    """The paper's learning rate: 0.1 for the GmP variants, 0.01 for the others.

    >>> paper_lr("GmP+IMN"), paper_lr("BN")
    (0.1, 0.01)
    """
    _check_method(method)
    return 0.1 if method.startswith("GmP") else 0.01


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}. Got: {method!r}")


def imn_available() -> bool:
    """Whether ``georeparam.register`` takes ``imn=True`` (input mean normalization) in this build."""
    import inspect

    from .. import api

    try:
        return "imn" in inspect.signature(api.register).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def apply_method(model: nn.Module, method: str, hidden: Sequence[str], output: str) -> nn.Module:
    """Turn a freshly built model into ``method``'s version of it (in place; returns it).

    ``hidden`` are the qualified names of the hidden linear/conv layers, ``output`` the output
    layer's. ``BN`` is structural: build the model with its BatchNorm layers (``mlp(..., bn=True)``);
    here it changes nothing. The GmP variants keep the function the model computes (the
    parametrization is exact); WN keeps it too (``g`` starts at ``‖v‖``).
    """
    _check_method(method)
    if method in ("SP", "BN"):
        return model
    if method == "WN":
        from torch.nn.utils.parametrizations import weight_norm

        for name in hidden:
            weight_norm(model.get_submodule(name))
        return model
    from .. import api

    if method == "GmP":
        api.register(model, include=list(hidden), form="weight")
        return model
    if not imn_available():
        raise RuntimeError(
            "GmP+IMN needs georeparam.register(..., imn=True) (georeparam/imn.py), which this build "
            "does not have. Got: register without an 'imn' argument"
        )
    api.register(model, imn=True, exclude=[output], form="weight")
    return model


def mlp(n_in: int, widths: Sequence[int], n_out: int, *, bn: bool = False) -> Tuple[nn.Sequential, List[str], str]:
    """``Linear → [BatchNorm1d] → ReLU`` per hidden width, then a ``Linear`` output layer.

    Returns ``(model, hidden_layer_names, output_layer_name)``.

    >>> model, hidden, out = mlp(2, [10], 1, bn=True)
    >>> [type(m).__name__ for m in model], hidden, out
    (['Linear', 'BatchNorm1d', 'ReLU', 'Linear'], ['0'], '3')
    """
    layers: List[nn.Module] = []
    hidden: List[str] = []
    width_in = n_in
    for w in widths:
        hidden.append(str(len(layers)))
        layers.append(nn.Linear(width_in, w))
        if bn:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        width_in = w
    out = str(len(layers))
    layers.append(nn.Linear(width_in, n_out))
    return nn.Sequential(*layers), hidden, out


def build(builder: Callable[..., Tuple[nn.Module, List[str], str]], method: str, seed: int, **kwargs) -> nn.Module:
    """``builder(bn=method == "BN", **kwargs)`` initialised from ``seed``, then :func:`apply_method`.

    SP, WN, GmP and GmP+IMN built with one seed start from the same weights (and, as the
    parametrizations are exact, compute the same function at step 0).
    """
    _check_method(method)
    torch.manual_seed(seed)
    model, hidden, output = builder(bn=(method == "BN"), **kwargs)
    return apply_method(model, method, hidden, output)


# -------------------------------------------------------------------------------------------------
# seeds and data
# -------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_root(override: Optional[str] = None) -> Path:
    """Where the shared data lives: ``override`` (``--data-dir``), else ``$GEOREPARAM_DATA``, else
    ``<repository>/../shared/data``."""
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
        f"{what}: data not found (looked for {root / subdir / filename} and {root / filename}). "
        f"Pass --data-dir or set GEOREPARAM_DATA."
    )


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
# training
# -------------------------------------------------------------------------------------------------


class Monitor:
    """Best-value tracking with Keras semantics: early stopping, plateau decay, best-weights snapshot.

    ``update(value)`` is called once per evaluation. A value improves when it is strictly better
    than the best so far (``mode="min"``: smaller). After ``plateau_patience`` evaluations without
    improvement every learning rate is multiplied by ``factor`` (and the plateau counter restarts);
    after ``patience`` evaluations without improvement ``update`` returns ``True`` (stop). NaN never
    improves.
    """

    def __init__(
        self,
        mode: str = "min",
        *,
        patience: Optional[int] = None,
        plateau_patience: Optional[int] = None,
        factor: float = 0.1,
        min_lr: float = 0.0,
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Got: {mode!r}")
        self.mode = mode
        self.patience = patience
        self.plateau_patience = plateau_patience
        self.factor = factor
        self.min_lr = min_lr
        self.best = math.inf if mode == "min" else -math.inf
        self.best_index = -1
        self.index = -1
        self.wait = 0
        self.plateau_wait = 0
        self.best_state: Optional[Dict[str, Tensor]] = None

    def improved(self, value: float) -> bool:
        if value != value:  # NaN
            return False
        return value < self.best if self.mode == "min" else value > self.best

    def update(self, value: float, model: Optional[nn.Module] = None, optimizer=None) -> bool:
        self.index += 1
        if self.improved(value):
            self.best = value
            self.best_index = self.index
            self.wait = 0
            self.plateau_wait = 0
            if model is not None:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.wait += 1
        self.plateau_wait += 1
        if self.plateau_patience is not None and optimizer is not None and self.plateau_wait >= self.plateau_patience:
            for group in optimizer.param_groups:
                group["lr"] = max(group["lr"] * self.factor, self.min_lr)
            self.plateau_wait = 0
        return self.patience is not None and self.wait >= self.patience

    def restore(self, model: nn.Module) -> bool:
        """Load the best snapshot into ``model``; ``False`` when there is none."""
        if self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True


@dataclass
class FitConfig:
    """How :func:`fit` trains.

    Attributes:
        lr: Adam's learning rate (or the optimizer's, see ``optimizer``).
        max_epochs: upper bound on epochs (one epoch = one pass over the training data).
        batch_size: mini-batch size; ``None`` or ≥ the data size means full batch.
        monitor: ``"val"`` (a score on the validation split) or ``"train"`` (the epoch's mean
            training loss, e.g. for 50-point Levy, where no data can be spared).
        mode: whether the monitored value is better when ``"min"`` or ``"max"``.
        patience: early-stopping patience in evaluations (``None``: never stop early).
        plateau_patience: evaluations without improvement before the learning rate is multiplied
            by ``plateau_factor`` (``None``: constant learning rate).
        eval_every: evaluate every this many epochs.
        restore_best: load the best monitored weights at the end.
        diverge_factor: stop and flag divergence when a training loss is non-finite or exceeds
            this multiple of the first one.
        max_steps: optional cap on optimizer steps.
    """

    lr: float
    max_epochs: int
    batch_size: Optional[int] = None
    monitor: str = "val"
    mode: str = "min"
    patience: Optional[int] = None
    plateau_patience: Optional[int] = None
    plateau_factor: float = 0.1
    eval_every: int = 1
    restore_best: bool = True
    diverge_factor: float = 1e3
    max_steps: Optional[int] = None
    optimizer: str = "adam"


@dataclass
class FitResult:
    epochs: int = 0
    steps: int = 0
    best_epoch: int = 0
    diverged: bool = False
    stopped_early: bool = False
    restored: bool = False
    final_train_loss: float = math.nan
    best_monitored: float = math.nan
    history: Dict[str, List[float]] = field(default_factory=lambda: {"epoch": [], "step": [], "train_loss": [], "monitored": [], "lr": []})


def _make_optimizer(model: nn.Module, cfg: FitConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd'. Got: {cfg.optimizer!r}")


def fit(
    model: nn.Module,
    train: Tuple[Tensor, Tensor],
    val: Optional[Tuple[Tensor, Tensor]],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    score_fn: Optional[Callable[[nn.Module, Tensor, Tensor], float]],
    cfg: FitConfig,
    seed: int = 0,
    on_eval: Optional[Callable[[int, int, nn.Module], None]] = None,
    on_step: Optional[Callable[[int, nn.Module], None]] = None,
    progress=None,
) -> FitResult:
    """Train ``model`` on in-memory tensors; early stopping and plateaus follow ``cfg``.

    No DataLoader: the data stays as two tensors and mini-batches are index slices of one
    permutation per epoch (drawn from a generator seeded with ``seed``), the last one partial, as
    in Keras. ``score_fn(model, x_val, y_val)`` runs in ``eval()`` mode without gradients.
    ``on_eval(epoch, step, model)`` observes the model after each evaluation (for curves and
    trajectories; it must not steer training). ``progress`` is a tqdm bar whose postfix shows the
    epoch.

    Returns a :class:`FitResult`; the model ends with the best monitored weights when
    ``cfg.restore_best`` (see Note [Validation, never the test set]).
    """
    if cfg.monitor not in ("val", "train"):
        raise ValueError(f"cfg.monitor must be 'val' or 'train'. Got: {cfg.monitor!r}")
    if cfg.monitor == "val" and (val is None or score_fn is None):
        raise ValueError("cfg.monitor='val' needs a validation split and a score_fn. Got: val=None or score_fn=None")
    x, y = train
    n = x.shape[0]
    bs = n if cfg.batch_size is None else min(int(cfg.batch_size), n)
    gen = torch.Generator().manual_seed(int(seed))
    opt = _make_optimizer(model, cfg)
    monitor = Monitor(cfg.mode, patience=cfg.patience, plateau_patience=cfg.plateau_patience, factor=cfg.plateau_factor)
    res = FitResult()
    first_loss = None
    model.train()
    for epoch in range(1, cfg.max_epochs + 1):
        if bs >= n:
            batches = [(x, y)]
        else:
            perm = torch.randperm(n, generator=gen).to(x.device)
            batches = [(x[idx], y[idx]) for idx in perm.split(bs)]
        total, count = 0.0, 0
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            res.steps += 1
            lv = float(loss.detach())
            if first_loss is None:
                first_loss = abs(lv) if lv == lv else math.inf
            if not math.isfinite(lv) or abs(lv) > cfg.diverge_factor * max(first_loss, 1e-12):
                res.diverged = True
                break
            total += lv * xb.shape[0]
            count += xb.shape[0]
            if on_step is not None:
                on_step(res.steps, model)
            if cfg.max_steps is not None and res.steps >= cfg.max_steps:
                break
        res.epochs = epoch
        if res.diverged:
            break
        train_loss = total / max(count, 1)
        res.final_train_loss = train_loss
        last = cfg.max_steps is not None and res.steps >= cfg.max_steps
        if epoch % cfg.eval_every == 0 or last or epoch == cfg.max_epochs:
            if cfg.monitor == "train":
                value = train_loss
            else:
                model.eval()
                with torch.no_grad():
                    value = float(score_fn(model, *val))
                model.train()
            res.history["epoch"].append(epoch)
            res.history["step"].append(res.steps)
            res.history["train_loss"].append(train_loss)
            res.history["monitored"].append(value)
            res.history["lr"].append(opt.param_groups[0]["lr"])
            if on_eval is not None:
                model.eval()
                with torch.no_grad():
                    on_eval(epoch, res.steps, model)
                model.train()
            stop = monitor.update(value, model if cfg.restore_best else None, opt)
            if monitor.best_index == monitor.index:
                res.best_epoch = epoch
            if progress is not None and epoch % max(cfg.eval_every, 50) == 0:
                progress.set_postfix_str(f"epoch {epoch} {cfg.monitor}={value:.4g}", refresh=False)
            if stop:
                res.stopped_early = True
                break
        if last:
            break
    res.best_monitored = monitor.best if monitor.best_index >= 0 else math.nan
    if cfg.restore_best:
        res.restored = monitor.restore(model)
    model.eval()
    return res


# -------------------------------------------------------------------------------------------------
# splits
# -------------------------------------------------------------------------------------------------


def split_indices(n: int, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """A seeded random partition of ``range(n)`` into parts of the given fractions (the last part
    takes the rest).

    >>> [len(p) for p in split_indices(10, [0.8, 0.2], 0)]
    [8, 2]
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    parts, start = [], 0
    for f in fractions[:-1]:
        k = int(round(f * n))
        parts.append(np.sort(perm[start : start + k]))
        start += k
    parts.append(np.sort(perm[start:]))
    return parts


def standardize(train: np.ndarray, *others: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Scale by the training part's mean and standard deviation (constant columns: std 1).

    Returns ``(mean, std, train_scaled, *others_scaled)``.
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (mean, std, (train - mean) / std) + tuple((o - mean) / std for o in others)


# -------------------------------------------------------------------------------------------------
# tables
# -------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3, *, sci: bool = False) -> str:
    """``"mean ± std"`` over the finite values; ``"n/a"`` when there are none.

    >>> fmt_mean_std([1.0, 2.0, 3.0], 2)
    '2.00 ± 1.00'
    >>> fmt_mean_std([0.0012, 0.0014], 2, sci=True)
    '1.30e-03 ± 1.41e-04'
    """
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "n/a"
    f = f"{{:.{digits}e}}" if sci else f"{{:.{digits}f}}"
    return f"{f.format(m)} ± {f.format(s)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table.

    >>> print(markdown_table(["method", "acc"], [["SP", "0.9"]]))
    | method | acc |
    |---|---|
    | SP | 0.9 |
    """
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"markdown_table: a row has {len(r)} cells, the header {len(header)}. Got: {list(r)}")
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def parse_markdown_table(text: str) -> Tuple[List[str], List[List[str]]]:
    """The first Markdown table in ``text`` as ``(header, rows)`` (used by the tests).

    >>> parse_markdown_table("| a | b |\\n|---|---|\\n| 1 | 2 |")
    (['a', 'b'], [['1', '2']])
    """
    lines = [ln.strip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        raise ValueError("parse_markdown_table: no table found. Got: text without a line starting with '|'")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split("|")])
    return block[0], block[2:]


def bold_best(cells: List[List[str]], values: List[List[float]], col: int, mode: str) -> None:
    """Bold the best finite value of column ``col`` (in place)."""
    vals = [(v[col], i) for i, v in enumerate(values) if v[col] is not None and math.isfinite(v[col])]
    if not vals:
        return
    best = min(vals)[1] if mode == "min" else max(vals)[1]
    cells[best][col] = f"**{cells[best][col]}**"


def write_json(path: Path, obj) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return repr(o)

    path.write_text(json.dumps(obj, indent=1, default=default))


def progress_bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr (sparse refreshes when stderr is not a terminal, e.g. a log file)."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, mininterval=0.5 if tty else 30.0, dynamic_ncols=True)


def matplotlib_pyplot():
    """``matplotlib.pyplot`` with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path: Path, dpi: int = 110) -> Path:
    """Save a PNG, then re-encode it with a 256-colour palette (plots stay well under 200 KB)."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt = matplotlib_pyplot()
    plt.close(fig)
    try:
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        pass
    return path


def clone_state(model: nn.Module) -> Dict[str, Tensor]:
    return copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})


# -------------------------------------------------------------------------------------------------
# the hidden units' boundaries, whatever the method
# -------------------------------------------------------------------------------------------------


def _imn_mean(layer: nn.Module) -> Optional[Tensor]:
    """The running input mean an IMN layer subtracts in eval mode, or ``None`` without IMN."""
    try:
        from ..imn import has_input_mean_norm
    except ImportError:  # pragma: no cover - builds without imn.py
        return None
    return layer.imn.running_mean if has_input_mean_norm(layer) else None


def folded_mlp(model: nn.Sequential) -> nn.Sequential:
    """A plain ``Linear → ReLU → Linear`` computing what a one-hidden-layer MLP of any method
    computes in eval mode (BatchNorm and IMN folded into the hidden layer, parametrizations baked).

    Its hidden layer's characteristic points are the model's (what :mod:`georeparam.analysis`
    plots).
    """
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    if len(linears) != 2:
        raise ValueError(f"folded_mlp expects one hidden Linear and one output Linear. Got: {len(linears)} Linear layers")
    W, b = effective_affine(model, linears[0])
    out = model[linears[1]]
    hidden = nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
    head = nn.Linear(out.in_features, out.out_features, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        hidden.weight.copy_(W)
        hidden.bias.copy_(b)
        head.weight.copy_(out.weight)
        head.bias.copy_(out.bias)
    return nn.Sequential(hidden, nn.ReLU(), head).eval()


def effective_affine(model: nn.Sequential, index: int) -> Tuple[Tensor, Tensor]:
    """``(W, b)`` of the pre-activation ``W x + b`` of hidden layer ``model[index]`` in eval mode.

    Folds what sits between the layer's input and its ReLU: a following ``BatchNorm1d`` (running
    statistics) and an IMN input-mean subtraction. For SP, WN and GmP this is simply the layer's
    (parametrized) ``weight`` and ``bias``. The characteristic point of unit ``i`` is then
    ``−b_i w_i / ‖w_i‖²``.
    """
    layer = model[index]
    with torch.no_grad():
        W = layer.weight.detach().clone()
        b = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
        m = _imn_mean(layer)
        if m is not None:
            b = b - W @ m.to(W.dtype).reshape(-1)
        nxt = model[index + 1] if index + 1 < len(model) else None
        if isinstance(nxt, nn.BatchNorm1d):
            s = torch.sqrt(nxt.running_var + nxt.eps)
            g = nxt.weight if nxt.affine else torch.ones_like(s)
            beta = nxt.bias if nxt.affine else torch.zeros_like(s)
            W = W * (g / s)[:, None]
            b = g * (b - nxt.running_mean) / s + beta
    return W, b


def characteristic_points(W: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Points ``−b w / ‖w‖²`` (nearest the origin on each unit's boundary) and unit directions.

    >>> p, u = characteristic_points(torch.tensor([[2.0, 0.0]]), torch.tensor([-4.0]))
    >>> p, u
    (tensor([[2., 0.]]), tensor([[1., 0.]]))
    """
    norm2 = (W * W).sum(dim=1).clamp_min(1e-30)
    points = -(b / norm2)[:, None] * W
    return points, W / norm2.sqrt()[:, None]
