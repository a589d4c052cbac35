r"""Long-run stability: 10,000 Adam steps at learning rate 1.0 on the MNIST-1D MLP.

Two runs from the same initial values and the same batches, GmP on the two hidden layers:

* ``wrapped``: ``GeometricOptimizer(Adam(param_groups(model, lr)))`` — canonicalizes after every step;
* ``plain``: ``Adam(param_groups(model, lr))`` — the same optimizer, angles left to drift.

Tracked every ``--log-every`` steps: training loss, whether any parameter or loss is NaN/Inf, the
largest stored angle ``max |θ|`` (latitudes and last angles separately; canonical ranges are
``|φ| ≤ π/2`` and ``|θ_last| ≤ π``), and the fraction of angles outside the canonical range. At the
end: test accuracy of both runs.

    python benchmarks/long_run.py                       # 10,000 steps, ~1 min per run on one core
    python benchmarks/long_run.py --other-lr 0.01             # GmP coordinates at 1.0, output layer 0.01
    python benchmarks/long_run.py --steps 200 --samples 600   # a smoke run

Writes ``results/long_run.json`` and ``results/long_run.png`` (angles over time); prints a table.
The MNIST-1D data come from the ``mnist1d`` package's generator (no download).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import georeparam
from georeparam.optim import GeometricOptimizer, param_groups

REPO = Path(__file__).resolve().parents[1]


def load_data(samples: Optional[int], seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42 + seed
    if samples:
        args.num_samples = samples
    d = make_dataset(args)
    x, xt = (torch.tensor(np.asarray(d[k]), dtype=torch.float32) for k in ("x", "x_test"))
    y, yt = (torch.tensor(np.asarray(d[k]), dtype=torch.long) for k in ("y", "y_test"))
    mean, std = x.mean(0), x.std(0)
    return (x - mean) / std, y, (xt - mean) / std, yt


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    georeparam.register(model, exclude=["4"])
    return model


def angle_stats(model: nn.Module) -> Dict[str, float]:
    lat_max = lon_max = 0.0
    outside = total = 0
    for m in model.modules():
        if georeparam.is_geometric(m):
            a = georeparam.geometry(m).angles.detach().double()
            lat, lon = a[:, :-1].abs(), a[:, -1].abs()
            lat_max = max(lat_max, float(lat.max()))
            lon_max = max(lon_max, float(lon.max()))
            outside += int((lat > math.pi / 2).sum() + (lon > math.pi).sum())
            total += a.numel()
    return {"max_abs_latitude": lat_max, "max_abs_last_angle": lon_max, "fraction_outside": outside / max(total, 1)}


def finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run(
    kind: str,
    data,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    log_every: int,
    quiet: bool,
    other_lr: Optional[float] = None,
) -> dict:
    from tqdm import tqdm

    x, y, xt, yt = data
    model = make_model(seed)
    base = torch.optim.Adam(param_groups(model, lr=lr, other=None if other_lr is None else {"lr": other_lr}))
    opt = GeometricOptimizer(base, model) if kind == "wrapped" else base
    g = torch.Generator().manual_seed(seed + 1)
    history: List[dict] = []
    first_nonfinite = None
    worst = {"max_abs_latitude": 0.0, "max_abs_last_angle": 0.0}
    start = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=kind, disable=quiet, mininterval=1.0):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            ok = bool(torch.isfinite(loss)) and finite(model)
            if not ok and first_nonfinite is None:
                first_nonfinite = step
            s = angle_stats(model)
            for k in worst:
                worst[k] = max(worst[k], s[k])
            history.append({"step": step, "loss": float(loss.detach()), "finite": ok, **s})
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return {
        "kind": kind,
        "steps": steps,
        "lr": lr,
        "other_lr": lr if other_lr is None else other_lr,
        "seconds": seconds,
        "first_nonfinite_step": first_nonfinite,
        "final": history[-1],
        "max_over_run": worst,
        "test_accuracy": acc,
        "history": history,
    }


def plot(results: Dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for kind, r in results.items():
        h = r["history"]
        steps = [e["step"] for e in h]
        axes[0].plot(steps, [e["max_abs_latitude"] for e in h], label=kind)
        axes[1].plot(steps, [e["max_abs_last_angle"] for e in h], label=kind)
        axes[2].plot(steps, [e["loss"] for e in h], label=kind, alpha=0.7)
    axes[0].axhline(math.pi / 2, color="k", ls=":", lw=1)
    axes[1].axhline(math.pi, color="k", ls=":", lw=1)
    axes[0].set(title="max |latitude| (canonical ≤ π/2)", xlabel="step", yscale="log")
    axes[1].set(title="max |last angle| (canonical ≤ π)", xlabel="step", yscale="log")
    axes[2].set(title="training loss (batch)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"MNIST-1D MLP, Adam lr {next(iter(results.values()))['lr']}, GmP hidden layers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument(
        "--other-lr", type=float, default=None, help="learning rate of the Cartesian output layer (default: --lr)"
    )
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=None, help="MNIST-1D size (default: the package's 5,000)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "results" / "long_run.json"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.samples, args.seed)
    results = {
        k: run(k, data, args.steps, args.lr, args.batch, args.seed, args.log_every, args.quiet, args.other_lr)
        for k in ("wrapped", "plain")
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if not args.no_plot:
        plot(results, out.with_suffix(".png"))
    other = "" if args.other_lr is None else f" (output layer {args.other_lr})"
    print(
        f"\nMNIST-1D MLP (40-100-100-10, GmP hidden layers), Adam lr {args.lr}{other}, {args.steps} steps, batch {args.batch}\n"
    )
    print(
        "| run | NaN/Inf | max abs latitude (run) | max abs last angle (run) | outside canonical (end) | final batch loss | test acc | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        nan = "none" if r["first_nonfinite_step"] is None else f"from step {r['first_nonfinite_step']}"
        w, f = r["max_over_run"], r["final"]
        print(
            f"| {k} | {nan} | {w['max_abs_latitude']:.4g} | {w['max_abs_last_angle']:.4g} | "
            f"{100 * f['fraction_outside']:.1f}% | {f['loss']:.4g} | {r['test_accuracy']:.3f} | {r['seconds']:.0f} |"
        )
    return results


if __name__ == "__main__":
    main()
