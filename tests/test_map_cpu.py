"""The compiled kernel (georeparam._map.cpu, Note [The kernel]) against the pure-torch map.

Every test here compares the kernel with an independent computation: the pure-torch map in
float64, libm-accurate torch sin/cos, or a subprocess where the kernel is off. Where this
machine cannot build the kernel the comparisons skip, and the pure-torch map is what runs.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT, rel_err, seeded
from georeparam._map import build, cpu, fast_paths, kernel_status, scaled_unit, use_backend
from georeparam.coords import to_hyperspherical

LIB = None if not fast_paths() else build.load()


@pytest.fixture(autouse=True)
def float64_kernel_too():
    """The float64 variant is tested here although float64 parameters normally take the
    pure-torch map (Note [float64 stays on the pure-torch map])."""
    with cpu.kernel_dtypes(torch.float32, torch.float64):
        yield


needs_kernel = pytest.mark.skipif(LIB is None, reason=f"kernel not in use here: {kernel_status()}")


def a_compiler() -> bool:
    cc = os.environ.get("CC")
    return bool(cc and shutil.which(cc)) or any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def torch_map(radius, angles, grad, mode="exact"):
    """The pure-torch map in float64: values and gradients (the reference)."""
    with use_backend("torch"):
        r = radius.double().requires_grad_()
        a = angles.double().requires_grad_()
        w = scaled_unit(r, a, mode)
        w.backward(grad.double())
    return w.detach(), r.grad, a.grad


def kernel_map(radius, angles, grad, mode="exact"):
    r = radius.clone().requires_grad_()
    a = angles.clone().requires_grad_()
    w = scaled_unit(r, a, mode)
    fn = w.grad_fn
    while fn is not None and "Kernel" not in type(fn).__name__:
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert fn is not None, "the kernel was not used"
    w.backward(grad)
    return w.detach(), r.grad, a.grad


@pytest.mark.skipif(not fast_paths(), reason="GEOREPARAM_NO_FAST_PATHS is set")
def test_kernel_builds_wherever_a_compiler_is_found():
    """Every other test here skips without the kernel, so a source that no longer compiles would
    leave the suite green: where a C compiler exists (as on CI), the build must succeed."""
    if not sys.platform.startswith(("linux", "darwin")) or not a_compiler():
        pytest.skip(f"no kernel expected here: {kernel_status()}")
    assert LIB is not None, kernel_status()
    assert LIB.gmp_openmp() in (0, 1)


@needs_kernel
def test_polynomial_sin_cos_within_2e_16():
    x = torch.cat(
        [torch.linspace(-1e6, 1e6, 200_001, dtype=torch.float64), torch.randn(10_000, dtype=torch.float64) * 4]
    )
    s, c = torch.empty_like(x), torch.empty_like(x)
    LIB.gmp_sincos_f64(x.data_ptr(), s.data_ptr(), c.data_ptr(), x.numel())
    assert (s - torch.sin(x)).abs().max() <= 4.5e-16
    assert (c - torch.cos(x)).abs().max() <= 4.5e-16
    x = torch.linspace(-math.pi / 4, math.pi / 4, 100_001, dtype=torch.float64)  # Note [Small angles]
    s, c = torch.empty_like(x), torch.empty_like(x)
    LIB.gmp_sincos_f64(x.data_ptr(), s.data_ptr(), c.data_ptr(), x.numel())
    assert (s - torch.sin(x)).abs().max() <= 2.5e-16 and (c - torch.cos(x)).abs().max() <= 2.5e-16


@needs_kernel
@pytest.mark.parametrize("part", ["polynomial", "small", "past small", "beyond"])
def test_float32_sin_cos_within_an_ulp_and_one_minus_cos_relative(part):
    """Note [float32 angles]: float reduction up to 4096, libm beyond (a call with one such angle
    takes libm for all of them, so the angles beyond are passed one at a time); 1 − cos keeps its relative
    precision near 0 (the reference writes it as 2 sin²(x/2), without cancellation)."""
    if part == "polynomial":
        x = torch.cat(
            [torch.linspace(-4096, 4096, 400_001), torch.tensor([0.0, 1e-30, -1e-3]), torch.randn(20_000) * 3]
        )
    elif part == "small":  # Note [Small angles]: every angle within ±π/4, no reduction
        x = torch.cat([torch.linspace(-0.7853981, 0.7853981, 200_001), torch.tensor([0.0, 1e-30, -1e-3])])
    elif part == "past small":  # just past ±π/4: the reduction must run
        x = torch.tensor([0.7853982, -0.7853982, 0.8, 1.0, -1.5, 1.57, 2.5, -3.1])
    else:
        x = torch.tensor([4096.0004, -4100.0, 3e6, -5e7, 1e9, float("inf"), float("nan")])
    s, c = torch.empty(x.numel(), dtype=torch.float64), torch.empty(x.numel(), dtype=torch.float64)
    calls = [(0, x.numel())] if part in ("polynomial", "small") else [(i, 1) for i in range(x.numel())]  # one at a time
    for i, k in calls:
        LIB.gmp_sincos_f32(x[i:].data_ptr(), s[i:].data_ptr(), c[i:].data_ptr(), k)
    xd = x.double()
    finite = xd.isfinite()
    assert s[~finite].isnan().all() and c[~finite].isnan().all()
    assert (s - torch.sin(xd))[finite].abs().max() <= (1e-15 if part == "beyond" else 1.2e-7)
    assert (c - torch.cos(xd))[finite].abs().max() <= (1e-15 if part == "beyond" else 1.2e-7)
    if part in ("polynomial", "small"):
        small = (xd.abs() < 0.7) & (xd.abs() > 1e-4)  # below, 1 − c is limited by c's own float64 spacing
        d_ref = 2 * torch.sin(xd[small] / 2) ** 2
        assert (((1 - c[small]) - d_ref).abs() / d_ref).max() <= 3e-7


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 11),
    n=st.sampled_from([2, 3, 4, 5, 9, 10, 11, 17, 130, 600]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    spread=st.sampled_from([0.0, 1.0, 8.0, 1e4, 3e6]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_torch_map(rows, n, dtype, spread, seed):
    """Canonical directions, drifted angles (|φ| up to 5e3 and 1.5e6: libm's path for float32 and
    float64) and signed radii; fan-ins around the kernel's blocks of eight (n − 2 = 7, 8, 9) and
    over several chunks of 256 (600)."""
    with seeded(seed):
        _, lat = to_hyperspherical(torch.randn(rows, n, dtype=torch.float64))
        lat = lat + spread * (torch.rand_like(lat) - 0.5)
        radius = torch.randn(rows, dtype=torch.float64) * 3
        grad = torch.randn(rows, n, dtype=torch.float64)
    lat, radius, grad = lat.to(dtype), radius.to(dtype), grad.to(dtype)
    w, gr, ga = kernel_map(radius, lat, grad)
    w64, gr64, ga64 = torch_map(radius, lat, grad)
    tol = 3e-7 if dtype == torch.float32 else 1e-12
    assert w.dtype == ga.dtype == gr.dtype == dtype
    assert rel_err(w, w64, dim=-1).max() <= tol
    # gradients normwise (the standard of a float32 backward): a row's error against |r|·‖g‖ and
    # ‖g‖, the sizes of ∂/∂angles and ∂/∂r = Σ g_i u_i before cancellation
    gnorm = grad.double().norm(dim=-1)
    assert ((ga.double() - ga64).norm(dim=-1) <= tol * (radius.double().abs() * gnorm + 1e-300)).all()
    assert ((gr.double() - gr64).abs() <= tol * gnorm).all()


@needs_kernel
def test_kernel_at_poles_matches_torch_map():
    h = math.pi / 2
    lat = torch.tensor(
        [[h, 0.3, -0.2, 0.5, 1.0], [-h, 0.0, 0.0, 0.0, 0.0], [0.1, h, -h, h, math.pi], [h, h, h, h, 0.0]],
        dtype=torch.float64,
    )
    radius = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
    grad = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for got, want in zip(kernel_map(radius, lat, grad), torch_map(radius, lat, grad)):
        assert (got - want).abs().max() <= 1e-15


@needs_kernel
def test_kernel_exact_at_fan_in_25088():
    with seeded(3):
        radius, lat = to_hyperspherical(torch.randn(8, 25088))
        grad = torch.randn(8, 25088)
    w, gr, ga = kernel_map(radius, lat, grad)
    w64, gr64, ga64 = torch_map(radius, lat, grad)
    assert rel_err(w, w64, dim=-1).max() <= 1e-7
    assert rel_err(ga, ga64) <= 1e-7 and rel_err(gr, gr64) <= 1e-7


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False])
def test_threads_split_rows_without_changing_a_bit(monkeypatch, openmp):
    """Note [Kernel threads]: torch's OpenMP pool inside the kernel (where it was built with it)
    and the Python pool give the bits of one thread."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu, "USE_OPENMP", openmp)
    with seeded(1):
        radius, lat = to_hyperspherical(torch.randn(37, 200))
        grad = torch.randn(37, 200)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(kernel_map(radius, lat, grad))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


