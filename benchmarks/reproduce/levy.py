r"""1-D Levy regression as ``1d_levy/1d_levy.ipynb`` runs it: 100 ReLU units, 50 noisy points.

Data (the notebook's): ``np.random.seed(s)``, 50 inputs ``x ~ U(−10, 10)``, then noise
``ε ~ N(0, 0.1²)``, ``y = levy(x) + ε``; the test grid is ``np.arange(−10, 10.1, 0.1)`` (201
points) with the noiseless function. The notebook runs ``s = 0`` once: the **official draw**.
``--draw`` picks ``official`` (data of ``s = 0`` for every seed), ``per-seed`` or ``both``
(default).

Training (the notebook's): ``Dense(100, relu) → Dense(1)``, MAE, full batch, ≤ 10,000 epochs,
Adam (lr 0.1 GmP / 0.01 others, ε 1e-7), float64; ``ReduceLROnPlateau(×0.1, patience 500)`` and
``EarlyStopping(patience 1000, restore_best_weights)`` on the training loss (``monitor='loss'``:
the notebook holds nothing out, and neither do we — the test grid never steers training).

``--lr X`` runs every method at ``X``. ``--lrs 0.01,0.1`` runs every method at every learning rate of
the grid and writes one JSON per seed under ``OUT/seeds`` (``tuned.py``'s Note [Per-seed result
files]); with no held-out split nothing is chosen, and the same runs are read as the paper's rule
(GmP 0.1, others 0.01) and as matched learning rates (``benchmarks/results/levy-matched``).

# Note [The official 1-D unit]
The official 1-D GmP unit (``models.py``, ``DenseReparam`` with ``n_in == 1``) is
``r·ReLU(s·x + λ)``: the direction ``s = sign(w₀)`` is frozen (a stop-gradient), ``r = |w₀|`` from
Glorot ``w₀ ~ U(±√(6/101)) = U(±0.244)``, ``λ = 0``, so every boundary starts at 0 (as SP's,
whose biases start at 0) and stays at ``−s·λ`` whatever the sign of ``r``. ``georeparam.register``
gives a fan-in-1 layer in the paper's form exactly this unit (the direction ``s`` a buffer of its
parametrization: Note [The official 1-D unit] in ``georeparam/parametrization.py``), so the
``GmP`` row is the library's layer; the ``GmP-w`` row is the weight form ``ReLU(r·(s·x + λ))``,
in which ``r`` crossing 0 flips the unit's active side. GmP+IMN is left out (IMN of a 1-D input
is a constant shift of λ).

The plot follows each unit's characteristic point over training (official draw, first seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import georeparam

from . import common as C
from . import tuned as TU

NAME = "levy"
TITLE = "Levy 1-D regression (official protocol)"
DEFAULT_SEEDS = "10"
METHODS = ("SP", "WN", "BN", "GmP", "GmP-w")
LABELS = dict(
    C.LABELS, GmP="GmP (paper form: the official 1-D unit)", **{"GmP-w": "GmP (georeparam, weight form at fan-in 1)"}
)


def direction(model) -> torch.Tensor:
    """The frozen directions ``s`` of the GmP row's hidden layer (Note [The official 1-D unit])."""
    return model[0].parametrizations.weight[0].direction


