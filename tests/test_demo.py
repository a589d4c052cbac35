"""`python -m georeparam demo` at toy size: the table first, the files, both GmP forms, no extras."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

import georeparam.demo as demo
from georeparam.demo import DEFAULT_RUNS, _prepare, main, run_demo, spirals

PNG = b"\x89PNG\r\n\x1a\n"
RUNS = list(DEFAULT_RUNS)
TOY = dict(steps=12, width=6, n_train=150, n_test=100, record_every=4, target=0.01, progress=False)


def parse_table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return header, rows


def test_default_runs_show_both_gmp_forms_at_lr_0_1():
    assert ("GmP", 0.1) in DEFAULT_RUNS and ("GmP-weight", 0.1) in DEFAULT_RUNS
    assert ("SP", 0.01) in DEFAULT_RUNS and ("WN", 0.01) in DEFAULT_RUNS


def test_run_demo_toy_size_prints_a_well_formed_table_and_saves_files(tmp_path, capsys):
    threads = torch.get_num_threads()
    res = run_demo(runs=RUNS, out=tmp_path, **TOY)
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    header, rows = parse_table(printed)
    assert header[:5] == ["method", "lr", "final loss", "test acc (final / best)", "steps to 1%"]
    assert {"median drift/step", "flips > π/2", "r sign changes", "dead units"} <= set(header)
    col = {h: i for i, h in enumerate(header)}
    assert [(r[0], float(r[1])) for r in rows] == RUNS
    for r in rows:
        loss, reach = float(r[2]), r[4]
        final, best = (float(v) for v in r[3].split(" / "))
        assert loss >= 0 and 0 <= final <= best <= 1
        assert reach == "1"  # a 1% target is met after the first step
        assert 0 <= float(r[col["median drift/step"]]) < 3.1416
        assert re.fullmatch(r"\d+ \(\d+(\.\d+)?%\)", r[col["flips > π/2"]])
        assert (r[col["r sign changes"]] == "–") == (not r[0].startswith("GmP"))
        assert re.fullmatch(r"\d+%", r[col["dead units"]])
    assert res["table"] in printed and res["table"] in res["results"].read_text()
    assert f"Saved the figure to {res['figure'].resolve()}" in printed
    assert res["figure"].read_bytes()[:8] == PNG and res["figure"].stat().st_size > 10_000
    numbers = json.loads(res["json"].read_text())
    assert numbers["config"]["steps"] == 12 and [(r["method"], r["lr"]) for r in numbers["rows"]] == RUNS
    for row, saved in zip(res["rows"], numbers["rows"]):
        assert saved["flips"] == row["flips"] and saved["test_accuracy"] == row["test_accuracy"]
        assert len(row["loss_curve"]) == len(row["accuracy_curve"]) == len(row["drift_per_step"]) == 12


def test_table_and_numbers_are_written_before_the_figure(tmp_path, capsys, monkeypatch):
    seen = {}

    def spy(state, rows, x, y, path, target):
        seen["stdout"] = capsys.readouterr().out
        seen["files"] = sorted(p.name for p in tmp_path.iterdir())
        path.write_bytes(PNG)
        return path

    monkeypatch.setattr(demo, "_save_figure", spy)
    res = run_demo(runs=[("SP", 0.01)], out=tmp_path, **TOY)
    assert seen["files"] == ["results.json", "results.md"]
    assert res["table"] in seen["stdout"]


def test_without_matplotlib_the_figure_is_skipped_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = run_demo(runs=[("SP", 0.01)], out=tmp_path, **TOY)
    out = capsys.readouterr().out
    assert res["figure"] is None and not (tmp_path / "demo.png").exists()
    assert [line for line in out.splitlines() if "figure" in line.lower()] == ["figure skipped: pip install matplotlib"]
    assert res["table"] in out and res["table"] in res["results"].read_text() and res["json"].exists()


def test_fresh_machine_without_matplotlib_or_tqdm_exits_0(tmp_path):
    # the README's main job on a machine with only torch and numpy: simulated by hiding both extras
    code = (
        "import sys\n"
        "for m in ('matplotlib', 'matplotlib.figure', 'tqdm', 'tqdm.auto'): sys.modules[m] = None\n"
        "from georeparam.cli import main\n"
        "sys.exit(main(['demo', '--steps', '20', '--width', '4', '--runs', 'SP:0.01,GmP-weight:0.1', '--out', sys.argv[1]]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, rows = parse_table(proc.stdout)
    assert [r[0] for r in rows] == ["SP", "GmP-weight"]
    assert proc.stdout.rstrip().endswith("figure skipped: pip install matplotlib")
    assert "step 20/20" in proc.stderr  # the plain progress lines stand in for tqdm
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["results.json", "results.md"]


def test_weight_form_flips_are_exactly_the_radius_sign_changes():
    # 2-D inputs, Adam at lr 0.1: u(θ) turns by ≤ |δθ| ≪ π/2, so every flip is a sign change of r
    res = run_demo(
        steps=100,
        width=32,
        n_train=300,
        n_test=300,
        runs=[("GmP-weight", 0.1)],
        out=None,
        progress=False,
        verbose=False,
    )
    row = res["rows"][0]
    assert row["sign_changes"] > 0 and row["flips"] == row["sign_changes"]


def test_paper_form_has_no_flips_although_r_changes_sign():
    res = run_demo(
        steps=100,
        width=32,
        n_train=300,
        n_test=300,
        runs=[("GmP", 0.1), ("GmP-weight", 0.1)],
        out=None,
        progress=False,
        verbose=False,
    )
    paper, weight = res["rows"]
    assert paper["sign_changes"] > 0 and paper["flips"] == 0 and paper["drift_p99"] < 0.5
    assert weight["flips"] == weight["sign_changes"] > 0


def test_steps_to_target_not_reached_is_reported():
    res = run_demo(
        steps=2,
        width=3,
        n_train=50,
        n_test=50,
        runs=[("GmP-weight", 0.1)],
        target=1.0,
        out=None,
        progress=False,
        verbose=False,
    )
    assert res["figure"] is None and res["results"] is None and res["rows"][0]["steps_to_target"] is None
    assert "| > 2 |" in res["table"]


def test_every_run_starts_from_the_same_function():
    x = torch.randn(64, 2)
    ref = _prepare("SP", 16, seed=3)(x)
    for method in [m for m in demo.METHODS if m != "SP"]:
        torch.testing.assert_close(_prepare(method, 16, seed=3)(x), ref, rtol=1e-5, atol=1e-6)
    # "GmP" really is the paper's form: a negative r leaves the layer's weight (|r|·u) alone
    from georeparam import geometry

    for method, same in (("GmP", True), ("GmP-weight", False)):
        model = _prepare(method, 4, seed=3)
        before = model[0].weight.detach().clone()
        with torch.no_grad():
            geometry(model[0]).radius.neg_()
        assert torch.equal(model[0].weight.detach(), before) == same, method


def test_spirals_are_deterministic_and_balanced():
    a = spirals(1000, generator=torch.Generator().manual_seed(1))
    b = spirals(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = a
    assert x.shape == (1000, 2) and set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < y.mean() < 0.6 and x.abs().max() < 3
    with pytest.raises(ValueError, match="turns"):
        spirals(10, turns=0, generator=torch.Generator())


def test_demo_main_validates(capsys):
    with pytest.raises(SystemExit):
        main(["--runs", "LN:0.1"])
    assert "METHOD:LR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr > 0"):
        run_demo(steps=1, runs=[("SP", -1.0)], out=None, verbose=False, progress=False)