@needs_kernel
def test_kernel_second_order_and_forward_mode_use_the_torch_formulas():
    with seeded(2):
        radius, lat = to_hyperspherical(torch.randn(5, 7, dtype=torch.float64))
    r, a = radius.requires_grad_(), lat.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: scaled_unit(s, t), (r, a), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda s, t: scaled_unit(s, t), (r, a))


@needs_kernel
def test_kernel_leads_dims_and_noncontiguous_inputs():
    with seeded(4):
        radius, lat = to_hyperspherical(torch.randn(2, 3, 9))
        grad = torch.randn(2, 3, 9)
    lat_t = lat.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    w, gr, ga = kernel_map(radius, lat_t, grad)
    w64, gr64, ga64 = torch_map(radius, lat, grad)
    assert w.shape == (2, 3, 9) and ga.shape == lat.shape and gr.shape == radius.shape
    assert rel_err(w, w64, dim=-1).max() <= 3e-7 and rel_err(ga, ga64) <= 3e-7


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


PROBE = (
    "import logging, torch, georeparam._map as f; logging.basicConfig(level=logging.INFO);"
    "r, a = torch.tensor([2.0, -1.0]), torch.tensor([[0.3, -0.2, 1.0], [1.2, 0.1, -2.0]]);"
    "print(f.kernel_status()); print(f.scaled_unit(r, a).tolist())"
)


