"""The one backend choice (georeparam._map.dispatch) and the map package's shape.

The negative-bit test compares against the same map on a tensor without the bit (its values
are equal, the memory it points at is not) and against the paper's formula in float64.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import georeparam
from conftest import REPO_ROOT, rel_err, seeded
from georeparam._map import backend_for, dispatch, kernel_status, scaled_unit, torch_impl, use_backend
from georeparam.coords import to_hyperspherical

BACKENDS = ["torch"] + (["cpu"] if kernel_status().startswith("loaded") else [])


def negated_view(t: torch.Tensor) -> torch.Tensor:
    """A view equal to ``t`` that carries the negative bit: the memory under it holds ``-t``."""
    v = torch.complex(torch.zeros_like(t), -t.detach()).conj().imag
    assert v.is_neg() and torch.equal(v, t)
    return v


def formula(radius: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """r·u from the paper's latitude form in float64: u_k = sin φ_k ∏_{j<k} cos φ_j, then (cos θ, sin θ)·∏."""
    lat, radius = lat.double(), radius.double()
    rows = []
    for r, a in zip(radius, lat):
        p, u = 1.0, []
        for phi in a[:-1].tolist():
            u.append(math.sin(phi) * p)
            p *= math.cos(phi)
        u += [math.cos(a[-1].item()) * p, math.sin(a[-1].item()) * p]
        rows.append([r.item() * x for x in u])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("units, fan_in", [(1, 2), (1, 9), (4, 9)])
def test_negative_bit_views_give_their_values_not_their_memory(backend, units, fan_in):
    """Note [Negative bit]: ``x.conj().imag`` reads as x; the kernel reads memory (data_ptr) and
    numpy refuses such tensors, so the bit must be resolved before either sees it. (A one-unit
    radius, or a one-unit, one-angle row, is such a view that is also contiguous: nothing on the
    way copies it.)"""
    with seeded(0):
        radius, lat = to_hyperspherical(torch.randn(units, fan_in))
        radius = radius + 0.5
        g = torch.randn(units, fan_in)
    r, a = negated_view(radius).requires_grad_(), negated_view(lat).requires_grad_()
    r_plain, a_plain = radius.clone().requires_grad_(), lat.clone().requires_grad_()
    with use_backend(backend):
        assert backend_for(radius, lat) == backend
        w = scaled_unit(r, a)
        w_plain = scaled_unit(r_plain, a_plain)
        w.backward(g)
        w_plain.backward(g)
    assert torch.equal(w, w_plain) and torch.equal(a.grad, a_plain.grad) and torch.equal(r.grad, r_plain.grad)
    assert rel_err(w, formula(radius, lat)) <= 3e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fan_in", [2, 6])
def test_functional_call_with_negative_bit_parameters(backend, fan_in):
    """The audit's route: a registered one-unit layer run by functional_call on ``conj().imag`` views."""
    with seeded(1):
        layer = georeparam.geometric(nn.Linear(fan_in, 1))
        x = torch.randn(5, fan_in)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    views = {k: negated_view(v) for k, v in params.items()}
    with use_backend(backend):
        want = functional_call(layer, params, (x,))
        got = functional_call(layer, views, (x,))
    w = formula(params["parametrizations.weight.original0"], params["parametrizations.weight.original1"])
    b = params["parametrizations.bias.original"].double() * params["parametrizations.weight.original0"].double()
    assert torch.equal(got, want)
    assert rel_err(got, x.double() @ w.t() + b) <= 1e-6


def test_use_backend_names_its_choices_and_restores():
    radius, lat = torch.ones(2), torch.zeros(2, 3)
    before = backend_for(radius, lat)
    with use_backend("torch"):
        assert backend_for(radius, lat) == "torch"
        with pytest.raises(ValueError, match=r"use_backend: name must be one of \['torch'.*Got: 'gpu'"):
            with use_backend("gpu"):
                pass
        assert backend_for(radius, lat) == "torch"
    assert backend_for(radius, lat) == before


