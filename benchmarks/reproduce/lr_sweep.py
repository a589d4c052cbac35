r"""Learning-rate sweep (not in the paper): does GmP stay usable where the others fail?

Every method at every learning rate of ``--lrs`` on one UCI dataset (``--dataset``, default
concrete: the UCI protocol's model, split, raw targets and batch) and on MNIST-1D with the MLP.
To measure stability rather than what a schedule rescues, the learning rate is constant, nothing
stops early, and the metric is the *final* iterate's: test RMSE after ``--uci-epochs`` epochs,
test accuracy after ``--mnist-epochs``. A run whose loss becomes non-finite is marked † and left
out of its cell's mean.

``--optimizers adam,sgd`` (default both): Adam (ε 1e-7) and SGD with momentum 0.9 (the paper's
deep-net optimizer, where it makes its high-learning-rate claim). Every run also records the
**per-step direction rotation** of each hidden unit — the angle between ``w/‖w‖`` before and
after an optimizer step, ``2·asin(‖u′ − u‖/2)`` (exact for small angles) — pooled over units
and steps as a median and 90th percentile: the paper's mechanism is that GmP turns directions
by bounded angles. One JSON per seed (``tuned.py``'s Note [Per-seed result files]).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import common as C
from . import mnist1d as M
from . import tuned as TU
from . import uci as U

NAME = "lr-sweep"
TITLE = "Learning-rate sweep (constant lr, final iterate; not in the paper)"
DEFAULT_SEEDS = "5"
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
QUICK_LRS = (1e-3, 0.1, 1.0)


def add_arguments(p) -> None:
    p.add_argument(
        "--lrs",
        default=None,
        help=f"comma-separated (default {','.join(f'{x:g}' for x in LRS)}; quick {','.join(f'{x:g}' for x in QUICK_LRS)})",
    )
    p.add_argument("--dataset", default="concrete", help="the UCI dataset")
    p.add_argument("--uci-epochs", type=int, default=None, help="default 1000; quick 20")
    p.add_argument("--mnist-epochs", type=int, default=None, help="default 30; quick 1")
    p.add_argument("--tasks", default="uci,mnist1d", help="uci,mnist1d")
    p.add_argument("--optimizers", default="adam,sgd", help="adam,sgd (SGD: momentum 0.9)")


class Rotation:
    """Per-step direction rotation of every hidden unit of ``model`` (each Linear/Conv but the
    last), pooled: ``on_step`` after every optimizer step; :meth:`summary` = (median, p90) in rad."""

    def __init__(self, model: nn.Module):
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        self.layers = layers[:-1]
        self.prev = [self._dirs(m) for m in self.layers]
        self.angles = []

    @staticmethod
    def _dirs(layer) -> torch.Tensor:
        w = layer.weight.detach().flatten(1).to(torch.float64)
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def __call__(self, model) -> None:
        for i, m in enumerate(self.layers):
            u = self._dirs(m)
            self.angles.append(
                (2.0 * torch.asin(((u - self.prev[i]).norm(dim=1) / 2.0).clamp(max=1.0))).numpy().astype(np.float32)
            )
            self.prev[i] = u

    def summary(self):
        if not self.angles:
            return math.nan, math.nan
        a = np.concatenate(self.angles)
        a = a[np.isfinite(a)]
        return (float(np.median(a)), float(np.quantile(a, 0.9))) if a.size else (math.nan, math.nan)


def _cell(runs, key, digits):
    ok = [r[key] for r in runs if not r["nonfinite"] and math.isfinite(r[key])]
    bad = len(runs) - len(ok)
    if not ok:
        return "diverged" if bad else "n/a", math.nan
    return C.fmt_mean_std(ok, digits) + (f" †{bad}" if bad else ""), C.mean_std(ok)[0]


def train_one(
    task: str, data, method: str, seed: int, lr: float, optimizer: str, *, uci_epochs: int, mnist_epochs: int
) -> dict:
    """One constant-lr run of ``task`` with the rotation recorded; the final iterate's test metric."""
    rot = {}

    def observe(model):
        rot["r"] = Rotation(model)
        return rot["r"]

    if task == "uci":
        r = U.train_one(
            *data, method, seed, lr=lr, epochs=uci_epochs, schedule=False, optimizer=optimizer, observe=observe
        )
    else:
        r = M.train_one(
            data, "mlp", method, seed, lr=lr, epochs=mnist_epochs, schedule=False, optimizer=optimizer, observe=observe
        )
    med, p90 = rot["r"].summary()
    return dict(r, rot_median=med, rot_p90=p90, optimizer=optimizer)


