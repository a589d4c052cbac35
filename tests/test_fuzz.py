"""Fuzzing GmP over layer types, shapes, dtypes and awkward values.

Properties, each over generated layers (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d with groups;
fan-in 1 … 10,000, odd sizes; float32, float64, bfloat16; ``exact`` and ``fast`` modes) whose
values are Gaussian, tiny (1e-30), huge (1e30; 1e150 in float64), with zero rows, one-hot rows
(angles at the poles), rows a hair off an axis, and constant rows:

1. ``register`` keeps the function: every unit's weight row and bias are rebuilt within the
   dtype's tolerance (or registration refuses with the documented ValueError, e.g. ``λ = b/r``
   overflowing), and the forward and backward stay finite wherever the original layer's are.
2. ``remove`` keeps the function: the baked weight and bias are bit-for-bit what the GmP layer
   computed, and the class is the original again.
3. ``canonicalize`` keeps the function: from arbitrary coordinates (angles up to ±1e4, negative
   radii, exact poles) the canonical ones rebuild the same weight and bias, lie in the canonical
   ranges, and give finite outputs and gradients.

Budget: the default run is small (a few dozen examples per property, well under 40 s on one
core). ``GEOREPARAM_FUZZ=full`` runs the campaign (1,200 examples per property, 2,400 in all):

    GEOREPARAM_FUZZ=full python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from georeparam.coords import canonicalize, to_cartesian
from conftest import rel_err

FULL = os.environ.get("GEOREPARAM_FUZZ", "").lower() == "full"
BUDGET = settings(
    max_examples=1200 if FULL else 150,
    deadline=None,
    derandomize=not FULL,  # the default run is a fixed, reproducible sample
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

KINDS = ("linear", "conv1d", "conv2d", "conv3d", "convT1d", "convT2d", "convT3d")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
STRUCTURES = ("gaussian", "zero_rows", "one_hot", "near_axis", "constant", "sparse")
MAX_FAN_IN, MAX_NUMEL = 10_000, 120_000


# -------------------------------------------------------------------------------------------------
# generated layers
# -------------------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    dtype: torch.dtype
    mode: str
    shape: dict  # constructor arguments
    structure: str
    scale_exp: int
    bias: str  # "none", "zero", "gaussian"
    seed: int

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: enough to rebuild it
        return (
            f"Case({self.kind}, {str(self.dtype)[6:]}, {self.mode}, {self.shape}, {self.structure}, "
            f"1e{self.scale_exp}, bias={self.bias}, seed={self.seed})"
        )


def _fan_in_strategy():
    return st.one_of(st.integers(1, 9), st.integers(10, 300), st.sampled_from([511, 1000, 2049, 4097, 9999, 10_000]))


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(("exact", "fast")))
    if kind == "linear":
        fan_in = draw(_fan_in_strategy())
        units = draw(st.integers(1, 8 if fan_in > 1000 else 17))
        shape = {"in_features": fan_in, "out_features": units}
    else:
        dims = int(kind[-2])
        groups = draw(st.sampled_from((1, 1, 2, 3)))
        k = tuple(draw(st.integers(1, 5 if dims < 3 else 3)) for _ in range(dims))
        per_group_in = draw(st.integers(1, max(1, min(40, MAX_FAN_IN // math.prod(k)))))
        out_per_group = draw(st.integers(1, 5))
        shape = {
            "in_channels": per_group_in * groups,
            "out_channels": out_per_group * groups,
            "kernel_size": k,
            "groups": groups,
        }
    scale_range = 150 if dtype == torch.float64 else 30
    # the edges: largest finite rows (radius may overflow the dtype), subnormal and vanishing rows
    edges = (-320, -310, -300, 300, 306, 307) if dtype == torch.float64 else (-46, -42, -38, 36, 37, 38)
    scale_exp = draw(
        st.one_of(
            st.just(0),
            st.integers(-3, 3),
            st.sampled_from((-scale_range, scale_range)),
            st.integers(-scale_range, scale_range),
            st.sampled_from(edges),
        )
    )
    return Case(
        kind=kind,
        dtype=dtype,
        mode=mode,
        shape=shape,
        structure=draw(st.sampled_from(STRUCTURES)),
        scale_exp=scale_exp,
        bias=draw(st.sampled_from(("none", "zero", "gaussian", "gaussian"))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _constructor(kind: str):
    return {
        "linear": nn.Linear,
        "conv1d": nn.Conv1d,
        "conv2d": nn.Conv2d,
        "conv3d": nn.Conv3d,
        "convT1d": nn.ConvTranspose1d,
        "convT2d": nn.ConvTranspose2d,
        "convT3d": nn.ConvTranspose3d,
    }[kind]


def _units_view(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``(units, fan_in)`` view of a weight of ``layer``'s layout (independent of GmP's to_units)."""
    if isinstance(layer, nn.Linear):
        return weight
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        in_ch, opg = weight.shape[0], weight.shape[1]
        w = weight.reshape(g, in_ch // g, opg, -1).permute(0, 2, 1, 3)  # group, out, in, k
        return w.reshape(g * opg, -1)
    return weight.reshape(weight.shape[0], -1)


def build(case: Case) -> Optional[Tuple[nn.Module, torch.Tensor]]:
    """The layer (plain, values per ``case``) and an input; ``None`` when the shape is too big."""
    layer = _constructor(case.kind)(**case.shape, bias=case.bias != "none")
    if layer.weight.numel() > MAX_NUMEL:
        return None
    g = torch.Generator().manual_seed(case.seed)
    units = _units_view(layer, layer.weight.detach())
    U, n = units.shape
    if n > MAX_FAN_IN:
        return None
    rows = torch.randn(U, n, generator=g, dtype=torch.float64)
    s = case.structure
    zero = torch.zeros(U, dtype=torch.bool)
    if s == "zero_rows":
        zero = torch.rand(U, generator=g) < 0.5
        rows[zero] = 0
    elif s == "one_hot":
        idx = torch.randint(0, n, (U,), generator=g)
        sign = torch.where(torch.rand(U, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        rows = torch.zeros(U, n, dtype=torch.float64)
        rows[torch.arange(U), idx] = sign
    elif s == "near_axis":
        idx = torch.randint(0, n, (U,), generator=g)
        rows = rows * 1e-7
        rows[torch.arange(U), idx] = 1.0
    elif s == "constant":
        rows = torch.ones(U, n, dtype=torch.float64) * torch.randn(U, 1, generator=g, dtype=torch.float64)
    elif s == "sparse":
        rows = rows * (torch.rand(U, n, generator=g) < 0.1)
    rows = rows * (10.0**case.scale_exp)
    with torch.no_grad():
        w = _units_view(layer, torch.arange(layer.weight.numel()).reshape(layer.weight.shape))  # index map
        flat = torch.empty(layer.weight.numel(), dtype=torch.float64)
        flat[w.reshape(-1)] = rows.reshape(-1)
        layer = layer.to(case.dtype)
        layer.weight.copy_(flat.reshape(layer.weight.shape).to(case.dtype))
        if layer.bias is not None:
            top = rows.abs().amax(dim=1).clamp_min(1e-300)  # squares of 1e300 overflow float64
            row_norm = top * (rows / top[:, None]).norm(dim=1)
            b = torch.zeros(U, dtype=torch.float64)
            if case.bias == "gaussian":  # sized like the rows (a plausible λ), zero where the row is
                b = torch.randn(U, generator=g, dtype=torch.float64) * row_norm / math.sqrt(n)
            b[zero | (row_norm == 0)] = 0
            layer.bias.copy_(b.to(case.dtype))
    if not bool(torch.isfinite(layer.weight).all()) or (
        layer.bias is not None and not bool(torch.isfinite(layer.bias).all())
    ):
        return None  # the scale overflowed the dtype: not a finite input
    if isinstance(layer, nn.Linear):
        x = torch.randn(3, n, generator=g)
    else:
        spatial = tuple(k + 1 for k in layer.kernel_size)
        x = torch.randn((2, layer.in_channels) + spatial, generator=g)
    return layer, x.to(case.dtype)


# -------------------------------------------------------------------------------------------------
# tolerances
# -------------------------------------------------------------------------------------------------


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def weight_tol(dtype: torch.dtype, mode: str, fan_in: int) -> float:
    """Per-unit relative error allowed for a rebuilt weight row."""
    if dtype == torch.bfloat16:
        return 1.5e-2  # bf16 angles and radius, each rounded once (worst row seen: 7.3e-3)
    base = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    if mode == "fast":  # ~√n·eps (documented for the fast mode)
        return max(base, 4 * math.sqrt(fan_in) * _eps(dtype))
    return base


def _row_errors_ok(got: torch.Tensor, want: torch.Tensor, tol: float) -> Tuple[bool, float]:
    """Each row within ``tol`` relative to its norm, plus the dtype's subnormal resolution."""
    tiny = torch.finfo(want.dtype).smallest_normal * torch.finfo(want.dtype).eps  # the subnormal spacing
    g, w = got.double(), want.double()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)  # avoid overflow of squares
    err = torch.linalg.vector_norm((g - w) / scale, dim=-1) * scale[:, 0]
    norm = torch.linalg.vector_norm(w / scale, dim=-1) * scale[:, 0]
    floor = 2 * tiny * (math.sqrt(w.shape[-1]) + 1)
    ok = err <= tol * norm + floor
    worst = float((err / (norm + floor)).max())
    return bool(ok.all()), worst


def _finite_io(layer: nn.Module, x: torch.Tensor):
    """Output and the gradients of a mean of the output (float32-safe), all detached."""
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.float().mean().backward()
    grads = [p.grad for p in layer.parameters()]
    return y.detach(), grads


def _finite(t) -> bool:
    return t is None or bool(torch.isfinite(t).all())


# the documented refusals: λ = b/r overflowing (tiny rows, large bias), a row whose norm overflows
# the dtype (finite entries near its largest value), a constant unit (zero row, non-zero bias)
ALLOWED_REFUSALS = ("λ = b / r overflows", "overflows", "cannot represent a unit with a zero weight row")


# -------------------------------------------------------------------------------------------------
# properties
# -------------------------------------------------------------------------------------------------


@BUDGET
@given(cases())
def test_register_and_remove_keep_the_function(case):
    built = build(case)
    assume(built is not None)  # too large, or the scale overflowed the dtype
    layer, x = built
    event(f"{case.kind} {str(case.dtype)[6:]}")
    w0 = layer.weight.detach().clone()
    b0 = None if layer.bias is None else layer.bias.detach().clone()
    y0, g0 = _finite_io(layer, x)
    try:
        georeparam.geometric(layer, mode=case.mode)
    except ValueError as e:
        assert any(s in str(e) for s in ALLOWED_REFUSALS), f"unexpected refusal: {e}"
        event(
            "refused: "
            + ("λ overflow" if "λ" in str(e) else "radius overflow" if "norm" in str(e) else "constant unit")
        )
        assert layer.weight is not None and torch.equal(layer.weight, w0)  # left as it was
        return
    n = _units_view(layer, w0).shape[1]
    # 1. the rebuilt weight, unit by unit
    w1 = layer.weight.detach()
    assert w1.dtype == case.dtype and w1.shape == w0.shape
    assert bool(torch.isfinite(w1).all()), "registration turned a finite weight non-finite"
    tol = weight_tol(case.dtype, case.mode, n)
    ok, worst = _row_errors_ok(_units_view(layer, w1), _units_view(layer, w0), tol)
    assert ok, f"weight rows off by up to {worst:.3g} > {tol:.3g}"
    event("registered")
    if b0 is not None:
        b1 = layer.bias.detach()
        # b = r·λ: one rounding of λ and one of the product, relative to b
        btol = 4 * _eps(case.dtype) if case.dtype != torch.bfloat16 else 2e-2
        assert bool(((b1.double() - b0.double()).abs() <= btol * b0.double().abs()).all())
    # 2. no NaN/Inf where the original had none
    y1, g1 = _finite_io(layer, x)
    if _finite(y0):
        assert _finite(y1), "finite output became non-finite"
    if all(_finite(g) for g in g0) and _finite(y0):
        assert all(_finite(g) for g in g1), "finite gradients became non-finite"
    # 3. remove bakes exactly what the GmP layer computes
    with torch.no_grad():
        w_gmp, b_gmp = layer.weight.clone(), None if b0 is None else layer.bias.clone()
    georeparam.remove(layer)
    assert type(layer) is _constructor(case.kind)
    assert torch.equal(layer.weight, w_gmp)
    if b0 is not None:
        assert torch.equal(layer.bias, b_gmp)


@st.composite
def coordinates(draw):
    """Arbitrary (radius, angles, offset): drifted, negative, exactly at the poles."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(_fan_in_strategy().filter(lambda v: v >= 2))
    units = draw(st.integers(1, 4 if n > 1000 else 12))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from((0.5, 3.0, 50.0, 1e4)))
    special = draw(st.sampled_from(("none", "poles", "zero_radius", "negative")))
    mode = draw(st.sampled_from(("exact", "fast")))
    return dtype, n, units, seed, spread, special, mode


@BUDGET
@given(coordinates())
def test_canonicalize_keeps_the_function(params):
    dtype, n, units, seed, spread, special, mode = params
    g = torch.Generator().manual_seed(seed)
    radius = torch.randn(units, generator=g, dtype=torch.float64) * 2
    angles = (torch.rand(units, n - 1, generator=g, dtype=torch.float64) * 2 - 1) * spread
    if special == "poles":  # latitudes at ±π/2 (and multiples of π): the singular points of the chart
        k = torch.randint(-3, 4, angles.shape, generator=g).to(torch.float64)
        mask = torch.rand(angles.shape, generator=g) < 0.3
        angles = torch.where(mask, k * math.pi / 2, angles)
    elif special == "zero_radius":
        radius[::2] = 0
    elif special == "negative":
        radius = -radius.abs()
    offset = torch.randn(units, generator=g, dtype=torch.float64)
    radius, angles, offset = radius.to(dtype), angles.to(dtype), offset.to(dtype)
    # the function before: evaluated from the stored values in float64
    w_before = radius.double()[:, None] * to_cartesian(angles.double())
    b_before = radius.double() * offset.double()
    r2, a2, o2 = canonicalize(radius, angles, offset)
    assert r2.dtype == a2.dtype == o2.dtype == dtype
    assert bool((r2 >= 0).all())
    lat, lon = a2[:, :-1].double(), a2[:, -1].double()
    # float64's π and π/2 lie just below the real ones, so |angle| ≤ math.pi is the real (−π, π]
    assert bool((lat.abs() <= math.pi / 2).all()) and bool((lon.abs() <= math.pi).all())
    w_after = r2.double()[:, None] * to_cartesian(a2.double())
    # rounding the new angles to the dtype: ~eps per angle, √n of them in a direction
    tol = 4 * _eps(dtype) * math.sqrt(n)  # each new angle rounded once: ≤ eps, √n of them
    errs = rel_err(w_after, w_before, dim=-1)
    assert bool((errs <= tol).all()), f"{float(errs.max()):.3g} > {tol:.3g}"
    assert torch.equal(r2.double() * o2.double(), b_before)  # b = r·λ: pure sign flips
    # a GmP layer holding these canonical coordinates computes finite outputs and gradients
    layer = georeparam.geometric(nn.Linear(n, units).to(dtype), mode=mode)
    geo = georeparam.geometry(layer)
    with torch.no_grad():
        geo.radius.copy_(r2)
        geo.angles.copy_(a2)
        geo.offset.copy_(o2)
    x = torch.randn(3, n, generator=g).to(dtype)
    y, grads = _finite_io(layer, x)
    assert _finite(y) and all(_finite(t) for t in grads)
    errs = rel_err(layer.weight.detach(), w_after, dim=-1)
    tol = weight_tol(dtype, mode, n)
    assert bool((errs <= tol).all()), f"canonical layer weight off by {float(errs.max()):.3g} > {tol:.3g}"


# -------------------------------------------------------------------------------------------------
# long-run stability (benchmarks/long_run.py at toy size; the 10,000-step run is the benchmark)
# -------------------------------------------------------------------------------------------------


def test_long_run_script_toy(tmp_path):
    pytest.importorskip("mnist1d")
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("georeparam_bench_long_run", REPO_ROOT / "benchmarks" / "long_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "long_run.json"
    res = mod.main(
        ["--steps", "150", "--samples", "600", "--log-every", "10", "--quiet", "--no-plot", "--out", str(out)]
    )
    assert out.exists()
    wrapped, plain = res["wrapped"], res["plain"]
    assert wrapped["first_nonfinite_step"] is None and all(h["finite"] for h in wrapped["history"])
    assert wrapped["max_over_run"]["max_abs_latitude"] <= math.pi / 2
    assert wrapped["max_over_run"]["max_abs_last_angle"] <= math.pi
    assert wrapped["final"]["fraction_outside"] == 0
    # at lr 1.0 the unwrapped angles leave the canonical ranges within these few steps
    assert plain["max_over_run"]["max_abs_latitude"] > math.pi / 2
