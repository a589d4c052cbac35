r"""UCI regression: one hidden layer of 100 ReLU units on the standard UCI benchmark files.

Data: ``uci/<name>/data.txt`` with ``index_features.txt`` / ``index_target.txt`` (the files of the
usual UCI regression benchmark). Protocol: per seed, a random 90/10 train/test split (the
standard convention); 10 % of the training part is held out for validation; features and target
are standardized with the training part's statistics; MAE loss, batch 1,024, Adam with lr 0.1
(GmP variants) / 0.01 (others), up to 5,000 epochs; learning rate ×0.1 after 50 epochs without a
lower validation MSE, early stopping after 100 (best weights restored) — the official script's
callbacks, but reading the validation split instead of the test split. Reported: test RMSE in
the target's original units, mean ± std over seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import common as C

NAME = "uci"
TITLE = "UCI regression (test RMSE)"
DEFAULT_SEEDS = "5"
DATASETS = ("boston", "concrete", "energy", "naval", "power", "wine", "yacht")
EXTRA = ("kin8nm",)
QUICK_DATASETS = ("yacht",)


def add_arguments(p) -> None:
    p.add_argument("--datasets", default=None, help=f"comma-separated (default {','.join(DATASETS + EXTRA)}; quick: {','.join(QUICK_DATASETS)})")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 5000; quick 60)")
    p.add_argument("--units", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the training part held out for validation")


def load_uci(name: str, data_dir=None):
    """``(X, y)`` float64 arrays of UCI dataset ``name``."""
    root = C.data_root(data_dir)
    path = C.find_data(root, f"uci/{name}", "data.txt", f"uci/{name}")
    folder = path.parent
    data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    feats = np.loadtxt(folder / "index_features.txt", dtype=np.int64, ndmin=1)
    target = np.loadtxt(folder / "index_target.txt", dtype=np.int64, ndmin=1)
    if target.size != 1 or feats.size == 0 or max(feats.max(), target.max()) >= data.shape[1]:
        raise ValueError(f"{folder}: index files do not fit data.txt ({data.shape[1]} columns). Got: features {feats.tolist()[:20]}, target {target.tolist()}")
    return data[:, feats], data[:, int(target[0])]


def make_split(X: np.ndarray, y: np.ndarray, seed: int, val_fraction: float = 0.1):
    """Random 90/10 train/test, then ``val_fraction`` of train for validation; standardized with
    the training part's (train+val) statistics. Returns a dict of arrays plus ``y_mean``/``y_std``."""
    train_idx, test_idx = C.split_indices(len(X), [0.9, 0.1], seed)
    fit_pos, val_pos = C.split_indices(len(train_idx), [1 - val_fraction, val_fraction], seed + 10_000)
    fit_idx, val_idx = train_idx[fit_pos], train_idx[val_pos]
    _, _, _, xf, xv, xt = C.standardize(X[train_idx], X[fit_idx], X[val_idx], X[test_idx])
    y_mean, y_std, _, yf, yv, yt = C.standardize(y[train_idx], y[fit_idx], y[val_idx], y[test_idx])
    return dict(train=(xf, yf), val=(xv, yv), test=(xt, y[test_idx]), y_mean=float(y_mean), y_std=float(y_std), idx=(fit_idx, val_idx, test_idx))


def _t(a, device):
    t = torch.as_tensor(a, dtype=torch.float32, device=device)
    return t.reshape(-1, 1) if t.dim() == 1 else t


def _mse(model, x, y) -> float:
    return float(((model(x) - y) ** 2).mean())


def train_one(X, y, method: str, seed: int, *, lr: float, epochs: int, units: int = 100, batch_size: int = 1024,
              val_fraction: float = 0.1, device="cpu", patience=100, plateau=50, progress=None, constant_lr=False) -> dict:
    """One run: split, build, train, and the test RMSE in original units."""
    s = make_split(X, y, seed, val_fraction)
    train, val = (_t(s["train"][0], device), _t(s["train"][1], device)), (_t(s["val"][0], device), _t(s["val"][1], device))
    model = C.build(C.mlp, method, seed, n_in=X.shape[1], widths=[units], n_out=1).to(device)
    cfg = C.FitConfig(lr=lr, max_epochs=epochs, batch_size=batch_size, monitor="val", mode="min",
                      patience=None if constant_lr else patience, plateau_patience=None if constant_lr else plateau,
                      restore_best=not constant_lr)
    res = C.fit(model, train, val, loss_fn=lambda p, t: (p - t).abs().mean(), score_fn=_mse, cfg=cfg, seed=seed, progress=progress)
    with torch.no_grad():
        pred = model(_t(s["test"][0], device)).cpu().numpy().ravel().astype(np.float64) * s["y_std"] + s["y_mean"]
    rmse = float(np.sqrt(np.mean((pred - s["test"][1]) ** 2))) if np.all(np.isfinite(pred)) else float("nan")
    return dict(seed=seed, rmse=rmse, epochs=res.epochs, steps=res.steps, best_epoch=res.best_epoch, diverged=res.diverged, val_mse=res.best_monitored)


