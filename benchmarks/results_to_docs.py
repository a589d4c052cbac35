"""Regenerate the generated part of docs/results.md (and its plots) from reproduction runs.

    python benchmarks/results_to_docs.py                      # the committed results only
    python benchmarks/results_to_docs.py --check              # exit 1 if docs/results.md differs
    python benchmarks/results_to_docs.py RESULTS_DIR          # also older-style run folders

The committed results are ``benchmarks/results/<folder>/seeds/seed_<s>.json``: one small file
per seed of a tuned run (``benchmarks/reproduce/tuned.py``'s Note [Per-seed result files]),
each with the command, configuration and code provenance that produced it; every folder
becomes one section, rendered by its experiment's own summary. ``--check`` re-renders the text
(no plots, no training) and compares it with docs/results.md.

RESULTS_DIR (optional) holds one folder per run of ``python benchmarks/reproduce.py NAME --out
RESULTS_DIR/FOLDER`` (each with NAME.md, NAME.json and plots). UCI runs are merged by condition
(targets × monitored split): one run per method group is fine, e.g. SP,WN,BN in one folder and
GmP in another. Everything in docs/results.md below the marker line is replaced; the hand-written
text above it is kept. Plots are copied to docs/ (each < 200 KB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproduce import common as C  # noqa: E402

MARKER = "<!-- generated below by benchmarks/results_to_docs.py: do not edit by hand -->"
ORDER = ("uci", "banana", "levy", "mnist1d", "lr-sweep", "imagenet32")
#: how deep the method key sits in each experiment's ``results``
METHOD_DEPTH = {"uci": 0, "banana": 1, "levy": 1, "mnist1d": 1, "lr-sweep": 1, "imagenet32": 0}
#: plots copied from the run folder that has them (uci and lr-sweep are redrawn from the merged results)
COPIED_PLOTS = {"banana": "banana_boundaries.png", "levy": "levy_points.png", "imagenet32": "imagenet32_top5.png"}
UCI_CONDITIONS = (("raw", "val"), ("standardized", "val"), ("raw", "test"))
UCI_TEXT = {
    ("raw", "val"): "raw targets, validation split (the main protocol)",
    ("standardized", "val"): "standardized targets, validation split (sensitivity)",
    ("raw", "test"): "raw targets, monitoring the test split (the official script; optimistic)",
}


def load_runs(results: Path):
    """Every full (non-quick) run under ``results``, oldest first."""
    runs = []
    for path in sorted(results.glob("*/*.json"), key=lambda p: p.stat().st_mtime):
        d = json.loads(path.read_text())
        if d.get("quick") or "name" not in d or d["name"] not in METHOD_DEPTH:
            continue
        d["folder"] = path.parent
        runs.append(d)
    return runs


def _condition(run) -> str:
    return json.dumps(run["config"], sort_keys=True)


def merge(runs):
    """``(name, condition) → dict(results, seeds, config, runs)``: runs of one experiment with the
    same configuration and seeds are merged method by method (UCI: dataset by dataset); a later
    run replaces what an earlier one had for the same method (and dataset)."""
    merged = {}
    for r in runs:
        key = (r["name"], _condition(r))
        entry = merged.setdefault(key, dict(results={}, seeds=r["seeds"], config=r["config"], runs=[]))
        if r["seeds"] != entry["seeds"]:
            raise SystemExit(
                f"{r['folder']}: runs of one condition must share their seeds. Got: {r['seeds']} vs {entry['seeds']}"
            )
        if METHOD_DEPTH[r["name"]] == 0:  # results[method], for UCI results[method][dataset]
            for m, per in r["results"].items():
                if isinstance(per, dict):
                    entry["results"].setdefault(m, {}).update(per)
                else:
                    entry["results"][m] = per
        else:
            for k, per in r["results"].items():
                entry["results"].setdefault(k, {}).update(per)
        entry["runs"].append(r)
    return merged


def _module(name):
    import importlib

    return importlib.import_module("benchmarks.reproduce." + {"lr-sweep": "lr_sweep"}.get(name, name))


def _title(name, config):
    if name == "uci":
        return "UCI regression — " + UCI_TEXT.get(
            (config["targets"], config["monitor"]), f"{config['targets']} targets, monitoring {config['monitor']}"
        )
    title = _module(name).TITLE
    if config.get("monitor") == "test":
        title += " — monitoring the test split (the official notebook's choice; optimistic)"
    return title


def section(name, entry, docs: Path):
    mod = _module(name)
    tables, notes = mod.summarize(entry["results"], entry["seeds"], entry["config"])
    out = [f"### {_title(name, entry['config'])}", "", "Runs (merged method by method):", ""]
    out += [
        f"- `{r['command']}` ({r['seconds'] / 60:.1f} min wall; {', '.join(r['methods'])})" for r in entry["runs"]
    ] + [""]
    out += [tables[0], ""] + [t + "\n" for t in tables[1:]] + [notes, ""]
    prefix = {"raw": "", "standardized": "std_"}.get(entry["config"].get("targets"), "") + (
        "test_" if entry["config"].get("monitor") == "test" else ""
    )
    if name == "uci" and entry["config"]["monitor"] == "val" and entry["config"]["targets"] == "raw":
        out += [f"![uci_rmse]({mod.plot(entry['results'], docs / 'uci_rmse.png').name})", ""]
    elif name == "lr-sweep":
        cfg = entry["config"]
        out += [
            f"![lr_sweep]({mod.plot(entry['results'], cfg['lrs'], cfg['tasks'], cfg['dataset'], docs / 'lr_sweep.png').name})",
            "",
        ]
    elif name in COPIED_PLOTS:
        having = [r for r in entry["runs"] if (r["folder"] / COPIED_PLOTS[name]).exists()]
        if having:
            src = having[-1]["folder"] / COPIED_PLOTS[name]
            dst = docs / (prefix + COPIED_PLOTS[name])
            shutil.copyfile(src, dst)
            if dst.stat().st_size >= 200_000:
                raise SystemExit(f"{dst} is {dst.stat().st_size} bytes; plots in docs/ must stay < 200 KB")
            out += [f"![{name}]({dst.name}) (from `{having[-1]['command']}`)", ""]
    return out


def _pooled(res, m, datasets):
    W = L = 0
    for d in datasets:
        w, l, _ = C.paired_wins([r["rmse"] for r in res[m][d]], [r["rmse"] for r in res["SP"][d]])
        W, L = W + w, L + l
    return f"{W}/{W + L} (p {C.fmt_p(C.sign_test(W, L))})"


def uci_overview(merged):
    """Each method against SP, pooled over the datasets, under every UCI condition; where a
    condition covers fewer datasets or seeds, the main protocol's count on the same pairs too."""
    entries = {(e["config"]["targets"], e["config"]["monitor"]): e for (n, _), e in merged.items() if n == "uci"}
    conds = [c for c in UCI_CONDITIONS if c in entries]
    main_res = entries[UCI_CONDITIONS[0]]["results"] if UCI_CONDITIONS[0] in entries else {}
    main_seeds = entries[UCI_CONDITIONS[0]]["seeds"] if main_res else []
    rows = []
    for m in C.METHODS[1:]:
        cells = [C.LABELS[m]]
        for c in conds:
            res, seeds = entries[c]["results"], entries[c]["seeds"]
            if m not in res or "SP" not in res:
                cells.append("—")
                continue
            ds = [d for d in res[m] if d in res["SP"]]
            cell = f"{_pooled(res, m, ds)}, {len(ds)} sets × {len(seeds)} seeds"
            if c != UCI_CONDITIONS[0] and m in main_res and "SP" in main_res and all(d in main_res[m] for d in ds):
                idx = [main_seeds.index(s) for s in seeds if s in main_seeds]
                if len(idx) == len(seeds):
                    same = {k: {d: [main_res[k][d][i] for i in idx] for d in ds} for k in ("SP", m)}
                    cell += f"; the main protocol on the same pairs: {_pooled(same, m, ds)}"
            cells.append(cell)
        if any(c != "—" for c in cells[1:]):
            rows.append(cells)
    if not rows:
        return []
    return [
        "### UCI at a glance: paired wins against SP under each condition",
        "",
        C.markdown_table(["method"] + [UCI_TEXT[c] for c in conds], rows),
        "",
        "A win: same dataset and seed, lower test RMSE than SP. p: two-sided exact sign test over all pairs (ties dropped).",
        "",
    ]


