"""param_groups and GeometricOptimizer.

The central claim: with the optimizer state transformed, canonicalizing does not change the
trajectory of w and b. It is checked in float64 (so that rounding, amplified by the training
dynamics, stays far below the tolerance) against the unwrapped optimizer, over 200 steps at large
learning rates for SGD-momentum, Adam and AdamW, and over generated drifted coordinates for every
supported optimizer. Run with ``-s`` to see the measured max |Δw|.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from georeparam.optim import PARITY, GeometricOptimizer, param_groups

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# param_groups
# ---------------------------------------------------------------------------------------------


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.ReLU(),
        nn.Linear(5, 1, bias=False),
        nn.LayerNorm(1),
    )
    georeparam.register(model, exclude=[nn.Conv1d])
    return model


def test_param_groups_cover_every_parameter_once_by_kind():
    model = small_model()
    groups = param_groups(model, 0.1, weight_decay=0.01, angle_lr=0.2, radius_lr=0.3, offset_lr=0.4)
    assert [g["name"] for g in groups] == ["angles", "radius", "offset", "other"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    geos = [georeparam.geometry(model[i]) for i in (3, 5)]
    by = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert by["angles"] == {id(g.angles) for g in geos}
    assert by["radius"] == {id(g.radius) for g in geos}
    assert by["offset"] == {id(geos[0].offset)}  # layer 5 has no bias
    opts = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert opts == {"angles": (0.2, 0.0), "radius": (0.3, 0.01), "offset": (0.4, 0.0), "other": (0.1, 0.01)}
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_options():
    model = small_model()
    groups = param_groups(
        model,
        0.1,
        weight_decay=0.01,
        radius_weight_decay=0.0,
        angle_weight_decay=0.5,
        offset_weight_decay=0.2,
        other={"lr": 1e-3, "momentum": 0.5},
    )
    opts = {g["name"]: g for g in groups}
    assert opts["angles"]["weight_decay"] == 0.5 and opts["radius"]["weight_decay"] == 0.0
    assert opts["offset"]["weight_decay"] == 0.2
    assert opts["other"]["lr"] == 1e-3 and opts["other"]["momentum"] == 0.5 and opts["other"]["weight_decay"] == 0.01
    with pytest.raises(TypeError, match="other must be a dict"):
        param_groups(model, 0.1, other=1e-3)
    with pytest.raises(ValueError, match="'params' key"):
        param_groups(model, 0.1, other={"params": []})
    # no "other" group when everything is GmP
    only = georeparam.geometric(nn.Linear(3, 2))
    assert [g["name"] for g in param_groups(only, 0.1)] == ["angles", "radius", "offset"]


def test_param_groups_on_an_unregistered_model_warn_and_put_everything_in_other():
    # (the model with no GmP layer is accepted since issue 21: tests/test_ecosystem.py)
    plain = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="no GmP-registered layer.*'other'.*register"):
        groups = param_groups(plain, 0.1)
    assert [(g["name"], len(g["params"])) for g in groups] == [("other", 2)]
    with pytest.raises(TypeError, match="nn.Module"):
        param_groups([nn.Parameter(torch.zeros(2))], 0.1)


def _names(groups):
    return [(g["name"], [id(p) for p in g["params"]]) for g in groups]


def test_param_groups_work_through_compile_and_ddp(tmp_path):
    model = small_model()
    expected = _names(param_groups(model, 0.1))
    compiled = torch.compile(model)  # a wrapper module; nothing is compiled until it is called
    assert _names(param_groups(compiled, 0.1)) == expected
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert _names(param_groups(ddp, 0.1)) == expected
        opt = GeometricOptimizer(torch.optim.SGD(param_groups(ddp, 0.1), momentum=0.9), ddp)
        assert len(opt._layers) == 2
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the trajectory identity: 200 steps at large learning rates
# ---------------------------------------------------------------------------------------------


def teacher_problem(seed=0, dtype=F64):
    """A 4-16-1 tanh network (both layers GmP) fitting a random tanh teacher, full batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    georeparam.register(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 4, generator=g, dtype=dtype)
    y = torch.tanh(x @ torch.randn(4, 3, generator=g, dtype=dtype)).sum(1, keepdim=True)
    return model, x, y


