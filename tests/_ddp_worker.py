"""One rank of the 2-process DDP check in test_machinery.py (also the single-process reference).

    python tests/_ddp_worker.py --rank R --world-size 2 --port P --out DIR     # a DDP rank
    python tests/_ddp_worker.py --world-size 1 --out DIR                       # the reference

Trains the same registered model for 3 SGD steps on a fixed full batch; each DDP rank sees its
half of the batch (the loss is a mean, so DDP's gradient average equals the full-batch gradient).
Rank 0 (or the reference) writes ``state.pt`` (the registered state_dict) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

import georeparam

STEPS = 3
BATCH = 8


def build():
    """The model, its data and the registered layers, identical in every process."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone (pytest imports this)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 6), nn.ReLU(), nn.Linear(6, 1)
        ).double()
        georeparam.register(model)
        x = torch.randn(BATCH, 2, 5, dtype=torch.float64)
        y = torch.randn(BATCH, 1, dtype=torch.float64)
    return model, x, y


def train(model, x, y, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    return model


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, x, y = build()
    if a.world_size == 1:
        train(model, x, y)
        torch.save(model.state_dict(), a.out / "state.pt")
        return
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(a.port)
    dist.init_process_group("gloo", rank=a.rank, world_size=a.world_size)
    try:
        ddp = DDP(model)
        per = BATCH // a.world_size
        sl = slice(a.rank * per, (a.rank + 1) * per)
        train(ddp, x[sl], y[sl])
        if a.rank == 0:
            torch.save(model.state_dict(), a.out / "state.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Note [Gloo teardown] in examples/train_ddp.py: a gloo rank can abort in C++ teardown after
    # the script is done ("terminate called without an active exception"); it happened to this
    # worker once in a clean-clone CI run (2026-11-28). Leave without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
