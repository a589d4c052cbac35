r"""Learning-rate sweep: does GmP stay stable at learning rates where the others fail?

Every method is trained at every learning rate of ``--lrs`` (default 1e-3 … 1.0) on one UCI
dataset (``--dataset``, default concrete; the UCI protocol's model, split and batch) and on
MNIST-1D with the MLP. To measure stability rather than rescue it, the learning rate is held
constant (no plateau decay), there is no early stopping, and the metric is the *final* iterate's:
test RMSE after ``--uci-epochs`` epochs, test accuracy after ``--mnist-epochs`` epochs. A run
*diverges* when its training loss becomes non-finite or exceeds 1,000× its first value; such seeds
are marked † and left out of the cell's mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import common as C
from . import mnist1d as M
from . import uci as U

NAME = "lr-sweep"
TITLE = "Learning-rate sweep (constant lr, final iterate)"
DEFAULT_SEEDS = "3"
QUICK_SEEDS = "1"
QUICK_LRS = (1e-3, 0.1, 1.0)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def add_arguments(p) -> None:
    p.add_argument("--lrs", default=None, help=f"comma-separated (default {','.join(f'{x:g}' for x in LRS)}; quick {','.join(f'{x:g}' for x in QUICK_LRS)})")
    p.add_argument("--dataset", default="concrete", help="the UCI dataset")
    p.add_argument("--uci-epochs", type=int, default=None, help="default 2000; quick 40")
    p.add_argument("--mnist-epochs", type=int, default=None, help="default 50; quick 2")
    p.add_argument("--tasks", default="uci,mnist1d", help="uci,mnist1d")


def _cell(runs, key, digits, sci=False):
    ok = [r[key] for r in runs if not r["diverged"] and math.isfinite(r[key])]
    div = sum(r["diverged"] for r in runs)
    if not ok:
        return "diverged" if div else "n/a", math.nan
    txt = C.fmt_mean_std(ok, digits, sci=sci) + (f" †{div}" if div else "")
    return txt, C.mean_std(ok)[0]


def run(args) -> dict:
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(QUICK_LRS if args.quick else LRS)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods, seeds = args.methods, args.seeds
    uci_epochs = args.uci_epochs or (40 if args.quick else 2000)
    mnist_epochs = args.mnist_epochs or (2 if args.quick else 50)
    todo = {}
    skipped = []
    if "uci" in tasks:
        try:
            todo["uci"] = U.load_uci(args.dataset, args.data_dir)
        except C.DataMissing as e:
            skipped.append(str(e))
    if "mnist1d" in tasks:
        todo["mnist1d"] = M.load_mnist1d(args.quick)
    if not todo:
        raise C.DataMissing("lr-sweep: nothing to run. " + "; ".join(skipped))
    results = {t: {m: {lr: [] for lr in lrs} for m in methods} for t in todo}
    bar = C.progress_bar(len(todo) * len(methods) * len(lrs) * len(seeds), "lr-sweep", args.quiet)
    for task, data in todo.items():
        for method in methods:
            for lr in lrs:
                for seed in seeds:
                    bar.set_description(f"lr-sweep {task} {method} lr={lr:g} seed {seed}")
                    if task == "uci":
                        r = U.train_one(*data, method, seed, lr=lr, epochs=uci_epochs, device=args.device, progress=bar, constant_lr=True)
                    else:
                        r = M.train_one(data, "mlp", method, seed, lr=lr, epochs=mnist_epochs, device=args.device, progress=bar, constant_lr=True)
                        r.pop("curve", None)
                    r["lr"] = lr
                    results[task][method][lr].append(r)
                    bar.update(1)
    bar.close()

    tables = []
    for task in todo:
        key, digits, mode = ("rmse", 3, "min") if task == "uci" else ("test_acc", 3, "max")
        label = f"UCI {args.dataset}: final test RMSE" if task == "uci" else "MNIST-1D MLP: final test accuracy"
        rows, vals = [], []
        for m in methods:
            cells, v = [m], [None]
            for lr in lrs:
                txt, mean = _cell(results[task][m][lr], key, digits)
                cells.append(txt)
                v.append(mean)
            rows.append(cells)
            vals.append(v)
        for j in range(1, len(lrs) + 1):
            C.bold_best(rows, vals, j, mode)
        tables.append(f"{label} (mean ± std over {len(seeds)} seeds; † = seeds that diverged, excluded from the mean):\n\n"
                      + C.markdown_table(["method \\ lr"] + [f"{lr:g}" for lr in lrs], rows))
    files = []
    if not args.no_plots:
        files.append(_plot(results, methods, lrs, list(todo), args.dataset, Path(args.out) / "lr_sweep.png"))
    notes = (
        f"Constant learning rate, no early stopping, final iterate; UCI {args.dataset}: {uci_epochs} epochs (batch 1024), "
        f"MNIST-1D MLP: {mnist_epochs} epochs (batch 100). Bold: best method at each learning rate."
        + (f" Skipped: {'; '.join(skipped)}." if skipped else "")
    )
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=files, results=results)


def _plot(results, methods, lrs, tasks, dataset, path: Path) -> Path:
    plt = C.matplotlib_pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = "rmse" if task == "uci" else "test_acc"
        for i, m in enumerate(methods):
            means, div_lrs = [], []
            for lr in lrs:
                runs = results[task][m][lr]
                ok = [r[key] for r in runs if not r["diverged"] and math.isfinite(r[key])]
                means.append(np.mean(ok) if ok else np.nan)
                if any(r["diverged"] for r in runs):
                    div_lrs.append(lr)
            line = ax.plot(lrs, means, "o-", ms=3, lw=1.2, label=m)[0]
            if div_lrs:
                ax.plot(div_lrs, [1.0 - 0.03 * i] * len(div_lrs), "x", color=line.get_color(), ms=7, mew=1.5,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xscale("log")
        if task == "uci":
            ax.set_yscale("log")
        ax.set_xlabel("learning rate (Adam, constant)")
        ax.set_ylabel("final test RMSE" if task == "uci" else "final test accuracy")
        ax.set_title(f"UCI {dataset}" if task == "uci" else "MNIST-1D MLP", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Learning-rate sweep (× at the top: some seeds diverged)", fontsize=9)
    fig.tight_layout()
    return C.savefig(fig, path, dpi=80)
