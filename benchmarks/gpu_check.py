"""One prepared end-to-end check of GmP on a GPU, writing one JSON (issue 13).

    python benchmarks/gpu_check.py                       # CUDA, ≤ 8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick  # toy sizes on CPU (tests run this)
    python benchmarks/gpu_check.py --dry-run             # the same as --device cpu --quick

Sections (each is timed and recorded; a failing section records its error and the rest still run):

1. ``registration``: ``georeparam.register`` keeps outputs (MLP, CNN) in float32, and under bf16
   autocast the registered model equals the plain model under the same autocast (the map runs in
   float32 and the layer casts its weight).
2. ``trajectories``: the paper's form (``register(model, form="paper")`` where that keyword
   exists, else the weight form, recorded) trained on the device in float32 with Adam through
   ``GeometricOptimizer`` against the same run on the CPU in float64: relative error of the
   losses and of the final weights along the way.
3. ``step_ratios``: training step GmP (exact, fast) and weight norm over standard, MLP, CNN and
   a transformer block at realistic batch sizes (CUDA events, medians of interleaved rounds),
   GmP by every GPU path: the Triton kernels (``*_triton``, where triton is installed), the
   pure-torch recomputing map (``*_torch``) and, in exact mode, the pure-torch map that saves ``u``
   and the prefix (``exact_saving``: what Note [Which pure-torch map] chose against); and each
   variant's extra peak memory of a step over
   the standard step, in parameter bytes (``torch.cuda.max_memory_allocated``; on CPU the
   profiler's allocator events, as benchmarks/speed.py).
4. ``map_cost``: the map's forward+backward in exact and fast mode by every path against weight
   norm's and against a float32 log-domain prefix ``exp(cumsum(log1p(−2 sin²(φ/2))))``, with each
   one's float32 error (and under bf16 autocast) against a float64 CPU evaluation of the paper's
   formula at fan-ins up to 25,088: what float64 costs on this device, and what the alternative
   would save.

A section that would start after ``--budget`` seconds (default 480: the 8 minutes a lent device
gives) is recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List

import torch
from torch import nn

import georeparam
from georeparam.coords import to_hyperspherical
from speed import Block, mlp, variant  # the same models as the CPU tables (benchmarks/ is this script's folder)
from speed import vgg as cnn

try:
    from georeparam._map import scaled_unit
except ImportError:  # an older checkout
    from georeparam._fused import scaled_unit
try:
    from georeparam._map import triton_impl
except ImportError:  # a checkout without the Triton map
    triton_impl = None
try:
    from georeparam._map import use_backend
except ImportError:  # a checkout without the backend table
    use_backend = None
from speed import peak_extra_bytes, param_bytes


def paths(device: torch.device) -> List[str]:
    """The GPU paths to time on this device: ``triton`` where it applies; ``torch``, the
    dispatcher's pure-torch choice with Triton off (the recomputing map off the CPU); and, off the
    CPU, ``saving``, the pure-torch map that saves ``u`` and the prefix (what the CPU runs), which
    Note [Which pure-torch map] in ``georeparam/_map/dispatch.py`` chose against without a GPU."""
    out = ["torch"]
    if triton_impl is not None and device.type == "cuda" and triton_impl.available():
        out.insert(0, "triton")
    if device.type != "cpu" and use_backend is not None:
        out.append("saving")
    return out


def on_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the Triton map on (``triton``), off (``torch``), or off with only the
    saving pure-torch map (``saving``)."""

    def run():
        if triton_impl is None:
            return fn()
        was = triton_impl.set_enabled(path == "triton")
        try:
            if path == "saving":
                with use_backend("torch"):
                    return fn()
            return fn()
        finally:
            triton_impl.set_enabled(was)

    return run


