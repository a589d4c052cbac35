"""The reproductions (benchmarks/reproduce): the official protocol's pieces checked against
independent computations, and every experiment's entry point at toy size (``--quick``).

The quick runs check the pipeline (tables, finite metrics, files), not the science. Experiments
whose data (``$GEOREPARAM_DATA`` or ``<repo>/../shared/data``) are absent are skipped.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
from itertools import product

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from conftest import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.reproduce import common as C  # noqa: E402
from benchmarks.reproduce import main  # noqa: E402

CELL = re.compile(r"^\**(?P<m>-?[0-9.]+(?:e[-+][0-9]+)?) ± (?P<s>[0-9.]+(?:e[-+][0-9]+)?)\**(?: †\d+)?$")
METHODS = list(C.METHODS)


def _data_or_skip(*parts):
    p = C.data_root().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"data absent: {p}")
    return p


def _check_table(text, label_col, expected, metric_cols):
    header, rows = C.parse_markdown_table(text)
    assert [r[label_col] for r in rows] == expected, (header, rows)
    for r in rows:
        for j in metric_cols:
            m = CELL.match(r[j])
            assert m, f"cell {r[j]!r} of {header[j]!r} is not 'mean ± std'"
            assert math.isfinite(float(m["m"])) and math.isfinite(float(m["s"]))
    return header, rows


# -------------------------------------------------------------------------------------------------
# Keras' callbacks, checked against hand-worked sequences
# -------------------------------------------------------------------------------------------------


def test_plateau_and_early_stopping_follow_keras():
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cb = C.KerasCallbacks("min", patience=4, plateau_patience=2, min_delta=0.5)
    values = [3.0, 2.8, 2.7, 1.0, float("nan"), 0.9, 0.9, 0.95, 0.92]
    stops, lrs = [], []
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        stops.append(cb.update(v, model, opt))
        lrs.append(opt.param_groups[0]["lr"])
        if stops[-1]:
            break
    # early stopping (strict, no min_delta): bests at 0, 1, 2, 3 (1.0), 5 (0.9); 0.9 ties do not
    # improve: epochs 6, 7, 8 wait 1..3, no stop yet. Plateau (min_delta 0.5, own counter): 3.0;
    # 2.8, 2.7 are not 0.5 better -> lr ×0.1 at epoch 2; 1.0 is; nan, 0.9 (not 0.5 better than
    # 1.0) -> ×0.1 at epoch 5; 0.9, 0.95 -> ×0.1 at epoch 7; 0.92 -> wait 1.
    assert cb.best_epoch == 5 and cb.best_value == 0.9
    assert stops == [False] * 9
    assert lrs == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert cb.update(0.91, model, opt)  # the fourth epoch without improvement
    with torch.no_grad():
        model.weight.fill_(42.0)
    assert cb.finish(model) and model.weight.item() == pytest.approx(0.9)


def test_keras2_restores_only_when_it_stopped():
    model = nn.Linear(1, 1)
    cb = C.KerasCallbacks("max", patience=3)
    for v in (0.5, 0.7, 0.6):
        with torch.no_grad():
            model.weight.fill_(v)
        assert not cb.update(v, model)
    assert not cb.finish(model) and model.weight.item() == pytest.approx(0.6)  # training simply ran out of epochs
    cb.restore_at_end = True
    assert cb.finish(model) and model.weight.item() == pytest.approx(0.7)


def test_fit_covers_each_epoch_once_and_keeps_the_best_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    seen = []

    class Spy(nn.Linear):
        def forward(self, xb):
            seen.append(xb.detach().clone())
            return super().forward(xb)

    model = Spy(3, 1, dtype=torch.float64)
    scores = iter([5.0, 4.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    weights = []
    cfg = C.FitConfig(lr=0.05, epochs=100, batch_size=16, patience=3)
    res = C.fit(
        model,
        (x, y),
        loss_fn=nn.functional.mse_loss,
        cfg=cfg,
        monitor=lambda m, _: next(scores),
        on_epoch=lambda e, m: weights.append(m.weight.detach().clone()),
    )
    assert [len(s) for s in seen[:4]] == [16, 16, 16, 2]  # only training batches reach the model
    epoch1 = torch.cat(seen[:4])
    assert torch.equal(epoch1[torch.argsort(epoch1[:, 0])], x[torch.argsort(x[:, 0])])  # a permutation
    assert res.best_epoch == 3 and res.epochs == 6 and res.stopped_early and res.restored
    assert torch.equal(model.weight, weights[2])


def test_fit_restores_the_best_weights_after_a_nonfinite_loss():
    x = torch.ones(8, 1, dtype=torch.float64)
    model = nn.Linear(1, 1, dtype=torch.float64)
    calls = iter(range(100))
    # the loss turns NaN at the third step: Keras would wait `patience` NaN epochs, then restore
    loss = lambda p, t: ((p - t) ** 2).mean() * (float("nan") if next(calls) >= 2 else 1.0)  # noqa: E731
    res = C.fit(model, (x, x), loss_fn=loss, cfg=C.FitConfig(lr=0.1, epochs=10, patience=5))
    assert res.nonfinite and res.restored and res.epochs == 3 and torch.isfinite(model.weight).all()


# -------------------------------------------------------------------------------------------------
# splits and statistics, against independent references
# -------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 3000), seed=st.integers(0, 2**31 - 1))
def test_split_is_sklearns_train_test_split(n, seed):
    sklearn = pytest.importorskip("sklearn.model_selection")
    rows = np.arange(n)
    ref_train, ref_test = sklearn.train_test_split(rows, test_size=0.2, random_state=seed)
    train, test = C.train_test_split_indices(n, 0.2, seed)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(test, ref_test)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 14), data=st.data())
def test_sign_test_against_enumeration(n, data):
    """Two-sided p = P(a fair-coin outcome at least as far from n/2 as the observed one), counted
    over all 2ⁿ sequences."""
    wins = data.draw(st.integers(0, n))
    far = abs(wins - n / 2)
    count = sum(1 for seq in product((0, 1), repeat=n) if abs(sum(seq) - n / 2) >= far - 1e-12)
    assert C.sign_test(wins, n - wins) == pytest.approx(count / 2**n if n else 1.0, rel=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    if n:
        assert C.sign_test(wins, n - wins) == pytest.approx(scipy_stats.binomtest(wins, n, 0.5).pvalue, rel=1e-9)


def test_paired_wins_counts_nonfinite_as_losses():
    assert C.paired_wins([1.0, 2.0, float("nan"), 3.0], [2.0, 1.0, 1.0, 3.0]) == (1, 2, 1)
    assert C.paired_wins([0.9, 0.8], [0.8, 0.8], "max") == (1, 0, 1)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), monitor=st.sampled_from(["val", "test"]))
def test_uci_split_never_trains_or_monitors_on_test_rows_by_default(seed, monitor):
    from benchmarks.reproduce import uci

    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(200, 3)) * 5 + 2, rng.normal(size=200) * 3 + 7
    s = uci.make_split(X, y, seed, monitor=monitor, targets="standardized")
    fit, mon, test = s["idx"]
    train, ref_test = C.train_test_split_indices(200, 0.2, seed)
    np.testing.assert_array_equal(test, ref_test)
    if monitor == "val":
        assert sorted(np.concatenate([fit, mon])) == sorted(train) and not set(mon) & set(test)
    else:
        np.testing.assert_array_equal(fit, train)
        np.testing.assert_array_equal(mon, test)
    # features and (sensitivity) targets scaled with the training part's statistics only
    np.testing.assert_allclose(s["fit"][0], (X[fit] - X[train].mean(0)) / X[train].std(0))
    np.testing.assert_allclose(s["test"][1], y[test])  # test targets stay in original units
    assert s["y_std"] == pytest.approx(y[train].std())


def test_banana_and_levy_draw_as_the_notebooks():
    from benchmarks.reproduce import banana, levy

    np.random.seed(3)  # the notebooks: global seed, then np.random.choice / uniform / normal
    idx = np.random.choice(5300, size=1000, replace=False)
    np.random.seed(3)
    xs = np.random.uniform(low=-10.0, high=10.0, size=[50, 1])
    data = np.column_stack([np.arange(5300.0), np.arange(5300.0) * 2, np.where(np.arange(5300) % 2, 1.0, -1.0)])
    s = banana.make_split(data, 3, monitor="test")
    drawn = np.sort(np.concatenate([s["fit"][0][:, 0], s["test"][0][:, 0]]))
    x_train = data[idx][C.train_test_split_indices(1000, 0.2, 3)[0], 0]
    np.testing.assert_allclose(drawn, np.sort((data[idx, 0] - x_train.mean()) / x_train.std()))
    x, y, grid, truth = levy.make_data(3)
    np.testing.assert_array_equal(x, xs)
    assert grid.shape == (201, 1) and grid[0, 0] == -10.0 and grid[-1, 0] == pytest.approx(10.0)


# -------------------------------------------------------------------------------------------------
# the methods start as the official layers do
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_in", [1, 7])
def test_methods_start_from_the_same_glorot_function(n_in):
    x = torch.randn(64, n_in, dtype=torch.float64)
    sp = C.mlp("SP", n_in, [20], 1, seed=5)
    a = math.sqrt(6 / (n_in + 20))
    assert sp[0].weight.abs().max() <= a and bool((sp[0].bias == 0).all()) and bool((sp[2].bias == 0).all())
    assert sp[0].weight.dtype == torch.float64
    for method in METHODS:
        model = C.mlp(method, n_in, [20], 1, seed=5)
        if method == "BN":
            bn = model[1]
            assert (bn.momentum, bn.eps) == (pytest.approx(0.01), 1e-3)
            continue
        model.eval()
        torch.testing.assert_close(model(x), sp.eval()(x), rtol=1e-12, atol=1e-12)
        if method.startswith("GmP"):
            g = georeparam.geometry(model[0])
            assert bool((g.offset == 0).all())
            torch.testing.assert_close(g.radius.abs(), sp[0].weight.norm(dim=1), rtol=1e-12, atol=0)
        if method == "WN":
            assert hasattr(model[2].parametrizations.weight, "original0")  # WN on both layers


def test_levy_gmp_is_the_official_1d_unit():
    """Levy's GmP row against the notebook's formula ``r·ReLU(s·x + λ)`` (``s = sign(w₀)`` frozen,
    ``r = |w₀|``, ``λ = 0``), written here from the formula and trained side by side: Adam at lr 0.1
    for 300 steps, float64. It starts as SP's function and its radii do cross zero."""
    from benchmarks.reproduce import levy

    x = torch.linspace(-10, 10, 50, dtype=torch.float64).reshape(-1, 1)
    y = torch.sin(x)
    model = levy.build("GmP", seed=2)
    sp = levy.build("SP", seed=2)
    torch.testing.assert_close(model(x), sp(x), rtol=1e-12, atol=1e-12)
    w0 = sp[0].weight.detach()[:, 0]
    s = torch.sign(w0)
    r = nn.Parameter(w0.abs().clone())
    lam = nn.Parameter(torch.zeros_like(w0))
    head_w = nn.Parameter(sp[2].weight.detach().clone())
    head_b = nn.Parameter(sp[2].bias.detach().clone())

    def official(inp):
        return (r * torch.relu(s * inp + lam)) @ head_w.T + head_b

    opt_m = torch.optim.Adam(model.parameters(), lr=0.1, eps=1e-7)
    opt_r = torch.optim.Adam([r, lam, head_w, head_b], lr=0.1, eps=1e-7)
    crossed = torch.zeros_like(w0, dtype=torch.bool)
    for _ in range(300):
        for opt, f in ((opt_m, model), (opt_r, official)):
            opt.zero_grad()
            (f(x) - y).abs().mean().backward()
            opt.step()
        crossed |= r.detach() < 0
    assert crossed.any(), "no radius crossed zero: the test would not tell the forms apart"
    torch.testing.assert_close(model(x), official(x), rtol=1e-9, atol=1e-12)
    assert torch.equal(levy.direction(model), s)  # frozen
    torch.testing.assert_close(torch.as_tensor(levy.points_1d(model)), -s * lam.detach(), rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------------------
# the entry points at toy size
# -------------------------------------------------------------------------------------------------


def test_reproduce_script_runs_levy_quick(tmp_path):
    pytest.importorskip("matplotlib")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    from benchmarks.reproduce import levy

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "reproduce.py"),
            "levy",
            "--quick",
            "--draw",
            "official",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "levy" in proc.stderr  # the progress bar
    md = (tmp_path / "levy.md").read_text()
    _check_table(md, 0, [levy.LABELS[m] for m in levy.METHODS], [2, 3])
    assert (tmp_path / "levy_points.png").stat().st_size < 200_000 and (tmp_path / "levy.json").exists()