def run(args) -> dict:
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(QUICK_LRS if args.quick else LRS)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not optimizers or any(o not in ("adam", "sgd") for o in optimizers):
        raise SystemExit(f"lr-sweep: --optimizers takes a subset of adam,sgd. Got: {args.optimizers!r}")
    methods, seeds = args.methods, args.seeds
    uci_epochs = args.uci_epochs or (20 if args.quick else 1000)
    mnist_epochs = args.mnist_epochs or (1 if args.quick else 30)
    todo, skipped = {}, []
    if "uci" in tasks:
        try:
            todo["uci"] = U.load_uci(args.dataset, args.data_dir)
        except C.DataMissing as e:
            skipped.append(str(e))
    if "mnist1d" in tasks:
        try:
            todo["mnist1d"] = M.load_mnist1d(args.quick)
        except C.DataMissing as e:
            skipped.append(str(e))
    if not todo:
        raise C.DataMissing("lr-sweep: nothing to run. " + "; ".join(skipped))
    units = [f"{t}/{o}" for t in todo for o in optimizers]
    config = dict(
        lrs=lrs,
        uci_epochs=uci_epochs,
        mnist_epochs=mnist_epochs,
        dataset=args.dataset,
        tasks=list(todo),
        optimizers=optimizers,
    )
    bar = C.progress_bar(len(units) * len(methods) * len(lrs) * len(seeds), "lr-sweep", args.quiet)

    def train(unit, method, seed, lr):
        task, opt = unit.split("/")
        return train_one(task, todo[task], method, seed, lr, opt, uci_epochs=uci_epochs, mnist_epochs=mnist_epochs)

    results = TU.run_grid(
        name=NAME,
        units=units,
        methods=methods,
        seeds=seeds,
        lrs=lrs,
        train=train,
        out=args.out,
        command=args.command,
        config=config,
        bar=bar,
    )
    bar.close()
    tables, notes = summarize(results, seeds, config)
    notes += f" Skipped: {'; '.join(s.rstrip('.') for s in skipped)}." if skipped else ""
    files = [] if args.no_plots else [plot(results, config, Path(args.out) / "lr_sweep.png")]
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=files, results=results, config=config)


OPT_TEXT = {"adam": "Adam (ε 1e-7)", "sgd": "SGD, momentum 0.9"}


def _units(config):
    return [f"{t}/{o}" for t in config["tasks"] for o in config.get("optimizers", ["adam"])]


def summarize(results, seeds, config):
    """``(tables, notes)`` from ``results[task/optimizer][method][lr]`` (the per-seed files merged)."""
    tables = []
    keys = [TU.lr_key(x) for x in config["lrs"]]
    for unit in _units(config):
        if unit not in results:
            continue
        task, opt = unit.split("/")
        key = "rmse" if task == "uci" else "test_acc"
        label = (
            f"UCI {config['dataset']} (raw targets): final test RMSE"
            if task == "uci"
            else "MNIST-1D MLP: final test accuracy"
        )
        res = results[unit]
        rows = [[C.LABELS[m]] + [_cell(res[m].get(k, []), key, 3)[0] for k in keys] for m in C.METHODS if m in res]
        rot = []
        for m in [m for m in C.METHODS if m in res]:
            cells = [C.LABELS[m]]
            for k in keys:
                runs = res[m].get(k, [])
                med = [r["rot_median"] for r in runs if math.isfinite(r.get("rot_median", math.nan))]
                p90 = [r["rot_p90"] for r in runs if math.isfinite(r.get("rot_p90", math.nan))]
                cells.append(f"{np.mean(med):.3g} / {np.mean(p90):.3g}" if med else "n/a")
            rot.append(cells)
        header = ["method \\ lr"] + keys
        tables.append(
            f"{label} — {OPT_TEXT[opt]} (mean ± std over {len(seeds)} seeds; †k: k seeds with a non-finite loss, left out):\n\n"
            + C.markdown_table(header, rows)
        )
        tables.append(
            f"{label.split(':')[0]} — {OPT_TEXT[opt]}: per-step direction rotation of the hidden units, median / 90th percentile "
            f"(rad; pooled over units and steps, averaged over seeds):\n\n" + C.markdown_table(header, rot)
        )
    notes = (
        f"Constant learning rate, no early stopping, final iterate, float64; UCI {config['dataset']}: {config['uci_epochs']} epochs (batch 1024), "
        f"MNIST-1D MLP: {config['mnist_epochs']} epochs (batch 100). Optimizers: {', '.join(OPT_TEXT[o] for o in config.get('optimizers', ['adam']))}."
    )
    return tables, notes


def _runs(per_lr: dict, lr: float):
    return per_lr[lr] if lr in per_lr else per_lr[str(lr)]


def plot(results, config, path: Path) -> Path:
    plt = C.pyplot()
    units = [u for u in _units(config) if u in results]
    fig, axes = plt.subplots(1, len(units), figsize=(4.2 * len(units), 3.3), squeeze=False)
    lrs = config["lrs"]
    for ax, unit in zip(axes[0], units):
        task, opt = unit.split("/")
        key = "rmse" if task == "uci" else "test_acc"
        for i, m in enumerate([m for m in C.METHODS if m in results[unit]]):
            per = results[unit][m]
            means = [_cell(per.get(TU.lr_key(lr), []), key, 3)[1] for lr in lrs]
            line = ax.plot(lrs, means, "o-", ms=3, lw=1.2, label=C.LABELS[m])[0]
            bad = [lr for lr in lrs if any(r["nonfinite"] for r in per.get(TU.lr_key(lr), []))]
            if bad:
                ax.plot(
                    bad,
                    [1.0 - 0.03 * i] * len(bad),
                    "x",
                    color=line.get_color(),
                    ms=7,
                    mew=1.5,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                )
        ax.set_xscale("log")
        if task == "uci":
            ax.set_yscale("log")
        ax.set_xlabel(f"learning rate ({opt}, constant)")
        ax.set_ylabel("final test RMSE" if task == "uci" else "final test accuracy")
        ax.set_title(f"UCI {config['dataset']}, {opt}" if task == "uci" else f"MNIST-1D MLP, {opt}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Learning-rate sweep (× at the top: some seeds non-finite)", fontsize=9)
    fig.tight_layout()
    return C.savefig(fig, path)
