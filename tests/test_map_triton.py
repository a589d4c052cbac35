"""The Triton map (georeparam._map.triton_impl, issue 22 item 2) on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, and torch may import triton on its
own, so the kernels run in a subprocess (the script is below). The
reference is the pure-torch recomputing map and, for the exactness check, the float64 paper
formula of the same float32 angles. What the interpreter cannot show (Note [What the interpreter
shows]): speed, the real GPU code and its libdevice float64 sin/cos, float64 rates, concurrency;
benchmarks/gpu_check.py measures those on a device. Sizes are small: the interpreter runs the
kernels' block loops in numpy, a few hundred ms per launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except Exception as e:  # pragma: no cover - depends on the environment
    _HAVE_TRITON = False
    _WHY = f"triton is not importable ({type(e).__name__}: {e}); the Triton map is untested here"

pytestmark = pytest.mark.skipif(not _HAVE_TRITON, reason=_WHY if not _HAVE_TRITON else "")

_SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import torch
    import georeparam._map.recompute as rc
    import georeparam._map.triton_impl as ti
    from georeparam.coords import to_hyperspherical

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    def paper_unit(lat):
        m = lat.shape[-1] - 1
        before = torch.cat([torch.ones_like(lat[..., :1]), torch.cumprod(torch.cos(lat[..., :m]), -1)], -1)
        th = lat[..., m:]
        return torch.cat([torch.sin(lat[..., :m]) * before[..., :m], before[..., m:] * torch.cos(th), before[..., m:] * torch.sin(th)], -1)

    out = {"status": ti.status(), "cases": []}
    gen = torch.Generator().manual_seed(0)
    for dtype, n, block, spread in [
        (torch.float32, 2, None, 0), (torch.float32, 3, None, 0), (torch.float32, 37, 8, 0),
        (torch.float32, 40, 16, 3.0), (torch.float64, 37, 8, 0), (torch.float64, 19, None, 50.0),
    ]:
        ti.BLOCK = block
        if spread:  # drifted angles: negative cosines, several turns
            lat = ((torch.rand(5, n - 1, generator=gen, dtype=torch.float64) - 0.5) * spread)
        else:
            _, lat = to_hyperspherical(torch.randn(5, n, generator=gen, dtype=torch.float64))
        lat = lat.to(dtype)
        r = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        g = torch.randn(5, n, generator=gen, dtype=torch.float64).to(dtype)
        res = {"dtype": str(dtype), "n": n}
        for name, fn in (("triton", ti.scaled_unit), ("torch", rc.scaled_unit)):
            a, rr = lat.clone().requires_grad_(), r.clone().requires_grad_()
            w = fn(rr, a, "exact")
            w.backward(g)
            res[name] = (w, a.grad, rr.grad)
        res["w"], res["grad_angles"], res["grad_r"] = (rel(x, y) for x, y in zip(res.pop("triton"), res.pop("torch")))
        out["cases"].append(res)

    # exactness: float32 angles, fan-in 25,088 in blocks of 1024, against the float64 formula
    ti.BLOCK = None
    _, lat = to_hyperspherical(torch.randn(2, 25088, generator=gen, dtype=torch.float64))
    lat = lat.float()
    w = ti.scaled_unit(torch.ones(2), lat, "exact")
    ref = paper_unit(lat.double())
    out["exact_25088"] = max(rel(w[i], ref[i]) for i in range(2))
    out["dtype_25088"] = str(w.dtype)
    # poles: latitudes at ±π/2, last angles 0 (sin θ = 0), π, ±π/2; float64
    h = 1.5707963267948966
    lat = torch.tensor([[h, 0.3, 0.0], [0.1, -h, 0.0], [0.0, 0.0, 3.141592653589793], [0.4, h, -h]], dtype=torch.float64)
    r = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    g = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    got = {}
    for name, fn in (("triton", ti.scaled_unit), ("torch", rc.scaled_unit)):
        a, rr = lat.clone().requires_grad_(), r.clone().requires_grad_()
        fn(rr, a, "exact").backward(g)
        got[name] = (a.grad, rr.grad)
    out["poles_finite"] = bool(all(torch.isfinite(t).all() for t in got["triton"]))
    out["poles"] = max(rel(x, y) for x, y in zip(got["triton"], got["torch"]))

    # forward-mode AD and a differentiated backward hand over to the pure-torch formulas
    import torch.autograd.forward_ad as fwAD
    _, lat = to_hyperspherical(torch.randn(2, 4, generator=gen, dtype=torch.float64))
    r = torch.tensor([0.7, 1.3], dtype=torch.float64)
    tangent = torch.randn(lat.shape, generator=gen, dtype=torch.float64)
    jvps = []
    for fn in (ti.scaled_unit, rc.scaled_unit):
        with fwAD.dual_level():
            jvps.append(fwAD.unpack_dual(fn(r, fwAD.make_dual(lat, tangent), "exact")).tangent)
    out["jvp"] = rel(*jvps)
    a, rr = lat.clone().requires_grad_(), r.clone().requires_grad_()
    out["gradgradcheck"] = bool(torch.autograd.gradgradcheck(lambda s, t: ti.scaled_unit(s, t, "exact"), (rr, a)))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted():
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_interpreter_ran(interpreted):
    assert "TRITON_INTERPRET=1" in interpreted["status"]


def test_agrees_with_the_torch_map(interpreted):
    """Values and both gradients, float32 (a few roundings) and float64 (to 1e-13), one block and
    several (the carried product and the reverse scan's suffix cross block boundaries)."""
    for case in interpreted["cases"]:
        bound = 1e-13 if case["dtype"] == "torch.float64" else 5e-7
        for key in ("w", "grad_angles", "grad_r"):
            assert case[key] <= bound, case


def test_poles_agree_and_stay_finite(interpreted):
    assert interpreted["poles_finite"]
    assert interpreted["poles"] <= 1e-13


def test_forward_ad_and_double_backward(interpreted):
    assert interpreted["jvp"] <= 1e-13
    assert interpreted["gradgradcheck"]


def test_exact_at_fan_in_25088(interpreted):
    assert interpreted["dtype_25088"] == "torch.float32"
    assert interpreted["exact_25088"] <= 1e-6


def test_applies_only_to_eager_cuda_tensors():
    from georeparam._map import triton_impl as ti

    a, r = torch.zeros(3, 4), torch.ones(3)
    assert not ti.applies(r, a)  # CPU: the pure-torch map (the interpreter is opted into by calling scaled_unit)
    if torch.cuda.is_available():
        assert ti.applies(r.cuda(), a.cuda()) == ti.available()
        assert not ti.applies(r.cuda().half(), a.cuda().half())
        assert not ti.applies(r.cuda()[:2], a.cuda())