def test_switch_off_build_once_and_no_compiler(tmp_path):
    """GEOREPARAM_NO_FAST_PATHS=1 turns the kernel off; a build logs one line once and is cached;
    without a compiler the pure-torch map runs. The numbers agree in all three."""
    off = _run(PROBE, {"GEOREPARAM_NO_FAST_PATHS": "1"})
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith("off") and off.stderr == ""
    cache = {"GEOREPARAM_CACHE_DIR": str(tmp_path / "cache"), "GEOREPARAM_NO_FAST_PATHS": "0"}
    nocc = _run(PROBE, {**cache, "PATH": str(tmp_path), "CC": ""})
    assert nocc.returncode == 0, nocc.stderr
    assert nocc.stdout.startswith("no C compiler")
    values = [off.stdout.splitlines()[1], nocc.stdout.splitlines()[1]]
    if LIB is not None:
        first = _run(PROBE, cache)
        assert first.returncode == 0, first.stderr
        says = [line for line in first.stderr.splitlines() if "georeparam:" in line]
        assert len(says) == 1 and says[0].startswith("INFO:georeparam._map.build:")
        assert "compiling the fused CPU kernel once" in says[0]
        second = _run(PROBE, cache)
        assert "georeparam:" not in second.stderr and second.stdout.startswith("loaded")
        values += [first.stdout.splitlines()[1], second.stdout.splitlines()[1]]
    ref = torch.tensor(eval(values[0]))
    for v in values[1:]:
        assert torch.allclose(torch.tensor(eval(v)), ref, rtol=3e-7, atol=1e-7)


@needs_kernel
def test_kernel_under_autocast_takes_float32_and_layer_casts():
    """Note [Autocast]: the map (here the kernel) sees float32 parameters under bf16 autocast,
    the weight read inside equals the one read outside bit for bit, the layer's matmul is bf16."""
    import georeparam
    from torch import nn

    with seeded(0):
        layer = georeparam.geometric(nn.Linear(40, 8))
        x = torch.randn(3, 40)
    outside = layer.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.weight
        y = layer(x)
    fn = w.grad_fn
    while fn is not None and "Kernel" not in type(fn).__name__:
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert fn is not None
    assert w.dtype == torch.float32 and torch.equal(w, outside)
    assert y.dtype == torch.bfloat16


@needs_kernel
def test_kernel_graph_keeps_only_its_inputs():
    """The kernel recomputes in its backward: the graph holds the angles and the radius (the
    Parameters themselves), nothing weight-sized of its own."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with seeded(5):
        radius, lat = to_hyperspherical(torch.randn(16, 300))
    radius.requires_grad_()
    lat.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scaled_unit(radius, lat)
    assert sum(seen.values()) == lat.numel() * 4 + radius.numel() * 4
