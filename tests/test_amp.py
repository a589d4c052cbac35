"""Mixed precision: autocast keeps the map in float32 or better; bf16 parameters work.

Stated tolerances (relative Frobenius error of each parameter's gradient against a float64 run,
GELU MLP, 256 samples; measured on CPU, torch 2.13):

* bf16 autocast: ≤ 0.1 (measured 1.6e-3 … 5.7e-2), and no worse than 1.5× the same model's
  *standard* (non-GmP) layers under the same autocast (measured 0.98 … 1.03×): GmP adds nothing
  to what autocast's low-precision matmuls cost.
* fp16 autocast: ≤ 0.05 (measured 3e-4 … 2.4e-2), same comparison.
* float32 (no autocast): ≤ 1e-5 (measured ~3e-7).

bf16 *storage* (``model.bfloat16()``): the weight GmP rebuilds is within 6e-3 of the original
(measured 2.9e-3 … 4.5e-3 for fan-in 2 … 25,088, flat in fan-in), about twice the 1.5e-3 …
1.9e-3 of storing the weight itself in bf16.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import georeparam
from conftest import rel_err, seeded
from georeparam._map import use_backend

MAP_OPS = {"cos", "sin", "cumprod", "atan2"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _RecordDtypes(TorchDispatchMode):
    """Records (op name, input dtypes) of every aten op, as seen *after* autocast's casts."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[str, List[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))


def _mlp(seed: int = 0, geometric: bool = True) -> nn.Sequential:
    with seeded(seed):
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    if geometric:
        georeparam.register(model, exclude=["4"])
    return model


def _data(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(256, 64, generator=g).to(device), torch.randint(0, 10, (256,), generator=g).to(device)


def _grads(model, x, y, amp_dtype=None) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_map_runs_in_float32_or_better_under_autocast(device, amp_dtype, mode):
    # the pure-torch map, whose ops the recorder can see (the compiled CPU kernel's float64
    # arithmetic is checked in tests/test_map_cpu.py)
    with use_backend("torch"):
        _check_map_dtypes(device, amp_dtype, mode)


def _check_map_dtypes(device, amp_dtype, mode):
    layer = georeparam.geometric(nn.Linear(64, 32).to(device), mode=mode)
    x = torch.randn(8, 64, device=device)
    outside = layer.weight.detach().clone()
    rec = _RecordDtypes()
    with torch.autocast(device, dtype=amp_dtype), rec:
        w = layer.weight
        out = layer(x)
        out.float().sum().backward()
    assert w.dtype == torch.float32 and torch.equal(w, outside)  # not a cast of a lower-precision map
    map_calls = [(op, d) for op, d in rec.calls if op in MAP_OPS]
    assert map_calls, "the map's sin/cos/cumprod were not seen"
    for op, dtypes in map_calls:  # forward and backward of the map alike
        assert all(d in (torch.float32, torch.float64) for d in dtypes), (op, dtypes)
    if mode == "exact":  # the cosines' running product is float64 (Note [Where float64 is needed])
        assert any(op == "cumprod" and d == [torch.float64] for op, d in map_calls)
    # the recorder sees autocast at work: the layer's own matmul ran in low precision
    assert any(op in ("addmm", "mm", "linear") and amp_dtype in d for op, d in rec.calls)
    assert out.dtype == amp_dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp_dtype,bound", [(torch.bfloat16, 0.1), (torch.float16, 0.05)])
def test_autocast_gradients_match_float32(device, amp_dtype, bound):
    x, y = _data(device)
    gmp, std = _mlp().to(device), _mlp(geometric=False).to(device)
    ref_gmp = _grads(copy.deepcopy(gmp).double(), x.double(), y)
    ref_std = _grads(copy.deepcopy(std).double(), x.double(), y)
    g32 = _grads(gmp, x, y)
    amp_gmp, amp_std = _grads(gmp, x, y, amp_dtype), _grads(std, x, y, amp_dtype)
    for name in ref_gmp:
        assert rel_err(g32[name], ref_gmp[name]) <= 1e-5, name
        assert torch.isfinite(amp_gmp[name]).all(), name
        assert amp_gmp[name].dtype == torch.float32  # gradients land in the parameters' dtype
        assert rel_err(amp_gmp[name], ref_gmp[name]) <= bound, name
    # layer by layer, GmP's error is what autocast costs the standard layer anyway
    for i in ("0", "2"):
        std_err = max(
            rel_err(amp_std[f"{i}.weight"], ref_std[f"{i}.weight"]), rel_err(amp_std[f"{i}.bias"], ref_std[f"{i}.bias"])
        )
        gmp_err = rel_err(
            amp_gmp[f"{i}.parametrizations.weight.original1"], ref_gmp[f"{i}.parametrizations.weight.original1"]
        )
        assert gmp_err <= 1.5 * std_err, (i, float(gmp_err), float(std_err))


# -------------------------------------------------------------------------------------------------
# bf16 parameters
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in", [2, 17, 784, 4608])
@pytest.mark.parametrize("order", ["register_then_cast", "cast_then_register"])
def test_bf16_storage_precision(fan_in, order):
    with seeded(fan_in):
        layer = nn.Linear(fan_in, 48)
    w32 = layer.weight.detach().clone()
    if order == "register_then_cast":
        layer = georeparam.geometric(layer).bfloat16()
        target = w32
    else:
        layer = georeparam.geometric(layer.bfloat16())
        target = w32.bfloat16()
    g = georeparam.geometry(layer)
    assert g.radius.dtype == g.angles.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    err = rel_err(layer.weight, target)
    plain = rel_err(w32.bfloat16(), w32)  # what bf16 storage of the weight itself costs
    assert err <= 6e-3, float(err)
    assert err <= 3.5 * plain, (float(err), float(plain))


def test_bf16_parameters_train():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (torch.sin(x[:, :4]).sum(1) > 0).long()
    with seeded(0):
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 2))
    georeparam.register(model, exclude=["2"])
    model = model.bfloat16()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    xb = x.bfloat16()
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(xb).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    georeparam.remove(model)  # bakes a bf16 weight back
    assert model[0].weight.dtype == torch.bfloat16
