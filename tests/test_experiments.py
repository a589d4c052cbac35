"""The reproductions' machinery (georeparam/experiments): the training loop's decisions, the
methods, the splits, and every experiment's --quick pipeline (table structure, finite metrics —
not the science)."""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from georeparam import is_geometric
from georeparam.experiments import common as C
from georeparam.experiments import main

CELL = re.compile(r"^\**(?P<m>-?[0-9.]+(?:e[-+][0-9]+)?) ± (?P<s>[0-9.]+(?:e[-+][0-9]+)?)\**(?: †\d+)?$")


def _data_or_skip(*parts):
    p = C.data_root().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"data absent: {p}")
    return p


def _check_table(text, first_col, expected_rows, metric_cols):
    header, rows = C.parse_markdown_table(text)
    assert [r[first_col] for r in rows] == expected_rows, (header, rows)
    for r in rows:
        assert len(r) == len(header)
        for j in metric_cols:
            m = CELL.match(r[j])
            assert m, f"cell {r[j]!r} of {header[j]!r} is not 'mean ± std'"
            assert math.isfinite(float(m["m"])) and math.isfinite(float(m["s"]))
    return header, rows


# -------------------------------------------------------------------------------------------------
# Monitor: Keras semantics, checked against hand-worked sequences
# -------------------------------------------------------------------------------------------------


def test_monitor_early_stopping_and_plateau_follow_keras():
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    mon = C.Monitor("min", patience=4, plateau_patience=2, factor=0.1)
    values = [3.0, 2.0, 2.0, float("nan"), 2.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    stops, lrs = [], []
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)  # the snapshot must hold the weights of the best evaluation
        stops.append(mon.update(v, model, opt))
        lrs.append(opt.param_groups[0]["lr"])
        if stops[-1]:
            break
    # best at index 1 (2.0; a tie is no improvement, NaN never improves), then 2.0, nan -> plateau
    # (lr 0.1), 2.5 (wait 3), 1.0 improves at index 5; four more without improvement -> stop at 9
    assert mon.best_index == 5 and mon.best == 1.0
    assert stops == [False] * 9 + [True]
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    with torch.no_grad():
        model.weight.fill_(42.0)
    assert mon.restore(model) and model.weight.item() == 1.0


def test_monitor_max_mode_and_validation():
    mon = C.Monitor("max", patience=1)
    assert not mon.update(0.5) and not mon.update(0.6) and mon.update(0.6)
    with pytest.raises(ValueError, match="mode"):
        C.Monitor("best")


# -------------------------------------------------------------------------------------------------
# fit
# -------------------------------------------------------------------------------------------------


def _regression(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1


def test_fit_minibatches_cover_each_epoch_once():
    x, y = _regression(50)
    model = nn.Linear(3, 1)
    seen = []
    # an identity "model" wrapper that records which rows each step sees
    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, xb):
            seen.append(xb.detach().clone())
            return self.inner(xb)

    cfg = C.FitConfig(lr=0.01, max_epochs=2, batch_size=16, monitor="train", restore_best=False)
    res = C.fit(Spy(), (x, y), None, loss_fn=nn.functional.mse_loss, score_fn=None, cfg=cfg)
    assert res.steps == 2 * math.ceil(50 / 16) and [len(s) for s in seen[:4]] == [16, 16, 16, 2]
    epoch1 = torch.cat(seen[:4])
    assert torch.equal(epoch1[torch.argsort(epoch1[:, 0])], x[torch.argsort(x[:, 0])])  # a permutation