COMMITTED = Path(__file__).resolve().parent / "results"
#: the summary that renders a committed folder, by experiment name
COMMITTED_ORDER = ("mnist1d", "digits", "lr-sweep", "uci", "levy")


def _committed_summary(name):
    mod = _module(name)
    return getattr(mod, "tuned_summary", None) or mod.summarize


def committed_sections(root: Path, docs: Path, plots: bool = True):
    """One section per ``root/<folder>`` holding ``seeds/seed_*.json``, in experiment order."""
    from benchmarks.reproduce import tuned as TU

    found = []
    for folder in sorted(p for p in Path(root).glob("*") if any((p / "seeds").glob("seed_*.json"))):
        results, seeds, meta = TU.load_seed_files(folder)
        found.append(
            (
                COMMITTED_ORDER.index(meta["name"]) if meta["name"] in COMMITTED_ORDER else 99,
                folder.name,
                results,
                seeds,
                meta,
            )
        )
    out = []
    for _, fname, results, seeds, meta in sorted(found, key=lambda t: (t[0], t[1])):
        name, config = meta["name"], meta["config"]
        tables, notes = _committed_summary(name)(results, seeds, config)
        prov = "; ".join(
            f"commit `{p['commit'][:12]}`{' + uncommitted changes' if p['dirty'] else ''}, sources sha256 `{p['source_sha256']}`"
            for p in meta["provenance"]
        )
        out += [
            f"### {_module(name).TITLE} — `benchmarks/results/{fname}`",
            "",
            f"Seeds {', '.join(str(s) for s in seeds)} ({len(seeds)} files); produced by {prov}; command(s):",
            "",
        ]
        out += [f"- `{c}`" for c in meta["commands"]] + [""]
        out += [t + "\n" for t in tables] + [notes, ""]
        if name == "lr-sweep":
            png = f"lr_sweep_{fname}.png"
            if plots:
                _module(name).plot(results, config, docs / png)
            out += [f"![lr sweep]({png})", ""]
    return out


