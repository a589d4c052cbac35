r"""2-D banana classification as ``2d_banana/2d_banana.ipynb`` runs it: 10 ReLU units, test accuracy.

Data (the notebook's): 1,000 of the 5,300 rows of ``banana/banana.csv`` drawn by
``np.random.seed(s); np.random.choice(5300, 1000, replace=False)``, then
``train_test_split(test_size=0.2, random_state=s)``, features standardized with the training
part's mean and (population) std, labels −1 → 0. The notebook runs ``s = 0`` once: the
**official draw**. ``--draw`` picks: ``official`` (data of ``s = 0`` for every seed, so only the
initialization varies), ``per-seed`` (seed ``s`` draws its own data) or ``both`` (default).

Training (the notebook's): ``Dense(10, relu) → Dense(1, sigmoid)``, binary cross-entropy on the
sigmoid output clipped to [1e-7, 1 − 1e-7] (``--bce logits``: from the logit, see the notes),
batch 128, ≤ 5,000 epochs, Adam (lr 0.1 GmP / 0.01 others, ε 1e-7), float64,
``ReduceLROnPlateau(×0.1, patience 50)`` and ``EarlyStopping(patience 100)`` on accuracy.
Monitored split (``--monitor``): ``val`` (default) — 20 % of the training part held out; ``test``
— the notebook's choice, the test split itself (training on all 800 rows).

For reference the notebook (one run, test-monitored, TensorFlow) printed test accuracy GmP 0.885,
BN 0.875, WN 0.81, SP 0.80.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import common as C

NAME = "banana"
TITLE = "Banana 2-D classification (test accuracy, official protocol)"
DEFAULT_SEEDS = "10"
REFERENCE = {"GmP": 0.885, "BN": 0.875, "WN": 0.81, "SP": 0.80}


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 5000; quick 30)")
    p.add_argument(
        "--draw",
        choices=["official", "per-seed", "both"],
        default="both",
        help="which 1,000-point data draws (default both)",
    )
    p.add_argument(
        "--monitor",
        choices=["val", "test"],
        default="val",
        help="split read by early stopping / plateau: val (default) or test (the notebook's, optimistic)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="with --monitor val: fraction of the training part held out"
    )
    p.add_argument(
        "--bce",
        choices=["clipped", "logits"],
        default="clipped",
        help="BCE on the clipped sigmoid output (default) or on the logit",
    )


def load_banana(data_dir=None) -> np.ndarray:
    """The banana CSV as an ``(N, 3)`` float array (At1, At2, Class ∈ {−1, 1}), in file order."""
    path = C.find_data(C.data_root(data_dir), "banana", "banana.csv", "banana")
    with open(path) as f:
        header = [h.strip() for h in f.readline().strip().split(",")]
    if header != ["At1", "At2", "Class"]:
        raise ValueError(f"{path}: expected the columns At1,At2,Class. Got: {header}")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if data.shape[1] != 3 or not set(np.unique(data[:, 2])) <= {-1.0, 1.0}:
        raise ValueError(
            f"{path}: expected rows 'x1,x2,±1'. Got: shape {data.shape}, classes {np.unique(data[:, 2])[:5]}"
        )
    return data


def make_split(
    data: np.ndarray, seed: int, *, monitor: str = "val", val_fraction: float = 0.2, n_points: int = 1000
) -> dict:
    """The notebook's draw and split for data seed ``seed``; returns float64 arrays."""
    rows = data[np.random.RandomState(seed).choice(len(data), size=min(n_points, len(data)), replace=False)]
    x, y = rows[:, :2], (rows[:, 2] > 0).astype(np.float64)
    train_idx, test_idx, fit_idx, mon_idx = C.monitored_split(len(x), seed, monitor, val_fraction)
    norm = C.normalizer(x[train_idx])
    return dict(
        fit=(norm(x[fit_idx]), y[fit_idx]),
        monitor=(norm(x[mon_idx]), y[mon_idx]),
        test=(norm(x[test_idx]), y[test_idx]),
    )


def clipped_bce(logits, target, eps: float = 1e-7):
    """Keras' ``BinaryCrossentropy`` on a sigmoid output: the probability clipped to [ε, 1 − ε]."""
    p = torch.sigmoid(logits).clamp(eps, 1 - eps)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def accuracy(model, x, y) -> float:
    return float(((model(x) > 0).to(y.dtype) == y).to(torch.float64).mean())  # sigmoid > 0.5


def _t(pair):
    return torch.as_tensor(pair[0], dtype=torch.float64), torch.as_tensor(pair[1], dtype=torch.float64).reshape(-1, 1)


def train_one(
    data,
    method: str,
    seed: int,
    data_seed: int,
    *,
    epochs: int,
    monitor: str,
    val_fraction: float,
    bce: str,
    progress=None,
):
    s = make_split(data, data_seed, monitor=monitor, val_fraction=val_fraction)
    fit, mon, test = _t(s["fit"]), _t(s["monitor"]), _t(s["test"])
    model = C.mlp(method, 2, [10], 1, seed)
    cfg = C.FitConfig(
        lr=C.paper_lr(method), epochs=epochs, batch_size=128, mode="max", patience=100, plateau_patience=50
    )
    loss = clipped_bce if bce == "clipped" else nn.functional.binary_cross_entropy_with_logits
    res = C.fit(model, fit, loss_fn=loss, cfg=cfg, seed=seed, monitor=lambda m, _: accuracy(m, *mon), progress=progress)
    with torch.no_grad():
        acc = accuracy(model, *test)
    return model, dict(
        seed=seed,
        data_seed=data_seed,
        test_acc=acc,
        monitored_acc=res.best_monitored,
        epochs=res.epochs,
        nonfinite=res.nonfinite,
    )