TRAJECTORY = {  # optimizer, lr (SGD 500×, Adam 300× their usual defaults), weight decay (radius/other)
    "sgd-momentum": (lambda groups: torch.optim.SGD(groups, momentum=0.9), 0.5, 0.01),
    "adam": (lambda groups: torch.optim.Adam(groups), 0.3, 0.0),
    "adamw": (lambda groups: torch.optim.AdamW(groups), 0.3, 0.1),
}


def train(name, wrap, steps=200, every=1, dtype=F64, parity=None):
    make, lr, wd = TRAJECTORY[name]
    model, x, y = teacher_problem(dtype=dtype)
    opt = make(param_groups(model, lr, weight_decay=wd))
    if wrap:
        opt = GeometricOptimizer(opt, model, every=every, parity=parity)
    in_range = True
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if wrap and every == 1:
            in_range &= all(canonical(georeparam.geometry(model[i])) for i in (0, 2))
    return model, opt, in_range


def canonical(g) -> bool:
    a = g.angles.detach().double()
    return (
        bool((g.radius >= 0).all())
        and bool((a[:, :-1].abs() <= math.pi / 2).all())
        and bool(((a[:, -1] > -math.pi) & (a[:, -1] <= math.pi + 1e-6)).all())
    )


def max_delta(a, b):
    dw = max((a[i].weight - b[i].weight).abs().max().item() for i in (0, 2))
    db = max((a[i].bias - b[i].bias).abs().max().item() for i in (0, 2))
    return dw, db


@pytest.mark.parametrize("name", list(TRAJECTORY))
def test_200_steps_same_trajectory_with_and_without_the_wrapper(name):
    plain, _, _ = train(name, wrap=False)
    wrapped, opt, in_range = train(name, wrap=True)
    dw, db = max_delta(plain, wrapped)
    print(
        f"\n{name}: max|Δw| = {dw:.2e}, max|Δb| = {db:.2e} after 200 float64 steps; "
        f"{opt.units_canonicalized} unit canonicalizations"
    )
    assert dw <= 1e-8 and db <= 1e-8
    assert in_range  # after every step
    # the unwrapped run did leave the canonical ranges, in every way the wrapper maps back
    geos = [georeparam.geometry(plain[i]) for i in (0, 2)]
    neg_r = sum(int((g.radius < 0).sum()) for g in geos)
    lat_out = sum(int((g.angles[:, :-1].abs() > math.pi / 2).sum()) for g in geos)
    lon_out = sum(int((g.angles[:, -1].abs() > math.pi).sum()) for g in geos)
    assert neg_r > 0 and lat_out > 0 and lon_out > 0, (neg_r, lat_out, lon_out)


def test_identity_is_not_vacuous_wrong_parity_diverges():
    # the same run with Adam's first moment declared even (not flipped) ends somewhere else
    plain, _, _ = train("adam", wrap=False)
    wrong = {"step": "scalar", "exp_avg": "even", "exp_avg_sq": "even", "max_exp_avg_sq": "even"}
    wrapped, _, _ = train("adam", wrap=True, parity=wrong)
    assert max_delta(plain, wrapped)[0] > 1e-3


def test_every_k_steps_same_trajectory():
    plain, _, _ = train("adam", wrap=False, steps=100)
    wrapped, opt, _ = train("adam", wrap=True, steps=100, every=7)
    assert opt.units_canonicalized > 0
    assert max(max_delta(plain, wrapped)) <= 1e-8


