r"""The main job: standard (SP), weight-normalized (WN) and geometric (GmP) parameterization
trained side by side on two interleaved spirals, GmP in both of its forms.

``python -m georeparam demo`` needs no data, no arguments and nothing beyond torch and numpy.
Every run starts from the *same* network (one hidden layer of ReLU units; registering WN or GmP
does not change what it computes) and is trained full-batch with Adam at the paper's learning
rates: SP and WN at 0.01, GmP at 0.1, and SP and WN at 0.1 as well, so that "GmP just uses a
larger learning rate" can be read off the same table. GmP runs in the paper's form
``r·ReLU(uᵀx + λ)`` (``register``'s default) and in the weight form ``ReLU(r(uᵀx + λ))``
(``register(form="weight")``), side by side at lr 0.1: in the weight form a radius crossing 0
flips the unit's boundary by π, in the paper's form it does not.

For each run it prints the final training loss, test accuracy, steps until the test accuracy
first reaches the target, how far the hidden units' boundary directions turn per step
(:class:`~georeparam.analysis.AngularDrift`), flips by more than π/2, sign changes of GmP's
radius and the share of dead hidden units. It writes the table (``results.md``) and the numbers
(``results.json``) first, then, if matplotlib is installed, a PNG with every run's decision
boundary, its hidden units' characteristic points and their paths, and the training curves.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .analysis import AngularDrift, PointsRecorder
from .layer import geometry
from .model import register

__all__ = [
    "spirals",
    "run_demo",
    "main",
    "DEFAULT_RUNS",
    "METHODS",
    "DESCRIPTION",
    "add_arguments",
    "run_from_args",
    "help_formatter",
]

#: The methods: ``GmP`` is the paper's form (``register``'s default), ``GmP-weight`` the weight form.
METHODS = ("SP", "WN", "GmP", "GmP-weight")

#: (method, learning rate) of each run: the paper's protocol (SP 0.01, WN 0.01, GmP 0.1, both
#: GmP forms side by side), then SP and WN at GmP's rate.
DEFAULT_RUNS: Tuple[Tuple[str, float], ...] = (
    ("SP", 0.01),
    ("WN", 0.01),
    ("GmP-weight", 0.1),
    ("GmP", 0.1),
    ("SP", 0.1),
    ("WN", 0.1),
)


def spirals(
    n: int, *, turns: float = 2.5, noise: float = 0.2, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Two interleaved spirals in 2-D, scaled to about ``[−2, 2]²``; labels in ``{0, 1}``.

    Arm ``k`` is ``±t·(cos t, sin t)``; points are spread uniformly along each arm (``t`` is
    ``√U``-distributed), ``turns`` full turns per arm, plus Gaussian noise of standard deviation
    ``noise`` in those units (neighbouring arms are π apart), then scaled by ``2 / (2π·turns)``.

    >>> x, y = spirals(6, generator=torch.Generator().manual_seed(0))
    >>> tuple(x.shape), y.tolist()
    ((6, 2), [1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    """
    if n < 1:
        raise ValueError(f"spirals needs n ≥ 1. Got: {n}")
    if turns <= 0 or noise < 0:
        raise ValueError(f"spirals needs turns > 0 and noise ≥ 0. Got: turns={turns}, noise={noise}")
    t_max = turns * 2 * math.pi
    t = torch.sqrt(torch.rand(n, generator=generator)) * t_max + 0.3
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1)
    x = x + noise * torch.randn(n, 2, generator=generator)
    return x * (2.0 / t_max), label.float()


def _network(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1))