def run(args) -> dict:
    names = [d.strip() for d in (args.datasets or ",".join(QUICK_DATASETS if args.quick else DATASETS + EXTRA)).split(",") if d.strip()]
    epochs = args.epochs or (60 if args.quick else 5000)
    patience, plateau = (100, 50) if not args.quick else (20, 10)
    loaded, skipped = {}, []
    for name in names:
        try:
            loaded[name] = load_uci(name, args.data_dir)
        except C.DataMissing as e:
            skipped.append(f"{name} ({e})")
    if not loaded:
        raise C.DataMissing("uci: no dataset found. " + "; ".join(skipped))
    methods, seeds = args.methods, args.seeds
    results = {m: {d: [] for d in loaded} for m in methods}
    bar = C.progress_bar(len(methods) * len(seeds) * len(loaded), "uci", args.quiet)
    for name, (X, y) in loaded.items():
        for seed in seeds:
            for method in methods:
                bar.set_description(f"uci {name} {method} seed {seed}")
                r = train_one(X, y, method, seed, lr=C.paper_lr(method), epochs=epochs, units=args.units, batch_size=args.batch_size,
                              val_fraction=args.val_fraction, device=args.device, patience=patience, plateau=plateau, progress=bar)
                results[method][name].append(r)
                bar.update(1)
    bar.close()

    ds = list(loaded)
    header = ["method", "lr"] + [f"{d} (n={len(loaded[d][0])})" for d in ds]
    rows, vals = [], []
    for m in methods:
        cells = [m, f"{C.paper_lr(m):g}"]
        v = [None, None]
        for d in ds:
            rm = [r["rmse"] for r in results[m][d]]
            sci = np.nanmean(rm) < 0.01 if np.any(np.isfinite(rm)) else False
            div = sum(r["diverged"] for r in results[m][d])
            cells.append(C.fmt_mean_std(rm, 2 if sci else 3, sci=sci) + (f" †{div}" if div else ""))
            v.append(C.mean_std(rm)[0])
        rows.append(cells)
        vals.append(v)
    for j in range(2, len(header)):
        C.bold_best(rows, vals, j, "min")
    epochs_rows = [[m] + [f"{np.mean([r['epochs'] for r in results[m][d]]):.0f}" for d in ds] for m in methods]
    epochs_table = "Epochs run (mean; early stopping on validation MSE):\n\n" + C.markdown_table(["method"] + ds, epochs_rows)
    files = []
    if not args.no_plots:
        files.append(_plot(results, methods, ds, Path(args.out) / "uci_rmse.png"))
    notes = (
        f"Test RMSE in original units, mean ± std over {len(seeds)} seeds (random 90/10 train/test split per seed; "
        f"{args.val_fraction:.0%} of train for validation). Bold: lowest mean per dataset. †k: k runs hit a non-finite/exploding loss. "
        f"≤{epochs} epochs, batch {args.batch_size}, plateau ×0.1 after {plateau}, early stop after {patience} epochs."
        + (f" Skipped (data absent): {'; '.join(skipped)}." if skipped else "")
    )
    return dict(table=C.markdown_table(header, rows), extra_tables=[epochs_table], notes=notes, files=files, results=results)


def _plot(results, methods, ds, path: Path) -> Path:
    plt = C.matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(ds) + 2, 3.2))
    width = 0.8 / len(methods)
    ref = "SP" if "SP" in methods else methods[0]
    for i, m in enumerate(methods):
        ratios, errs = [], []
        for d in ds:
            base = C.mean_std([r["rmse"] for r in results[ref][d]])[0]
            mm, ss = C.mean_std([r["rmse"] for r in results[m][d]])
            ratios.append(mm / base)
            errs.append(ss / base)
        ax.bar(np.arange(len(ds)) + (i - (len(methods) - 1) / 2) * width, ratios, width, yerr=errs, label=m, capsize=2)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(ds)))
    ax.set_xticklabels(ds)
    ax.set_ylabel(f"test RMSE / {ref}'s")
    ax.set_title("UCI regression: test RMSE relative to SP (lower is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=len(methods))
    fig.tight_layout()
    return C.savefig(fig, path, dpi=80)