def test_decay_on_angles_warns_and_changes_the_trajectory():
    # Note [Weight decay and canonicalization]: a shifted angle with decay is pulled elsewhere
    def run(wrap):
        model, x, y = teacher_problem()
        opt = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.1)  # decay on angles too
        if wrap:
            with pytest.warns(UserWarning, match="does not commute with canonicalization"):
                opt = GeometricOptimizer(opt, model)
        for _ in range(100):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model

    assert max_delta(run(False), run(True))[0] > 1e-6


# ---------------------------------------------------------------------------------------------
# every supported optimizer, over generated drifted coordinates
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True),
    "AdamW-maximize": lambda p: torch.optim.AdamW(p, lr=0.1, maximize=True, weight_decay=0.0),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.1),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.1),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "RMSprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.1),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.1, lambd=0.0, t0=0),
}


def test_every_known_optimizer_is_covered():
    covered = {type(make([nn.Parameter(torch.zeros(1))])) for make in OPTIMIZERS.values()}
    assert covered | {torch.optim.SparseAdam} == set(PARITY)


@settings(max_examples=8)
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    fan_in=st.integers(2, 6),
    units=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_generated_drifted_coordinates_same_steps(name, fan_in, units, seed):
    g = torch.Generator().manual_seed(seed)
    layer = georeparam.geometric(nn.Linear(fan_in, units).double())
    geo = georeparam.geometry(layer)
    with torch.no_grad():  # drifted: angles far outside their ranges, some radii negative
        geo.radius.copy_(torch.randn(units, generator=g, dtype=F64))
        geo.angles.copy_(6 * torch.randn(units, fan_in - 1, generator=g, dtype=F64))
        geo.offset.copy_(torch.randn(units, generator=g, dtype=F64))
    twin = copy.deepcopy(layer)
    x = torch.randn(16, fan_in, generator=g, dtype=F64)
    target = torch.randn(16, units, generator=g, dtype=F64)
    plain = OPTIMIZERS[name](twin.parameters())
    wrapped = GeometricOptimizer(OPTIMIZERS[name](layer.parameters()), layer)
    for _ in range(4):
        for m, opt in ((twin, plain), (layer, wrapped)):
            opt.zero_grad()
            torch.tanh(m(x)).sub(target).pow(2).mean().backward()
            opt.step()
    assert canonical(geo)
    torch.testing.assert_close(layer.weight, twin.weight, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.bias, twin.bias, rtol=0, atol=1e-10)
    if name == "ASGD":  # the averaged iterate is mapped like the parameters: same averaged w
        avg = {}
        for m, opt in ((twin, plain), (layer, wrapped)):
            gm = georeparam.geometry(m)
            r, a = opt.state[gm.radius]["ax"], opt.state[gm.angles]["ax"]
            avg[m is layer] = r[:, None] * georeparam.to_cartesian(a)
        torch.testing.assert_close(avg[True], avg[False], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# it behaves like an optimizer
# ---------------------------------------------------------------------------------------------


def test_canonicalize_keeps_w_and_b_and_leaves_canonical_units_alone():
    layer = georeparam.geometric(nn.Linear(5, 6).double())
    geo = georeparam.geometry(layer)
    with torch.no_grad():
        geo.radius[:3].neg_()
        geo.angles[3, 0] += 2 * math.pi
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    before = [geo.radius.detach().clone(), geo.angles.detach().clone()]
    opt = GeometricOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer)
    assert opt.canonicalize_() == 4
    assert canonical(geo)
    torch.testing.assert_close(layer.weight, w, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.bias, b, rtol=0, atol=1e-14)
    assert torch.equal(geo.angles[4:], before[1][4:]) and torch.equal(geo.radius[4:], before[0][4:])
    assert opt.canonicalize_() == 0