def render(docs: Path, committed: Path, runs=None, plots: bool = True) -> str:
    """The whole text of docs/results.md: the hand-written part above the marker, then the
    committed results, then (when given) older-style run folders."""
    doc = docs / "results.md"
    head = doc.read_text().split(MARKER)[0].rstrip() + "\n\n" if doc.exists() else "# Reproductions\n\n"
    parts = [MARKER, ""]
    if committed is not None and Path(committed).is_dir():
        parts += committed_sections(committed, docs, plots)
    if runs is not None:
        parts += legacy_sections(runs, docs)
    return head + "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="?", default=None, help="older-style run folders (optional)")
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    p.add_argument(
        "--committed", type=Path, default=COMMITTED, help="the per-seed result folders (default benchmarks/results)"
    )
    p.add_argument("--check", action="store_true", help="compare instead of writing (no plots); exit 1 on a difference")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    doc = args.docs / "results.md"
    text = render(args.docs, args.committed, args.results, plots=not (args.check or args.no_plots))
    if args.check:
        same = doc.exists() and doc.read_text() == text
        print(f"{doc}: {'matches' if same else 'DIFFERS from'} the committed results under {args.committed}")
        return 0 if same else 1
    doc.write_text(text)
    print(f"wrote {doc}")
    return 0


def legacy_sections(results: Path, docs: Path):
    merged = merge(load_runs(results))
    parts = uci_overview(merged)
    for name in ORDER:
        keys = [k for k in merged if k[0] == name]
        if name == "uci":
            order = {json.dumps(c): i for i, c in enumerate(UCI_CONDITIONS)}
            keys.sort(
                key=lambda k: order.get(
                    json.dumps([merged[k]["config"]["targets"], merged[k]["config"]["monitor"]]), 99
                )
            )
        for key in keys:
            parts += section(name, merged[key], docs)
    return parts


if __name__ == "__main__":
    sys.exit(main())
