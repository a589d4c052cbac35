r"""1-D Levy regression (the paper's Figure on characteristic points): 100 ReLU units fit 50 noisy
samples of the Levy function on [−10, 10].

Protocol (the official notebook's): ``y = levy(x) + ε``, ``ε ~ N(0, 0.1²)``, 50 training points
drawn uniformly per seed; one hidden layer of 100 ReLU units; MAE loss; full batch; Adam with
lr 0.1 (GmP variants) / 0.01 (others); up to 10,000 epochs; learning rate ×0.1 after 500 epochs
without improvement of the training loss and early stopping after 1,000 (best weights restored).
With 50 points there is nothing to spare for validation, so — as in the notebook — the training
loss is monitored (``--val-fraction`` carves a validation split instead). The test RMSE is measured
against the noiseless function on a dense grid of 1,001 points; the grid never steers training.

The plot follows each unit's characteristic point ``−b/w`` (where its ReLU switches) over training.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import common as C

NAME = "levy"
TITLE = "Levy 1-D regression"
DEFAULT_SEEDS = "5"


def levy(x: np.ndarray) -> np.ndarray:
    """The 1-D Levy function as in the official notebook (``w = 1 + (x − 1)/4``).

    >>> float(levy(np.array([1.0]))[0])   # the global minimum
    0.0
    """
    w = 1.0 + (np.asarray(x, dtype=np.float64) - 1.0) / 4.0
    return np.sin(np.pi * w) ** 2 + (w - 1.0) ** 2 * (1.0 + np.sin(2.0 * np.pi * w) ** 2)


def make_data(seed: int, n_train: int = 50, noise: float = 0.1, n_grid: int = 1001):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-10.0, 10.0, size=n_train)
    y = levy(x) + rng.normal(0.0, noise, size=n_train)
    grid = np.linspace(-10.0, 10.0, n_grid)
    return x, y, grid, levy(grid)


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 10000; quick 600)")
    p.add_argument("--units", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=0.0, help="carve this fraction of the 50 points for validation (default 0: monitor the training loss)")
    p.add_argument("--record-every", type=int, default=None, help="epochs between recorded characteristic points (seed 0)")


def _t(a, device):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device).reshape(-1, 1)


def run(args) -> dict:
    device = torch.device(args.device)
    epochs = args.epochs or (600 if args.quick else 10000)
    patience, plateau = (1000, 500) if not args.quick else (200, 100)
    record_every = args.record_every or max(1, epochs // 500)
    methods = args.methods
    seeds = args.seeds
    results = {m: [] for m in methods}
    tracks = {}
    fits = {}
    bar = C.progress_bar(len(methods) * len(seeds), "levy", args.quiet)
    for seed in seeds:
        x, y, grid, truth = make_data(seed)
        if args.val_fraction > 0:
            tr, va = C.split_indices(len(x), [1 - args.val_fraction, args.val_fraction], seed + 1000)
            train, val = (_t(x[tr], device), _t(y[tr], device)), (_t(x[va], device), _t(y[va], device))
            monitor = "val"
        else:
            train, val, monitor = (_t(x, device), _t(y, device)), None, "train"
        xg = _t(grid, device)
        for method in methods:
            model = C.build(C.mlp, method, seed, n_in=1, widths=[args.units], n_out=1).to(device)
            cfg = C.FitConfig(
                lr=C.paper_lr(method), max_epochs=epochs, batch_size=None, monitor=monitor, mode="min",
                patience=patience, plateau_patience=plateau,
            )
            track = []
            on_eval = None
            if seed == seeds[0]:
                def on_eval(epoch, step, m, track=track):
                    if epoch % record_every == 0 or epoch == 1:
                        W, b = C.effective_affine(m, 0)
                        track.append((epoch, (-b / W[:, 0]).cpu().numpy()))
            bar.set_description(f"levy {method} seed {seed}")
            res = C.fit(
                model, train, val, loss_fn=lambda p, t: (p - t).abs().mean(),
                score_fn=lambda m, xv, yv: float(((m(xv) - yv) ** 2).mean()), cfg=cfg, seed=seed,
                on_eval=on_eval, progress=bar,
            )
            with torch.no_grad():
                pred = model(xg).cpu().numpy().ravel()
            rmse = float(np.sqrt(np.mean((pred - truth) ** 2)))
            results[method].append(dict(seed=seed, rmse=rmse, epochs=res.epochs, steps=res.steps, best_epoch=res.best_epoch, diverged=res.diverged, train_mae=res.best_monitored))
            if seed == seeds[0]:
                tracks[method] = track
                fits[method] = pred
            bar.update(1)
    bar.close()

    header = ["method", "lr", f"test RMSE (mean ± std, {len(seeds)} seeds)", "train MAE (best)", "epochs run", "diverged"]
    rows, vals = [], []
    for m in methods:
        r = results[m]
        rows.append([m, f"{C.paper_lr(m):g}", C.fmt_mean_std([d["rmse"] for d in r], 3), C.fmt_mean_std([d["train_mae"] for d in r], 3),
                     f"{np.mean([d['epochs'] for d in r]):.0f}", str(sum(d["diverged"] for d in r))])
        vals.append([None, None, C.mean_std([d["rmse"] for d in r])[0], None, None, None])
    C.bold_best(rows, vals, 2, "min")
    table = C.markdown_table(header, rows)

    files = []
    out = Path(args.out)
    if not args.no_plots:
        files.append(_plot_points(tracks, out / "levy_points.png", seeds[0]))
        x, y, grid, truth = make_data(seeds[0])
        files.append(_plot_fit(x, y, grid, truth, fits, out / "levy_fit.png", seeds[0]))
    notes = (
        f"Protocol: {len(seeds)} seeds ({', '.join(map(str, seeds))}); each seed draws its own 50 points and initial weights "
        f"(all methods of a seed start from the same weights). Max {epochs} epochs, full batch, MAE, Adam; "
        f"monitored: {'validation MSE' if args.val_fraction > 0 else 'training loss (no data spared for validation, as the official notebook)'}; "
        f"plateau ×0.1 after {plateau}, early stop after {patience} epochs. Test RMSE vs the noiseless Levy function on 1,001 grid points."
    )
    return dict(table=table, notes=notes, files=files, results=results)


def _plot_points(tracks, path: Path, seed: int) -> Path:
    from ..analysis import plot_points_1d

    plt = C.matplotlib_pyplot()
    methods = list(tracks)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], methods):
        epochs = [e for e, _ in tracks[m]]
        pts = torch.as_tensor(np.stack([p for _, p in tracks[m]]), dtype=torch.float32)
        plot_points_1d(pts, ax=ax, steps=epochs, x_range=(-10.0, 10.0), title=m)
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    fig.suptitle(f"Levy: each unit's characteristic point −b/w over training (seed {seed}; grey = data range)", fontsize=10)
    fig.tight_layout()
    return C.savefig(fig, path, dpi=80)


def _plot_fit(x, y, grid, truth, fits, path: Path, seed: int) -> Path:
    plt = C.matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(grid, truth, "k-", lw=2, label="Levy")
    ax.plot(x, y, "k.", ms=5, label="train (50)")
    for m, pred in fits.items():
        ax.plot(grid, pred, lw=1, label=m)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"Levy fits (seed {seed})", fontsize=10)
    fig.tight_layout()
    return C.savefig(fig, path, dpi=80)
