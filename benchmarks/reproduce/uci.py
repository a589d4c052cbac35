r"""UCI regression as ``uci_regression/uci_regression.py`` runs it: 100 ReLU units, test RMSE.

Per seed: ``train_test_split(test_size=0.2, random_state=seed)`` (reproduced exactly, no sklearn
needed), features normalized with the training part's statistics (Keras ``Normalization``),
**raw targets** (``--targets standardized`` is the sensitivity variant: targets scaled by the
training part's mean/std, RMSE still in original units), MAE loss, batch 1,024, ≤ 5,000 epochs,
Adam (lr 0.1 GmP / 0.01 others, ε = 1e-7), float64; ``ReduceLROnPlateau(×0.1, patience 50,
min_delta 1e-4)`` and ``EarlyStopping(patience 100, restore_best_weights)`` on the MSE of the
monitored split. Monitored split (``--monitor``): ``val`` (default) — 10 % of the training part
held out, the model trains on the other 90 %; ``test`` — the official script's choice, the test
split itself, training on the whole training part.

Data: the standard UCI regression files ``uci/<name>/data.txt`` with ``index_features.txt`` and
``index_target.txt``. The official script downloads its own copies (boston from Keras, energy's
``Y1``, naval's column 16, red wine); kin8nm is not in the paper and is run as an extra set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import common as C
from . import tuned as TU

NAME = "uci"
TITLE = "UCI regression (test RMSE, official protocol)"
DEFAULT_SEEDS = "10"
DATASETS = ("boston", "concrete", "energy", "kin8nm", "naval", "power", "wine", "yacht")
QUICK_DATASETS = ("yacht",)


def add_arguments(p) -> None:
    p.add_argument(
        "--datasets",
        default=None,
        help=f"comma-separated (default {','.join(DATASETS)}; quick: {','.join(QUICK_DATASETS)})",
    )
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 5000; quick 40)")
    p.add_argument(
        "--targets", choices=["raw", "standardized"], default="raw", help="raw (official) or standardized targets"
    )
    p.add_argument(
        "--monitor",
        choices=["val", "test"],
        default="val",
        help="split read by early stopping / plateau: val (default) or test (the official script's, optimistic)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="with --monitor val: fraction of the training part held out"
    )
    p.add_argument(
        "--protocol",
        choices=["fixed", "tuned"],
        default="fixed",
        help="fixed (default): the paper's rule; tuned: every method over --lrs, chosen on the validation MSE (needs --monitor val)",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="tuned: comma-separated grid (default 0.001,0.003,0.01,0.03,0.1,0.3; quick 0.01,0.1); "
        "--lrs 0.01,0.1 gives the paper's rule and both matched-lr controls",
    )


def load_uci(name: str, data_dir=None):
    """``(X, y)`` float64 arrays of UCI dataset ``name``."""
    path = C.find_data(C.data_root(data_dir), f"uci/{name}", "data.txt", f"uci/{name}")
    folder = path.parent
    data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    feats = np.loadtxt(folder / "index_features.txt", dtype=np.int64, ndmin=1)
    target = np.loadtxt(folder / "index_target.txt", dtype=np.int64, ndmin=1)
    if target.size != 1 or feats.size == 0 or max(feats.max(), target.max()) >= data.shape[1]:
        raise ValueError(
            f"{folder}: index files do not fit data.txt ({data.shape[1]} columns). Got: features {feats.tolist()[:20]}, target {target.tolist()}"
        )
    return data[:, feats], data[:, int(target[0])]


def make_split(X, y, seed: int, *, monitor: str = "val", val_fraction: float = 0.1, targets: str = "raw") -> dict:
    """The official 80/20 split; the fitted rows, the monitored rows and the test rows as float64
    arrays (targets scaled when ``targets='standardized'``), plus the target scale."""
    train_idx, test_idx, fit_idx, mon_idx = C.monitored_split(len(X), seed, monitor, val_fraction)
    norm = C.normalizer(X[train_idx])
    if targets == "raw":
        y_mean, y_std = 0.0, 1.0
    elif targets == "standardized":
        y_mean, y_std = float(y[train_idx].mean()), float(y[train_idx].std())
    else:
        raise ValueError(f"targets must be 'raw' or 'standardized'. Got: {targets!r}")
    scale = lambda v: (v - y_mean) / y_std  # noqa: E731
    return dict(
        fit=(norm(X[fit_idx]), scale(y[fit_idx])),
        monitor=(norm(X[mon_idx]), scale(y[mon_idx])),
        test=(norm(X[test_idx]), y[test_idx]),
        y_mean=y_mean,
        y_std=y_std,
        idx=(fit_idx, mon_idx, test_idx),
    )


def _t(a):
    t = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    return t.reshape(-1, 1) if t.dim() == 1 else t


def train_one(
    X,
    y,
    method: str,
    seed: int,
    *,
    lr=None,
    epochs: int = 5000,
    monitor: str = "val",
    val_fraction: float = 0.1,
    targets: str = "raw",
    schedule: bool = True,
    progress=None,
    optimizer: str = "adam",
    observe=None,
) -> dict:
    """One run; returns the test RMSE in the target's original units and how training went.
    ``schedule=False``: constant learning rate, no early stopping, the final iterate."""
    s = make_split(X, y, seed, monitor=monitor, val_fraction=val_fraction, targets=targets)
    xf, yf = _t(s["fit"][0]), _t(s["fit"][1])
    xm, ym = _t(s["monitor"][0]), _t(s["monitor"][1])
    model = C.mlp(method, X.shape[1], [100], 1, seed)
    cfg = C.FitConfig(
        lr=C.paper_lr(method) if lr is None else lr,
        epochs=epochs,
        batch_size=1024,
        mode="min",
        patience=100 if schedule else None,
        plateau_patience=50 if schedule else None,
        optimizer=optimizer,
    )
    res = C.fit(
        model,
        (xf, yf),
        loss_fn=lambda p, t: (p - t).abs().mean(),
        cfg=cfg,
        seed=seed,
        progress=progress,
        on_step=None if observe is None else observe(model),
        monitor=lambda m, _: float(((m(xm) - ym) ** 2).mean()),
    )
    with torch.no_grad():
        pred = model(_t(s["test"][0])).numpy().ravel() * s["y_std"] + s["y_mean"]
    rmse = float(np.sqrt(np.mean((pred - s["test"][1]) ** 2))) if np.all(np.isfinite(pred)) else math.nan
    return dict(
        seed=seed,
        rmse=rmse,
        val_mse=res.best_monitored,
        epochs=res.epochs,
        steps=res.steps,
        best_epoch=res.best_epoch,
        nonfinite=res.nonfinite,
        stopped_early=res.stopped_early,
        final_lr=res.history["lr"][-1] if res.history["lr"] else math.nan,
    )


def run(args) -> dict:
    names = [
        d.strip()
        for d in (args.datasets or ",".join(QUICK_DATASETS if args.quick else DATASETS)).split(",")
        if d.strip()
    ]
    epochs = args.epochs or (40 if args.quick else 5000)
    loaded, skipped = {}, []
    for name in names:
        try:
            loaded[name] = load_uci(name, args.data_dir)
        except C.DataMissing as e:
            skipped.append(f"{name} ({e})")
    if not loaded:
        raise C.DataMissing("uci: no dataset found. " + "; ".join(skipped))
    methods, seeds = args.methods, args.seeds
    if args.protocol == "tuned":
        if args.monitor != "val":
            raise SystemExit(
                "uci: --protocol tuned chooses the learning rate on the validation split; it needs --monitor val. Got: --monitor test"
            )
        return run_tuned(args, loaded, epochs, skipped)
    results = {m: {d: [] for d in loaded} for m in methods}
    bar = C.progress_bar(len(methods) * len(seeds) * len(loaded), "uci", args.quiet)
    for name, (X, y) in loaded.items():
        for seed in seeds:
            for method in methods:
                bar.set_description(f"uci {name} {method} seed {seed}", refresh=False)
                r = train_one(
                    X,
                    y,
                    method,
                    seed,
                    epochs=epochs,
                    monitor=args.monitor,
                    val_fraction=args.val_fraction,
                    targets=args.targets,
                    progress=bar,
                )
                results[method][name].append(r)
                bar.update(1)
    bar.close()
    config = dict(targets=args.targets, monitor=args.monitor, epochs=epochs, val_fraction=args.val_fraction)
    tables, notes = summarize(results, seeds, config)
    notes += f" Skipped (data absent): {'; '.join(skipped)}." if skipped else ""
    files = [] if args.no_plots else [plot(results, Path(args.out) / "uci_rmse.png")]
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=files, results=results, config=config)


def _layout(results):
    """Methods (in METHODS order) and the datasets every one of them ran."""
    methods = [m for m in C.METHODS if m in results]
    datasets = [d for d in DATASETS if all(d in results[m] for m in methods)]
    datasets += [d for d in results[methods[0]] if d not in datasets and all(d in results[m] for m in methods)]
    return methods, datasets


def summarize(results, seeds, config):
    """``(tables, notes)`` from ``results[method][dataset]`` (also merged from several runs): the
    RMSE table, the paired wins against SP, the epochs run."""
    methods, datasets = _layout(results)
    header = ["method", "lr"] + datasets
    rows = []
    for m in methods:
        cells = [C.LABELS[m], f"{C.paper_lr(m):g}"]
        for d in datasets:
            rm = [r["rmse"] for r in results[m][d]]
            small = np.nanmean(rm) < 0.01 if np.any(np.isfinite(rm)) else False
            cells.append(C.fmt_mean_std(rm, 2 if small else 3, sci=small))
        rows.append(cells)
    tables = [C.markdown_table(header, rows)]
    if "SP" in methods and len(methods) > 1:
        wrows = []
        for m in methods:
            if m == "SP":
                continue
            cells, W, L = [C.LABELS[m]], 0, 0
            for d in datasets:
                w, l, t = C.paired_wins([r["rmse"] for r in results[m][d]], [r["rmse"] for r in results["SP"][d]])
                W, L = W + w, L + l
                cells.append(f"{w}/{w + l + t}" + (f" (p {C.fmt_p(C.sign_test(w, l))})" if w + l else ""))
            cells.append(f"**{W}/{W + L}** (p {C.fmt_p(C.sign_test(W, L))})")
            wrows.append(cells)
        tables.append(
            "Paired wins against SP (lower test RMSE on the same seed), per dataset and overall, with the two-sided sign-test p-value:\n\n"
            + C.markdown_table(["method"] + datasets + ["all"], wrows)
        )
    erows = [
        [C.LABELS[m]] + [f"{np.mean([r['epochs'] for r in results[m][d]]):.0f}" for d in datasets] for m in methods
    ]
    tables.append("Epochs run (mean):\n\n" + C.markdown_table(["method"] + datasets, erows))
    monitor = (
        "test split (the official script; optimistic)"
        if config["monitor"] == "test"
        else f"validation split ({config['val_fraction']:.0%} of the training part)"
    )
    notes = (
        f"Targets: **{config['targets']}**. Early stopping / plateau read the **{monitor}**. "
        f"{len(seeds)} seeds (official 80/20 split per seed; all methods of a seed start from the same Glorot draw). "
        "Test RMSE in original units, mean ± sample std; †k: k runs ended with a non-finite loss or prediction. "
        f"≤{config['epochs']} epochs, batch 1024, MAE, Adam (ε 1e-7), float64; plateau ×0.1 after 50, early stop after 100 epochs. "
        "Wins: paired runs (same seed) with a lower test RMSE than SP; p: two-sided exact sign test (ties dropped)."
    )
    return tables, notes


def plot(results, path: Path) -> Path:
    """Per dataset, each method's test RMSE relative to SP's on the same seed (log scale)."""
    methods, datasets = _layout(results)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(1.0 * len(datasets) + 2.5, 3.4))
    ref = "SP" if "SP" in methods else methods[0]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        for j, d in enumerate(datasets):
            ratios = [
                a["rmse"] / b["rmse"]
                for a, b in zip(results[m][d], results[ref][d])
                if math.isfinite(a["rmse"]) and math.isfinite(b["rmse"]) and b["rmse"] > 0
            ]
            xs = np.full(len(ratios), j + (i - (len(methods) - 1) / 2) * width)
            ax.scatter(xs, ratios, s=7, color=f"C{i}", alpha=0.7, label=C.LABELS[m] if j == 0 else None)
            if ratios:
                ax.plot(
                    [xs[0] - width / 2, xs[0] + width / 2], [np.exp(np.mean(np.log(ratios)))] * 2, color=f"C{i}", lw=2
                )
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(datasets)))
    ax.set_xticklabels(datasets)
    ax.set_ylabel(f"test RMSE / {ref}'s (same seed)")
    ax.set_title(
        "UCI: each run's test RMSE relative to SP on the same seed (bar: geometric mean; below 1 = better)", fontsize=8
    )
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return C.savefig(fig, path)


METRIC = TU.Metric(
    test="rmse", val="val_mse", mode="min", kind="logratio", digits=3, effect_digits=3, label="test RMSE"
)


def run_tuned(args, loaded, epochs, skipped) -> dict:
    lrs = TU.parse_lrs(args.lrs, args.quick)
    names = list(loaded)
    config = dict(
        protocol="tuned",
        targets=args.targets,
        monitor="val",
        epochs=epochs,
        val_fraction=args.val_fraction,
        datasets=names,
        lrs=lrs,
        optimizer="adam",
    )

    def train(name, method, seed, lr):
        X, y = loaded[name]
        return train_one(
            X,
            y,
            method,
            seed,
            lr=lr,
            epochs=epochs,
            monitor="val",
            val_fraction=args.val_fraction,
            targets=args.targets,
        )

    out = TU.run_tuned(args, NAME, names, train, config, tuned_summary)
    out["notes"] += f" Skipped (data absent): {'; '.join(skipped)}." if skipped else ""
    return out


def tuned_summary(results, seeds, config):
    names = [d for d in config["datasets"] if d in results]
    tables = [
        "\n".join(
            TU.pooled_table(
                "UCI, pooled over " + ", ".join(names),
                {d: results[d] for d in names},
                METRIC,
                C.METHODS,
                C.LABELS,
                C.paper_lr,
            )
        )
    ]
    for d in names:
        tables.append(
            "\n".join(TU.summarize_unit(f"UCI {d}", results[d], seeds, METRIC, C.METHODS, C.LABELS, C.paper_lr))
        )
    notes = (
        f"Targets: **{config['targets']}**; the learning rate is chosen per method and dataset on the validation MSE "
        f"({config['val_fraction']:.0%} of the training part), never the test split. ≤{config['epochs']} epochs, batch 1024, MAE, Adam (ε 1e-7), "
        "float64; plateau ×0.1 after 50, early stop after 100 epochs. Ratios: geometric mean over seeds of the per-seed RMSE ratio (method / SP), "
        "95 % t interval on the log scale; pooled: the mean over datasets of each dataset's mean log-ratio, 95 % bootstrap interval "
        "resampling seeds within each dataset (every dataset counts once); the pooled sign test counts all pairs."
    )
    return tables, notes
