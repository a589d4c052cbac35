r"""Statistics, tables and output files of the reproductions: the paired sign test, ``mean ± std``
cells, Markdown tables, JSON, progress bars and small PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: ``P(|W − n/2| ≥ |wins − n/2|)`` for ``W ~ Binomial(n, ½)``,
    ``n = wins + losses`` (ties are left out before calling). 1.0 when ``n = 0``.

    >>> round(sign_test(9, 1), 4), sign_test(5, 5), sign_test(0, 0)
    (0.0215, 1.0, 1.0)
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_wins(values: Sequence[float], reference: Sequence[float], mode: str = "min") -> Tuple[int, int, int]:
    """``(wins, losses, ties)`` of ``values`` against ``reference``, pair by pair (a non-finite
    value loses to a finite one; two non-finite values tie)."""
    w = l = t = 0
    for a, b in zip(values, reference):
        a = float(a) if math.isfinite(float(a)) else math.inf * (1 if mode == "min" else -1)
        b = float(b) if math.isfinite(float(b)) else math.inf * (1 if mode == "min" else -1)
        if a == b:
            t += 1
        elif (a < b) == (mode == "min"):
            w += 1
        else:
            l += 1
    return w, l, t


def wins_cell(values: Sequence[float], reference: Sequence[float], mode: str = "min") -> str:
    """``"wins / losses (p …)"`` of ``values`` against ``reference`` with the two-sided sign test.

    >>> wins_cell([1.0, 2.0, 0.5], [2.0, 3.0, 1.0])
    '3 / 0 (p 0.250)'
    """
    w, l, _ = paired_wins(values, reference, mode)
    return f"{w} / {l} (p {fmt_p(sign_test(w, l))})"


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3, *, sci: bool = False) -> str:
    """``"mean ± std"`` over the finite values (``"n/a"`` when none), ``†k`` when k were not finite.

    >>> fmt_mean_std([1.0, 2.0, 3.0], 2), fmt_mean_std([0.0012, 0.0014, float("nan")], 2, sci=True)
    ('2.00 ± 1.00', '1.30e-03 ± 1.41e-04 †1')
    """
    m, s = mean_std(values)
    bad = sum(1 for v in values if not math.isfinite(float(v)))
    if not math.isfinite(m):
        return "n/a" + (f" †{bad}" if bad else "")
    f = f"{{:.{digits}e}}" if sci else f"{{:.{digits}f}}"
    return f"{f.format(m)} ± {f.format(s)}" + (f" †{bad}" if bad else "")


def fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table.

    >>> print(markdown_table(["method", "acc"], [["SP", "0.9"]]))
    | method | acc |
    |---|---|
    | SP | 0.9 |
    """
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"markdown_table: a row has {len(r)} cells, the header {len(header)}. Got: {list(r)}")
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def parse_markdown_table(text: str) -> Tuple[List[str], List[List[str]]]:
    """The first Markdown table in ``text`` as ``(header, rows)``.

    >>> parse_markdown_table("| a | b |\\n|---|---|\\n| 1 | 2 |")
    (['a', 'b'], [['1', '2']])
    """
    lines = [ln.strip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        raise ValueError("parse_markdown_table: no table found. Got: text without a line starting with '|'")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split("|")])
    return block[0], block[2:]


def write_json(path: Path, obj) -> None:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    path.write_text(json.dumps(obj, indent=1, default=default))


def progress_bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr (sparse refreshes when stderr is a log file)."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=quiet, mininterval=0.5 if tty else 30.0, dynamic_ncols=True)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path: Path, dpi: int = 80) -> Path:
    """Save a PNG re-encoded with a 256-colour palette (plots stay well under 200 KB)."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)
    return path