def test_fit_keeps_the_best_validation_weights_and_stops_early():
    x, y = _regression()
    model = nn.Linear(3, 1)
    scores = iter([5.0, 4.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    weights = []
    cfg = C.FitConfig(lr=0.05, max_epochs=100, monitor="val", mode="min", patience=3)
    res = C.fit(model, (x, y), (x, y), loss_fn=nn.functional.mse_loss, score_fn=lambda m, a, b: next(scores),
                cfg=cfg, on_eval=lambda e, s, m: weights.append(m.weight.detach().clone()))
    assert res.best_epoch == 3 and res.epochs == 6 and res.stopped_early and res.restored
    assert torch.equal(model.weight, weights[2]) and not torch.equal(model.weight, weights[-1])


def test_fit_flags_divergence():
    x, y = _regression()
    model = nn.Linear(3, 1)
    cfg = C.FitConfig(lr=1e4, max_epochs=50, optimizer="sgd", monitor="train")
    res = C.fit(model, (x, y), None, loss_fn=nn.functional.mse_loss, score_fn=None, cfg=cfg)
    assert res.diverged and res.epochs < 50


def test_fit_rejects_val_monitor_without_val():
    with pytest.raises(ValueError, match="validation"):
        C.fit(nn.Linear(3, 1), _regression(), None, loss_fn=nn.functional.mse_loss, score_fn=None, cfg=C.FitConfig(lr=0.1, max_epochs=1))


# -------------------------------------------------------------------------------------------------
# methods
# -------------------------------------------------------------------------------------------------


def test_methods_build_the_right_models():
    for method in C.METHODS:
        if method == "GmP+IMN" and not C.imn_available():
            continue
        model = C.build(C.mlp, method, 0, n_in=4, widths=[8, 8], n_out=2)
        kinds = [type(m).__name__ for m in model]
        assert ("BatchNorm1d" in kinds) == (method == "BN")
        hidden, output = [model[0], model[2 + (method == "BN")]], model[-1]
        assert all(is_geometric(h) == method.startswith("GmP") for h in hidden)
        assert not is_geometric(output) and "parametrizations" not in dict(output.named_children())
        if method == "WN":
            assert all(hasattr(h.parametrizations.weight, "original0") for h in hidden)
        if method == "GmP+IMN":
            assert all(hasattr(h, "imn") for h in hidden) and not hasattr(output, "imn")
    with pytest.raises(ValueError, match="method"):
        C.build(C.mlp, "LN", 0, n_in=2, widths=[2], n_out=1)


def test_sp_wn_gmp_start_from_the_same_function():
    x = torch.randn(32, 5)
    outs = {m: C.build(C.mlp, m, 3, n_in=5, widths=[16], n_out=1)(x) for m in ("SP", "WN", "GmP")}
    for m in ("WN", "GmP"):
        torch.testing.assert_close(outs[m], outs["SP"], rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from([m for m in C.METHODS]), seed=st.integers(0, 10_000), n_in=st.integers(1, 4))
def test_folded_model_computes_what_the_model_computes(method, seed, n_in):
    """effective_affine folds BN running stats and the IMN running mean: checked against the model
    itself in eval mode, after some training moved every statistic and parameter."""
    if method == "GmP+IMN" and not C.imn_available():
        return
    torch.manual_seed(seed)
    model = C.build(C.mlp, method, seed, n_in=n_in, widths=[6], n_out=1).double()
    x = torch.randn(40, n_in, dtype=torch.float64) * 2 + 1
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.eval()
    torch.testing.assert_close(C.folded_mlp(model)(x), model(x), rtol=1e-9, atol=1e-9)
    W, b = C.effective_affine(model, 0)
    points, _ = C.characteristic_points(W, b)
    torch.testing.assert_close((points * W).sum(1) + b, torch.zeros_like(b), rtol=0, atol=1e-9)  # on the boundary


def test_paper_lr():
    assert [C.paper_lr(m) for m in C.METHODS] == [0.01, 0.01, 0.01, 0.1, 0.1]


# -------------------------------------------------------------------------------------------------
# splits: the test part never informs training
# -------------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(n=st.integers(30, 400), seed=st.integers(0, 2**31 - 1))
def test_uci_split_is_a_partition_and_ignores_the_test_rows(n, seed):
    from georeparam.experiments import uci

    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(n, 3)) * 5 + 2, rng.normal(size=n) * 3 + 7
    s = uci.make_split(X, y, seed)
    fit_idx, val_idx, test_idx = s["idx"]
    assert len(set(fit_idx) | set(val_idx) | set(test_idx)) == n
    assert len(fit_idx) + len(val_idx) + len(test_idx) == n
    assert abs(len(test_idx) - round(0.1 * n)) <= 1
    # scaled with the training part's statistics: recompute them independently
    train = np.concatenate([fit_idx, val_idx])
    np.testing.assert_allclose(s["train"][0], (X[fit_idx] - X[train].mean(0)) / X[train].std(0))
    assert s["y_mean"] == pytest.approx(y[train].mean()) and s["y_std"] == pytest.approx(y[train].std())
    # changing the test rows changes nothing the training sees
    X2, y2 = X.copy(), y.copy()
    X2[test_idx] += 1e3
    y2[test_idx] -= 1e3
    s2 = uci.make_split(X2, y2, seed)
    for k in ("train", "val"):
        np.testing.assert_array_equal(s2[k][0], s[k][0])
        np.testing.assert_array_equal(s2[k][1], s[k][1])


def test_banana_split_is_disjoint():
    from georeparam.experiments import banana

    rng = np.random.default_rng(0)
    data = np.column_stack([rng.normal(size=(500, 2)), rng.choice([-1.0, 1.0], size=500)])
    s = banana.make_split(data, 0, n_points=200)
    fit_idx, val_idx, test_idx = s["idx"]
    assert (len(fit_idx), len(val_idx), len(test_idx)) == (128, 32, 40)
    assert not (set(fit_idx) & set(val_idx)) and not (set(fit_idx) & set(test_idx)) and not (set(val_idx) & set(test_idx))
    assert set(np.unique(s["train"][1])) <= {0.0, 1.0}


def test_levy_function_reference_values():
    from georeparam.experiments.levy import levy

    # minimum at x = 1; at x = −3: w = 0, f = sin²(0) + (−1)²(1 + sin²(0)) = 1
    np.testing.assert_allclose(levy(np.array([1.0, -3.0])), [0.0, 1.0], atol=1e-15)


# -------------------------------------------------------------------------------------------------
# the --quick pipelines
# -------------------------------------------------------------------------------------------------


def _methods():
    return [m for m in C.METHODS if m != "GmP+IMN" or C.imn_available()]


def test_levy_quick(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["levy", "--quick", "--seeds", "1", "--out", str(tmp_path), "--quiet"]) == 0
    _check_table((tmp_path / "levy.md").read_text(), 0, _methods(), [2, 3])
    assert (tmp_path / "levy_points.png").stat().st_size > 0 and (tmp_path / "levy.json").exists()


def test_banana_quick(tmp_path):
    pytest.importorskip("matplotlib")
    _data_or_skip("banana", "banana.csv")
    assert main(["banana", "--quick", "--seeds", "1", "--out", str(tmp_path), "--quiet"]) == 0
    header, rows = _check_table((tmp_path / "banana.md").read_text(), 0, _methods(), [2, 3])
    assert all(0.0 <= float(CELL.match(r[2])["m"]) <= 1.0 for r in rows)
    assert (tmp_path / "banana_boundaries.png").stat().st_size < 200_000


def test_uci_quick(tmp_path):
    _data_or_skip("uci", "yacht", "data.txt")
    assert main(["uci", "--quick", "--seeds", "2", "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    header, _ = _check_table((tmp_path / "uci.md").read_text(), 0, _methods(), [2])
    assert header[2].startswith("yacht")


def test_missing_data_skips_cleanly(tmp_path, capsys):
    assert main(["banana", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "SKIPPED" in capsys.readouterr().err and not (tmp_path / "o" / "banana.md").exists()


def test_mnist1d_quick(tmp_path):
    pytest.importorskip("mnist1d")
    assert main(["mnist1d", "--quick", "--seeds", "1", "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    header, rows = _check_table((tmp_path / "mnist1d.md").read_text(), 1, _methods() * 2, [3])
    assert [r[0] for r in rows] == ["mlp"] * len(_methods()) + ["cnn"] * len(_methods())


def test_lr_sweep_quick(tmp_path):
    pytest.importorskip("mnist1d")
    pytest.importorskip("matplotlib")
    assert main(["lr-sweep", "--quick", "--tasks", "mnist1d", "--methods", "SP,GmP", "--out", str(tmp_path), "--quiet"]) == 0
    header, rows = C.parse_markdown_table((tmp_path / "lr-sweep.md").read_text())
    assert header[1:] == ["0.001", "0.1", "1"] and [r[0] for r in rows] == ["SP", "GmP"]
    for r in rows:
        for c in r[1:]:
            assert CELL.match(c) or c == "diverged", c
    assert (tmp_path / "lr_sweep.png").exists()


# -------------------------------------------------------------------------------------------------
# imagenet32: the file format and a toy-size run
# -------------------------------------------------------------------------------------------------


def test_imagenet32_batches_round_trip(tmp_path):
    from georeparam.experiments import imagenet32 as I

    x, y = I.make_synthetic(40, 7, 0)
    xt, yt = I.make_synthetic(10, 7, 1)
    I.write_batches(tmp_path, x, y, xt, yt, n_batches=3)
    raw = np.load(tmp_path / "train_data_batch_1.npz")
    assert raw["data"].shape[1] == 3072 and raw["labels"].min() >= 1  # the standard, 1-based layout
    x2, y2, xt2, yt2 = I.load_imagenet32(tmp_path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(xt2, xt)
    # the original pickled files (no extension) load too; 0-based labels are refused
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": xt.reshape(10, -1), "labels": list(yt + 1)}, f)
    xp, yp = I.load_batch(tmp_path / "val_data")
    np.testing.assert_array_equal(yp, yt)
    np.savez(tmp_path / "bad.npz", data=x.reshape(40, -1), labels=y)
    if y.min() == 0:
        with pytest.raises(ValueError, match="1-based"):
            I.load_batch(tmp_path / "bad.npz")


def test_imagenet32_quick_on_files(tmp_path):
    from georeparam.experiments import imagenet32 as I

    x, y = I.make_synthetic(160, 10, 0)
    xt, yt = I.make_synthetic(40, 10, 1)
    I.write_batches(tmp_path / "data", x, y, xt, yt, n_batches=2)
    argv = ["imagenet32", "--quick", "--data-dir", str(tmp_path / "data"), "--num-classes", "10", "--epochs", "1",
            "--max-train", "160", "--val-size", "32", "--methods", ",".join(_methods()), "--seeds", "1", "--out", str(tmp_path / "o"),
            "--quiet", "--no-plots"]
    assert main(argv) == 0
    header, rows = _check_table((tmp_path / "o" / "imagenet32.md").read_text(), 0, _methods(), [2, 3])


def test_cli_reports_bad_arguments():
    with pytest.raises(SystemExit, match="methods"):
        main(["levy", "--methods", "SP,LN", "--quick"])
    with pytest.raises(ValueError, match="seeds"):
        C.parse_seeds("zero")


def test_all_quick_writes_one_folder_per_experiment(tmp_path):
    pytest.importorskip("mnist1d")
    assert main(["all", "--quick", "--methods", "SP", "--seeds", "1", "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    for name in ("levy", "uci", "banana", "mnist1d", "lr-sweep"):
        md = tmp_path / name / f"{name}.md"
        if name in ("uci", "banana") and not md.exists():
            continue  # data absent: skipped
        assert f"--out {tmp_path / name}" in md.read_text()
