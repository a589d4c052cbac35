"""The compiled CPU kernel inside torch.compile (georeparam._map.cpu_op): the graph holds the
kernel's custom ops, and the compiled model computes what the eager one does.

References: the eager registered model (the same kernel through its autograd Function), the
pure-torch map in float64, and ``torch.library.opcheck`` (schema, fake kernel, autograd
registration).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import georeparam
from conftest import REPO_ROOT, rel_err, seeded
from georeparam._map import backend_for, build, cpu_op, scaled_unit, use_backend

pytestmark = pytest.mark.skipif(
    not hasattr(torch.library, "custom_op") or build.load() is None or not georeparam._map.fast_paths(),
    reason="needs torch.library.custom_op (torch >= 2.4), the compiled kernel and the fast paths",
)


def net(seed=0):
    with seeded(seed):
        return nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 3)
        )  # fmt: skip


class Graphs:
    """An AOTAutograd backend that keeps the forward and backward graphs it is handed."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs = []

        def keep(gm, example_inputs):
            self.graphs.append(gm)
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def count(self, op) -> int:
        return sum(1 for g in self.graphs for node in g.graph.nodes if node.target is op)


@pytest.mark.parametrize("form", ["paper", "weight"])
def test_the_compiled_graph_runs_the_kernel_and_matches_eager(form):
    model = net()
    georeparam.register(model, form=form)
    twin = copy.deepcopy(model)
    with seeded(1):
        x = torch.randn(4, 3, 6, 6)
    graphs = Graphs()
    compiled = torch.compile(twin, fullgraph=True, backend=graphs.backend)
    y_c = compiled(x)
    y_c.pow(2).sum().backward()
    y_e = model(x)
    y_e.pow(2).sum().backward()
    layers = 3
    assert graphs.count(torch.ops.georeparam.gmp_forward.default) == layers
    assert graphs.count(torch.ops.georeparam.gmp_backward.default) == layers
    assert rel_err(y_c, y_e) <= 1e-6
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert rel_err(q.grad, p.grad) <= 1e-5, n


def test_opcheck_and_float64_reference():
    """The ops' schema, fake kernels and autograd pass ``torch.library.opcheck``; their values and
    gradients agree with the pure-torch map evaluated in float64."""
    g = torch.Generator().manual_seed(3)
    r = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    a = (torch.rand(6, 40, generator=g) * 3 - 1.5).requires_grad_()
    if hasattr(torch.library, "opcheck"):
        torch.library.opcheck(torch.ops.georeparam.gmp_forward.default, (r, a))
        gw = torch.randn(6, 41, generator=g)
        torch.library.opcheck(torch.ops.georeparam.gmp_backward.default, (r.detach(), a.detach(), gw))
    w = torch.ops.georeparam.gmp_forward(r, a)
    gw = torch.randn(6, 41, generator=g)
    gr, ga = torch.autograd.grad(w, (r, a), gw)
    r64, a64 = r.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    with use_backend("torch"):
        w64 = scaled_unit(r64, a64, "exact")
    gr64, ga64 = torch.autograd.grad(w64, (r64, a64), gw.double())
    assert rel_err(w.double(), w64) <= 1e-6
    assert rel_err(gr.double(), gr64) <= 1e-5 and rel_err(ga.double(), ga64) <= 1e-5


def test_only_inside_compile_and_not_for_float64():
    r, a = torch.ones(3), torch.zeros(3, 4)
    assert not cpu_op.applies(r, a)  # eager: the kernel's own Function (backend "cpu")
    assert backend_for(r, a) == "cpu"

    seen = {}

    def probe(r, a):
        seen["float32"] = cpu_op.applies(r, a)
        seen["float64"] = cpu_op.applies(r.double(), a.double())
        return r

    torch.compile(probe, backend="eager", fullgraph=True)(r, a)
    assert seen == {"float32": True, "float64": False}


def test_registration_loads_the_kernel_for_a_graph_traced_first():
    """A fresh process that registers (weight form: no eager forward at all) and compiles at once
    gets the kernel's ops in its graph: the trace itself cannot load the kernel."""
    code = (
        "import torch, georeparam\n"
        "from georeparam._map import build\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))\n"
        "georeparam.register(m, form='weight')\n"
        "assert build.is_loaded()\n"
        "ops = []\n"
        "def backend(gm, inputs):\n"
        "    ops.extend(str(n.target) for n in gm.graph.nodes)\n"
        "    return gm.forward\n"
        "torch.compile(m, backend=backend, fullgraph=True)(torch.randn(3, 4))\n"
        "print(sum('gmp_forward' in o for o in ops))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "2"
