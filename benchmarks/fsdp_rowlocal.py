r"""What FSDP2 communicates for GmP, and a row-local alternative that evaluates the map on shards.

Launch with torchrun (gloo on CPU)::

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_rowlocal.py

Three runs of ``examples/train_ddp.py``'s model and data, 20 Adam steps each, on 2 ranks:

* ``standard``: the Cartesian model under ``fully_shard``;
* ``gmp``: the GmP model under ``fully_shard``. FSDP2 shards radius, angles and offset along the
  unit dimension (``Shard(0)``), all-gathers them before the layer runs, evaluates the map on the
  gathered tensors — on every rank, for every unit — and reduce-scatters their gradients;
* ``gmp-keep``: the same with ``reshard_after_forward=False``: the gathered coordinates stay
  until backward, so each is gathered once per step instead of twice;
* ``gmp-rowlocal``: the GmP layers' radius, angles and offset stay ``Shard(0)`` DTensors outside
  ``fully_shard`` (``ignored_params``); each rank evaluates the map on its own units only (the map
  is row-local: no communication), and the finished ``W`` and ``b`` are all-gathered
  (``redistribute(Replicate)``, with ``to_local(grad_placements=[Partial("avg")])`` so that the
  backward is a reduce-scatter of the averaged gradient). The rest of the model stays under
  ``fully_shard``.

Per run: bytes each rank sends per step in all-gathers and reduce-scatters (counted at the
dispatcher, c10d and functional collectives alike), the number of map rows each rank evaluates
per step, and the largest difference of the final parameters from a single-process run.

Why FSDP2 itself cannot do what ``gmp-rowlocal`` does: its unsharded parameter is an autograd
leaf (``_fully_shard/_fsdp_param.py``, Note "FSDP tensors"); the all-gather extension hooks
(``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``) transform data around the gather but are not
differentiated, so a map applied before the gather would get no gradient. And it would not
save bytes: a unit's direction needs ``n − 1`` angles, its weight row ``n`` numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import georeparam
from georeparam._map import scaled_unit

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("georeparam_example_train_ddp", REPO / "examples" / "train_ddp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -------------------------------------------------------------------------------------------------
# counting collectives at the dispatcher
# -------------------------------------------------------------------------------------------------

_GATHER = {
    "_allgather_base_",
    "all_gather_into_tensor",
    "allgather_into_tensor_coalesced",
    "all_gather_into_tensor_coalesced",
}
_SCATTER = {"_reduce_scatter_base_", "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"}
_REDUCE = {"allreduce_", "all_reduce"}


class CountCollectives(TorchDispatchMode):
    """Bytes of the input each rank contributes to every all-gather / reduce-scatter / all-reduce."""

    def __init__(self):
        super().__init__()
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = (
            "all_gather"
            if name in _GATHER
            else "reduce_scatter"
            if name in _SCATTER
            else "all_reduce"
            if name in _REDUCE
            else None
        )
        if kind is not None:
            # c10d ops take (output, input, ...) for gathers/scatters; functional ones take (input, ...)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            if name.startswith("_") or name == "allreduce_":
                src = lists[-1] if lists else tensors[-1:] if name != "allreduce_" else tensors
                src = src if isinstance(src, (list, tuple)) else [src]
                if name in ("_allgather_base_", "_reduce_scatter_base_"):
                    src = [tensors[1]]
            else:
                src = lists[0] if lists else tensors[:1]
            self.bytes[kind] += sum(t.numel() * t.element_size() for t in src)
            self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


# -------------------------------------------------------------------------------------------------
# the row-local scheme
# -------------------------------------------------------------------------------------------------


def _gather_rows(local: torch.Tensor, mesh, rows: int) -> torch.Tensor:
    """All-gather row shards into the full (rows, …) tensor; backward: reduce-scatter of the mean."""
    shape = (rows,) + tuple(local.shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    full = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
    return full.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial("avg")])


def make_rowlocal(model: nn.Module, mesh) -> List[nn.Parameter]:
    """Turn every GmP layer's coordinates into Shard(0) DTensors evaluated row-locally.

    Returns the new Parameters (to keep out of ``fully_shard``).
    """
    new = []
    for m in model.modules():
        if not georeparam.is_geometric(m):
            continue
        wlist = m.parametrizations["weight"]
        geo = wlist[0]
        for name in ("original0", "original1"):
            p = nn.Parameter(distribute_tensor(getattr(wlist, name).detach(), mesh, [Shard(0)]))
            setattr(wlist, name, p)
            new.append(p)

        def weight_forward(self, radius, angles, mesh=mesh):
            rows = scaled_unit(radius.to_local(), angles.to_local(), self.mode)  # this rank's units only
            self.rows_evaluated = getattr(self, "rows_evaluated", 0) + rows.shape[0]
            return self.from_units(_gather_rows(rows, mesh, self.units))

        geo.forward = types.MethodType(weight_forward, geo)
        if "bias" in m.parametrizations:
            blist = m.parametrizations["bias"]
            p = nn.Parameter(distribute_tensor(blist.original.detach(), mesh, [Shard(0)]))
            blist.original = p
            new.append(p)

            def bias_forward(self, offset, mesh=mesh):
                return _gather_rows(self._radius().to_local() * offset.to_local(), mesh, offset.shape[0])

            blist[0].forward = types.MethodType(bias_forward, blist[0])
    return new


def full_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }


def train(ex, variant: str, mesh, steps: int = 20, lr: float = 0.05) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = ex.make_model(0, geometric=variant != "standard")
    ignored = set(make_rowlocal(model, mesh)) if variant == "gmp-rowlocal" else set()
    reshard = variant != "gmp-keep"  # keep: no re-gather before backward (ZeRO-2 style)
    for m in model:
        if any(p not in ignored for p in m.parameters()):
            fully_shard(m, mesh=mesh, ignored_params=ignored, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=reshard)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = ex.make_data(0)
    per = ex.GLOBAL_BATCH // world
    counter = CountCollectives()
    with counter:
        for xb, yb in ex.batches(x, y, steps, 0):
            loss = F.cross_entropy(model(xb[rank * per : (rank + 1) * per]), yb[rank * per : (rank + 1) * per])
            opt.zero_grad()
            loss.backward()
            opt.step()
    rows = 0
    map_rows_total = 0
    for m in model.modules():
        if georeparam.is_geometric(m):
            geo = m.parametrizations["weight"][0]
            rows += getattr(geo, "rows_evaluated", 0)
            map_rows_total += geo.units
    if variant in ("gmp", "gmp-keep"):  # FSDP2: every rank evaluates every unit in forward
        rows = map_rows_total * steps
    return {
        "bytes_per_step": {k: v / steps for k, v in counter.bytes.items()},
        "calls_per_step": {k: v / steps for k, v in counter.calls.items()},
        "map_rows_per_step_per_rank": rows / steps,
        "state": full_state(model),
        "placements": {n: str(p.placements) for n, p in model.named_parameters() if isinstance(p, DTensor)},
    }


def main() -> None:
    if "WORLD_SIZE" not in os.environ:
        sys.exit("launch with: torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_rowlocal.py")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ex = _example()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for variant in ("standard", "gmp", "gmp-keep", "gmp-rowlocal"):
        results[variant] = train(ex, variant, mesh)
    if dist.get_rank() == 0:
        ref = {
            "standard": ex.train("none", geometric=False)["state_dict"],
            "gmp": ex.train("none")["state_dict"],
        }
        ref["gmp-rowlocal"] = ref["gmp-keep"] = ref["gmp"]
        print(
            f"\n2 ranks (gloo), {ex.IN_FEATURES}-{'-'.join(map(str, ex.HIDDEN))}-{ex.CLASSES} GELU MLP, GmP on the hidden layers, 20 Adam steps\n"
        )
        print(
            "| run | all-gather B/step/rank | reduce-scatter B/step/rank | map rows/step/rank | max |Δ| vs 1 process |"
        )
        print("|---|---|---|---|---|")
        summary = {}
        for v, r in results.items():
            diff = max(float((r["state"][k] - ref[v][k]).abs().max()) for k in ref[v])
            b = r["bytes_per_step"]
            summary[v] = {
                "bytes_per_step": b,
                "calls_per_step": r["calls_per_step"],
                "map_rows_per_step_per_rank": r["map_rows_per_step_per_rank"],
                "max_abs_diff": diff,
                "placements": r["placements"],
            }
            print(
                f"| {v} | {b.get('all_gather', 0):.0f} | {b.get('reduce_scatter', 0):.0f} | {r['map_rows_per_step_per_rank']:.0f} | {diff:.2g} |"
            )
        out = REPO / "results" / "fsdp_rowlocal.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    _example().exit_if_launched()  # Note [Gloo teardown]