def test_closure_zero_grad_and_repr():
    model, x, y = teacher_problem()
    opt = GeometricOptimizer(torch.optim.SGD(param_groups(model, 0.1), momentum=0.9), model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "GeometricOptimizer(every=1, layers=2" in repr(opt) and "SGD" in repr(opt)


def run_steps(model, opt, sched, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def test_state_dict_resume_and_scheduler():
    def setup():
        model, x, y = teacher_problem()
        opt = GeometricOptimizer(torch.optim.Adam(param_groups(model, 0.3)), model, every=4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        return model, opt, sched, x, y

    model, opt, sched, x, y = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        run_steps(model, opt, sched, x, y, 30)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.3 / 8)  # the scheduler reaches it
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    assert ckpt["opt"]["geometric"] == {"steps": 30, "every": 4}
    run_steps(model, opt, sched, x, y, 30)

    model2, opt2, sched2, _, _ = setup()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state
    run_steps(model2, opt2, sched2, x, y, 30)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.optimizer.param_groups[0]["lr"] == pytest.approx(0.3 / 64)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def test_unknown_optimizers_are_refused():
    layer = georeparam.geometric(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="does not know how the state of LBFGS"):
        GeometricOptimizer(torch.optim.LBFGS(layer.parameters()), layer)
    if hasattr(torch.optim, "Adafactor"):
        with pytest.raises(TypeError, match="Adafactor"):
            GeometricOptimizer(torch.optim.Adafactor(layer.parameters()), layer)

    class MyAdam(torch.optim.Adam):
        pass

    with pytest.raises(TypeError, match="MyAdam.*parity=georeparam.optim.PARITY"):
        GeometricOptimizer(MyAdam(layer.parameters()), layer)
    GeometricOptimizer(MyAdam(layer.parameters()), layer, parity=PARITY[torch.optim.Adam])
    with pytest.raises(ValueError, match="parity maps state keys"):
        GeometricOptimizer(MyAdam(layer.parameters()), layer, parity={"exp_avg": "sometimes"})


def test_unknown_state_key_is_refused_at_canonicalization():
    layer = georeparam.geometric(nn.Linear(3, 2))
    opt = GeometricOptimizer(torch.optim.Adam(layer.parameters(), lr=0.1), layer, parity={"momentum_buffer": "odd"})
    layer(torch.randn(4, 3)).sum().backward()
    opt.optimizer.step()
    with torch.no_grad():
        georeparam.geometry(layer).radius.neg_()
    with pytest.raises(RuntimeError, match="state entry 'step' whose parity is unknown"):
        opt.canonicalize_()


def test_bad_construction_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no GmP-registered layer"):
        GeometricOptimizer(early, model)
    georeparam.register(model)
    with pytest.raises(ValueError, match="none of the model.s GmP radii or angles are in the optimizer.*orphans"):
        GeometricOptimizer(early, model)
    g = georeparam.geometry(model[0])
    partial = torch.optim.SGD([g.angles, g.radius], lr=0.1)
    with pytest.raises(ValueError, match="layer '0' has only some of its GmP Parameters"):
        GeometricOptimizer(partial, model)
    # a layer wholly outside the optimizer is left alone
    only_first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    assert [layer.name for layer in GeometricOptimizer(only_first, model)._layers] == ["0"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive int"):
            GeometricOptimizer(opt, model, every=bad)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        GeometricOptimizer(list(model.parameters()), model)
    with pytest.raises(TypeError, match="already wrapped"):
        GeometricOptimizer(GeometricOptimizer(opt, model), model)


# ---------------------------------------------------------------------------------------------
# docs/training.md: its snippets run, in order, as one script
# ---------------------------------------------------------------------------------------------


def test_training_doc_snippets_run(capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "training.md"
    if not doc.exists():
        pytest.skip("docs/training.md not found")
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 4
    exec(compile("\n".join(blocks), str(doc), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[('angles', 0.1, 0.0), ('radius', 0.1, 0.0001), ('offset', 0.1, 0.0), ('other', 0.1, 0.0001)]",
        "['bias', 'imn.running_mean', 'weight']",
        "True",
    ]