def test_uci_quick(tmp_path):
    _data_or_skip("uci", "yacht", "data.txt")
    assert main(["uci", "--quick", "--methods", ",".join(METHODS), "--out", str(tmp_path), "--quiet"]) == 0
    md = (tmp_path / "uci.md").read_text()
    header, _ = _check_table(md, 0, [C.LABELS[m] for m in METHODS], [2])
    assert header[2] == "yacht" and "Paired wins against SP" in md and (tmp_path / "uci_rmse.png").exists()


def test_banana_quick(tmp_path):
    pytest.importorskip("matplotlib")
    _data_or_skip("banana", "banana.csv")
    assert (
        main(
            [
                "banana",
                "--quick",
                "--methods",
                ",".join(METHODS),
                "--out",
                str(tmp_path),
                "--quiet",
                "--monitor",
                "test",
            ]
        )
        == 0
    )
    md = (tmp_path / "banana.md").read_text()
    _, rows = _check_table(md, 0, [C.LABELS[m] for m in METHODS], [2])
    assert all(0.0 <= float(CELL.match(r[2])["m"]) <= 1.0 for r in rows)
    assert "test split (the notebook; optimistic)" in md and "Per-seed draws" in md
    assert (tmp_path / "banana_boundaries.png").stat().st_size < 200_000