def _prepare(method: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial network for every run
    model = _network(width)
    if method in ("GmP", "GmP-weight"):
        # the output layer stays standard
        register(model, exclude=["2"], form="paper" if method == "GmP" else "weight")
    elif method == "WN":
        nn.utils.parametrizations.weight_norm(model[0])
    elif method != "SP":
        raise ValueError(f"method must be one of {METHODS}. Got: {method!r}")
    return model


def _parse_runs(spec: str) -> List[Tuple[str, float]]:
    runs = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        method, sep, lr = item.partition(":")
        if not sep or method not in METHODS:
            raise ValueError(
                f"--runs takes METHOD:LR items separated by commas, METHOD in {', '.join(METHODS)}. Got: {item!r}"
            )
        try:
            runs.append((method, float(lr)))
        except ValueError:
            raise ValueError(f"--runs: the learning rate must be a number. Got: {item!r}") from None
    if not runs:
        raise ValueError(f"--runs names no run. Got: {spec!r}")
    return runs


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _table(rows: Sequence[Dict], steps: int, target: float) -> str:
    head = (
        f"| method | lr | final loss | test acc (final / best) | steps to {target:.0%} | median drift/step | "
        f"p99 drift/step | flips > π/2 | r sign changes | dead units | seconds |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reach = str(r["steps_to_target"]) if r["steps_to_target"] is not None else f"> {steps}"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {_fmt(r['final_loss'], '.4f')} | {r['test_accuracy']:.3f} / "
            f"{r['best_test_accuracy']:.3f} | {reach} | {_fmt(r['drift_median'], '.2e')} | {_fmt(r['drift_p99'], '.2e')} | "
            f"{r['flips']} ({_fmt(r['flip_fraction'], '.2%')}) | {_fmt(r['sign_changes'], 'd')} | "
            f"{r['dead_units']:.0%} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


_LEGEND = (
    "GmP: the paper's form r·ReLU(uᵀx + λ), register's default; GmP-weight: ReLU(r·(uᵀx + λ)), "
    'register(form="weight"). drift: angle (rad) a hidden unit\'s boundary direction turns in one step, over '
    "all steps and units (dead units get no gradient and do not turn); flips: unit-steps turning by more than "
    "π/2 (count and share); r sign changes: unit-steps in which a GmP radius changed sign; dead units: hidden "
    "units inactive on every training point at the end."
)


def run_demo(
    steps: int = 1000,
    *,
    seed: int = 0,
    width: int = 128,
    target: float = 0.95,
    runs: Sequence[Tuple[str, float]] = DEFAULT_RUNS,
    n_train: int = 2000,
    n_test: int = 2000,
    turns: float = 2.5,
    noise: float = 0.2,
    record_every: int = 10,
    out: Union[str, Path, None] = "georeparam-demo",
    plot: bool = True,
    progress: bool = True,
    verbose: bool = True,
    threads: Optional[int] = 1,
) -> Dict:
    r"""Train every run side by side, print and write the comparison table, then the figure.

    Args:
        steps: full-batch Adam steps per run.
        seed: seeds the data and the (shared) initial network.
        width: hidden ReLU units.
        target: test accuracy for the "steps to target" column (checked after every step).
        runs: ``(method, lr)`` pairs, method in :data:`METHODS`.
        n_train, n_test: points per split; ``turns``, ``noise``: see :func:`spirals`.
        record_every: characteristic points are recorded every this many steps (the paths).
        out: directory for ``results.md``, ``results.json`` and ``demo.png`` (created);
            ``None`` writes nothing.
        plot: draw ``demo.png`` after the table is written. Without matplotlib the figure is
            skipped with one line saying so.
        progress: show progress on stderr (a tqdm bar on a terminal if tqdm is installed, else a
            line per 10 %).
        verbose: print the table and where the files went.
        threads: torch intra-op threads while training (restored afterwards); ``None`` leaves
            the setting alone. See Note [One thread].

    Returns:
        ``{"rows": [per-run dict], "table": Markdown str, "results": Path or None,
        "json": Path or None, "figure": Path or None}``.
    """
    if steps < 1 or width < 1 or n_train < 1 or n_test < 1 or record_every < 1:
        raise ValueError(
            f"steps, width, n_train, n_test and record_every must be ≥ 1. Got: steps={steps}, width={width}, "
            f"n_train={n_train}, n_test={n_test}, record_every={record_every}"
        )
    if not 0 < target <= 1:
        raise ValueError(f"target must be an accuracy in (0, 1]. Got: {target}")
    check_out(out)
    runs = [(m, float(lr)) for m, lr in runs]
    if not runs:
        raise ValueError("runs must name at least one (method, lr) pair. Got: []")
    for m, lr in runs:
        if m not in METHODS or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"runs must be (method, lr) with method in {METHODS} and lr > 0. Got: {(m, lr)}")
    # Note [One thread]
    # The network is tiny (2,000 × 128 matmuls): intra-op threads buy nothing and, on a busy
    # 2-core machine, their spin-waiting made 100 steps of the five runs take 36.5 s wall instead
    # of 5.5 s with one thread (measured with other jobs running).
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        config = dict(
            steps=steps, seed=seed, width=width, target=target, n_train=n_train, n_test=n_test, turns=turns, noise=noise
        )
        return _run(config, runs, record_every, out, plot, progress, verbose)
    finally:
        torch.set_num_threads(previous)


class _Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal; otherwise a plain line on stderr
    every 10 % (a log file gets 10 lines, not a bar redrawn every step)."""

    def __init__(self, steps: int, enabled: bool):
        self.steps, self.enabled, self.bar = steps, enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=steps, desc="demo", unit="step", leave=False)

    def update(self, step: int, note: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % 20 == 0 or step == self.steps:
                self.bar.set_postfix_str(note)
        elif step % max(1, self.steps // 10) == 0 or step == self.steps:
            print(f"step {step}/{self.steps}: test acc {note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(config: Dict, runs, record_every, out, plot, progress, verbose) -> Dict:
    steps, seed, width, target = config["steps"], config["seed"], config["width"], config["target"]
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    x, y = spirals(config["n_train"], turns=config["turns"], noise=config["noise"], generator=gen)
    xt, yt = spirals(config["n_test"], turns=config["turns"], noise=config["noise"], generator=gen)
    loss_fn = nn.functional.binary_cross_entropy_with_logits

    state = []
    for method, lr in runs:
        model = _prepare(method, width, seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        drift = AngularDrift(model, layers=["0"]).attach(opt)
        rec = PointsRecorder(model[0], every=record_every).attach(opt)
        radius = geometry(model[0]).radius if method.startswith("GmP") else None
        sign = None if radius is None else radius.detach() >= 0
        state.append(
            dict(
                method=method,
                lr=lr,
                model=model,
                opt=opt,
                drift=drift,
                rec=rec,
                loss=[],
                acc=[],
                seconds=0.0,
                reach=None,
                radius=radius,
                sign=sign,
                sign_changes=0,
            )
        )

    bar = _Progress(steps, progress)
    for step in range(1, steps + 1):
        for s in state:
            t0 = time.perf_counter()
            s["opt"].zero_grad(set_to_none=True)
            loss = loss_fn(s["model"](x).squeeze(1), y)
            loss.backward()
            s["opt"].step()
            with torch.no_grad():
                acc = ((s["model"](xt).squeeze(1) > 0).float() == yt).float().mean().item()
            if s["radius"] is not None:
                sign = s["radius"].detach() >= 0
                s["sign_changes"] += int((sign != s["sign"]).sum())
                s["sign"] = sign
            s["seconds"] += time.perf_counter() - t0
            s["loss"].append(loss.item())
            s["acc"].append(acc)
            if s["reach"] is None and acc >= target:
                s["reach"] = step
        bar.update(step, "  ".join(f"{s['method']}@{s['lr']:g} {s['acc'][-1]:.3f}" for s in state))
    bar.close()

    rows = []
    for s in state:
        s["drift"].detach()
        s["rec"].detach()
        summ = s["drift"].summary()
        with torch.no_grad():
            hidden = s["model"][0](x)
        final_loss = s["loss"][-1]
        measured = summ["steps"] * summ["units"] - summ["undefined"]
        flips = 0 if measured == 0 or math.isnan(summ["flip_fraction"]) else round(summ["flip_fraction"] * measured)
        rows.append(
            dict(
                method=s["method"],
                lr=s["lr"],
                final_loss=final_loss if math.isfinite(final_loss) else math.nan,
                test_accuracy=s["acc"][-1],
                best_test_accuracy=max(s["acc"]),
                steps_to_target=s["reach"],
                drift_median=summ["median"],
                drift_p99=summ["p99"],
                flip_fraction=summ["flip_fraction"],
                flips=flips,
                sign_changes=s["sign_changes"] if s["radius"] is not None else None,
                dead_units=float(((hidden > 0).sum(0) == 0).float().mean()),
                seconds=s["seconds"],
                loss_curve=s["loss"],
                accuracy_curve=s["acc"],
                drift_per_step=s["drift"].per_step["median"].tolist(),
            )
        )
    table = _table(rows, steps, target)
    intro = (
        f"Two spirals: {config['n_train']} training / {config['n_test']} test points; 2-{width}-1 ReLU network, "
        f"the same initial weights for every run; full-batch Adam, {steps} steps, seed {seed}."
    )
    results = json_path = figure = None
    if verbose:
        print(intro)
        print(table)
        print(_LEGEND)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        results = out / "results.md"
        results.write_text(f"# georeparam demo\n\n{intro}\n\n{table}\n\n{_LEGEND}\n")
        json_path = out / "results.json"
        summary_rows = [{k: v for k, v in r.items() if not k.endswith(("_curve", "_per_step"))} for r in rows]
        json_path.write_text(
            json.dumps(
                {
                    "config": config,
                    "torch": torch.__version__,
                    "wall_seconds": time.perf_counter() - started,
                    "rows": summary_rows,
                },
                indent=1,
                allow_nan=True,
            )
            + "\n"
        )
        if verbose:
            print(f"Saved the table to {results.resolve()} and the numbers to {json_path.resolve()}")
        if plot:
            from . import plot as plots

            try:
                plots.require_matplotlib()
            except ImportError:
                if verbose:
                    print("figure skipped: pip install matplotlib")
            else:
                figure = _save_figure(state, rows, x, y, out / "demo.png", target)
                if verbose:
                    print(f"Saved the figure to {figure.resolve()}")
    return {"rows": rows, "table": table, "results": results, "json": json_path, "figure": figure}


def _save_figure(state, rows, x, y, path: Path, target: float) -> Path:
    from .plot import new_axes, plot_boundaries_2d

    fig = new_axes().figure
    fig.delaxes(fig.axes[0])
    n = len(state)
    ncols = 3
    nrows = math.ceil(n / ncols) + 1  # the runs, then a row of curves
    fig.set_size_inches(4.2 * ncols, 4.2 * nrows)
    # one colour per method, one line style per learning rate
    method_color = {"SP": "tab:blue", "WN": "tab:orange", "GmP": "tab:green", "GmP-weight": "tab:purple"}
    lrs = sorted({s["lr"] for s in state})
    styles = ["--", "-", ":", "-."]
    for i, (s, r) in enumerate(zip(state, rows)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        title = f"{s['method']}, lr {s['lr']:g}: test acc {r['test_accuracy']:.3f}, flips {r['flips']}"
        plot_boundaries_2d(
            s["model"],
            x,
            y,
            ax=ax,
            layer=s["model"][0],
            trajectories=s["rec"],
            resolution=150,
            boundaries=False,
            title=title,
        )
        ax.title.set_fontsize(10)
    k = (nrows - 1) * ncols + 1
    curves = [
        ("test accuracy", "accuracy_curve", False),
        ("training loss", "loss_curve", True),
        ("median boundary turn per step (rad)", "drift_per_step", True),
    ]
    for label, key, log in curves:
        ax = fig.add_subplot(nrows, ncols, k)
        k += 1
        for r in rows:
            v = torch.tensor(r[key], dtype=torch.float64)
            if log:
                v = v.clamp_min(1e-10)
            ax.plot(
                range(1, len(v) + 1),
                v.numpy(),
                color=method_color[r["method"]],
                ls=styles[lrs.index(r["lr"]) % len(styles)],
                lw=1.0,
                label=f"{r['method']} {r['lr']:g}",
            )
        if log:
            ax.set_yscale("log")
        if key == "accuracy_curve":
            ax.axhline(target, color="0.5", lw=0.8, ls="--")
            ax.set_ylim(0.4, 1.005)
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
    fig.suptitle(
        "Decision boundary (black), hidden units' characteristic points (stars) and their paths (green)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    return path


#: ``--help`` text (plain: argparse prints it as is).
DESCRIPTION = """\
Train a 2-128-1 ReLU network on two generated spirals, from the same initial weights, with
standard (SP), weight-normalized (WN) and geometric parameterization (GmP, in the paper's form
and in the weight form), full-batch Adam. Needs no data and nothing beyond torch and numpy;
the default run takes about a minute on 2 CPU cores.

Prints a table (loss, accuracy, steps to target, boundary drift per step, flips > pi/2, sign
changes of GmP's radius, dead units), writes it to OUT/results.md and OUT/results.json, then
draws OUT/demo.png if matplotlib is installed (otherwise says so and skips it).
"""


def help_formatter(prog: str):
    """argparse's raw-description formatter, wrapping option help at spaces only ("GmP-weight" stays whole)."""
    import argparse
    import textwrap

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _split_lines(self, text, width):
            return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    return Formatter(prog)


def add_arguments(parser) -> None:
    """The demo's options, on an ``argparse`` parser (``python -m georeparam demo`` uses this)."""
    parser.add_argument("--steps", type=int, default=1000, help="full-batch Adam steps per run (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the data and the shared initial network (default: %(default)s)"
    )
    parser.add_argument("--width", type=int, default=128, help="hidden ReLU units (default: %(default)s)")
    parser.add_argument(
        "--target", type=float, default=0.95, help="test accuracy for 'steps to target' (default: %(default)s)"
    )
    parser.add_argument(
        "--runs",
        metavar="METHOD:LR,...",
        default=",".join(f"{m}:{lr:g}" for m, lr in DEFAULT_RUNS),
        help=f"comma-separated runs, METHOD in {', '.join(METHODS)} (GmP: the paper's form) (default: %(default)s)",
    )
    parser.add_argument("--out", default="georeparam-demo", help="output directory (default: ./%(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="write the table and numbers, skip the figure")
    parser.add_argument("--no-save", action="store_true", help="print the table only; write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")


def check_out(out) -> None:
    """Refuse an ``out`` that cannot be the results directory before training (the files are
    written after a minute of training): an existing file, or a path that cannot be created."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"out (--out) must be a directory for results.md, results.json and demo.png. Got: {str(path)!r}, an existing file"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"out (--out) must be a directory that can be created. Got: {str(path)!r} ({e.strerror or e})"
        ) from None


def run_from_args(parser, args) -> int:
    """Run the demo from parsed :func:`add_arguments` options; bad values end in ``parser.error``."""
    try:
        runs = _parse_runs(args.runs)
        if args.steps < 1 or args.width < 1:
            raise ValueError(f"--steps and --width must be ≥ 1. Got: --steps {args.steps}, --width {args.width}")
        if not 0 < args.target <= 1:
            raise ValueError(f"--target must be an accuracy in (0, 1]. Got: {args.target}")
        check_out(None if args.no_save else args.out)
    except ValueError as e:
        parser.error(str(e))
    run_demo(
        steps=args.steps,
        seed=args.seed,
        width=args.width,
        target=args.target,
        runs=runs,
        out=None if args.no_save else args.out,
        plot=not args.no_plot,
        progress=not args.no_progress,
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m georeparam demo [options]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m georeparam demo", description=DESCRIPTION, formatter_class=help_formatter
    )
    add_arguments(parser)
    return run_from_args(parser, parser.parse_args(argv))
