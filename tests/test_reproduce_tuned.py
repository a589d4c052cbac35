"""The tuned protocol of the reproductions (benchmarks/reproduce/tuned.py, stats.py): intervals
against scipy and closed forms, learning-rate selection on validation, the per-seed files, the
committed docs against the committed JSON, and every new entry point at toy size."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.reproduce import common as C  # noqa: E402
from benchmarks.reproduce import main  # noqa: E402
from benchmarks.reproduce import stats as S  # noqa: E402
from benchmarks.reproduce import tuned as TU  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")


# -------------------------------------------------------------------------------------------------
# intervals
# -------------------------------------------------------------------------------------------------


def test_t_interval_closed_form():
    # [1, 2, 3]: mean 2, s = 1; with 2 degrees of freedom t's quantile has the closed form
    # t_p = (2p − 1) / √(2p(1 − p)) (= 4.3027 at p = 0.975) → 2 ± t/√3
    m, lo, hi = S.t_interval([1.0, 2.0, 3.0])
    p = 0.975
    half = (2 * p - 1) / math.sqrt(2 * p * (1 - p)) / math.sqrt(3)
    assert m == 2.0 and lo == pytest.approx(2 - half, rel=1e-12) and hi == pytest.approx(2 + half, rel=1e-12)
    assert S.t_interval([5.0])[0] == 5.0 and math.isnan(S.t_interval([5.0])[1])
    assert S.t_interval([1.0, float("nan"), 3.0])[0] == 2.0  # non-finite values are dropped


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=30).filter(lambda v: np.std(v) > 1e-6),
    st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_t_interval_against_scipy(values, level):
    m, lo, hi = S.t_interval(values, level)
    ref = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(level)
    assert m == pytest.approx(np.mean(values), abs=1e-9)
    assert lo == pytest.approx(ref.low, rel=1e-9, abs=1e-9) and hi == pytest.approx(ref.high, rel=1e-9, abs=1e-9)


def test_bootstrap_interval_approaches_the_normal_one_and_is_reproducible():
    v = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    m, lo, hi = S.bootstrap_interval(v, resamples=20_000)
    se = v.std() / math.sqrt(v.size)  # the bootstrap's own (ddof 0) standard error
    assert m == pytest.approx(v.mean())
    assert lo == pytest.approx(v.mean() - 1.959964 * se, abs=0.1 * se) and hi == pytest.approx(
        v.mean() + 1.959964 * se, abs=0.1 * se
    )
    assert S.bootstrap_interval(v) == S.bootstrap_interval(v)
    assert S.bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_stratified_bootstrap_weights_each_group_once():
    groups = [[0.0] * 20, [1.0, 1.0]]  # pooled mean of pairs 2/22; mean of group means 0.5
    stat, lo, hi = S.stratified_bootstrap_interval(groups)
    assert stat == 0.5 and lo == 0.5 and hi == 0.5  # no spread within a group, none in the statistic
    rng = np.random.default_rng(1)
    g = [rng.normal(0, 1, 50), rng.normal(2, 1, 50)]
    stat, lo, hi = S.stratified_bootstrap_interval(g, resamples=20_000)
    se = 0.5 * math.sqrt(g[0].var() / 50 + g[1].var() / 50)  # Var of the mean of two independent means
    assert stat == pytest.approx((g[0].mean() + g[1].mean()) / 2)
    assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=0.1)


def test_paired_effects_and_cells():
    e = S.effect([0.9, 1.8, 2.7], [1.0, 2.0, 3.0], "logratio")
    assert math.exp(e["mean"]) == pytest.approx(0.9) and e["t_high"] - e["t_low"] == pytest.approx(0.0, abs=1e-12)
    e = S.effect([1.0, float("nan"), 3.0], [0.5, 1.0, 1.0], "diff")
    assert e["n"] == 2 and e["dropped"] == 1 and e["mean"] == pytest.approx(1.25)
    assert S.effect_cell(e, digits=2).endswith("(1 dropped)")
    with pytest.raises(ValueError, match="kind"):
        S.paired([1.0], [1.0], "ratio")


# -------------------------------------------------------------------------------------------------
# learning-rate selection and the tables
# -------------------------------------------------------------------------------------------------

METRIC = TU.Metric(test="test", val="val", mode="max", kind="diff", scale=100.0, digits=3, label="acc")


def _grid(values):
    """``values[method][lr] = [(val, test) per seed]`` → records."""
    return {
        m: {k: [dict(val=v, test=t, seed=i) for i, (v, t) in enumerate(per)] for k, per in d.items()}
        for m, d in values.items()
    }


def test_choose_reads_validation_only_and_skips_nonfinite():
    per = _grid(
        {
            "SP": {
                "0.01": [(0.5, 0.9), (0.6, 0.9)],
                "0.1": [(0.7, 0.1), (0.8, 0.1)],
                "0.3": [(0.99, 0.0), (float("nan"), 0.0)],
            }
        }
    )["SP"]
    assert TU.choose(per, METRIC) == "0.1"  # best mean validation; 0.3 has a NaN seed; test never read
    assert TU.choose({"0.1": per["0.01"], "0.01": per["0.01"]}, METRIC) == "0.01"  # ties: the smaller
    assert TU.choose(per, TU.Metric(METRIC, mode="min")) == "0.01"
    tied = {"0.01": [dict(val=0.9, loss=0.3)], "0.1": [dict(val=0.9, loss=0.2)], "0.3": [dict(val=0.8, loss=0.01)]}
    assert (
        TU.choose(tied, METRIC) == "0.01" and TU.choose(tied, TU.Metric(METRIC, tiebreak="loss")) == "0.1"
    )  # the loss only breaks ties
    picks = TU.choose_per_seed(per, METRIC)
    assert [p["val"] for p in picks] == [0.99, 0.8]


def test_summarize_unit_compares_under_each_rule():
    res = _grid(
        {
            "SP": {"0.01": [(0.6, 0.60), (0.6, 0.62), (0.6, 0.64)], "0.1": [(0.5, 0.50), (0.5, 0.50), (0.5, 0.52)]},
            "GmP": {"0.01": [(0.5, 0.55), (0.5, 0.60), (0.5, 0.62)], "0.1": [(0.7, 0.70), (0.7, 0.71), (0.7, 0.75)]},
        }
    )
    text = "\n".join(
        TU.summarize_unit("toy", res, [0, 1, 2], METRIC, ["SP", "GmP"], {"SP": "SP", "GmP": "GmP"}, C.paper_lr)
    )
    header, rows = C.parse_markdown_table(text)
    assert rows[0][:2] == ["SP", "0.01"] and rows[1][:2] == ["GmP", "0.1"]
    eff = text.split("Against SP")[1]
    _, erows = C.parse_markdown_table(eff)
    cells = dict(zip(header[2:], erows[0][1:]))
    # best vs best = paper's rule here: GmP@0.1 − SP@0.01 per seed: +10, +9, +11 points
    d = [10.0, 9.0, 11.0]
    ref = scipy_stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert cells["best vs best (lr per method)"].startswith(f"+10.0 [{ref.low:+.1f}, {ref.high:+.1f}]; 3 / 0")
    assert cells["paper's rule (GmP 0.1, others 0.01)"] == cells["best vs best (lr per method)"]
    assert cells["matched lr 0.01"].startswith("-3.0 ")  # (−5 − 2 − 2)/3
    assert cells["matched lr 0.1"].startswith("+21.3 ")  # (20 + 21 + 23)/3
    assert "◀" in text


def test_pooled_table_marks_a_rule_the_grid_cannot_answer():
    """A grid with only lr 0.01 has no paper's-rule or matched-0.1 records for GmP: those cells are
    '–' (it raised a TypeError before), the others are computed."""
    unit = _grid({"SP": {"0.01": [(0.6, 0.60), (0.6, 0.62)]}, "GmP": {"0.01": [(0.5, 0.65), (0.5, 0.66)]}})
    text = "\n".join(
        TU.pooled_table("toy", {"a": unit, "b": unit}, METRIC, ["SP", "GmP"], {"SP": "SP", "GmP": "GmP"}, C.paper_lr)
    )
    header, rows = C.parse_markdown_table(text)
    cells = dict(zip(header[1:], rows[0][1:]))
    assert cells["paper's rule (GmP 0.1, others 0.01)"] == "–"
    assert "matched lr 0.1" not in cells
    assert cells["matched lr 0.01"].startswith("+4.5 ") and cells["matched lr 0.01"].endswith("4 / 0 (p 0.125)")


def test_seed_files_round_trip_and_refuse_mixed_configs(tmp_path):
    calls = []

    def train(u, m, s, lr):
        calls.append((u, m, s, lr))
        return dict(val=lr * s, test=lr + s)

    res = TU.run_grid(
        name="toy",
        units=["a"],
        methods=["SP", "GmP"],
        seeds=[3, 5],
        lrs=[0.01, 0.1],
        train=train,
        out=tmp_path,
        command="cmd",
        config=dict(x=1),
    )
    assert len(calls) == 8 and sorted(p.name for p in (tmp_path / "seeds").iterdir()) == ["seed_3.json", "seed_5.json"]
    back, seeds, meta = TU.load_seed_files(tmp_path)
    assert seeds == [3, 5] and back == json.loads(json.dumps(res)) and meta["commands"] == ["cmd"]
    assert set(meta["provenance"][0]) == {"commit", "dirty", "source_sha256"}
    d = json.loads((tmp_path / "seeds" / "seed_5.json").read_text())
    d["config"] = dict(x=2)
    (tmp_path / "seeds" / "seed_5.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="share"):
        TU.load_seed_files(tmp_path)


# -------------------------------------------------------------------------------------------------
# the committed docs
# -------------------------------------------------------------------------------------------------


def test_committed_docs_match_committed_json():
    """docs/results.md below the marker is exactly what the committed per-seed JSON renders to."""
    from benchmarks import results_to_docs as R

    assert R.main(["--check"]) == 0, "docs/results.md is stale: run python benchmarks/results_to_docs.py"


def test_check_notices_a_changed_result(tmp_path):
    from benchmarks import results_to_docs as R

    folders = [p for p in R.COMMITTED.glob("*") if (p / "seeds").is_dir()]
    if not folders:
        pytest.skip("no committed results")
    shutil.copytree(R.COMMITTED, tmp_path / "results")
    shutil.copytree(REPO_ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png"))
    f = sorted((tmp_path / "results" / folders[0].name / "seeds").glob("*.json"))[0]
    d = json.loads(f.read_text())
    unit = next(iter(d["results"].values()))
    rec = next(iter(next(iter(unit.values())).values()))
    for k in ("test_acc", "rmse"):
        if k in rec:
            rec[k] = rec[k] * 0.5 + 0.123
    f.write_text(json.dumps(d))
    assert R.main(["--check", "--docs", str(tmp_path / "docs"), "--committed", str(tmp_path / "results")]) == 1


# -------------------------------------------------------------------------------------------------
# the rotation meter and the entry points at toy size
# -------------------------------------------------------------------------------------------------


def test_rotation_meter_measures_the_angle():
    from benchmarks.reproduce.lr_sweep import Rotation

    model = nn.Sequential(nn.Linear(2, 3, dtype=torch.float64), nn.ReLU(), nn.Linear(3, 1, dtype=torch.float64))
    angles = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(
            torch.stack([torch.cos(angles), torch.sin(angles)], 1)
            * torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64)
        )
    meter = Rotation(model)
    turn = torch.tensor([1e-6, 0.3, 3.0], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.stack([torch.cos(angles + turn), torch.sin(angles + turn)], 1) * 7.0)
    meter(model)
    np.testing.assert_allclose(meter.angles[0], turn.numpy(), rtol=1e-6)  # float32 storage
    assert meter.summary() == (pytest.approx(0.3, rel=1e-6), pytest.approx(np.quantile(turn.numpy(), 0.9), rel=1e-6))


def test_digits_quick(tmp_path):
    pytest.importorskip("sklearn")
    assert main(["digits", "--quick", "--methods", "SP,GmP,GmP+IMN", "--out", str(tmp_path), "--quiet"]) == 0
    text = (tmp_path / "digits.md").read_text()
    header, rows = C.parse_markdown_table(text)
    assert [r[0] for r in rows] == [C.LABELS[m] for m in ("SP", "GmP", "GmP+IMN")] and "matched lr 0.1" in header
    assert "Digits CNN" in text and len(list((tmp_path / "seeds").glob("seed_*.json"))) == 1


def test_levy_lr_grid_reports_the_paper_rule_and_matched_lrs_from_seed_files(tmp_path):
    """``levy --lrs``: every method at every learning rate, one file per seed, nothing chosen (the
    notebook holds nothing out); the paper's rule is read off the same runs as the matched lrs."""
    from benchmarks import results_to_docs as R
    from benchmarks.reproduce import levy

    out = tmp_path / "levy-matched"
    argv = ["levy", "--quick", "--epochs", "20", "--lrs", "0.01,0.1", "--seeds", "2", "--draw", "official"]
    assert main(argv + ["--methods", "SP,GmP", "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert sorted(p.name for p in (out / "seeds").glob("*.json")) == ["seed_0.json", "seed_1.json"]
    text = "\n".join(R.committed_sections(tmp_path, tmp_path, plots=False))
    assert levy.DRAW_TITLE["official"] in text and "chosen lr (val)" not in text and "◀" not in text
    header, rows = C.parse_markdown_table(text.split(levy.DRAW_TITLE["official"])[1])
    assert header == ["method", "paper's rule (GmP 0.1, others 0.01)", "matched lr 0.01", "matched lr 0.1"]
    sp, gmp = (dict(zip(header, r)) for r in rows)
    assert sp[header[1]] == sp["matched lr 0.01"] and gmp[header[1]] == gmp["matched lr 0.1"]
    with pytest.raises(SystemExit, match="exclude"):
        main(argv + ["--lr", "0.1", "--out", str(tmp_path / "x"), "--quiet", "--no-plots"])


def test_uci_tuned_quick_pools_datasets(tmp_path):
    p = C.data_root() / "uci" / "yacht" / "data.txt"
    if not p.exists():
        pytest.skip(f"data absent: {p}")
    assert (
        main(
            [
                "uci",
                "--quick",
                "--protocol",
                "tuned",
                "--datasets",
                "yacht,boston",
                "--methods",
                "SP,GmP",
                "--seeds",
                "2",
                "--out",
                str(tmp_path),
                "--quiet",
                "--no-plots",
            ]
        )
        == 0
    )
    text = (tmp_path / "uci.md").read_text()
    assert "UCI, pooled over yacht, boston" in text and "×" in text
    with pytest.raises(SystemExit, match="monitor val"):
        main(["uci", "--quick", "--protocol", "tuned", "--monitor", "test", "--out", str(tmp_path / "x"), "--quiet"])


def test_lr_sweep_quick_with_sgd_and_rotation(tmp_path):
    pytest.importorskip("mnist1d")
    assert (
        main(
            [
                "lr-sweep",
                "--quick",
                "--tasks",
                "mnist1d",
                "--methods",
                "SP,GmP",
                "--out",
                str(tmp_path),
                "--quiet",
                "--no-plots",
            ]
        )
        == 0
    )
    text = (tmp_path / "lr-sweep.md").read_text()
    assert "SGD, momentum 0.9" in text and "Adam" in text
    d = json.loads((tmp_path / "seeds" / "seed_0.json").read_text())
    recs = d["results"]["mnist1d/sgd"]["GmP"]["0.1"]
    assert recs["optimizer"] == "sgd" and 0 < recs["rot_median"] <= recs["rot_p90"] < math.pi


def test_imagenet32_smoke_mode_at_toy_size(tmp_path):
    argv = [
        "imagenet32",
        "--smoke",
        "--synthetic",
        "--max-train",
        "64",
        "--max-test",
        "32",
        "--val-size",
        "16",
        "--width",
        "0.0625",
        "--num-classes",
        "10",
        "--batch-size",
        "16",
        "--methods",
        "GmP,GmP+IMN",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-plots",
    ]
    assert main(argv) == 0
    d = json.loads((tmp_path / "imagenet32.json").read_text())
    assert d["config"]["epochs"] == 1 and d["config"]["recipe"] == "official"
    assert all(r[0]["images_per_s"] > 0 for r in d["results"].values())


def test_imagenet32_official_recipe_builds_the_official_models():
    from benchmarks.reproduce import imagenet32 as I
    from georeparam.imn import has_output_mean_norm

    model = I.vgg6("GmP+IMN", 0, width=1 / 16, num_classes=10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for conv in convs:
        w = conv.weight.detach().flatten(1)
        assert (
            w.abs().max() <= math.sqrt(6.0 / (w.shape[1] + w.shape[0])) + 1e-6
        )  # the official bound, not PyTorch's Glorot
        assert bool((w[:, -1] >= 0).all())  # the official sign loss
    relus = [model[i + 1] for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    assert all(has_output_mean_norm(r) and r.omn.momentum == 0.01 for r in relus)
    assert not any(hasattr(m, "imn") for m in convs)
    lib = I.vgg6("GmP+IMN", 0, width=1 / 16, num_classes=10, recipe="library")
    assert all(hasattr(m, "imn") for m in lib if isinstance(m, nn.Conv2d))
    assert lib(torch.zeros(2, 3, 32, 32)).shape == model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