def test_missing_data_skips_cleanly(tmp_path, capsys):
    assert main(["banana", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "SKIPPED" in capsys.readouterr().err and not (tmp_path / "o" / "banana.md").exists()


def test_mnist1d_quick(tmp_path):
    pytest.importorskip("mnist1d")
    assert (
        main(
            [
                "mnist1d",
                "--quick",
                "--protocol",
                "fixed",
                "--methods",
                ",".join(METHODS),
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    _, rows = _check_table((tmp_path / "mnist1d.md").read_text(), 1, [C.LABELS[m] for m in METHODS] * 2, [3])
    assert [r[0] for r in rows] == ["mlp"] * len(METHODS) + ["cnn"] * len(METHODS)


def test_lr_sweep_quick(tmp_path):
    pytest.importorskip("mnist1d")
    pytest.importorskip("matplotlib")
    methods = ["SP", "GmP"]
    assert (
        main(
            [
                "lr-sweep",
                "--quick",
                "--tasks",
                "mnist1d",
                "--methods",
                ",".join(methods),
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    header, rows = C.parse_markdown_table((tmp_path / "lr-sweep.md").read_text())
    assert header[1:] == ["0.001", "0.1", "1"] and [r[0] for r in rows] == [C.LABELS[m] for m in methods]
    assert all(CELL.match(c) or c == "diverged" for r in rows for c in r[1:])


def test_imagenet32_files_round_trip_and_quick_run(tmp_path):
    from benchmarks.reproduce import imagenet32 as I

    x, y = I.make_synthetic(160, 10, 0)
    xt, yt = I.make_synthetic(40, 10, 1)
    I.write_batches(tmp_path / "data", x, y, xt, yt, n_batches=2)
    x2, y2, xt2, yt2 = I.load_imagenet32(tmp_path / "data")
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(yt2, yt)
    with open(tmp_path / "val_data", "wb") as f:  # the original pickled layout loads too
        pickle.dump({"data": xt.reshape(40, -1), "labels": list(yt + 1)}, f)
    np.testing.assert_array_equal(I.load_batch(tmp_path / "val_data")[1], yt)
    methods = [m for m in I.METHODS if m in METHODS]
    argv = [
        "imagenet32",
        "--quick",
        "--data-dir",
        str(tmp_path / "data"),
        "--num-classes",
        "10",
        "--val-size",
        "32",
        "--methods",
        ",".join(methods),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--no-plots",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    _check_table((tmp_path / "o" / "imagenet32.md").read_text(), 0, [C.LABELS[m] for m in methods], [2, 3])


@pytest.mark.parametrize("name", ["common", "tables", "levy", "imagenet32", "stats", "tuned"])
def test_docstring_examples(name):
    import doctest
    import importlib

    mod = importlib.import_module(f"benchmarks.reproduce.{name}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="methods"):
        main(["levy", "--methods", "SP,LN", "--quick"])
    with pytest.raises(ValueError, match="seeds"):
        C.parse_seeds("zero")


def test_results_to_docs_merges_runs_by_method_and_dataset(tmp_path):
    """Two UCI runs of one condition (different methods and datasets) and a second condition are
    merged into one table each; paired wins are counted over every merged pair."""
    import json

    from benchmarks import results_to_docs as R

    cfg = dict(targets="raw", monitor="val", epochs=5, val_fraction=0.1)

    def run(folder, methods, datasets, rmse, config=cfg):
        (tmp_path / "runs" / folder).mkdir(parents=True)
        res = {
            m: {d: [dict(seed=s, rmse=rmse[m] + 0.01 * s, epochs=1) for s in range(3)] for d in datasets}
            for m in methods
        }
        body = dict(
            name="uci",
            command=f"cmd {folder}",
            seconds=60.0,
            quick=False,
            seeds=[0, 1, 2],
            methods=methods,
            config=config,
            results=res,
        )
        (tmp_path / "runs" / folder / "uci.json").write_text(json.dumps(body))

    run("a", ["SP"], ["boston", "yacht"], {"SP": 2.0})
    run("b", ["GmP"], ["boston"], {"GmP": 1.0})
    run("c", ["GmP"], ["yacht"], {"GmP": 3.0})
    run("d", ["SP", "GmP"], ["yacht"], {"SP": 2.0, "GmP": 1.0}, dict(cfg, monitor="test"))
    (tmp_path / "docs").mkdir()
    pytest.importorskip("matplotlib")
    assert (
        R.main([str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--committed", str(tmp_path / "none")]) == 0
    )
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "3/6 (p 1.000), 2 sets × 3 seeds" in text  # boston 3 wins + yacht 3 losses
    assert "3/3 (p 0.250), 1 sets × 3 seeds; the main protocol on the same pairs: 0/3 (p 0.250)" in text
    assert text.count("### UCI regression") == 2 and "cmd b" in text and "cmd c" in text
