"""Speed and memory of GmP against the plain formula, standard training and weight norm.

Prints ONE Markdown table of ratios, every ratio measured in the same run:

* transform forward+backward (the map ``angles → unit rows`` and its gradient): ours ``exact``,
  ours ``fast`` and weight norm's computation (``torch._weight_norm``, what
  ``torch.nn.utils.parametrizations.weight_norm`` evaluates), each over the plain autograd
  formula (cos, sin, cumprod, roll, as existing GmP code writes it);
* one training step (forward, cross-entropy, backward, SGD with momentum) of an MLP 784-1024-1024-10
  at batch 256 and a VGG-style CNN (32-64-128 channels, two 3×3 convs per stage, 32×32 inputs) at
  batch 64, GmP / standard and weight norm / standard;
* inference (eval, no_grad) after ``georeparam.remove()`` and with GmP still registered, over
  standard;
* extra peak memory of a training step over the standard step, in multiples of the model's
  parameter bytes. Peak = the highest ``total_allocated`` among the CPU allocator's
  allocation events that ``torch.profiler`` (``profile_memory=True``) records during the step,
  minus its value before the step; it counts every tensor allocation (saved activations and
  temporaries alike), not the Python heap.

Timing: candidates of one row run interleaved (each repeat runs every candidate once, so a load
change hits all of them), after warm-up; the table shows medians. Threads: ``--threads``
(default 2, the machine this project targets).

    nice python benchmarks/speed.py            # the table in docs/speed.md
    python benchmarks/speed.py --quick         # toy sizes, a few seconds (tests run this)
    python benchmarks/speed.py --large         # adds the 4096×25088 transform
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import georeparam

try:
    from georeparam._map import kernel_status, scaled_unit, unit
except ImportError:  # an older checkout (before georeparam._map), for before/after tables
    from georeparam._fused import kernel_status, scaled_unit, unit
from georeparam.coords import latitude_to_polar, to_hyperspherical


# ---------------------------------------------------------------------------------------------
# the baseline: the plain formula, autograd through every op
# ---------------------------------------------------------------------------------------------


def plain_unit(theta: torch.Tensor) -> torch.Tensor:
    """Polar angles ``(..., n-1)`` → unit rows ``(..., n)`` the way existing GmP code does it.

    ``u = [cos θ, 1] · roll(cumprod([sin θ, 1]), 1)`` with the first factor set to 1; every op is
    an autograd op (the graph keeps cos, sin and the cumprod).
    """
    ones = torch.ones_like(theta[..., :1])
    sines = torch.roll(torch.cumprod(torch.cat([torch.sin(theta), ones], dim=-1), dim=-1), 1, dims=-1)
    sines = torch.cat([ones, sines[..., 1:]], dim=-1)
    return torch.cat([torch.cos(theta), ones], dim=-1) * sines


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------


CLOCK: Callable[[], float] = time.perf_counter


def interleaved(
    fns: Dict[str, Callable[[], object]], repeats: int, warmup: int, clock: Optional[Callable[[], float]] = None
) -> Dict[str, List[float]]:
    """Seconds of each function per round; every round runs all of them once, in turn.

    ``clock`` is wall time unless ``--cpu-time`` (this thread's CPU time: steadier on a loaded
    machine, only meaningful with one torch thread).
    """
    clock = clock or CLOCK
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return times


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], repeats: int, warmup: int, clock=None
) -> Dict[str, float]:
    """Median seconds of each function (see :func:`interleaved`)."""
    return {k: statistics.median(v) for k, v in interleaved(fns, repeats, warmup, clock).items()}


def ratio(times: Dict[str, List[float]], key: str, base: str) -> str:
    """Median over rounds of ``key / base`` in the same round, with its quartiles."""
    r = sorted(a / b for a, b in zip(times[key], times[base]))
    if len(r) < 4:
        return f"{statistics.median(r):.2f}"
    q = statistics.quantiles(r, n=4)
    return f"{statistics.median(r):.2f} [{q[0]:.2f}, {q[2]:.2f}]"


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Highest number of bytes allocated during ``fn()`` above what was allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        x = e.extra_fields
        if hasattr(x, "alloc_size") and hasattr(x, "total_allocated") and str(x.device) == "cpu":
            events.append((e.start_time_ns, x.alloc_size, x.total_allocated))
    if not events:
        raise RuntimeError("the profiler recorded no allocation events; cannot measure peak memory")
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def mlp(sizes: Sequence[int]) -> nn.Module:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def vgg(channels: Sequence[int], in_ch: int = 3, classes: int = 10) -> nn.Module:
    layers: List[nn.Module] = []
    c = in_ch
    for width in channels:
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    """A transformer encoder block (pre-norm, GELU MLP) with a mean-pooled linear head."""

    def __init__(self, d: int, heads: int, ff: int, classes: int = 10):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(dim=1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18(width: int = 64, classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 layout (7×7 stem, max-pool, 2-2-2-2 basic blocks) written out here,
    so that no torchvision is needed."""
    w = [width, 2 * width, 4 * width, 8 * width]
    layers: List[nn.Module] = [
        nn.Conv2d(3, w[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(w[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = w[0]
    for i, c in enumerate(w):
        layers += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def variant(make: Callable[[], nn.Module], kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    if kind in ("exact", "fast"):
        georeparam.register(model, mode=kind)
    elif kind == "wn":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.utils.parametrizations.weight_norm(m)
    elif kind != "standard":
        raise ValueError(kind)
    return model


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def fmt(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def transform_row(units: int, fan_in: int, repeats: int, warmup: int) -> List[str]:
    """The map ``(r, angles) → w`` forward and backward (what a training step runs), over weight
    norm's computation on the same shape; the third column is the plain autograd formula."""
    torch.manual_seed(0)
    radius, lat = to_hyperspherical(torch.randn(units, fan_in))
    theta = latitude_to_polar(lat.double()).float()
    grad = torch.randn(units, fan_in)
    v = torch.randn(units, fan_in)
    g = v.norm(dim=1, keepdim=True)

    def gmp(mode):
        def run():
            r, a = radius.detach().requires_grad_(), lat.detach().requires_grad_()
            scaled_unit(r, a, mode).backward(grad)

        return run

    def plain():
        r, th = radius.detach().requires_grad_(), theta.detach().requires_grad_()
        (r.unsqueeze(-1) * plain_unit(th)).backward(grad)

    def wn():
        vv, gg = v.detach().requires_grad_(), g.detach().requires_grad_()
        torch._weight_norm(vv, gg, 0).backward(grad)

    t = interleaved({"wn": wn, "exact": gmp("exact"), "fast": gmp("fast"), "plain": plain}, repeats, warmup)
    return [
        "transform fwd+bwd / weight norm (3rd column: plain formula)",
        f"{units}×{fan_in}",
        ratio(t, "exact", "wn"),
        ratio(t, "fast", "wn"),
        ratio(t, "plain", "wn"),
        f"{statistics.median(t['wn']) * 1e3:.2f} ms",
        "exact ≤ 2.5",
    ]


def register_row(sizes: Sequence[int], repeats: int) -> List[str]:
    """``georeparam.register`` on an MLP of these sizes, nanoseconds per parameter (best of the rounds)."""
    import copy

    torch.manual_seed(0)
    model = mlp(sizes)
    params = sum(p.numel() for p in model.parameters())
    times = []
    for _ in range(max(1, repeats)):
        m = copy.deepcopy(model)
        t0 = CLOCK()
        georeparam.register(m)
        times.append(CLOCK() - t0)
    best = min(times)
    return [
        f"register, ns per parameter (MLP {'-'.join(map(str, sizes))})",
        f"{params / 1e6:.1f} M params",
        f"{best / params * 1e9:.1f}",
        "–",
        "–",
        f"{best * 1e3:.0f} ms",
        "≤ 15",
    ]


def _models_and_step_row(
    name: str, make: Callable[[], nn.Module], x: torch.Tensor, classes: int, repeats: int, warmup: int, target: str
) -> Tuple[Dict[str, nn.Module], Dict[str, Callable[[], None]], List[str]]:
    """The four variants of the model, their training steps, and the step row (ratios over standard)."""
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    models = {k: variant(make, k) for k in ("standard", "exact", "fast", "wn")}
    steps = {k: step_fn(m, x, y) for k, m in models.items()}
    t = interleaved(steps, repeats, warmup)
    row = [
        f"training step / standard ({name})",
        f"batch {x.shape[0]}",
        ratio(t, "exact", "standard"),
        ratio(t, "fast", "standard"),
        ratio(t, "wn", "standard"),
        f"{statistics.median(t['standard']) * 1e3:.1f} ms",
        target,
    ]
    return models, steps, row


def step_row(
    name: str, make: Callable[[], nn.Module], x: torch.Tensor, classes: int, repeats: int, warmup: int, target: str
) -> List[str]:
    """Only the training-step row (the larger models)."""
    return _models_and_step_row(name, make, x, classes, repeats, warmup, target)[2]


def model_rows(
    name: str, make: Callable[[], nn.Module], x: torch.Tensor, classes: int, repeats: int, warmup: int, target: str
) -> List[List[str]]:
    models, steps, row = _models_and_step_row(name, make, x, classes, repeats, warmup, target)
    rows = [row]

    # inference: registered, and after remove(), over standard
    infer = {}
    for k in ("standard", "exact", "fast"):
        m = models[k]
        m.eval()
        infer[k] = m
    removed = {k: georeparam.remove(variant(make, k)).eval() for k in ("exact", "fast")}

    def inf(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    ti = interleaved(
        {
            "standard": inf(infer["standard"]),
            "exact": inf(infer["exact"]),
            "fast": inf(infer["fast"]),
            "r_exact": inf(removed["exact"]),
            "r_fast": inf(removed["fast"]),
        },
        repeats,
        warmup,
    )
    bi = f"{statistics.median(ti['standard']) * 1e3:.1f} ms"
    batch = f"batch {x.shape[0]}"
    rows.append(
        [f"inference after remove() / standard ({name})", batch]
        + [ratio(ti, "r_exact", "standard"), ratio(ti, "r_fast", "standard"), "–", bi, "1.00 ± noise"]
    )
    rows.append(
        [f"inference, GmP registered / standard ({name})", batch]
        + [ratio(ti, "exact", "standard"), ratio(ti, "fast", "standard"), "–", bi, ""]
    )

    # memory: a fresh step after one warm-up step (optimizer state exists, grads are None)
    for m in models.values():
        m.train()
    pb = param_bytes(models["standard"])
    extra = {}
    for k, s in steps.items():
        s()
        extra[k] = peak_extra_bytes(s)
    rows.append(
        [
            f"extra peak memory of a step / parameter bytes ({name})",
            f"{pb / 2**20:.1f} MiB params",
            fmt((extra["exact"] - extra["standard"]) / pb, 1),
            fmt((extra["fast"] - extra["standard"]) / pb, 1),
            fmt((extra["wn"] - extra["standard"]) / pb, 1),
            f"{extra['standard'] / 2**20:.1f} MiB",
            "≤ 4",
        ]
    )
    return rows


def paper_row(width: int, depth: int, batch: int, repeats: int, warmup: int) -> List[str]:
    """The paper form's fixed cost per ReLU-followed layer and step, in µs over the weight form:
    an MLP of ``depth`` ReLU layers ``width`` wide at a small batch (so per-layer Python and op
    overheads, not arithmetic, dominate), all radii > 0 (as at initialization) and every other
    radius negated (after training, some are)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def make(form: str, negate: bool) -> nn.Module:
        torch.manual_seed(0)
        layers: List[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        georeparam.register(model, form=form)
        if negate:
            with torch.no_grad():
                for m in model.modules():
                    if "weight" in getattr(m, "parametrizations", {}):
                        m.parametrizations.weight.original0[::2] *= -1
        return model

    steps = {
        "weight": step_fn(make("weight", False), x, y),
        "paper": step_fn(make("paper", False), x, y),
        "paper_neg": step_fn(make("paper", True), x, y),
    }
    t = interleaved(steps, repeats, warmup)

    def per_layer(key: str) -> float:
        return statistics.median((a - b) / depth * 1e6 for a, b in zip(t[key], t["weight"]))

    return [
        f"paper form − weight form, µs per ReLU-followed layer and step: all r > 0 · half r < 0 (MLP {depth}×{width})",
        f"batch {batch}",
        f"{per_layer('paper'):.0f} · {per_layer('paper_neg'):.0f}",
        "–",
        "–",
        f"{statistics.median(t['weight']) * 1e3:.2f} ms",
        "≤ 100",
    ]


def precision_table(quick: bool) -> int:
    """Worst relative error over 16 random float32 directions (rows) of u(angles) and of the
    angle gradient, against float64 evaluations of the same float32 angles."""

    def err(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()

    print("| fan-in | exact u | fast u | plain formula u | exact grad | fast grad | plain formula grad |")
    print("|---|---|---|---|---|---|---|")
    for n in (64, 300) if quick else (784, 4608, 25088):
        gen = torch.Generator().manual_seed(n)
        _, lat = to_hyperspherical(torch.randn(16, n, dtype=torch.float64, generator=gen))
        lat = lat.float()
        g = torch.randn(16, n, dtype=torch.float64, generator=gen)
        a64 = lat.double().requires_grad_()
        ref = unit(a64)
        ref.backward(g)
        cells = {}
        for mode in ("exact", "fast"):
            a = lat.clone().requires_grad_()
            u = scaled_unit(torch.ones(16), a, mode)  # what training runs (the kernel where built)
            u.backward(g.float())
            cells[mode] = (err(u, ref.detach()), err(a.grad, a64.grad))
        # the plain formula on the same directions, stored as float32 polar angles (as it is used)
        th = latitude_to_polar(lat.double()).float().requires_grad_()
        up = plain_unit(th)
        up.backward(g.float())
        th64 = th.detach().double().requires_grad_()
        ref_p = plain_unit(th64)
        ref_p.backward(g)
        cells["plain"] = (err(up, ref_p.detach()), err(th.grad, th64.grad))
        row = [cells[k][0] for k in ("exact", "fast", "plain")] + [cells[k][1] for k in ("exact", "fast", "plain")]
        print(f"| {n} | " + " | ".join(f"{v:.1e}" for v in row) + " |")
    return 0


def compile_rows(sizes: Sequence[int], batch: int, repeats: int, warmup: int) -> List[List[str]]:
    """``torch.compile`` (inductor) of an MLP training step: compiled GmP / compiled standard with
    the kernel's custom ops in the graph (Note [The kernel in a compiled graph] in
    ``georeparam/_map/cpu_op.py``) and with the pure-torch map traced instead (``use_backend("torch")``,
    what every compiled graph ran before), paper and weight form; and the first compiled step's wall
    time (a cold compile: Note [A cold compile])."""
    from georeparam._map import use_backend

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def compiled_step(form: Optional[str], backend: Optional[str]):
        torch.manual_seed(0)
        model = mlp(sizes)
        if form is not None:
            georeparam.register(model, form=form)
        step = step_fn(torch.compile(model), x, y)

        def run():
            if backend is None:
                return step()
            with use_backend(backend):  # every call, so that dynamo's guard on the choice holds
                return step()

        t0 = time.perf_counter()
        run()
        return run, time.perf_counter() - t0

    # Note [A cold compile]: torch's on-disk caches (FX graphs, generated C++) would make a
    # second run's "first compiled step" a cache hit; a fresh cache folder and no FX graph cache
    # make every variant's first step a real compile.
    import os
    import tempfile

    import torch._inductor.config as inductor_config

    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), inductor_config.fx_graph_cache
    tmp = tempfile.TemporaryDirectory(prefix="georeparam-compile-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"], inductor_config.fx_graph_cache = tmp.name, False
    try:
        steps, cold = _compiled_steps(compiled_step)
    finally:
        if saved[0] is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved[0]
        inductor_config.fx_graph_cache = saved[1]
    t = interleaved(steps, repeats, warmup)
    tmp.cleanup()
    name = f"MLP {'-'.join(map(str, sizes))}"
    return _compile_table(t, cold, name, batch)


def _compiled_steps(compiled_step):
    steps, cold = {}, {}
    for key, form, backend in [
        ("standard", None, None),
        ("paper", "paper", None),
        ("paper_torch", "paper", "torch"),
        ("weight", "weight", None),
        ("weight_torch", "weight", "torch"),
    ]:
        steps[key], cold[key] = compiled_step(form, backend)
    return steps, cold


def _compile_table(t, cold, name: str, batch: int) -> List[List[str]]:
    rows = []
    for form in ("paper", "weight"):
        rows.append(
            [
                f"torch.compile: compiled GmP / compiled standard, {form} form, kernel · pure-torch map ({name})",
                f"batch {batch}",
                f"{ratio(t, form, 'standard')} · {ratio(t, form + '_torch', 'standard')}",
                "–",
                "–",
                f"{statistics.median(t['standard']) * 1e3:.1f} ms",
                "",
            ]
        )
        rows.append(
            [
                f"torch.compile: first compiled step (wall s), {form} form, kernel · pure-torch map ({name})",
                f"standard {cold['standard']:.1f} s",
                f"{cold[form]:.1f} · {cold[form + '_torch']:.1f}",
                "–",
                "–",
                "",
                "",
            ]
        )
    return rows


def resnet_breakdown(quick: bool) -> int:
    """Where a GmP training step of ResNet-18 at batch 2 spends its extra time over the standard
    step: the map alone (forward+backward of ``scaled_unit`` on every registered layer's radius and
    angles, summed: the arithmetic), and the rest (parametrize, ``|r|``, the bias product, the sign
    hooks, and the memory traffic of writing every weight fresh each step). Interleaved rounds,
    medians; meaningful with ``--threads 1 --cpu-time``."""
    gen = torch.Generator().manual_seed(1)
    width, side, batch = (4, 16, 2) if quick else (64, 64, 2)
    x = torch.randn(batch, 3, side, side, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    make = lambda: resnet18(width)  # noqa: E731
    models = {k: variant(make, k) for k in ("standard", "exact", "wn")}
    steps = {k: step_fn(m, x, y) for k, m in models.items()}
    coords = []
    for m in models["exact"].modules():
        plist = getattr(m, "parametrizations", {})
        if "weight" in plist:
            r, a = plist.weight.original0.detach(), plist.weight.original1.detach()
            coords.append(
                (r.clone().requires_grad_(), a.clone().requires_grad_(), torch.randn(r.shape + (a.shape[-1] + 1,)))
            )

    def maps():
        for r, a, g in coords:
            scaled_unit(r, a, "exact").backward(g)

    steps["map"] = maps
    repeats = 3 if quick else 11
    t = interleaved_medians(steps, repeats, 1 if quick else 2)
    ms = {k: v * 1e3 for k, v in t.items()}
    weights = sum(g.numel() for _, _, g in coords)
    extra = ms["exact"] - ms["standard"]
    print(
        f"ResNet-18 width {width} at {side}×{side}, batch {batch}, {len(coords)} registered layers, "
        f"{weights / 1e6:.1f} M weights; medians of {repeats} interleaved rounds, {torch.get_num_threads()} thread(s)"
    )
    print("| | ms per step | / standard |\n|---|---|---|")
    print(f"| standard step | {ms['standard']:.1f} | 1.00 |")
    print(f"| GmP step (exact) | {ms['exact']:.1f} | {ms['exact'] / ms['standard']:.2f} |")
    print(f"| weight-norm step | {ms['wn']:.1f} | {ms['wn'] / ms['standard']:.2f} |")
    print(f"| GmP's extra | {extra:.1f} | |")
    print(
        f"| … the map alone, fwd+bwd over all layers ({ms['map'] / weights * 1e6:.2f} ns per weight) | {ms['map']:.1f} | |"
    )
    print(f"| … the rest | {extra - ms['map']:.1f} | |")
    return 0


def profile_step(which: str, mode: str, quick: bool) -> int:
    """Print where a GmP training step spends its time (numpy's sin/cos show up as the
    Function's self time: torch.profiler does not see inside numpy)."""
    from torch.profiler import profile

    gen = torch.Generator().manual_seed(1)
    if which == "resnet":
        return resnet_breakdown(quick)
    if which == "mlp":
        sizes = (64, 32, 32, 10) if quick else (784, 1024, 1024, 10)
        make, x = (lambda: mlp(sizes)), torch.randn(8 if quick else 256, sizes[0], generator=gen)
    else:
        channels = (4, 8, 8) if quick else (32, 64, 128)
        make, x = (
            (lambda: vgg(channels)),
            torch.randn(4 if quick else 64, 3, 8 if quick else 32, 8 if quick else 32, generator=gen),
        )
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    step = step_fn(variant(make, mode), x, y)
    for _ in range(3):
        step()
    with profile() as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, few repeats (a smoke test)")
    p.add_argument("--large", action="store_true", help="add the 4096×25088 transform (minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 21, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 3, quick 1)")
    p.add_argument(
        "--only",
        choices=["transform", "mlp", "cnn", "transformer", "resnet", "register", "paper", "compile"],
        action="append",
        help="run only these parts (compile, minutes of inductor compiling, runs only when named)",
    )
    p.add_argument(
        "--profile",
        choices=["mlp", "cnn", "resnet"],
        help="instead of the table: torch.profiler's top ops of five GmP training steps (--mode); "
        "resnet: where ResNet-18's extra time at batch 2 goes (the map alone vs the rest)",
    )
    p.add_argument("--mode", choices=["exact", "fast"], default="fast", help="GmP mode for --profile")
    p.add_argument(
        "--precision",
        action="store_true",
        help="instead of the table: float32 errors of the map and its gradient (docs/speed.md)",
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this thread's CPU time instead of wall time: steadier on a loaded machine, "
        "only meaningful with --threads 1",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="run everything with only this map backend (georeparam._map.use_backend: torch, recompute, cpu, ...); "
        "e.g. --backend recompute times on CPU the pure-torch map other devices get",
    )
    args = p.parse_args(argv)
    if args.backend:
        from georeparam._map import use_backend

        with use_backend(args.backend):
            return _run(p, args)
    return _run(p, args)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.cpu_time:
        if (args.threads or 1) != 1:
            p.error("--cpu-time needs --threads 1 (other threads' work would not be counted)")
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    repeats = args.repeats or (3 if args.quick else 21)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    if args.quick:
        sizes = [(16, 64), (8, 300)]
        mlp_sizes, mlp_batch = (64, 32, 32, 10), 8
        cnn_channels, cnn_batch, side = (4, 8, 8), 4, 8
        tf = dict(d=16, heads=2, ff=32, seq=8, batch=2)
        rn_width, rn_side, rn_batches = 4, 16, (2,)
        reg_sizes = (64, 64, 64)
    else:
        sizes = [(128, 784), (1000, 2048), (512, 4608)]
        mlp_sizes, mlp_batch = (784, 1024, 1024, 10), 256
        cnn_channels, cnn_batch, side = (32, 64, 128), 64, 32
        tf = dict(d=256, heads=8, ff=1024, seq=128, batch=8)
        rn_width, rn_side, rn_batches = 64, 64, (32, 2)
        reg_sizes = (2048, 2048, 2048)
    if args.large:
        sizes.append((4096, 25088))

    if args.profile:
        return profile_step(args.profile, args.mode, args.quick)
    if args.precision:
        return precision_table(args.quick)

    t0 = time.perf_counter()
    rows: List[List[str]] = []
    parts = set(args.only or ["transform", "mlp", "cnn", "transformer", "resnet", "register", "paper"])
    if "transform" not in parts:
        sizes = []
    for units, fan_in in sizes:
        r = repeats if units * fan_in < 10**7 else max(3, repeats // 7)
        rows.append(transform_row(units, fan_in, r, min(warmup, 1) if units * fan_in >= 10**7 else warmup))
    gen = torch.Generator().manual_seed(1)
    x_mlp = torch.randn(mlp_batch, mlp_sizes[0], generator=gen)
    x_cnn = torch.randn(cnn_batch, 3, side, side, generator=gen)
    if "mlp" in parts:
        name = f"MLP {'-'.join(map(str, mlp_sizes))}"
        rows += model_rows(name, lambda: mlp(mlp_sizes), x_mlp, mlp_sizes[-1], repeats, warmup, "exact ≤ 1.3")
    if "cnn" in parts:
        name = f"CNN {'-'.join(map(str, cnn_channels))}"
        rows += model_rows(name, lambda: vgg(cnn_channels), x_cnn, 10, repeats, warmup, "≤ 1.03")
    if "transformer" in parts:
        x_tf = torch.randn(tf["batch"], tf["seq"], tf["d"], generator=gen)
        name = f"transformer block d {tf['d']}, feed-forward {tf['ff']}, seq {tf['seq']}"
        rows.append(step_row(name, lambda: Block(tf["d"], tf["heads"], tf["ff"]), x_tf, 10, repeats, warmup, "≤ 1.15"))
    if "resnet" in parts:
        for b in rn_batches:
            x_rn = torch.randn(b, 3, rn_side, rn_side, generator=gen)
            name = f"ResNet-18 width {rn_width} at {rn_side}×{rn_side}"
            target = "≤ 1.2" if b >= 32 else "≤ 2.5"
            rows.append(
                step_row(name, lambda: resnet18(rn_width), x_rn, 10, max(3, repeats // 2), min(warmup, 2), target)
            )
    if "register" in parts:
        rows.append(register_row(reg_sizes, 3))
    if "compile" in parts:
        rows += compile_rows(mlp_sizes, mlp_batch, repeats, warmup)
    if "paper" in parts:
        rows.append(
            paper_row(8 if args.quick else 32, 2 if args.quick else 8, 8, repeats * (1 if args.quick else 10), warmup)
        )

    header = ["measurement", "size", "GmP exact", "GmP fast", "weight norm", "baseline", "target"]
    print(f"| {' | '.join(header)} |")
    print(f"|{'|'.join('---' for _ in header)}|")
    for r in rows:
        print(f"| {' | '.join(r)} |")
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, "
        f"median [quartiles] of {repeats} interleaved repeats (3 for transforms of ≥ 10⁷ elements) "
        f"after {warmup} warm-up (ResNet rows: half the repeats); {time.perf_counter() - t0:.0f} s; "
        f"kernel: {kernel_status()}; backend: {args.backend or 'default'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
