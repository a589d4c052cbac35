r"""Data-parallel GmP training: DDP or FSDP2, launched with ``torchrun``.

GmP needs nothing special from PyTorch's distributed engines. The one rule is the order:

    register(model)  →  DDP(model) / fully_shard(model)  →  build the optimizer

``register`` replaces ``weight``/``bias`` with new Parameters (radius, angles, offset), so DDP
and FSDP2 must see the registered model, and the optimizer must see what they hand back (FSDP2
swaps every Parameter for a sharded ``DTensor`` one).

Usage (gloo on CPU, nccl when CUDA is available)::

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --engine ddp
    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --engine fsdp2 --comm-stats
    python examples/train_ddp.py                      # one process: the reference run

Every rank trains on its own contiguous slice of the same global batch, so N processes compute
the same mean gradient as one process with the whole batch; the final parameters agree to float32
rounding (``tests/test_distributed.py`` checks it). ``--out FILE`` saves the full (unsharded)
state_dict, the losses and, with ``--comm-stats``, the bytes each rank sent per collective.

What FSDP2 communicates for a GmP layer (see docs/distributed.md): it shards radius, angles and
offset along the unit dimension (``Shard(0)``), all-gathers them before the layer's forward (and
again before its backward), runs the map on the gathered tensors on every rank, and
reduce-scatters their gradients: ``units·(fan_in + 1)`` numbers per layer each way, exactly the
count of a standard layer's weight and bias.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import defaultdict
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import georeparam

IN_FEATURES, HIDDEN, CLASSES = 8, (33, 17), 3  # odd widths: FSDP2 shards them unevenly (padding)
DATASET_SIZE, GLOBAL_BATCH = 256, 32


# -------------------------------------------------------------------------------------------------
# model and data (identical on every rank: everything is seeded)
# -------------------------------------------------------------------------------------------------


def make_model(seed: int = 0, geometric: bool = True) -> nn.Sequential:
    """A small GELU MLP; with ``geometric`` every layer but the output layer is GmP."""
    g = torch.Generator().manual_seed(seed)
    sizes = (IN_FEATURES,) + HIDDEN
    layers: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    layers.append(nn.Linear(sizes[-1], CLASSES))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():  # seeded without touching the global RNG
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    if geometric:
        georeparam.register(model, exclude=[str(len(layers) - 1)])
    return model


def make_data(seed: int = 0):
    """A fixed synthetic classification set: labels from a random teacher network."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(DATASET_SIZE, IN_FEATURES, generator=g)
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=g)
    y = torch.sin(2 * x) @ teacher
    return x, y.argmax(dim=1)


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> Iterator:
    """The same sequence of global batches on every rank (a seeded shuffle per epoch)."""
    g = torch.Generator().manual_seed(seed + 2)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < GLOBAL_BATCH:
            order = torch.cat([order, torch.randperm(len(x), generator=g)])
        idx, order = order[:GLOBAL_BATCH], order[GLOBAL_BATCH:]
        yield x[idx], y[idx]


def build_optimizer(model: nn.Module, kind: str, lr: float) -> torch.optim.Optimizer:
    """``adam``: plain Adam; ``gmp``: GmP parameter groups and the canonicalizing wrapper."""
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    from georeparam.optim import GeometricOptimizer, param_groups

    return GeometricOptimizer(torch.optim.Adam(param_groups(model, lr=lr)), model)