def run(args) -> dict:
    data = load_banana(args.data_dir)
    epochs = args.epochs or (30 if args.quick else 5000)
    draws = ["official", "per-seed"] if args.draw == "both" else [args.draw]
    methods, seeds = args.methods, args.seeds
    results = {d: {m: [] for m in methods} for d in draws}
    plot_models = {}
    bar = C.progress_bar(len(draws) * len(methods) * len(seeds), "banana", args.quiet)
    for draw in draws:
        for seed in seeds:
            data_seed = 0 if draw == "official" else seed
            for method in methods:
                bar.set_description(f"banana {draw} {method} seed {seed}", refresh=False)
                model, r = train_one(
                    data,
                    method,
                    seed,
                    data_seed,
                    epochs=epochs,
                    monitor=args.monitor,
                    val_fraction=args.val_fraction,
                    bce=args.bce,
                    progress=bar,
                )
                results[draw][method].append(r)
                if draw == draws[0] and seed == seeds[0]:
                    plot_models[method] = model
                bar.update(1)
    bar.close()

    config = dict(monitor=args.monitor, bce=args.bce, epochs=epochs, draws=draws, val_fraction=args.val_fraction)
    tables, notes = summarize(results, seeds, config)
    files = []
    if not args.no_plots:
        s = make_split(
            data, 0 if draws[0] == "official" else seeds[0], monitor=args.monitor, val_fraction=args.val_fraction
        )
        files.append(plot_boundaries(plot_models, _t(s["test"]), Path(args.out) / "banana_boundaries.png", seeds[0]))
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=files, results=results, config=config)


def summarize(results, seeds, config):
    """``(tables, notes)`` from ``results[draw][method]`` (also merged from several runs)."""
    tables = []
    for draw in config["draws"]:
        methods = [m for m in C.METHODS if m in results[draw]]
        header = [
            "method",
            "lr",
            f"test accuracy (mean ± std, {len(seeds)} seeds)",
            "min – max",
            "wins / losses vs SP (p)",
            "epochs",
            "notebook (1 run, test-monitored)",
        ]
        rows = []
        for m in methods:
            acc = [r["test_acc"] for r in results[draw][m]]
            wins = (
                C.wins_cell(acc, [r["test_acc"] for r in results[draw]["SP"]], "max")
                if m != "SP" and "SP" in methods
                else "—"
            )
            rows.append(
                [
                    C.LABELS[m],
                    f"{C.paper_lr(m):g}",
                    C.fmt_mean_std(acc, 3),
                    f"{np.nanmin(acc):.3f} – {np.nanmax(acc):.3f}",
                    wins,
                    f"{np.mean([r['epochs'] for r in results[draw][m]]):.0f}",
                    f"{REFERENCE[m]:.3f}" if m in REFERENCE else "—",
                ]
            )
        what = (
            "the official draw (data seed 0; seeds vary only the initial weights)"
            if draw == "official"
            else "a new 1,000-point draw and split per seed"
        )
        tables.append(
            f"{'Official draw' if draw == 'official' else 'Per-seed draws'} — {what}:\n\n"
            + C.markdown_table(header, rows)
        )
    monitor = (
        "the test split (the notebook; optimistic)"
        if config["monitor"] == "test"
        else f"a validation split ({config['val_fraction']:.0%} of the training part)"
    )
    bce = (
        "clipped sigmoid output (Keras 3; Keras 2.x computes it from the logit when the output layer is Dense(sigmoid))"
        if config["bce"] == "clipped"
        else "from the logit (Keras 2.x path)"
    )
    notes = (
        f"Early stopping / plateau read **{monitor}**; BCE: {bce}. "
        f"≤{config['epochs']} epochs, batch 128, Adam (ε 1e-7), float64, plateau ×0.1 after 50 and early stop after 100 epochs on accuracy. "
        "Wins: paired runs (same seed) with a higher test accuracy than SP; p: two-sided exact sign test (ties dropped)."
    )
    return tables, notes


def plot_boundaries(models: dict, test, path: Path, seed: int) -> Path:
    """Per method: decision regions, each hidden unit's boundary and characteristic point
    (``plot_boundaries_2d``; for BN the points drawn are those of the layer before BN)."""
    try:
        from georeparam.plot import plot_boundaries_2d
    except ImportError:  # before the plots move out of georeparam.analysis
        from georeparam.plot import plot_boundaries_2d

    plt = C.pyplot()
    x, y = test
    fig, axes = plt.subplots(1, len(models), figsize=(2.8 * len(models), 3.0), squeeze=False)
    for ax, (m, model) in zip(axes[0], models.items()):
        plot_boundaries_2d(
            model, x, y.reshape(-1), ax=ax, title=C.LABELS[m] + (" (points before BN)" if m == "BN" else "")
        )
        ax.title.set_fontsize(7)
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.suptitle(
        f"Banana, official draw, seed {seed}: test points, decision boundary, unit boundaries and characteristic points (stars)",
        fontsize=8,
    )
    fig.tight_layout()
    return C.savefig(fig, path)
