r"""The learning rate as a controlled variable: every method over one grid, chosen on validation.

# Note [Which learning rate is compared]
The paper fixes the learning rate by method (0.1 for GmP, 0.01 for the others). Comparing at
that rule measures *parameterization and learning rate together*. Here each experiment trains
every method at every learning rate of one grid (default :data:`LR_GRID`, which holds both of
the paper's values) and, from the same runs, reports four comparisons against SP:

* **best vs best** — each method at the learning rate with the best *mean validation* metric
  over the seeds (chosen **per method**, the test split never involved): what each
  parameterization achieves when its own learning rate is tuned;
* **per seed** — the same, the learning rate chosen per method *and seed* (noisier: a
  selection on one validation split);
* **paper's rule** — GmP variants at 0.1, the others at 0.01: the published protocol;
* **matched 0.01 / matched 0.1** — every method at the same learning rate: the
  parameterization alone, at a learning rate that suits one side or the other.

Each comparison is paired by seed (same Glorot draw, same split) and reported as an effect size
with a 95 % t interval (:mod:`.stats`) beside the wins and the two-sided sign test.

# Note [Per-seed result files]
A tuned run writes one small JSON per seed (``<out>/seeds/seed_<s>.json``) as soon as that
seed's grid is done — every method at every learning rate — with the command, the
configuration and the code's provenance (git commit, whether the tree was dirty, a digest of
the library and benchmark sources). A run cut short keeps its finished seeds;
``benchmarks/results_to_docs.py`` renders docs/results.md from these files alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import stats as S
from .common import progress_bar
from . import tables as T

__all__ = [
    "LR_GRID",
    "QUICK_GRID",
    "MATCHED",
    "lr_key",
    "parse_lrs",
    "provenance",
    "run_grid",
    "load_seed_files",
    "choose",
    "summarize_unit",
    "Metric",
]

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
QUICK_GRID = (1e-2, 0.1)
MATCHED = (0.01, 0.1)
REPO = Path(__file__).resolve().parents[2]


def lr_key(lr: float) -> str:
    """The learning rate as a JSON key: ``f"{lr:g}"``.

    >>> lr_key(0.1), lr_key(3e-3)
    ('0.1', '0.003')
    """
    return f"{float(lr):g}"


def parse_lrs(text: Optional[str], quick: bool) -> List[float]:
    if not text:
        return list(QUICK_GRID if quick else LR_GRID)
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"reproduce: --lrs takes comma-separated learning rates (0.01,0.1). Got: {text!r}") from None
    if not lrs or any(not (math.isfinite(x) and x > 0) for x in lrs):
        raise SystemExit(f"reproduce: --lrs needs positive learning rates. Got: {text!r}")
    return lrs


def provenance() -> dict:
    """The git commit the code came from, whether tracked sources differed from it, and a sha256
    of ``georeparam/*.py`` and ``benchmarks/reproduce/*.py`` (what actually ran)."""

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    h = hashlib.sha256()
    for f in sorted(list((REPO / "georeparam").glob("*.py")) + list((REPO / "benchmarks" / "reproduce").glob("*.py"))):
        h.update(f.relative_to(REPO).as_posix().encode())
        h.update(f.read_bytes())
    return dict(
        commit=git("rev-parse", "HEAD") or "unknown",
        dirty=bool(git("status", "--porcelain", "--", "georeparam", "benchmarks")),
        source_sha256=h.hexdigest()[:16],
    )


def run_grid(
    *,
    name: str,
    units: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    lrs: Sequence[float],
    train: Callable[[str, str, int, float], dict],
    out: Path,
    command: str,
    config: dict,
    bar=None,
) -> Dict:
    """``results[unit][method][lr_key]`` = one record per seed (seed order), training
    ``train(unit, method, seed, lr)`` for every combination; writes each seed's file as it
    completes (Note [Per-seed result files])."""
    results = {u: {m: {lr_key(lr): [] for lr in lrs} for m in methods} for u in units}
    folder = Path(out) / "seeds"
    folder.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    for seed in seeds:
        per = {u: {m: {} for m in methods} for u in units}
        for u in units:
            for m in methods:
                for lr in lrs:
                    if bar is not None:
                        bar.set_description(f"{name} {u} {m} lr={lr:g} seed {seed}", refresh=False)
                    rec = dict(train(u, m, seed, lr), seed=seed, lr=float(lr))
                    per[u][m][lr_key(lr)] = rec
                    results[u][m][lr_key(lr)].append(rec)
                    if bar is not None:
                        bar.update(1)
        T.write_json(
            folder / f"seed_{seed}.json",
            dict(
                name=name,
                seed=seed,
                command=command,
                config=config,
                lrs=[float(x) for x in lrs],
                provenance=prov,
                results=per,
            ),
        )
    return results


def run_tuned(args, name, units, train, config, summary) -> dict:
    """The tuned protocol (:func:`run_grid` over every unit, then ``summary``) for an experiment whose units (models, datasets) share one training function ``train(unit, method, seed, lr)``."""
    lrs = parse_lrs(args.lrs, args.quick)
    config = dict(config, lrs=lrs)
    bar = progress_bar(len(units) * len(args.methods) * len(lrs) * len(args.seeds), name, args.quiet)
    results = run_grid(
        name=name,
        units=units,
        methods=args.methods,
        seeds=args.seeds,
        lrs=lrs,
        train=train,
        out=args.out,
        command=args.command,
        config=config,
        bar=bar,
    )
    bar.close()
    tables, notes = summary(results, args.seeds, config)
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=[], results=results, config=config)


def load_seed_files(folder: Path):
    """``(results, seeds, meta)`` merged from ``folder/seeds/seed_*.json`` (seed order);
    ``meta`` holds the name, config, grid, commands and provenances."""
    files = sorted(Path(folder).glob("seeds/seed_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"load_seed_files: no seeds/seed_*.json under {folder}")
    results: Dict = {}
    seeds, commands, provs = [], [], []
    meta = None
    for f in files:
        d = json.loads(f.read_text())
        if meta is None:
            meta = dict(name=d["name"], config=d["config"], lrs=d["lrs"])
        elif (d["name"], d["config"], d["lrs"]) != (meta["name"], meta["config"], meta["lrs"]):
            raise ValueError(
                f"{f}: every seed file of one folder must share its experiment, configuration and grid. Got: {d['config']} vs {meta['config']}"
            )
        seeds.append(d["seed"])
        if d["command"] not in commands:
            commands.append(d["command"])
        p = json.dumps(d["provenance"], sort_keys=True)
        if p not in provs:
            provs.append(p)
        for u, per_m in d["results"].items():
            for m, per_lr in per_m.items():
                for k, rec in per_lr.items():
                    results.setdefault(u, {}).setdefault(m, {}).setdefault(k, []).append(rec)
    meta.update(commands=commands, provenance=[json.loads(p) for p in provs], files=[f.name for f in files])
    return results, seeds, meta


class Metric(dict):
    """What a unit is scored by: ``test``/``val`` record keys, ``mode`` (max/min), ``kind``
    (``diff`` or ``logratio``), ``scale`` and ``digits`` of the effect, ``label``."""


def _mean_val(recs, key, mode) -> float:
    v = [r[key] for r in recs]
    if not v or any(not math.isfinite(float(x)) for x in v):
        return -math.inf if mode == "max" else math.inf
    return float(np.mean(v))


def choose(per_lr: Dict[str, List[dict]], metric: Metric) -> str:
    """The learning rate (key) whose mean validation metric over the seeds is best; a learning
    rate with any non-finite validation value is never chosen unless all are. Ties (a small
    validation split saturates accuracy) go to the lower mean of ``metric["tiebreak"]`` (a
    validation loss) where the metric names one, then to the smaller learning rate."""
    keys = sorted(per_lr, key=float)
    sign = 1.0 if metric["mode"] == "max" else -1.0
    tb = metric.get("tiebreak")

    def key(k):
        second = -_mean_val(per_lr[k], tb, "min") if tb and all(tb in r for r in per_lr[k]) else 0.0
        return (sign * _mean_val(per_lr[k], metric["val"], metric["mode"]), second, -float(k))

    return max(keys, key=key)


def choose_per_seed(per_lr: Dict[str, List[dict]], metric: Metric) -> List[dict]:
    """Per seed, the record at that seed's best validation metric."""
    keys = sorted(per_lr, key=float)
    n = len(per_lr[keys[0]])
    out = []
    for i in range(n):
        out.append(choose({k: [per_lr[k][i]] for k in keys}, metric))
    return [per_lr[k][i] for i, k in enumerate(out)]


def rule_records(
    per_method: Dict[str, Dict[str, List[dict]]], method: str, rule: str, metric: Metric, paper_lr
) -> Optional[List[dict]]:
    """The records of ``method`` under ``rule``: ``best``, ``per-seed``, ``paper`` or a learning
    rate key (``0.01``); None where the grid does not hold it."""
    per_lr = per_method[method]
    if rule == "best":
        return per_lr[choose(per_lr, metric)]
    if rule == "per-seed":
        return choose_per_seed(per_lr, metric)
    k = lr_key(paper_lr(method)) if rule == "paper" else rule
    return per_lr.get(k)


RULES = ("best", "per-seed", "paper") + tuple(lr_key(x) for x in MATCHED)
RULE_TEXT = {
    "best": "best vs best (lr per method)",
    "per-seed": "best vs best (lr per method and seed)",
    "paper": "paper's rule (GmP 0.1, others 0.01)",
    "0.01": "matched lr 0.01",
    "0.1": "matched lr 0.1",
}


def summarize_unit(
    title: str,
    per_method: Dict,
    seeds: Sequence[int],
    metric: Metric,
    methods_order: Sequence[str],
    labels: Dict[str, str],
    paper_lr,
    reference: str = "SP",
) -> List[str]:
    """Three Markdown tables for one unit (a model on a dataset): the test metric of every method
    under each rule, the effect against ``reference`` under each rule, and the full grid. A
    metric whose ``val`` is None (an experiment with no held-out split, Levy) chooses nothing: only
    the paper's rule and the matched learning rates are reported."""
    methods = [m for m in methods_order if m in per_method]
    fmt = lambda recs: T.fmt_mean_std([r[metric["test"]] for r in recs], metric["digits"]) if recs else "—"  # noqa: E731
    selects = metric.get("val") is not None
    fixed = ("paper",) if not selects else ("best", "per-seed", "paper")
    rules = [r for r in RULES if r in fixed or any(r in per_method[m] for m in methods)]
    chosen = {m: choose(per_method[m], metric) for m in methods} if selects else {}
    rows = []
    for m in methods:
        cells = [labels[m]] + ([chosen[m]] if selects else [])
        for rule in rules:
            cells.append(fmt(rule_records(per_method, m, rule, metric, paper_lr)))
        rows.append(cells)
    n = len(seeds)
    out = [
        f"**{title}** — {metric['label']} (mean ± std over {n} seeds) under each learning-rate rule:",
        "",
        T.markdown_table(["method"] + (["chosen lr (val)"] if selects else []) + [RULE_TEXT[r] for r in rules], rows),
        "",
    ]
    if reference in methods and len(methods) > 1:
        erows = []
        for m in methods:
            if m == reference:
                continue
            cells = [labels[m]]
            for rule in rules:
                a = rule_records(per_method, m, rule, metric, paper_lr)
                b = rule_records(per_method, reference, rule, metric, paper_lr)
                if a is None or b is None:
                    cells.append("—")
                    continue
                va, vb = [r[metric["test"]] for r in a], [r[metric["test"]] for r in b]
                e = S.effect(va, vb, metric["kind"])
                cells.append(
                    f"{S.effect_cell(e, metric.get('scale', 1.0), metric.get('effect_digits', 1))}; {T.wins_cell(va, vb, metric['mode'])}"
                )
            erows.append(cells)
        what = (
            "difference in test accuracy, percentage points (method − SP)"
            if metric["kind"] == "diff"
            else "ratio of test RMSE, geometric mean of per-seed ratios (method / SP; below 1 = lower RMSE)"
        )
        out += [
            f"Against {reference}, paired by seed — {what}, 95 % t interval; then wins / losses (two-sided sign test p):",
            "",
            T.markdown_table(["method"] + [RULE_TEXT[r] for r in rules], erows),
            "",
        ]
    keys = sorted({k for m in methods for k in per_method[m]}, key=float)
    grows = [
        [labels[m]]
        + [(fmt(per_method[m][k]) + (" ◀" if k == chosen.get(m) else "")) if k in per_method[m] else "—" for k in keys]
        for m in methods
    ]
    out += [
        f"Full grid — {metric['label']} per learning rate" + (" (◀: chosen on validation):" if selects else ":"),
        "",
        T.markdown_table(["method \\ lr"] + keys, grows),
        "",
    ]
    return out


def pooled_table(
    title: str,
    per_unit: Dict[str, Dict],
    metric: Metric,
    methods_order: Sequence[str],
    labels: Dict[str, str],
    paper_lr,
    reference: str = "SP",
) -> List[str]:
    """One table over several units (datasets): per rule, the pooled effect against
    ``reference`` (:func:`stats.pooled_effect`: every unit counts once) and the pooled wins."""
    units = list(per_unit)
    methods = [m for m in methods_order if all(m in per_unit[u] for u in units)]
    if reference not in methods or len(methods) < 2:
        return []
    rules = [
        r
        for r in RULES
        if r in ("best", "per-seed", "paper") or all(r in per_unit[u][m] for u in units for m in methods)
    ]
    rows = []
    for m in methods:
        if m == reference:
            continue
        cells = [labels[m]]
        for rule in rules:
            pairs = [
                (
                    rule_records(per_unit[u], m, rule, metric, paper_lr),
                    rule_records(per_unit[u], reference, rule, metric, paper_lr),
                )
                for u in units
            ]
            if any(a is None or b is None for a, b in pairs):  # the grid lacks a learning rate the rule needs
                cells.append("–")
                continue
            va = [[r[metric["test"]] for r in a] for a, _ in pairs]
            vb = [[r[metric["test"]] for r in b] for _, b in pairs]
            e = S.pooled_effect(va, vb, metric["kind"])
            W = L = 0
            for a, b in zip(va, vb):
                w, l, _ = T.paired_wins(a, b, metric["mode"])
                W, L = W + w, L + l
            cells.append(
                f"{S.effect_cell(e, metric.get('scale', 1.0), metric.get('effect_digits', 1))}; {W} / {L} (p {T.fmt_p(T.sign_test(W, L))})"
            )
        rows.append(cells)
    what = "ratio of test RMSE (method / SP)" if metric["kind"] == "logratio" else "difference in points (method − SP)"
    return [
        f"**{title}** — {what}, each dataset weighted once, 95 % stratified bootstrap interval; then pooled wins / losses (sign test p):",
        "",
        T.markdown_table(["method"] + [RULE_TEXT[r] for r in rules], rows),
        "",
    ]