# -------------------------------------------------------------------------------------------------
# communication statistics
# -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_fsdp_collectives(stats: Dict[str, List[int]]):
    """Record the bytes each FSDP2 collective sends from this rank.

    FSDP2's default collectives call ``dist.all_gather_single`` and ``dist.reduce_scatter_single``
    (torch 2.13, ``_fully_shard/_fsdp_collectives.py``) and look them up on the module at call
    time, so wrapping the module attributes sees every one. Bytes are those of the input each rank
    contributes (its shard for all-gather, the full unsharded gradient for reduce-scatter).
    """
    originals = {}

    def wrap(name: str, input_key: str, pos: int):
        fn = getattr(dist, name)
        originals[name] = fn

        def counted(*args, **kwargs):
            t = kwargs[input_key] if input_key in kwargs else args[pos]
            stats[name].append(t.numel() * t.element_size())
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    wrap("all_gather_single", "input_tensor", 1)
    wrap("reduce_scatter_single", "input", 1)
    try:
        yield stats
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _counting_allreduce_hook(stats: Dict[str, List[int]]):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        buf = bucket.buffer()
        stats["all_reduce"].append(buf.numel() * buf.element_size())
        return allreduce_hook(state, bucket)

    return hook


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The unsharded state_dict on every rank (a collective under FSDP2: call it on all ranks)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):  # a DTensor (FSDP2)
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def train(
    engine: str = "none",
    steps: int = 20,
    lr: float = 0.05,
    seed: int = 0,
    optimizer: str = "adam",
    geometric: bool = True,
    comm_stats: bool = False,
) -> dict:
    """Train on this rank; ``engine`` is ``none`` (one process), ``ddp`` or ``fsdp2``."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if engine != "none" else (0, 1)
    if GLOBAL_BATCH % world:
        raise ValueError(f"the global batch {GLOBAL_BATCH} must split evenly over ranks. Got: world size {world}")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.is_initialized() and dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    model = make_model(seed, geometric).to(device)  # 1. register (inside make_model)
    stats: Dict[str, List[int]] = defaultdict(list)
    if engine == "ddp":  # 2. wrap
        model = nn.parallel.DistributedDataParallel(model)
        if comm_stats:
            model.register_comm_hook(None, _counting_allreduce_hook(stats))
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for m in model:
            if any(True for _ in m.parameters()):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif engine != "none":
        raise ValueError(f"engine must be one of none, ddp, fsdp2. Got: {engine!r}")
    placements = {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}
    opt = build_optimizer(model, optimizer, lr)  # 3. optimizer last
    x, y = make_data(seed)
    per_rank = GLOBAL_BATCH // world
    losses = []
    counting = count_fsdp_collectives(stats) if (comm_stats and engine == "fsdp2") else contextlib.nullcontext()
    with counting:
        for xb, yb in batches(x, y, steps, seed):
            xb = xb[rank * per_rank : (rank + 1) * per_rank].to(device)
            yb = yb[rank * per_rank : (rank + 1) * per_rank].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    loss_t = torch.stack(losses).cpu()
    if engine != "none":  # report the global mean loss, the single-process number
        loss_t = loss_t.to(device)
        dist.all_reduce(loss_t)
        loss_t = (loss_t / world).cpu()
    return {
        "state_dict": full_state_dict(model),
        "losses": loss_t,
        "comm_bytes_per_step": {k: sum(v) / steps for k, v in stats.items()},
        "comm_calls_per_step": {k: len(v) / steps for k, v in stats.items()},
        "placements": placements,
        "world_size": world,
        "engine": engine,
    }


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--engine", choices=["ddp", "fsdp2", "none"], default=None, help="default: ddp under torchrun, none otherwise"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--optimizer", choices=["adam", "gmp"], default="adam", help="gmp: georeparam.optim param_groups + wrapper"
    )
    p.add_argument("--standard", action="store_true", help="train the standard (not GmP) model, for comparison")
    p.add_argument("--comm-stats", action="store_true", help="count the bytes each collective sends")
    p.add_argument("--out", default=None, help="torch.save the results (rank 0) to this file")
    args = p.parse_args(argv)
    launched = "WORLD_SIZE" in os.environ
    engine = args.engine or ("ddp" if launched else "none")
    if engine != "none":
        if not launched:
            p.error(f"--engine {engine} needs torchrun (WORLD_SIZE is not set)")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    try:
        result = train(engine, args.steps, args.lr, args.seed, args.optimizer, not args.standard, args.comm_stats)
        if engine == "none" or dist.get_rank() == 0:
            l = result["losses"]
            print(f"{engine} world={result['world_size']}: loss {l[0]:.4f} → {l[-1]:.4f} over {len(l)} steps")
            for k, v in result["comm_bytes_per_step"].items():
                print(f"  {k}: {v:.0f} bytes/step/rank in {result['comm_calls_per_step'][k]:.0f} calls")
            if args.out:
                torch.save(result, args.out)
        if dist.is_initialized():
            dist.barrier()  # every rank has finished writing before any tears gloo down
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_if_launched() -> None:
    """End a torchrun-launched worker now, past gloo's teardown abort; do nothing otherwise.

    # Note [Gloo teardown]
    A gloo worker sometimes aborts *after* its script has finished, while the interpreter shuts
    down ("terminate called without an active exception", SIGABRT; faulthandler shows no Python
    frame, so it is C++ teardown, not this script). Measured on 2 loaded cores: 1 run in 20-40,
    even after a barrier and destroy_process_group. Call this once everything is written: a
    launched worker flushes and leaves without running C++ static destructors.
    """
    if "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
    exit_if_launched()
