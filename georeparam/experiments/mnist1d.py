r"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package (no download).

The dataset is the package's default (``get_dataset_args()``: 4,000 train / 1,000 test sequences of
length 40, 10 classes, generator seed 42). Per seed, 10 % of the training set is held out for
validation; inputs are standardized with training statistics. Two models:

* ``mlp``: 40 → 100 → 100 → 10, ReLU;
* ``cnn``: the package's small 1-D CNN — three Conv1d layers of 25 channels (kernels 5, 3, 3,
  stride 2) with ReLU, then a linear layer to 10 classes.

Cross-entropy, batch 100, Adam with lr 0.1 (GmP variants) / 0.01 (others), up to 200 epochs;
learning rate ×0.1 after 15 epochs without a better validation accuracy, early stopping after 30
(best weights restored). Reported: test accuracy, and the optimizer steps until the test accuracy
first reaches 90 % of the best mean test accuracy any method reached with that model (measured
every epoch; an observer, it never steers training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import common as C

NAME = "mnist1d"
TITLE = "MNIST-1D classification"
DEFAULT_SEEDS = "5"
MODELS = ("mlp", "cnn")


def add_arguments(p) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="mlp,cnn")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 200; quick 4)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--target", type=float, default=0.9, help="steps-to-target threshold, a fraction of the best mean accuracy")


def load_mnist1d(quick: bool = False):
    """``(x_train, y_train, x_test, y_test)`` numpy arrays from the mnist1d generator."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - the bench extra installs it
        raise C.DataMissing(f"mnist1d: the 'mnist1d' package is not installed (pip install mnist1d). Got: {e}") from None
    a = get_dataset_args()
    if quick:
        a.num_samples = 1000
    d = make_dataset(a)
    return (np.asarray(d["x"], dtype=np.float64), np.asarray(d["y"], dtype=np.int64),
            np.asarray(d["x_test"], dtype=np.float64), np.asarray(d["y_test"], dtype=np.int64))


def mlp(*, bn: bool = False, n_in: int = 40, width: int = 100, n_out: int = 10):
    return C.mlp(n_in, [width, width], n_out, bn=bn)


def cnn(*, bn: bool = False, channels: int = 25, length: int = 40, n_out: int = 10):
    """The mnist1d package's ConvBase layout: three Conv1d + ReLU, flatten, linear."""
    layers = [nn.Unflatten(1, (1, length))]
    hidden = []
    c_in, L = 1, length
    for k in (5, 3, 3):
        hidden.append(str(len(layers)))
        layers.append(nn.Conv1d(c_in, channels, k, stride=2, padding=1))
        if bn:
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.ReLU())
        c_in, L = channels, (L + 2 - k) // 2 + 1
    layers.append(nn.Flatten())
    out = str(len(layers))
    layers.append(nn.Linear(channels * L, n_out))
    return nn.Sequential(*layers), hidden, out


BUILDERS = {"mlp": mlp, "cnn": cnn}


def make_split(x, y, x_test, y_test, seed: int, val_fraction: float = 0.1):
    fit_idx, val_idx = C.split_indices(len(x), [1 - val_fraction, val_fraction], seed)
    mean, std = x.mean(), x.std()
    f = lambda a: (a - mean) / std  # noqa: E731 - one scalar scale: the sequences share units
    return dict(train=(f(x[fit_idx]), y[fit_idx]), val=(f(x[val_idx]), y[val_idx]), test=(f(x_test), y_test))


def _t(pair, device):
    return torch.as_tensor(pair[0], dtype=torch.float32, device=device), torch.as_tensor(pair[1], dtype=torch.long, device=device)


def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train_one(data, model_name: str, method: str, seed: int, *, lr: float, epochs: int, batch_size: int = 100, val_fraction: float = 0.1,
              device="cpu", patience=30, plateau=15, progress=None, constant_lr=False) -> dict:
    s = make_split(*data, seed, val_fraction)
    train, val, test = _t(s["train"], device), _t(s["val"], device), _t(s["test"], device)
    model = C.build(BUILDERS[model_name], method, seed).to(device)
    cfg = C.FitConfig(lr=lr, max_epochs=epochs, batch_size=batch_size, monitor="val", mode="max",
                      patience=None if constant_lr else patience, plateau_patience=None if constant_lr else plateau,
                      restore_best=not constant_lr)
    curve = []
    res = C.fit(model, train, val, loss_fn=nn.functional.cross_entropy, score_fn=accuracy, cfg=cfg, seed=seed,
                on_eval=lambda ep, st, m: curve.append((st, accuracy(m, *test))), progress=progress)
    with torch.no_grad():
        acc = accuracy(model, *test) if not res.diverged or res.restored else float("nan")
    return dict(seed=seed, test_acc=acc, val_acc=res.best_monitored, epochs=res.epochs, steps=res.steps, diverged=res.diverged, curve=curve)