def build(method: str, seed: int) -> nn.Sequential:
    """The notebook's model for ``method``: ``Dense(100, relu) → Dense(1)``, Glorot, zero biases."""
    if method != "GmP":
        return C.mlp(method, 1, [100], 1, seed)
    sp = C.mlp("SP", 1, [100], 1, seed)
    georeparam.register(sp, include=["0"])  # the paper's form: r·ReLU(s·x + λ), s = sign(w₀) frozen
    return sp


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 10000; quick 100)")
    p.add_argument(
        "--draw",
        choices=["official", "per-seed", "both"],
        default="both",
        help="which 50-point data draws (default both)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="every method at this learning rate (a matched-lr control; default: the paper's rule)",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="every method at every learning rate of this grid (0.01,0.1: the paper's rule and both matched "
        "controls from one run), one JSON per seed under OUT/seeds; nothing is chosen (no held-out split)",
    )
    p.add_argument("--record-every", type=int, default=10, help="epochs between recorded characteristic points (plot)")


def levy(x: np.ndarray) -> np.ndarray:
    """The 1-D Levy function of the notebook (``w = 1 + (x − 1)/4``).

    >>> abs(float(levy(np.array([1.0]))[0])) < 1e-30   # the global minimum, 0
    True
    """
    w = 1.0 + (np.asarray(x, dtype=np.float64) - 1.0) / 4.0
    return np.sin(np.pi * w) ** 2 + (w - 1.0) ** 2 * (1.0 + np.sin(2.0 * np.pi * w) ** 2)


def make_data(seed: int, n_train: int = 50, noise: float = 0.1):
    """``(x, y, grid, truth)`` as the notebook draws them with ``np.random.seed(seed)``."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(low=-10.0, high=10.0, size=[n_train, 1])
    eps = rng.normal(loc=0.0, scale=noise, size=[n_train, 1])
    grid = np.arange(-10.0, 10.1, 0.1).reshape(-1, 1)
    return x, levy(x) + eps, grid, levy(grid)


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(-1, 1)


def points_1d(model) -> np.ndarray:
    """Each hidden unit's characteristic point (``georeparam.analysis.characteristic_points``,
    with BN's running statistics folded in; ``−s·λ`` for the official 1-D unit)."""
    from georeparam.analysis import characteristic_points

    if (
        georeparam.is_geometric(model[0])
        and getattr(model[0].parametrizations.weight[0], "direction", None) is not None
    ):
        return (-direction(model) * georeparam.geometry(model[0]).offset).detach().numpy().copy()
    norm = model[1] if isinstance(model[1], torch.nn.BatchNorm1d) else None
    return characteristic_points(model[0], norm=norm)[0][:, 0].numpy().copy()


METRIC = TU.Metric(
    test="rmse", val=None, mode="min", kind="logratio", digits=3, effect_digits=3, label="test RMSE"
)  # no held-out split: nothing is chosen (summarize_unit reports the paper's rule and matched lrs)
DRAW_TITLE = {
    "official": "Levy, official draw (data seed 0; seeds vary only the initial weights)",
    "per-seed": "Levy, per-seed draws (a new 50-point draw per seed)",
}


def train_one(method: str, seed: int, draw: str, lr: float, epochs: int, *, on_epoch=None, progress=None):
    """One notebook run; returns ``(record, model, prediction on the test grid)``."""
    x, y, grid, truth = make_data(0 if draw == "official" else seed)
    model = build(method, seed)
    cfg = C.FitConfig(lr=lr, epochs=epochs, batch_size=None, mode="min", patience=1000, plateau_patience=500)
    res = C.fit(
        model,
        (_t(x), _t(y)),
        loss_fn=lambda p, t: (p - t).abs().mean(),
        cfg=cfg,
        seed=seed,
        on_epoch=on_epoch,
        progress=progress,
    )
    with torch.no_grad():
        pred = model(_t(grid)).numpy().ravel()
    rmse = float(np.sqrt(np.mean((pred - truth.ravel()) ** 2)))
    rec = dict(seed=seed, rmse=rmse, train_mae=res.best_monitored, epochs=res.epochs, nonfinite=res.nonfinite)
    return rec, model, pred


def run(args) -> dict:
    epochs = args.epochs or (100 if args.quick else 10000)
    draws = ["official", "per-seed"] if args.draw == "both" else [args.draw]
    methods, seeds = args.methods, args.seeds
    if args.lrs is not None:
        if args.lr is not None:
            raise SystemExit("levy: --lr and --lrs exclude each other (--lrs 0.1 is one matched learning rate)")
        config = dict(protocol="grid", epochs=epochs, draws=draws, optimizer="adam")
        return TU.run_tuned(
            args, NAME, draws, lambda d, m, s, lr: train_one(m, s, d, lr, epochs)[0], config, tuned_summary
        )
    results = {d: {m: [] for m in methods} for d in draws}
    tracks, fits = {}, {}
    bar = C.progress_bar(len(draws) * len(methods) * len(seeds), "levy", args.quiet)
    for draw in draws:
        for seed in seeds:
            for method in methods:
                lr = C.paper_lr(method) if args.lr is None else args.lr
                track = []
                on_epoch = None
                if draw == draws[0] and seed == seeds[0]:
                    track.append((0, points_1d(build(method, seed))))  # the same draw train_one starts from

                    def on_epoch(epoch, m, track=track):
                        if epoch % args.record_every == 0:
                            track.append((epoch, points_1d(m)))

                bar.set_description(f"levy {draw} {method} seed {seed}", refresh=False)
                rec, model, pred = train_one(method, seed, draw, lr, epochs, on_epoch=on_epoch, progress=bar)
                results[draw][method].append(rec)
                if track:
                    tracks[method], fits[method] = track, pred
                bar.update(1)
    bar.close()

    config = dict(epochs=epochs, draws=draws, **({} if args.lr is None else {"lr": args.lr}))
    tables, notes = summarize(results, seeds, config)
    files = []
    if not args.no_plots:
        files.append(plot_points(tracks, Path(args.out) / "levy_points.png", seeds[0], draws[0]))
        x, y, grid, truth = make_data(0 if draws[0] == "official" else seeds[0])
        files.append(plot_fit(x, y, grid, truth, fits, Path(args.out) / "levy_fit.png"))
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=files, results=results, config=config)


