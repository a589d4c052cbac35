r"""bf16 with GmP: how precisely coordinates stored in bf16 rebuild the weight, and how training fares.

    python benchmarks/precision_bf16.py

1. Storage. For ``nn.Linear(n, 64)`` (PyTorch's default init) and fan-in ``n`` from 2 to 25,088:
   relative Frobenius error of the weight GmP rebuilds when radius and angles are bf16, both
   orders (register then ``.bfloat16()``; ``.bfloat16()`` then register, against the bf16
   weight), next to the error of storing the weight itself in bf16.
2. Training. A 16-64-2 GELU MLP, 300 full-batch Adam steps on a synthetic task, parameters in
   float32 or bf16, GmP (hidden layer) or standard: the final loss.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import georeparam


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def storage() -> None:
    print("| fan-in | W stored in bf16 | GmP: register → bf16 (vs fp32 W) | GmP: bf16 → register (vs bf16 W) |")
    print("|---|---|---|---|")
    for n in (2, 16, 256, 784, 4096, 25088):
        torch.manual_seed(0)
        layer = nn.Linear(n, 64)
        w32 = layer.weight.detach().clone()
        after = georeparam.geometric(copy.deepcopy(layer)).bfloat16()
        lb = copy.deepcopy(layer).bfloat16()
        wb = lb.weight.detach().clone()
        before = georeparam.geometric(lb)
        print(f"| {n} | {rel(w32.bfloat16(), w32):.1e} | {rel(after.weight, w32):.1e} | {rel(before.weight, wb):.1e} |")


def training() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (torch.sin(x[:, :4]).sum(1) > 0).long()
    print("\n| lr | model | float32 params | bf16 params |")
    print("|---|---|---|---|")
    for lr in (1e-3, 1e-2):
        for geo in (True, False):
            row = []
            for dt in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                m = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 2))
                if geo:
                    georeparam.register(m, exclude=["2"])
                m = m.to(dt)
                opt = torch.optim.Adam(m.parameters(), lr=lr)
                for _ in range(300):
                    loss = F.cross_entropy(m(x.to(dt)).float(), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    row.append(F.cross_entropy(m(x.to(dt)).float(), y).item())
            print(f"| {lr:g} | {'GmP' if geo else 'standard'} | {row[0]:.4f} | {row[1]:.4f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    storage()
    training()
