"""`python -m georeparam demo` at toy size: the table, the files, the CLI."""

import re

import pytest
import torch

from georeparam import cli
from georeparam.demo import DEFAULT_RUNS, _prepare, main, run_demo, spirals

PNG = b"\x89PNG\r\n\x1a\n"


def parse_table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) <= {""}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return header, rows


def test_run_demo_toy_size_prints_a_well_formed_table_and_saves_files(tmp_path, capsys):
    threads = torch.get_num_threads()
    res = run_demo(steps=12, width=6, n_train=150, n_test=100, record_every=4, target=0.01, out=tmp_path, progress=False)
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    header, rows = parse_table(printed)
    assert header[:5] == ["method", "lr", "final loss", "test acc (final / best)", "steps to 1%"]
    assert "median drift/step" in header and "dead units" in header
    assert [(r[0], float(r[1])) for r in rows] == list(DEFAULT_RUNS)
    for r in rows:
        loss, reach = float(r[2]), r[4]
        final, best = (float(v) for v in r[3].split(" / "))
        assert loss >= 0 and 0 <= final <= best <= 1
        assert reach == "1"  # a 1% target is met after the first step
        drift = float(r[5])
        assert 0 <= drift < 3.1416
        assert re.fullmatch(r"\d+(\.\d+)?%", r[7]) and re.fullmatch(r"\d+%", r[8])
    assert res["table"] in printed
    assert f"Saved the figure to {res['figure'].resolve()}" in printed
    assert res["figure"].read_bytes()[:8] == PNG and res["figure"].stat().st_size > 10_000
    assert res["table"] in res["results"].read_text()
    for row in res["rows"]:
        assert len(row["loss_curve"]) == len(row["accuracy_curve"]) == len(row["drift_per_step"]) == 12


def test_steps_to_target_not_reached_is_reported():
    res = run_demo(steps=2, width=3, n_train=50, n_test=50, runs=[("GmP", 0.1)], target=1.0, out=None, progress=False, verbose=False)
    assert res["figure"] is None and res["rows"][0]["steps_to_target"] is None
    assert "| > 2 |" in res["table"]


def test_every_run_starts_from_the_same_function():
    x = torch.randn(64, 2)
    ref = _prepare("SP", 16, seed=3)(x)
    for method in ("WN", "GmP"):
        torch.testing.assert_close(_prepare(method, 16, seed=3)(x), ref, rtol=1e-5, atol=1e-6)


def test_spirals_are_deterministic_and_balanced():
    a = spirals(1000, generator=torch.Generator().manual_seed(1))
    b = spirals(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = a
    assert x.shape == (1000, 2) and set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < y.mean() < 0.6 and x.abs().max() < 3
    with pytest.raises(ValueError, match="turns"):
        spirals(10, turns=0, generator=torch.Generator())


def test_cli_runs_the_demo_and_rejects_bad_runs(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "2", "--width", "3", "--runs", "SP:0.01,GmP:0.1", "--no-progress", "--no-plot"]) == 0
    out = capsys.readouterr().out
    _, rows = parse_table(out)
    assert [r[0] for r in rows] == ["SP", "GmP"] and "Saved" not in out
    with pytest.raises(SystemExit):
        main(["--runs", "LN:0.1"])
    assert "METHOD:LR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr > 0"):
        run_demo(steps=1, runs=[("SP", -1.0)], out=None, verbose=False, progress=False)