def steps_to(curve, target: float):
    """First step whose accuracy reaches ``target`` (``None`` if never).

    >>> steps_to([(10, 0.5), (20, 0.8), (30, 0.9)], 0.75)
    20
    """
    for step, acc in curve:
        if acc >= target:
            return step
    return None


def run(args) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"mnist1d: --models takes a subset of {','.join(MODELS)}. Got: {args.models!r}")
    data = load_mnist1d(args.quick)
    epochs = args.epochs or (4 if args.quick else 200)
    patience, plateau = (30, 15) if not args.quick else (3, 2)
    methods, seeds = args.methods, args.seeds
    results = {mod: {m: [] for m in methods} for mod in models}
    bar = C.progress_bar(len(models) * len(methods) * len(seeds), "mnist1d", args.quiet)
    for mod in models:
        for seed in seeds:
            for method in methods:
                bar.set_description(f"mnist1d {mod} {method} seed {seed}")
                results[mod][method].append(train_one(data, mod, method, seed, lr=C.paper_lr(method), epochs=epochs, batch_size=args.batch_size,
                                                      val_fraction=args.val_fraction, device=args.device, patience=patience, plateau=plateau, progress=bar))
                bar.update(1)
    bar.close()

    header = ["model", "method", "lr", f"test accuracy (mean ± std, {len(seeds)} seeds)", f"steps to {args.target:.0%} of best", "epochs run"]
    rows, targets = [], {}
    for mod in models:
        best = max(C.mean_std([r["test_acc"] for r in results[mod][m]])[0] for m in methods)
        targets[mod] = args.target * best
        block, vals = [], []
        for m in methods:
            r = results[mod][m]
            st = [steps_to(d["curve"], targets[mod]) for d in r]
            reached = [s for s in st if s is not None]
            st_txt = C.fmt_mean_std(reached, 0) if reached else "never"
            if reached and len(reached) < len(st):
                st_txt += f" ({len(reached)}/{len(st)} reached)"
            for d, s in zip(r, st):
                d["steps_to_target"] = s
            block.append([mod, m, f"{C.paper_lr(m):g}", C.fmt_mean_std([d["test_acc"] for d in r], 3), st_txt, f"{np.mean([d['epochs'] for d in r]):.0f}"])
            vals.append([None, None, None, C.mean_std([d["test_acc"] for d in r])[0], None, None])
        C.bold_best(block, vals, 3, "max")
        rows += block
    files = []
    if not args.no_plots:
        files.append(_plot(results, models, methods, targets, Path(args.out) / "mnist1d_curves.png"))
    notes = (
        f"MNIST-1D default dataset (4,000 train / 1,000 test; {args.val_fraction:.0%} of train for validation), {len(seeds)} seeds, batch {args.batch_size}, "
        f"≤{epochs} epochs, plateau ×0.1 after {plateau} and early stop after {patience} epochs on validation accuracy. "
        f"Steps-to-target: first evaluation (every epoch) where the test accuracy reaches "
        + ", ".join(f"{targets[m]:.3f} ({m})" for m in models) + f" = {args.target:.0%} of the best mean test accuracy of that model."
    )
    return dict(table=C.markdown_table(header, rows), notes=notes, files=files, results=results)


def _plot(results, models, methods, targets, path: Path) -> Path:
    plt = C.matplotlib_pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.2), squeeze=False)
    for ax, mod in zip(axes[0], models):
        for m in methods:
            curves = [d["curve"] for d in results[mod][m] if d["curve"]]
            if not curves:
                continue
            # runs stop early at different epochs: hold each one's last value to the longest run
            longest = max(curves, key=len)
            steps = np.array([s for s, _ in longest])
            accs = np.array([[a for _, a in c] + [c[-1][1]] * (len(longest) - len(c)) for c in curves])
            ax.plot(steps, accs.mean(0), lw=1.2, label=m)
        ax.axhline(targets[mod], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"MNIST-1D {mod.upper()} (mean over seeds; dotted = target)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return C.savefig(fig, path, dpi=80)
