r"""Effect sizes for paired runs: how much, with a 95 % interval, beside the sign test.

A seed gives one *pair* (the method and SP start from the same Glorot draw and see the same
split), so every comparison is computed on per-seed differences ``d_i = a_i − b_i``
(accuracies, in points) or log-ratios ``log(a_i / b_i)`` (RMSE; reported as the ratio
``exp(mean)``, below 1 = the method's RMSE is lower).

* :func:`t_interval`: the mean with Student's t interval, ``mean ± t_{0.975, n−1}·s/√n``.
* :func:`bootstrap_interval`: the percentile interval of the mean over ``B`` resamples of the
  pairs (a seeded ``numpy`` generator: the same data give the same interval).
* :func:`stratified_bootstrap_interval`: pooled over datasets, the statistic is the *mean of the
  per-dataset means* (each dataset counts once, whatever its seed count), resampled within each
  dataset — the pooled sign test, by contrast, counts pairs.

Non-finite values (a diverged run) are dropped pair-wise and counted, never silently averaged.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "t_quantile",
    "t_interval",
    "bootstrap_interval",
    "stratified_bootstrap_interval",
    "paired",
    "effect_cell",
    "Effect",
]


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``).

    >>> round(t_quantile(0.975, 1), 4), round(t_quantile(0.975, 9), 4)
    (12.7062, 2.2622)
    """
    if not (0.0 < p < 1.0) or df < 1:
        raise ValueError(f"t_quantile: needs 0 < p < 1 and df ≥ 1. Got: p={p!r}, df={df!r}")
    try:
        from scipy.stats import t
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn / the bench extras
        raise ImportError(f"t_quantile needs scipy (pip install scipy). Got: {e}") from None
    return float(t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """``(mean, low, high)``: Student's t interval for the mean of ``values`` (finite ones).
    One value: ``(v, nan, nan)``; none: all nan.

    >>> m, lo, hi = t_interval([1.0, 2.0, 3.0])
    >>> m, round(lo, 4), round(hi, 4)
    (2.0, -0.4841, 4.4841)
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size == 1:
        return m, math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, *, resamples: int = 10_000, seed: int = 0
) -> Tuple[float, float, float]:
    """``(mean, low, high)``: the percentile bootstrap interval of the mean (resampling the
    finite values with replacement, ``resamples`` times, ``numpy.random.default_rng(seed)``)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def stratified_bootstrap_interval(
    groups: Sequence[Sequence[float]], level: float = 0.95, *, resamples: int = 10_000, seed: int = 0
) -> Tuple[float, float, float]:
    """``(statistic, low, high)`` for the mean over groups of each group's mean, resampling
    within each group (pooled over datasets: every dataset counts once)."""
    gs = [np.asarray([float(x) for x in g], dtype=np.float64) for g in groups]
    gs = [g[np.isfinite(g)] for g in gs]
    gs = [g for g in gs if g.size]
    if not gs:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    stat = float(np.mean([g.mean() for g in gs]))
    boot = np.zeros(resamples)
    for g in gs:
        boot += g[rng.integers(0, g.size, size=(resamples, g.size))].mean(axis=1)
    boot /= len(gs)
    a = (1.0 - level) / 2.0
    return stat, float(np.quantile(boot, a)), float(np.quantile(boot, 1.0 - a))


def paired(values: Sequence[float], reference: Sequence[float], kind: str = "diff") -> Tuple[List[float], int]:
    """Per-pair effects and how many pairs were dropped (a non-finite or non-positive value).
    ``kind="diff"``: ``a − b``; ``kind="logratio"``: ``log(a / b)``."""
    if kind not in ("diff", "logratio"):
        raise ValueError(f"paired: kind must be 'diff' or 'logratio'. Got: {kind!r}")
    out, dropped = [], 0
    for a, b in zip(values, reference):
        a, b = float(a), float(b)
        ok = math.isfinite(a) and math.isfinite(b) and (kind == "diff" or (a > 0 and b > 0))
        if not ok:
            dropped += 1
            continue
        out.append(a - b if kind == "diff" else math.log(a / b))
    return out, dropped


class Effect(dict):
    """``dict(mean, t_low, t_high, boot_low, boot_high, n, dropped, kind)`` of one comparison."""


def effect(values: Sequence[float], reference: Sequence[float], kind: str = "diff", *, seed: int = 0) -> Effect:
    d, dropped = paired(values, reference, kind)
    m, tl, th = t_interval(d)
    _, bl, bh = bootstrap_interval(d, seed=seed)
    return Effect(mean=m, t_low=tl, t_high=th, boot_low=bl, boot_high=bh, n=len(d), dropped=dropped, kind=kind)


def effect_cell(e: Dict, scale: float = 1.0, digits: int = 1, *, boot: bool = False) -> str:
    """``"+2.3 [0.4, 4.1]"`` (a difference ×``scale``) or ``"×0.91 [0.85, 0.97]"`` (a ratio).

    >>> effect_cell(dict(mean=0.023, t_low=0.004, t_high=0.041, n=5, dropped=0, kind="diff"), 100)
    '+2.3 [+0.4, +4.1]'
    >>> effect_cell(dict(mean=math.log(0.9), t_low=math.log(0.8), t_high=math.log(1.1), n=5, dropped=1, kind="logratio"), digits=2)
    '×0.90 [0.80, 1.10] (1 dropped)'
    """
    lo, hi = (e["boot_low"], e["boot_high"]) if boot else (e["t_low"], e["t_high"])
    if not math.isfinite(e["mean"]):
        return "n/a"
    if e["kind"] == "logratio":
        f = lambda x: f"{math.exp(x):.{digits}f}" if math.isfinite(x) else "–"  # noqa: E731
        text = f"×{f(e['mean'])} [{f(lo)}, {f(hi)}]"
    else:
        f = lambda x: f"{x * scale:+.{digits}f}" if math.isfinite(x) else "–"  # noqa: E731
        text = f"{f(e['mean'])} [{f(lo)}, {f(hi)}]"
    return text + (f" ({e['dropped']} dropped)" if e.get("dropped") else "")


def pooled_effect(
    groups_values: Sequence[Sequence[float]],
    groups_reference: Sequence[Sequence[float]],
    kind: str = "logratio",
    *,
    seed: int = 0,
) -> Effect:
    """Pooled over datasets: the mean of per-dataset mean effects with a stratified bootstrap
    interval (``t_low``/``t_high`` hold the same interval, so :func:`effect_cell` prints it)."""
    per, dropped = [], 0
    for a, b in zip(groups_values, groups_reference):
        d, k = paired(a, b, kind)
        per.append(d)
        dropped += k
    m, lo, hi = stratified_bootstrap_interval(per, seed=seed)
    return Effect(
        mean=m, t_low=lo, t_high=hi, boot_low=lo, boot_high=hi, n=sum(len(d) for d in per), dropped=dropped, kind=kind
    )


def finite(values: Sequence[float]) -> List[float]:
    return [float(v) for v in values if math.isfinite(float(v))]


def quantiles(values: Sequence[float], qs=(0.5, 0.9)) -> Optional[List[float]]:
    v = np.asarray(finite(values))
    return [float(np.quantile(v, q)) for q in qs] if v.size else None
