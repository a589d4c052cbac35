"""benchmarks/figure1.py: the paper's Figure 1 (moved out of georeparam.analysis), at toy size."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "figure1.py"
F64 = torch.float64


def _load():
    spec = importlib.util.spec_from_file_location("figure1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figure1 = _load()
stability_experiment = figure1.stability_experiment


@pytest.mark.parametrize("perturbation", ["ones", "random"])
def test_gmp_direction_change_is_exactly_the_angle_step(perturbation):
    res = stability_experiment(trials=500, seed=1, perturbation=perturbation)
    gmp = res.direction[res.methods.index("GmP")]
    # ‖δθ‖ bounds the turn; in 2-D it is the turn itself (all steps here are < π)
    assert bool((gmp <= res.angle_step + 1e-12).all())
    torch.testing.assert_close(gmp, res.angle_step, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("perturbation", ["ones", "random"])
def test_cartesian_directions_are_lost_when_eps_dominates_w(perturbation):
    res = stability_experiment(trials=500, seed=2, perturbation=perturbation)
    big = res.eps.index(0.1)
    for m in ("SP", "WN", "BN"):
        d = res.direction[res.methods.index(m), big]
        assert d.median() > 1.0, m  # ~π/2: the new direction is unrelated to the old one
        assert (d > math.pi / 2).float().mean() > 0.3, m
    gmp = res.direction[res.methods.index("GmP"), big]
    assert gmp.max() <= 0.1 * (1 if perturbation == "ones" else 6) + 1e-12


def test_stability_sp_trial_by_hand_and_bn_turns_like_sp():
    res = stability_experiment((1e-3,), trials=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(3, 2, generator=gen, dtype=F64) * 1e-3
    b = torch.randn(3, generator=gen, dtype=F64) * 1e-3
    w1, b1 = w + 1e-3, b + 1e-3
    cos = (w * w1).sum(1) / (w.norm(dim=1) * w1.norm(dim=1))
    torch.testing.assert_close(res.direction[0, 0], torch.acos(cos), rtol=1e-7, atol=1e-12)
    shift = (
        -b1[:, None] * w1 / w1.norm(dim=1, keepdim=True) ** 2 + b[:, None] * w / w.norm(dim=1, keepdim=True) ** 2
    ).norm(dim=1)
    torch.testing.assert_close(res.point[0, 0], shift)
    torch.testing.assert_close(res.direction[res.methods.index("BN")], res.direction[0])  # same Cartesian turn
    assert "| GmP |" in res.table() and res.table().count("\n") == 1 + len(res.methods)


def test_stability_zero_eps_changes_nothing_and_validates():
    res = stability_experiment((0.0,), trials=10)
    assert res.direction.abs().max() < 1e-7 and res.point.abs().max() < 1e-9
    with pytest.raises(ValueError, match="perturbation"):
        stability_experiment(perturbation="up")
    with pytest.raises(ValueError, match="methods"):
        stability_experiment(methods=("LN",))


def test_script_writes_table_and_figure_at_toy_size(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "20", "--eps", "1e-3,1e-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "figure1.md").read_text()
    assert table.strip() in proc.stdout
    lines = table.strip().splitlines()
    assert lines[0] == "| method | ε = 0.001 | ε = 0.1 |" and len(lines) == 2 + 4
    gmp = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert gmp[0] == "GmP" and math.isclose(float(gmp[1].split(" / ")[0]), 1e-3, rel_tol=1e-9)
    assert (tmp_path / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--eps", "-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "eps must be" in bad.stderr
