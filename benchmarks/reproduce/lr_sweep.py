r"""Learning-rate sweep (not in the paper): does GmP stay usable where the others fail?

Every method at every learning rate of ``--lrs`` on one UCI dataset (``--dataset``, default
concrete: the UCI protocol's model, split, raw targets and batch) and on MNIST-1D with the MLP.
To measure stability rather than what a schedule rescues, the learning rate is constant, nothing
stops early, and the metric is the *final* iterate's: test RMSE after ``--uci-epochs`` epochs,
test accuracy after ``--mnist-epochs``. A run whose loss becomes non-finite is marked † and left
out of its cell's mean.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import common as C
from . import mnist1d as M
from . import uci as U

NAME = "lr-sweep"
TITLE = "Learning-rate sweep (constant lr, final iterate; not in the paper)"
DEFAULT_SEEDS = "3"
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
QUICK_LRS = (1e-3, 0.1, 1.0)


def add_arguments(p) -> None:
    p.add_argument("--lrs", default=None, help=f"comma-separated (default {','.join(f'{x:g}' for x in LRS)}; quick {','.join(f'{x:g}' for x in QUICK_LRS)})")
    p.add_argument("--dataset", default="concrete", help="the UCI dataset")
    p.add_argument("--uci-epochs", type=int, default=None, help="default 1000; quick 20")
    p.add_argument("--mnist-epochs", type=int, default=None, help="default 30; quick 1")
    p.add_argument("--tasks", default="uci,mnist1d", help="uci,mnist1d")


def _cell(runs, key, digits):
    ok = [r[key] for r in runs if not r["nonfinite"] and math.isfinite(r[key])]
    bad = len(runs) - len(ok)
    if not ok:
        return "diverged" if bad else "n/a", math.nan
    return C.fmt_mean_std(ok, digits) + (f" †{bad}" if bad else ""), C.mean_std(ok)[0]


def run(args) -> dict:
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else list(QUICK_LRS if args.quick else LRS)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
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
    results = {t: {m: {lr: [] for lr in lrs} for m in methods} for t in todo}
    bar = C.progress_bar(len(todo) * len(methods) * len(lrs) * len(seeds), "lr-sweep", args.quiet)
    for task, data in todo.items():
        for method in methods:
            for lr in lrs:
                for seed in seeds:
                    bar.set_description(f"lr-sweep {task} {method} lr={lr:g} seed {seed}", refresh=False)
                    if task == "uci":
                        r = U.train_one(*data, method, seed, lr=lr, epochs=uci_epochs, schedule=False, progress=bar)
                    else:
                        r = M.train_one(data, "mlp", method, seed, lr=lr, epochs=mnist_epochs, schedule=False, progress=bar)
                    results[task][method][lr].append(dict(r, lr=lr))
                    bar.update(1)
    bar.close()
    config = dict(lrs=lrs, uci_epochs=uci_epochs, mnist_epochs=mnist_epochs, dataset=args.dataset, tasks=list(todo))
    tables, notes = summarize(results, seeds, config)
    notes += f" Skipped: {'; '.join(skipped)}." if skipped else ""
    files = [] if args.no_plots else [plot(results, lrs, list(todo), args.dataset, Path(args.out) / "lr_sweep.png")]
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=files, results=results, config=config)


def summarize(results, seeds, config):
    """``(tables, notes)`` from ``results[task][method][lr]`` (also merged from several runs;
    JSON turns the learning rates into strings, hence ``_runs``)."""
    tables = []
    for task in config["tasks"]:
        key = "rmse" if task == "uci" else "test_acc"
        label = f"UCI {config['dataset']} (raw targets): final test RMSE" if task == "uci" else "MNIST-1D MLP: final test accuracy"
        rows = [[C.LABELS[m]] + [_cell(_runs(results[task][m], lr), key, 3)[0] for lr in config["lrs"]] for m in C.METHODS if m in results[task]]
        tables.append(f"{label} (mean ± std over {len(seeds)} seeds; †k: k seeds with a non-finite loss, left out):\n\n"
                      + C.markdown_table(["method \\ lr"] + [f"{lr:g}" for lr in config["lrs"]], rows))
    notes = (f"Constant learning rate (Adam, ε 1e-7), no early stopping, final iterate, float64; UCI {config['dataset']}: {config['uci_epochs']} epochs (batch 1024), "
             f"MNIST-1D MLP: {config['mnist_epochs']} epochs (batch 100).")
    return tables, notes


def _runs(per_lr: dict, lr: float):
    return per_lr[lr] if lr in per_lr else per_lr[str(lr)]


def plot(results, lrs, tasks, dataset, path: Path) -> Path:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = "rmse" if task == "uci" else "test_acc"
        for i, m in enumerate([m for m in C.METHODS if m in results[task]]):
            means = [_cell(_runs(results[task][m], lr), key, 3)[1] for lr in lrs]
            line = ax.plot(lrs, means, "o-", ms=3, lw=1.2, label=C.LABELS[m])[0]
            bad = [lr for lr in lrs if any(r["nonfinite"] for r in _runs(results[task][m], lr))]
            if bad:
                ax.plot(bad, [1.0 - 0.03 * i] * len(bad), "x", color=line.get_color(), ms=7, mew=1.5, transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xscale("log")
        if task == "uci":
            ax.set_yscale("log")
        ax.set_xlabel("learning rate (Adam, constant)")
        ax.set_ylabel("final test RMSE" if task == "uci" else "final test accuracy")
        ax.set_title(f"UCI {dataset}" if task == "uci" else "MNIST-1D MLP", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Learning-rate sweep (× at the top: some seeds non-finite)", fontsize=9)
    fig.tight_layout()
    return C.savefig(fig, path)
