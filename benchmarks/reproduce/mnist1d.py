r"""MNIST-1D (Greydanus 2020; not in the paper): an external check with the paper's training setup.

The data are the ``mnist1d`` package's default dataset, generated locally
(``get_dataset_args()``: 4,000 train / 1,000 test sequences of length 40, 10 classes); inputs
scaled by one scalar mean/std of the training set. 10 % of the training set is held out for
validation. Models, initialised as Keras does (Glorot weights, zero biases; GmP from the same
draw with ``λ = 0``), float64:

* ``mlp``: 40 → 100 → 100 → 10, ReLU;
* ``cnn``: the package's small 1-D CNN — three Conv1d layers of 25 channels (kernels 5, 3, 3,
  stride 2, padding 1) with ReLU, flatten, a linear layer to 10 classes.

Cross-entropy, batch 100, ≤ 200 epochs, Adam (ε 1e-7); ``ReduceLROnPlateau(×0.1, patience 15)``
and ``EarlyStopping(patience 30)`` on validation accuracy.

``--protocol tuned`` (default): every method at every learning rate of ``--lrs`` (default
1e-3 … 0.3), the learning rate chosen per method on validation accuracy, reported beside the
paper's rule and matched learning rates (``tuned.py``'s Note [Which learning rate is compared]),
one JSON per seed. ``--protocol fixed``: the paper's rule only (lr 0.1 GmP / 0.01 others).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from . import common as C
from . import tuned as TU

NAME = "mnist1d"
TITLE = "MNIST-1D classification (external check, not in the paper)"
DEFAULT_SEEDS = "5"
MODELS = ("mlp", "cnn")


def add_arguments(p) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="mlp,cnn")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 200; quick 3)")
    add_protocol_arguments(p)


def add_protocol_arguments(p) -> None:
    p.add_argument(
        "--protocol",
        choices=["tuned", "fixed"],
        default="tuned",
        help="tuned (default): a learning-rate grid per method; fixed: the paper's rule",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="tuned: comma-separated grid (default 0.001,0.003,0.01,0.03,0.1,0.3; quick 0.01,0.1)",
    )


def load_mnist1d(quick: bool = False):
    """``(x_train, y_train, x_test, y_test)`` from the mnist1d generator (no download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise C.DataMissing(
            f"mnist1d: the 'mnist1d' package is not installed (pip install mnist1d). Got: {e}"
        ) from None
    a = get_dataset_args()
    if quick:
        a.num_samples = 1000
    d = make_dataset(a)
    return (
        np.asarray(d["x"], dtype=np.float64),
        np.asarray(d["y"], dtype=np.int64),
        np.asarray(d["x_test"], dtype=np.float64),
        np.asarray(d["y_test"], dtype=np.int64),
    )


def cnn(
    method: str, seed: int, *, channels: int = 25, length: int = 40, n_out: int = 10, dtype=torch.float64
) -> nn.Sequential:
    """The mnist1d package's ConvBase layout with Keras' initial values, then ``method``."""
    g = torch.Generator().manual_seed(seed)
    layers: List[nn.Module] = [nn.Unflatten(1, (1, length))]
    hidden = []
    c_in, L = 1, length
    for k in (5, 3, 3):
        hidden.append(str(len(layers)))
        layers.append(C.glorot_(nn.Conv1d(c_in, channels, k, stride=2, padding=1, dtype=dtype), g))
        if method == "BN":
            layers.append(C.bn(channels, dtype))
        layers.append(nn.ReLU())
        c_in, L = channels, (L + 2 - k) // 2 + 1
    layers.append(nn.Flatten())
    layers.append(C.glorot_(nn.Linear(channels * L, n_out, dtype=dtype), g))
    return C.apply_method(nn.Sequential(*layers), method, hidden, str(len(layers) - 1), seed)


def build(model_name: str, method: str, seed: int) -> nn.Module:
    if model_name == "mlp":
        return C.mlp(method, 40, [100, 100], 10, seed)
    return cnn(method, seed)


def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).to(torch.float64).mean())


def make_split(data, seed: int, val_fraction: float = 0.1):
    x, y, xt, yt = data
    fit_idx, val_idx = C.carve_validation(np.arange(len(x)), val_fraction, seed)
    mean, std = x.mean(), x.std()
    t = lambda a, b: (torch.as_tensor((a - mean) / std, dtype=torch.float64), torch.as_tensor(b))  # noqa: E731
    return t(x[fit_idx], y[fit_idx]), t(x[val_idx], y[val_idx]), t(xt, yt)


