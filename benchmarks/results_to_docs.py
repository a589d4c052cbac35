"""Regenerate the generated part of docs/results.md from full reproduction runs.

    python benchmarks/results_to_docs.py RESULTS_DIR [--docs docs]

RESULTS_DIR holds one folder per experiment as written by ``python -m georeparam reproduce NAME
--out RESULTS_DIR/NAME`` (NAME.md, NAME.json, plots). Everything in docs/results.md below the
marker line is replaced: the tables as the runs wrote them, a generated list of where GmP (or
GmP+IMN) had the best mean and where it did not, and links to the plots copied into docs/img/
(re-encoded, each < 200 KB). The hand-written text above the marker is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

MARKER = "<!-- generated below by benchmarks/results_to_docs.py: do not edit by hand -->"
ORDER = ("levy", "banana", "uci", "mnist1d", "lr-sweep", "imagenet32")
PLOTS = ("levy_points.png", "banana_boundaries.png", "lr_sweep.png")
GMP = ("GmP", "GmP+IMN")


def _mean(values):
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else math.nan


def _verdict(label, means: dict, mode: str, fmt="{:.4g}"):
    """``(line, gmp_won)``: which method had the best mean, and how GmP's best variant compares."""
    pick = min if mode == "min" else max
    gmp = {m: v for m, v in means.items() if m in GMP and v == v}
    others = {m: v for m, v in means.items() if m not in GMP and v == v}
    if not others or not any(m in GMP for m in means):
        return None
    obest = pick(others, key=others.get)
    if not gmp:
        return f"- {label}: **GmP not best** — no GmP run has a value (never reached / all diverged); best {obest} {fmt.format(others[obest])}", False
    gbest = pick(gmp, key=gmp.get)
    won = pick([gmp[gbest], others[obest]]) == gmp[gbest] and gmp[gbest] != others[obest]
    if won:
        return f"- {label}: GmP best — {gbest} {fmt.format(gmp[gbest])} vs best other {obest} {fmt.format(others[obest])}", True
    return f"- {label}: **GmP not best** — best {obest} {fmt.format(others[obest])} vs best GmP variant {gbest} {fmt.format(gmp[gbest])}", False


def verdicts(results_dir: Path):
    lines = []
    def add(v):
        if v is not None:
            lines.append(v)

    def load(name):
        p = results_dir / name / f"{name}.json"
        return json.loads(p.read_text())["results"] if p.exists() else None

    r = load("levy")
    if r:
        add(_verdict("Levy test RMSE", {m: _mean(d["rmse"] for d in runs) for m, runs in r.items()}, "min"))
    r = load("banana")
    if r:
        add(_verdict("Banana test accuracy", {m: _mean(d["test_acc"] for d in runs) for m, runs in r.items()}, "max"))
    r = load("uci")
    if r:
        datasets = list(next(iter(r.values())))
        for ds in datasets:
            add(_verdict(f"UCI {ds} test RMSE", {m: _mean(d["rmse"] for d in r[m][ds]) for m in r}, "min"))
    r = load("mnist1d")
    if r:
        for model, per in r.items():
            add(_verdict(f"MNIST-1D {model} test accuracy", {m: _mean(d["test_acc"] for d in runs) for m, runs in per.items()}, "max"))
            add(_verdict(f"MNIST-1D {model} steps to target (runs that reached it)",
                         {m: _mean(d.get("steps_to_target") for d in runs) for m, runs in per.items()}, "min", "{:.0f}"))
    r = load("lr-sweep")
    if r:
        for task, per in r.items():
            key, mode = ("rmse", "min") if task == "uci" else ("test_acc", "max")
            lrs = list(next(iter(per.values())))
            for lr in lrs:
                means = {m: _mean(d[key] for d in per[m][lr] if not d["diverged"]) for m in per}
                add(_verdict(f"lr-sweep {task} lr={float(lr):g}", means, mode))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = p.parse_args(argv)
    doc = args.docs / "results.md"
    img = args.docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    head = doc.read_text().split(MARKER)[0].rstrip() + "\n\n" if doc.exists() else "# Reproductions\n\n"
    parts = [MARKER, ""]
    for name in ORDER:
        md = args.results / name / f"{name}.md"
        if not md.exists():
            continue
        body = []
        for line in md.read_text().splitlines():
            if line.startswith("!["):
                target = line[line.index("(") + 1 : line.rindex(")")]
                if target in PLOTS:
                    shutil.copyfile(args.results / name / target, img / target)
                    size = (img / target).stat().st_size
                    if size >= 200_000:
                        raise SystemExit(f"{img / target} is {size} bytes; plots in docs/ must stay < 200 KB")
                    body.append(line.replace(f"({target})", f"(img/{target})"))
                continue
            body.append(line)
        parts += body + [""]
    lines = verdicts(args.results)
    if lines:
        won = sum(1 for _, w in lines if w)
        parts += ["## Where GmP did and did not have the best mean (generated)", "",
                  f"GmP or GmP+IMN had the best mean in {won} of {len(lines)} comparisons "
                  "(means only; look at the ± std in the tables before calling a difference real).", ""]
        parts += [text for text, _ in lines] + [""]
    doc.write_text(head + "\n".join(parts).rstrip() + "\n")
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
