"""What the optimizer side keeps track of: layers added by ``add_param_group``, optimizers that hold
Parameters ``register``/``remove`` replaced, frozen layers (``init_geometric_`` and
``GeometricOptimizer``), NaN units, the wrapper's saved ``every``, and the learning-rate claims of
docs/training.md. Each case is exact within its tolerance or a clear error that names the
tensor/module, with nothing changed."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import georeparam
from conftest import REPO_ROOT, rel_err
from georeparam.optim import GeometricOptimizer, param_groups
from test_errors import assert_unchanged, snapshot

F64 = torch.float64


def canonical(g) -> bool:
    a = g.angles.detach().double()
    return (
        bool((g.radius >= 0).all())
        and bool((a[:, :-1].abs() <= math.pi / 2).all())
        and bool(((a[:, -1] > -math.pi) & (a[:, -1] <= math.pi + 1e-6)).all())
    )


def tanh_net(seed=0, dtype=F64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    georeparam.register(model, exclude=["4"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 4, generator=g, dtype=dtype)
    y = torch.tanh(x @ torch.randn(4, 3, generator=g, dtype=dtype)).sum(1, keepdim=True)
    return model, x, y


def geo_params(layer):
    g = georeparam.geometry(layer)
    return [p for p in g if p is not None]


# -------------------------------------------------------------------------------------------------
# add_param_group with another GmP layer after wrapping
# -------------------------------------------------------------------------------------------------


def _train_added(wrap, steps=300, lr=0.5):
    model, x, y = tanh_net()
    first = geo_params(model[0]) + list(model[4].parameters())
    opt = torch.optim.SGD(first, lr=lr, momentum=0.9)
    if wrap:
        opt = GeometricOptimizer(opt, model)
    g2 = georeparam.geometry(model[2])
    for p in (g2.angles, g2.radius, g2.offset):  # one group per kind, as param_groups builds them
        opt.add_param_group({"params": [p]})
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def test_add_param_group_layer_is_canonicalized_on_the_same_trajectory():
    plain, _ = _train_added(wrap=False)
    wrapped, opt = _train_added(wrap=True)
    assert not canonical(georeparam.geometry(plain[2]))  # the case is not vacuous: it drifts
    assert canonical(georeparam.geometry(wrapped[2])) and canonical(georeparam.geometry(wrapped[0]))
    assert len(opt._layers) == 2 and opt.units_canonicalized > 0
    for i in (0, 2):  # the same w and b as without the wrapper (float64; rounding amplified by 300 steps)
        assert (plain[i].weight - wrapped[i].weight).abs().max().item() <= 1e-8
        assert (plain[i].bias - wrapped[i].bias).abs().max().item() <= 1e-8


def test_add_param_group_with_part_of_a_layer_is_refused_before_stepping():
    model, x, y = tanh_net()
    opt = GeometricOptimizer(torch.optim.SGD(geo_params(model[0]), lr=0.5), model)
    opt.add_param_group({"params": [georeparam.geometry(model[2]).angles]})
    nn.functional.mse_loss(model(x), y).backward()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"layer '2' has only some of its GmP Parameters.*Got: \{'radius': False, 'angles': True"
    ):
        opt.step()
    assert_unchanged(model, snap)
    assert not opt.state  # nothing was stepped


# -------------------------------------------------------------------------------------------------
# An optimizer built before register; remove while the optimizer holds the coordinates
# -------------------------------------------------------------------------------------------------


def _step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_optimizer_built_before_register_warns_and_holds_only_orphans():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    old_b = model[0].bias
    b_before = old_b.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    georeparam.register(model, exclude=["2"])
    g = georeparam.geometry(model[0])
    assert old_b is not g.offset and torch.equal(old_b.detach(), b_before)  # λ is a new Parameter
    x = torch.randn(8, 3)
    before = copy.deepcopy(model)
    with pytest.warns(
        UserWarning, match=r"SGD is stepping 2 Parameters that georeparam.register.*replaced.*Linear.weight"
    ):
        _step(model, opt, x)
    assert torch.equal(model[0].weight, before[0].weight)  # it trained nothing there (and said so)
    # once per optimizer: the next step is quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, opt, x)
    # an optimizer built after registering never warns
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, good, x)


def test_register_rolled_back_does_not_retire_the_live_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
    model[1].bias.data.fill_(1.0)  # a zero row with a bias: refused, register changes nothing
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError):
        georeparam.register(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, opt, torch.randn(2, 3))


def test_remove_mid_training_warns_at_the_next_step():
    model, x, y = tanh_net()
    opt = GeometricOptimizer(torch.optim.Adam(param_groups(model, lr=0.05)), model)
    for _ in range(3):
        _step(model, opt, x)
    georeparam.remove(model)
    with pytest.warns(UserWarning, match=r"Adam is stepping 6 Parameters.*Linear.weight radius \(replaced by remove\)"):
        _step(model, opt, x)
    # a new optimizer over the plain model is quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, torch.optim.Adam(model.parameters(), lr=0.05), x)


# -------------------------------------------------------------------------------------------------
# Frozen layers
# -------------------------------------------------------------------------------------------------


def test_init_geometric_skips_frozen_layers_and_refuses_partly_frozen_ones():
    model, _, _ = tanh_net(dtype=torch.float32)
    for p in geo_params(model[0]):
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in geo_params(model[0])]
    w2 = model[2].weight.detach().clone()
    georeparam.init_geometric_(model, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(geo_params(model[0]), frozen))
    assert not torch.equal(model[2].weight, w2)  # the trainable layer was re-initialised
    # partly frozen: refused, nothing written
    georeparam.geometry(model[2]).radius.requires_grad_(False)
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"layer '2' has some GmP coordinates frozen.*Got: requires_grad \{'radius': False"
    ):
        georeparam.init_geometric_(model)
    assert_unchanged(model, snap)
    # all frozen: refused
    for p in geo_params(model[2]):
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every GmP layer of Sequential is frozen.*Got: 2 frozen layers"):
        georeparam.init_geometric_(model)
    assert_unchanged(model, snap)


def test_geometric_optimizer_leaves_frozen_coordinates_alone():
    model, x, y = tanh_net()
    g0 = georeparam.geometry(model[0])
    with torch.no_grad():  # a drifted, non-canonical (w-preserving) state of the frozen layer
        g0.angles[:, 0] += 2 * math.pi
        g0.radius.neg_(), g0.offset.neg_()
        g0.angles[:, -1] += math.pi
    for p in geo_params(model[0]):
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in geo_params(model[0])]
    opt = GeometricOptimizer(torch.optim.SGD(param_groups(model, lr=0.5)), model)
    for _ in range(5):
        _step(model, opt, x)
    assert all(torch.equal(p, q) for p, q in zip(geo_params(model[0]), frozen))
    assert canonical(georeparam.geometry(model[2]))
    # unfrozen, it is canonicalized at the next step (w and b unchanged)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    for p in geo_params(model[0]):
        p.requires_grad_(True)
    assert opt.canonicalize_() == 16
    assert canonical(g0) and rel_err(model[0].weight, w) <= 1e-12 and rel_err(model[0].bias, b) <= 1e-12


# -------------------------------------------------------------------------------------------------
# NaN units are not counted as canonicalized
# -------------------------------------------------------------------------------------------------


def test_nan_units_are_not_counted():
    model, x, y = tanh_net()
    opt = GeometricOptimizer(torch.optim.SGD(param_groups(model, lr=0.1)), model)
    g = georeparam.geometry(model[0])
    with torch.no_grad():
        g.angles[3] = math.nan
        g.radius[5] = math.nan
        g.radius[7].neg_(), g.offset[7].neg_()
        g.angles[7, :-1].neg_(), g.angles[7, -1].add_(math.pi)  # unit 7: non-canonical, same w
    assert opt.canonicalize_() == 1 and opt.canonicalize_() == 0 and opt.canonicalize_() == 0
    assert opt.units_canonicalized == 1
    assert torch.isnan(g.angles[3]).all() and torch.isnan(g.radius[5])


# -------------------------------------------------------------------------------------------------
# Wrapper state saved with another `every`
# -------------------------------------------------------------------------------------------------


def test_state_with_another_every_is_refused():
    model, x, y = tanh_net()
    src = GeometricOptimizer(torch.optim.Adam(param_groups(model, lr=0.1)), model, every=3)
    for _ in range(4):
        _step(model, src, x)
    sd = src.state_dict()
    dst = GeometricOptimizer(torch.optim.Adam(param_groups(model, lr=0.1)), model, every=5)
    with pytest.raises(ValueError, match=r"saved by a wrapper with every=3, this one has every=5.*Got: every=3"):
        dst.load_state_dict(sd)
    assert not dst.state and dst._steps == 0  # nothing loaded
    sd["geometric"]["every"] = 5  # switching on purpose, as the message says
    dst.load_state_dict(sd)
    assert dst._steps == 4 and len(dst.state) == len(src.state)
    same = GeometricOptimizer(torch.optim.Adam(param_groups(model, lr=0.1)), model, every=3)
    same.load_state_dict(src.state_dict())
    assert same._steps == 4


# -------------------------------------------------------------------------------------------------
# "tolerates larger learning rates": what docs/training.md says is what was measured
# -------------------------------------------------------------------------------------------------


def test_training_doc_reports_the_measured_sgd_divergence():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lr_stability", REPO_ROOT / "benchmarks" / "lr_stability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = (REPO_ROOT / "docs" / "training.md").read_text()
    assert "tolerates larger learning rates than standard" not in doc  # the unmeasured claim is gone
    # one documented row, re-measured (seed 0, 60 steps): SGD lr 1 without momentum
    assert re.search(r"\| 1 \| 0 \| 0/5 · loss [^|]*\| 5/5 at step", doc)  # standard finite, GmP diverged
    standard, gmp = (bench.run(m, 0, 1.0, 0.0, 60) for m in ("standard", "GmP"))
    assert standard["diverged_at"] is None and math.isfinite(standard["loss"])
    assert gmp["diverged_at"] is not None and gmp["diverged_at"] <= 60