def test_a_backend_is_one_row_of_the_table(monkeypatch):
    """The hook a GPU backend plugs into: a row (name, predicate, function) in BACKENDS."""
    calls = []

    def fake(radius, angles, mode):
        calls.append(mode)
        return torch_impl.scaled_unit(radius, angles, mode)

    monkeypatch.setattr(dispatch, "BACKENDS", [("fake", lambda r, a: a.shape[-1] == 4, fake)] + dispatch.BACKENDS)
    radius, lat = torch.ones(2), torch.zeros(2, 4)
    assert backend_for(radius, lat) == "fake" and backend_for(radius, torch.zeros(2, 3)) != "fake"
    w = scaled_unit(radius, lat, "fast")
    assert calls == ["fast"] and torch.equal(w, torch_impl.scaled_unit(radius, lat, "fast"))
    with use_backend("torch"):
        scaled_unit(radius, lat)
    assert calls == ["fast"]


# -------------------------------------------------------------------------------------------------
# the package's shape: no cycle, no private name imported across its modules
# -------------------------------------------------------------------------------------------------

PACKAGE = REPO_ROOT / "georeparam" / "_map"


def imports(path: Path):
    """(module, names) for each ``from .x import names`` in the file, relative to the package."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                yield from ((alias.name, []) for alias in node.names)
            else:
                yield node.module, [alias.name for alias in node.names]


def check_package(files) -> None:
    graph = {}
    for path in files:
        name = path.stem
        graph[name] = set()
        for module, names in imports(path):
            graph[name].add(module)
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports private {private} from .{module}"
    # no cycle (depth-first search with colours)
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for nxt in graph.get(node, ()):
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_map_package_imports_form_a_dag_without_private_names(tmp_path):
    files = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in files} >= {"dispatch", "modes", "torch_impl", "cpu", "build", "_compat"}
    check_package(files)
    # the check can fail: a planted cycle and a planted private import
    (tmp_path / "a.py").write_text("from .b import thing\n")
    (tmp_path / "b.py").write_text("from .a import other\n")
    with pytest.raises(AssertionError, match="import cycle"):
        check_package([tmp_path / "a.py", tmp_path / "b.py"])
    (tmp_path / "c.py").write_text("from .modes import _hidden\n")
    with pytest.raises(AssertionError, match="private"):
        check_package([tmp_path / "c.py"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_recomputing_map_is_opt_in_on_cpu_and_agrees_with_the_default(dtype):
    g = torch.Generator().manual_seed(5)
    r = (torch.rand(7, generator=g, dtype=dtype) + 0.5).requires_grad_()
    a = torch.randn(7, 12, generator=g, dtype=dtype).requires_grad_()
    assert backend_for(r.detach(), a.detach()) != "recompute"  # on CPU never chosen unless asked for
    outs = {}
    for name in ("recompute", "torch"):
        with use_backend(name):
            assert backend_for(r.detach(), a.detach()) == name
            w = scaled_unit(r, a)
            gr, ga = torch.autograd.grad((w * torch.arange(w.numel(), dtype=dtype).view_as(w)).sum(), (r, a))
        outs[name] = (w.detach(), gr, ga)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x, y in zip(outs["recompute"], outs["torch"]):
        torch.testing.assert_close(x, y, **tol)


def test_every_other_device_gets_the_recomputing_map():
    """Note [Which pure-torch map]: off the CPU (here the meta device, which runs the same ops
    for shapes only) the recomputing map is chosen, forward and backward run, and
    ``use_backend("torch")`` still selects the saving map."""
    r = torch.ones(5, device="meta", requires_grad=True)
    a = torch.zeros(5, 8, device="meta", requires_grad=True)
    assert backend_for(r.detach(), a.detach()) == "recompute"
    for mode in ("exact", "fast"):
        w = scaled_unit(r, a, mode)
        assert w.shape == (5, 9) and w.device.type == "meta"
        assert type(w.grad_fn).__name__.startswith("ScaledUnitRecompute")
        gr, ga = torch.autograd.grad(w, (r, a), torch.ones_like(w))
        assert gr.shape == r.shape and ga.shape == a.shape
    with use_backend("torch"):
        assert backend_for(r.detach(), a.detach()) == "torch"