NOTES = (
    "≤{epochs} epochs, full batch, MAE, Adam (ε 1e-7), float64; plateau ×0.1 after 500 and early stop after 1000 epochs on the training loss "
    "(as the notebook). Test RMSE against the noiseless function on the notebook's 201-point grid."
)


def tuned_summary(results, seeds, config):
    """``(tables, notes)`` of a ``--lrs`` run, from ``results[draw][method][lr]`` (the per-seed files)."""
    tables = [
        "\n".join(TU.summarize_unit(DRAW_TITLE[d], results[d], seeds, METRIC, METHODS, LABELS, C.paper_lr))
        for d in config["draws"]
        if d in results
    ]
    notes = NOTES.format(epochs=config["epochs"]) + (
        " The notebook holds nothing out, so no learning rate is chosen: every method ran at every learning rate "
        "of the grid, read as the paper's rule (GmP 0.1, others 0.01) and as matched learning rates. Ratios: geometric "
        "mean over seeds of the per-seed test-RMSE ratio (method / SP), 95 % t interval on the log scale; "
        "wins: same seed, lower test RMSE than SP; p: two-sided exact sign test."
    )
    return tables, notes


def summarize(results, seeds, config):
    """``(tables, notes)`` from ``results[draw][method]`` (also merged from several runs)."""
    tables = []
    for draw in config["draws"]:
        methods = [m for m in METHODS if m in results[draw]]
        header = [
            "method",
            "lr",
            f"test RMSE (mean ± std, {len(seeds)} seeds)",
            "best train MAE",
            "wins / losses vs SP (p)",
            "epochs",
        ]
        rows = []
        for m in methods:
            rm = [r["rmse"] for r in results[draw][m]]
            wins = C.wins_cell(rm, [r["rmse"] for r in results[draw]["SP"]]) if m != "SP" and "SP" in methods else "—"
            rows.append(
                [
                    LABELS[m],
                    f"{config.get('lr', C.paper_lr(m)):g}",
                    C.fmt_mean_std(rm, 3),
                    C.fmt_mean_std([r["train_mae"] for r in results[draw][m]], 3),
                    wins,
                    f"{np.mean([r['epochs'] for r in results[draw][m]]):.0f}",
                ]
            )
        what = (
            "the official draw (data seed 0; seeds vary only the initial weights)"
            if draw == "official"
            else "a new 50-point draw per seed"
        )
        tables.append(
            f"{'Official draw' if draw == 'official' else 'Per-seed draws'} — {what}:\n\n"
            + C.markdown_table(header, rows)
        )
    notes = NOTES.format(epochs=config["epochs"]) + (
        " Wins: paired runs (same seed) with a lower test RMSE than SP; p: two-sided exact sign test."
    )
    return tables, notes


def plot_points(tracks, path: Path, seed: int, draw: str) -> Path:
    try:
        from georeparam.plot import plot_points_1d
    except ImportError:  # before the plots move out of georeparam.analysis
        from georeparam.plot import plot_points_1d

    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(tracks), figsize=(2.9 * len(tracks), 2.9), sharey=True, squeeze=False)
    for ax, (m, track) in zip(axes[0], tracks.items()):
        pts = torch.as_tensor(np.stack([p for _, p in track]))
        plot_points_1d(pts, ax=ax, steps=[max(e, 1) for e, _ in track], x_range=(-10.0, 10.0), title=LABELS[m])
        ax.title.set_fontsize(8)
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    fig.suptitle(
        f"Levy ({draw} draw, seed {seed}): each unit's characteristic point over training (grey: data range)",
        fontsize=9,
    )
    fig.tight_layout()
    return C.savefig(fig, path)


def plot_fit(x, y, grid, truth, fits, path: Path) -> Path:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(grid, truth, "k-", lw=2, label="Levy")
    ax.plot(x, y, "k.", ms=5, label="train (50)")
    for m, pred in fits.items():
        ax.plot(grid, pred, lw=1, label=LABELS[m])
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("Levy fits (official draw, first seed)", fontsize=9)
    fig.tight_layout()
    return C.savefig(fig, path)