def train_one(
    data,
    model_name: str,
    method: str,
    seed: int,
    *,
    lr=None,
    epochs: int = 200,
    schedule: bool = True,
    progress=None,
    optimizer: str = "adam",
    observe=None,
) -> dict:
    """One run; ``schedule=False``: constant learning rate, no early stopping, the final iterate.
    ``observe(model)`` returns an ``on_step`` callback for :func:`common.fit` (e.g. a rotation meter)."""
    fit, val, test = make_split(data, seed)
    model = build(model_name, method, seed)
    cfg = C.FitConfig(
        lr=C.paper_lr(method) if lr is None else lr,
        epochs=epochs,
        batch_size=100,
        mode="max",
        patience=30 if schedule else None,
        plateau_patience=15 if schedule else None,
        optimizer=optimizer,
    )
    res = C.fit(
        model,
        fit,
        loss_fn=nn.functional.cross_entropy,
        cfg=cfg,
        seed=seed,
        monitor=lambda m, _: accuracy(m, *val),
        progress=progress,
        on_step=None if observe is None else observe(model),
    )
    with torch.no_grad():
        acc = accuracy(model, *test) if not res.nonfinite or res.restored else float("nan")
    return dict(seed=seed, test_acc=acc, val_acc=res.best_monitored, epochs=res.epochs, nonfinite=res.nonfinite)


def run(args) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"mnist1d: --models takes a subset of {','.join(MODELS)}. Got: {args.models!r}")
    data = load_mnist1d(args.quick)
    epochs = args.epochs or (3 if args.quick else 200)
    methods, seeds = args.methods, args.seeds
    if args.protocol == "tuned":
        config = dict(
            protocol="tuned", epochs=epochs, models=models, n_train=len(data[0]), n_test=len(data[2]), optimizer="adam"
        )
        return TU.run_tuned(
            args,
            NAME,
            models,
            lambda u, m, s, lr: train_one(data, u, m, s, lr=lr, epochs=epochs),
            config,
            tuned_summary,
        )
    results = {mod: {m: [] for m in methods} for mod in models}
    bar = C.progress_bar(len(models) * len(methods) * len(seeds), "mnist1d", args.quiet)
    for mod in models:
        for seed in seeds:
            for method in methods:
                bar.set_description(f"mnist1d {mod} {method} seed {seed}", refresh=False)
                results[mod][method].append(train_one(data, mod, method, seed, epochs=epochs, progress=bar))
                bar.update(1)
    bar.close()
    config = dict(epochs=epochs, models=models, n_train=len(data[0]), n_test=len(data[2]))
    tables, notes = summarize(results, seeds, config)
    return dict(table=tables[0], notes=notes, files=[], results=results, config=config)


def summarize(results, seeds, config):
    """``(tables, notes)`` from ``results[model][method]`` (also merged from several runs)."""
    header = [
        "model",
        "method",
        "lr",
        f"test accuracy (mean ± std, {len(seeds)} seeds)",
        "wins / losses vs SP (p)",
        "epochs",
    ]
    rows = []
    for mod in config["models"]:
        methods = [m for m in C.METHODS if m in results[mod]]
        for m in methods:
            acc = [r["test_acc"] for r in results[mod][m]]
            wins = (
                C.wins_cell(acc, [r["test_acc"] for r in results[mod]["SP"]], "max")
                if m != "SP" and "SP" in methods
                else "—"
            )
            rows.append(
                [
                    mod,
                    C.LABELS[m],
                    f"{C.paper_lr(m):g}",
                    C.fmt_mean_std(acc, 3),
                    wins,
                    f"{np.mean([r['epochs'] for r in results[mod][m]]):.0f}",
                ]
            )
    notes = (
        f"MNIST-1D default dataset ({config['n_train']} train, 10 % held out for validation; {config['n_test']} test), batch 100, ≤{config['epochs']} epochs, "
        "float64, Adam (ε 1e-7), plateau ×0.1 after 15 and early stop after 30 epochs on validation accuracy."
    )
    return [C.markdown_table(header, rows)], notes


METRIC = TU.Metric(
    test="test_acc",
    val="val_acc",
    mode="max",
    kind="diff",
    scale=100.0,
    digits=3,
    effect_digits=1,
    label="test accuracy",
)
UNIT_TITLE = {"mlp": "MNIST-1D MLP (40-100-100-10)", "cnn": "MNIST-1D CNN (3 conv layers of 25 channels)"}


def tuned_summary(results, seeds, config):
    tables = []
    for u in config["models"]:
        tables.append(
            "\n".join(TU.summarize_unit(UNIT_TITLE[u], results[u], seeds, METRIC, C.METHODS, C.LABELS, C.paper_lr))
        )
    notes = (
        f"MNIST-1D default dataset ({config['n_train']} train, 10 % held out for validation; {config['n_test']} test), batch 100, ≤{config['epochs']} epochs, "
        "float64, Adam (ε 1e-7), plateau ×0.1 after 15 and early stop after 30 epochs on validation accuracy; the learning rate is chosen on "
        "validation accuracy only (Note [Which learning rate is compared])."
    )
    return tables, notes
