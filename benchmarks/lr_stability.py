r"""Does GmP tolerate larger SGD learning rates? Steps until the loss goes non-finite, GmP vs standard.

The model and data of ``docs/training.md`` (a 2-64-64-1 ReLU MLP, 256 points of
``sin(3·x₁)·x₂``, full-batch MSE). For every learning rate and momentum, each seed starts the
standard model and its GmP twin from the *same function* (``register`` keeps it; the output layer
stays Cartesian) and trains both with the same SGD settings; GmP runs under
``GeometricOptimizer(SGD(param_groups(model, lr)))``, in the paper's form (``register``'s default).
``GmP+IMN`` adds input mean normalization (``register(..., imn=True)``); ``GmP weight form`` is
``register(..., form="weight")``. A run *diverges* at the first step whose loss or parameters are
non-finite; each cell gives how many seeds diverged and the median step at which they did, and
the median final loss of the others.

    python benchmarks/lr_stability.py                 # SGD, 5 seeds × 300 steps (~1 min on one core)
    python benchmarks/lr_stability.py --optimizer adam
    python benchmarks/lr_stability.py --seeds 1 --steps 50 --lrs 10   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import georeparam  # noqa: E402
from georeparam.optim import GeometricOptimizer, param_groups  # noqa: E402

METHODS = ("standard", "GmP", "GmP+IMN", "GmP weight form")


def make(method: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).double()
    if method != "standard":
        form = "weight" if method == "GmP weight form" else "paper"
        georeparam.register(model, exclude=["4"], imn=method == "GmP+IMN", form=form)
    return model


def _optimizer(kind: str, params, lr: float, momentum: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def run(
    method: str, seed: int, lr: float, momentum: float, steps: int, kind: str = "sgd"
) -> Dict[str, Optional[float]]:
    """One run: ``{"diverged_at": step or None, "loss": final loss or None}``."""
    model = make(method, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(256, 2, generator=g, dtype=torch.float64)
    y = torch.sin(3 * x[:, :1]) * x[:, 1:]
    if method == "standard":
        opt = _optimizer(kind, model.parameters(), lr, momentum)
    else:
        opt = GeometricOptimizer(_optimizer(kind, param_groups(model, lr=lr), lr, momentum), model)
    loss = None
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if not math.isfinite(loss.item()):
            return {"diverged_at": step, "loss": None}
        loss.backward()
        opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return {"diverged_at": step, "loss": None}
    return {"diverged_at": None, "loss": loss.item()}


def _cell(rs: List[Dict[str, Optional[float]]]) -> str:
    div = [r["diverged_at"] for r in rs if r["diverged_at"] is not None]
    ok = [r["loss"] for r in rs if r["diverged_at"] is None]
    out = f"{len(div)}/{len(rs)}"
    if div:
        out += f" at step {statistics.median(div):g}"
    if ok:
        out += f" · loss {statistics.median(ok):.3g}"
    return out


def table(lrs: List[float], momenta: List[float], seeds: int, steps: int, kind: str = "sgd") -> str:
    """Rows: learning rate (and momentum); cells: seeds diverged (median step) · median final loss of the others."""
    head = "| SGD lr | momentum |" if kind == "sgd" else "| Adam lr |"
    lines = [head + "".join(f" {m} |" for m in METHODS), "|---" * (head.count("|") - 1 + len(METHODS)) + "|"]
    for lr in lrs:
        for mom in momenta if kind == "sgd" else [0.0]:
            cells = [_cell([run(method, s, lr, mom, steps, kind) for s in range(seeds)]) for method in METHODS]
            first = f"| {lr:g} | {mom:g} |" if kind == "sgd" else f"| {lr:g} |"
            lines.append(first + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lrs", default=None, help="default: SGD 0.1,0.3,1,3,10; Adam 0.01,0.03,0.1,0.3,1")
    p.add_argument("--momenta", default="0,0.9")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lrs = a.lrs or ("0.1,0.3,1,3,10" if a.optimizer == "sgd" else "0.01,0.03,0.1,0.3,1")
    print(
        table(
            [float(v) for v in lrs.split(",")], [float(v) for v in a.momenta.split(",")], a.seeds, a.steps, a.optimizer
        )
    )


if __name__ == "__main__":
    main()