def peak_extra(step: Callable[[], object], device: torch.device) -> int:
    """Highest bytes allocated during ``step()`` above what was allocated before it."""
    if device.type != "cuda":
        return peak_extra_bytes(step)
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def paper_rows64(radius: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """The paper's formula ``r·u(φ)`` in float64 on the CPU, written here (the reference)."""
    radius, lat = radius.detach().double().cpu(), lat.detach().double().cpu()
    m = lat.shape[-1] - 1
    before = torch.cat([torch.ones_like(lat[..., :1]), torch.cumprod(torch.cos(lat[..., :m]), -1)], -1)
    th = lat[..., m:]
    u = torch.cat(
        [torch.sin(lat[..., :m]) * before[..., :m], before[..., m:] * torch.cos(th), before[..., m:] * torch.sin(th)],
        -1,
    )
    return radius.unsqueeze(-1) * u


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> Dict[str, List[float]]:
    """Seconds per call of each function, interleaved rounds after warm-up."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f()
                b.record()
                b.synchronize()
                out[k].append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                f()
                out[k].append(time.perf_counter() - t0)
    return out


def med_ratio(t: Dict[str, List[float]], key: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(t[key], t[base]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def register_paper(model: nn.Module, **kw) -> str:
    """``register(model, form="paper")`` where the keyword exists; otherwise the weight form."""
    try:
        georeparam.register(model, form="paper", **kw)
        return "paper"
    except TypeError as e:
        if "form" not in str(e):
            raise
        georeparam.register(model, **kw)
        return "weight (this georeparam has no form= keyword)"


# -------------------------------------------------------------------------------------------------
# sections
# -------------------------------------------------------------------------------------------------


def registration(device: torch.device, quick: bool) -> dict:
    res = {}
    gen = torch.Generator().manual_seed(0)
    cases = {
        "mlp": (lambda: mlp((64, 48, 10) if quick else (784, 1024, 1024, 10)), (8, 64) if quick else (256, 784)),
        "cnn": (lambda: cnn((4, 8) if quick else (32, 64, 128)), (2, 3, 8, 8) if quick else (64, 3, 32, 32)),
    }
    for name, (make, shape) in cases.items():
        torch.manual_seed(0)
        plain = make().to(device)
        x = torch.randn(*shape, generator=gen).to(device)
        gmp = make().to(device)
        gmp.load_state_dict(plain.state_dict())
        georeparam.register(gmp)
        with torch.no_grad():
            ref = plain(x)
            res[f"{name}_fp32_output_rel_err"] = rel(gmp(x), ref)
            if device.type == "cuda" or torch.cpu.is_available():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    a, b = gmp(x), plain(x)
                res[f"{name}_bf16_autocast_output_rel_err_vs_plain_autocast"] = rel(a, b)
                res[f"{name}_bf16_autocast_output_dtype"] = str(a.dtype)
    res["pass"] = all(v <= 1e-5 for k, v in res.items() if k.endswith("fp32_output_rel_err")) and all(
        v <= 2e-2 for k, v in res.items() if k.endswith("vs_plain_autocast")
    )
    return res


def trajectories(device: torch.device, quick: bool) -> dict:
    """Adam (lr 0.01) through GeometricOptimizer on the device (float32) and on the CPU (float64)."""
    steps = 30 if quick else 300
    res = {"steps": steps}
    gen = torch.Generator().manual_seed(1)
    for name, sizes in {"mlp_2_32_32_1": (2, 32, 32, 1), "mlp_8_64_1": (8, 64, 1)}.items():
        x = torch.randn(128, sizes[0], generator=gen)
        y = torch.sin(3 * x[:, :1]) + 0.1 * torch.randn(128, 1, generator=gen)
        runs = {}
        for where, dtype in (("device", torch.float32), ("cpu64", torch.float64)):
            dev = device if where == "device" else torch.device("cpu")
            torch.manual_seed(0)
            model = mlp(sizes).to(dev, dtype)
            form = register_paper(model)
            opt = georeparam.GeometricOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model)
            xs, ys = x.to(dev, dtype), y.to(dev, dtype)
            losses, weights = [], []
            for i in range(steps):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(xs), ys)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if (i + 1) % max(1, steps // 3) == 0:
                    with torch.no_grad():
                        weights.append(
                            torch.cat([m.weight.flatten() for m in model if isinstance(m, nn.Linear)]).double().cpu()
                        )
            runs[where] = (losses, weights, form)
        (l32, w32, form), (l64, w64, _) = runs["device"], runs["cpu64"]
        res[name] = {
            "form": form,
            "final_loss_device_fp32": l32[-1],
            "final_loss_cpu_fp64": l64[-1],
            "loss_rel_err_max": max(abs(a - b) / abs(b) for a, b in zip(l32, l64)),
            "weight_rel_err_at_checkpoints": [rel(a, b) for a, b in zip(w32, w64)],
        }
    res["pass"] = all(res[k]["weight_rel_err_at_checkpoints"][0] <= 1e-3 for k in res if k.startswith("mlp"))
    return res


def step_ratios(device: torch.device, quick: bool) -> dict:
    repeats, warmup = (3, 1) if quick else (30, 5)
    gen = torch.Generator().manual_seed(2)
    cases = {
        "mlp": (lambda: mlp((64, 32, 10) if quick else (784, 4096, 4096, 10)), (8, 64) if quick else (1024, 784), None),
        "cnn": (lambda: cnn((4, 8) if quick else (64, 128, 256)), (2, 3, 8, 8) if quick else (256, 3, 32, 32), None),
        "transformer": (
            lambda: Block(16, 2, 32) if quick else Block(512, 8, 2048),
            (2, 8, 16) if quick else (32, 256, 512),
            None,
        ),
    }
    res = {"paths": paths(device), "triton": triton_impl.status() if triton_impl is not None else "absent"}
    for name, (make, shape, _) in cases.items():
        x = torch.randn(*shape, generator=gen).to(device)
        y = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
        steps, pbytes = {}, 0
        for kind in ("standard", "exact", "fast", "wn"):
            model = variant(make, kind).to(device)  # registered on the CPU, then moved
            pbytes = pbytes or param_bytes(model)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            if kind in ("exact", "fast"):
                for path in res["paths"]:
                    if path != "saving" or kind == "exact":  # the saving map in one mode only (the budget)
                        steps[f"{kind}_{path}"] = on_path(path, step)
            else:
                steps[kind] = step
        t = timed(steps, device, repeats, warmup)
        row = {"batch": shape[0], "standard_ms": statistics.median(t["standard"]) * 1e3, "param_bytes": pbytes}
        for k in steps:
            if k != "standard":
                row[f"{k}_over_standard"] = med_ratio(t, k, "standard")
        extra = {k: peak_extra(f, device) for k, f in steps.items()}
        for k in steps:
            if k != "standard":
                row[f"{k}_extra_peak_over_param_bytes"] = (extra[k] - extra["standard"]) / pbytes
        # the names earlier versions wrote (the default path on this device)
        row["exact_over_standard"] = row[f"exact_{res['paths'][0]}_over_standard"]
        row["fast_over_standard"] = row[f"fast_{res['paths'][0]}_over_standard"]
        row["weight_norm_over_standard"] = row["wn_over_standard"]
        res[name] = row
    return res


def log_domain_scaled_unit(radius: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """The alternative: float32 only, prefix = exp(cumsum(log1p(−2 sin²(φ/2)))) (canonical angles,
    cos φ > 0), autograd through every op."""
    m = lat.shape[-1] - 1
    phi, lon = lat[..., :m], lat[..., m:]
    h = torch.sin(0.5 * phi)
    prefix = torch.exp(torch.cumsum(torch.log1p(-2 * h * h), -1))
    before = torch.cat([torch.ones_like(lon), prefix[..., :-1]], -1)
    tail = prefix[..., -1:]
    u = torch.cat([torch.sin(phi) * before, tail * torch.cos(lon), tail * torch.sin(lon)], -1)
    return radius.unsqueeze(-1) * u


def map_cost(device: torch.device, quick: bool) -> dict:
    repeats, warmup = (3, 1) if quick else (20, 3)
    res = {}
    shapes = [(16, 300)] if quick else [(1024, 1024), (4096, 4096), (512, 25088)]
    for units, n in shapes:
        g = torch.Generator().manual_seed(n)
        radius, lat = to_hyperspherical(torch.randn(units, n, dtype=torch.float64, generator=g))
        r32, a32 = radius.float().to(device), lat.float().to(device)
        grad = torch.randn(units, n, generator=g).to(device)
        v = torch.randn(units, n, generator=g).to(device)
        vn = v.norm(dim=1, keepdim=True)

        def fb(fn):
            def run():
                r, a = r32.detach().requires_grad_(), a32.detach().requires_grad_()
                fn(r, a).backward(grad)

            return run

        def wn():
            vv, gg = v.detach().requires_grad_(), vn.detach().requires_grad_()
            torch._weight_norm(vv, gg, 0).backward(grad)

        fns = {"wn": wn, "log_domain": fb(log_domain_scaled_unit)}
        for path in paths(device):
            for mode in ("exact", "fast"):
                fns[f"{mode}_{path}"] = on_path(path, fb(lambda r, a, mode=mode: scaled_unit(r, a, mode)))
        t = timed(fns, device, repeats, warmup)
        ref = paper_rows64(r32, a32)  # the same float32 angles, float64 on the CPU

        def err(w):
            return float(((w.detach().double().cpu() - ref).norm(dim=-1) / ref.norm(dim=-1)).max())

        errors, bf16 = {}, {}
        with torch.no_grad():
            for path in paths(device):
                for mode in ("exact", "fast"):
                    key = f"{mode}_{path}"
                    errors[key] = err(on_path(path, lambda mode=mode: scaled_unit(r32, a32, mode))())
                    with torch.autocast(device.type, dtype=torch.bfloat16):  # the map runs in float32 inside
                        bf16[key] = err(on_path(path, lambda mode=mode: scaled_unit(r32, a32, mode))())
            errors["log_domain"] = err(log_domain_scaled_unit(r32, a32))
        row = {
            "weight_norm_ms": statistics.median(t["wn"]) * 1e3,
            "fp32_row_rel_err_vs_fp64": errors,
            "bf16_autocast_row_rel_err_vs_fp64": bf16,
        }
        for k in fns:
            if k != "wn":
                row[f"{k}_over_weight_norm"] = med_ratio(t, k, "wn")
        res[f"{units}x{n}"] = row
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu …")
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds; what tests run on CPU)")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON goes (default ./gpu_check.json)")
    p.add_argument("--only", action="append", choices=["registration", "trajectories", "step_ratios", "map_cost"])
    p.add_argument(
        "--dry-run", action="store_true", help="--device cpu --quick: proves the script runs, no device needed"
    )
    p.add_argument(
        "--budget", type=float, default=480.0, help="seconds after which no new section starts (default 480)"
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --quick for a dry run)")
    t_all = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "georeparam_version": getattr(georeparam, "__version__", "?"),
        "quick": args.quick,
        "triton": triton_impl.status() if triton_impl is not None else "absent",
        "sections": {},
    }
    sections = {
        "registration": registration,
        "trajectories": trajectories,
        "step_ratios": step_ratios,
        "map_cost": map_cost,
    }
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        if t0 - t_all > args.budget:
            report["sections"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        try:
            out = fn(device, args.quick)
            out["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 — record and go on to the next section
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report["sections"][name] = out
        print(f"{name}: {json.dumps(out, default=str)[:400]}", flush=True)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0 if all("error" not in s and "skipped" not in s for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
