"""The main job: SP vs GmP on generated 2-D data (two interleaved spirals)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .api import register


def spirals(n: int, *, noise: float = 0.15, generator: torch.Generator) -> tuple:
    """Two interleaved spirals in 2-D; labels in {0, 1}."""
    t = torch.rand(n, generator=generator) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / (3 * math.pi)
    x = x + noise / (3 * math.pi) * torch.randn(n, 2, generator=generator)
    return x, label.float()


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def run_demo(steps: int = 600, seed: int = 0, width: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    x, y = spirals(2000, generator=g)
    xt, yt = spirals(2000, generator=g)
    results = {}
    for method, lr in (("SP", 0.01), ("GmP", 0.1)):
        torch.manual_seed(seed)
        model = _mlp(width)
        if method == "GmP":
            register(model, exclude=["4"])
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = ((model(xt).squeeze(1) > 0).float() == yt).float().mean().item()
        results[method] = dict(loss=loss.item(), acc=acc, seconds=time.perf_counter() - start, lr=lr)
    print("| method | lr | final loss | test accuracy | seconds |")
    print("|---|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v['lr']} | {v['loss']:.4f} | {v['acc']:.3f} | {v['seconds']:.1f} |")
    return results


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m georeparam demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_demo(steps=args.steps, seed=args.seed)
    return 0
