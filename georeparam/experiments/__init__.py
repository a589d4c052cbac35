r"""The paper's experiments, reproduced side by side: ``python -m georeparam reproduce NAME``.

Names: ``levy``, ``banana``, ``uci``, ``mnist1d``, ``lr-sweep``, ``imagenet32`` (GPU scale), and
``all`` (every CPU experiment in turn). Each writes ``NAME.md`` (the Markdown table and how it was
made), ``NAME.json`` (every run's numbers) and PNG plots to ``--out`` (default ``results/NAME``),
shows tqdm progress on stderr, and has ``--quick`` (under a minute, for smoke tests; its numbers
are not the paper's).

Methods (``--methods``, default all): SP, WN, BN, GmP, GmP+IMN — see
:mod:`georeparam.experiments.common`. Experiments whose data are absent print why and are skipped
(exit status 0); ``--data-dir`` (or ``$GEOREPARAM_DATA``) says where the data live.

Example::

    python -m georeparam reproduce levy --quick --out /tmp/levy
    python -m georeparam reproduce uci --datasets boston,yacht --seeds 5
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "EXPERIMENTS"]

#: name → module (imported lazily, so ``--help`` and doctest collection stay cheap)
EXPERIMENTS = {
    "levy": "levy",
    "banana": "banana",
    "uci": "uci",
    "mnist1d": "mnist1d",
    "lr-sweep": "lr_sweep",
    "imagenet32": "imagenet32",
}
#: what ``all`` runs (imagenet32 needs a GPU and its data)
CPU_EXPERIMENTS = ("levy", "banana", "uci", "mnist1d", "lr-sweep")


def _module(name: str):
    return importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")


def _common_arguments(p: argparse.ArgumentParser, default_seeds: str) -> None:
    p.add_argument("--out", default=None, help="output directory (default results/NAME)")
    p.add_argument("--quick", action="store_true", help="a < 1 minute smoke run (fewer seeds, epochs, data)")
    p.add_argument("--seeds", default=None, help=f"a count (seeds 0..N-1) or a list 0,3,7 (default {default_seeds}; quick: 2)")
    p.add_argument("--data-dir", default=None, help="data root (holding banana/, uci/) or the dataset's own folder; default $GEOREPARAM_DATA or <repo>/../shared/data")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--methods", default=",".join(_methods()), help="comma-separated subset of SP,WN,BN,GmP,GmP+IMN")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 1 on CPU: the models are tiny)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _methods():
    from .common import METHODS

    return METHODS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m georeparam reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", metavar="NAME", required=True)
    for name in EXPERIMENTS:
        mod = _module(name)
        p = sub.add_parser(name, help=mod.TITLE, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        _common_arguments(p, mod.DEFAULT_SEEDS)
        mod.add_arguments(p)
    p = sub.add_parser("all", help="levy, banana, uci, mnist1d and lr-sweep in turn (out/NAME each)")
    _common_arguments(p, "per experiment")
    return parser


def _finish_args(args, name: str) -> None:
    from .common import METHODS, parse_seeds

    mod = _module(name)
    quick_seeds = getattr(mod, "QUICK_SEEDS", "2")
    args.seeds = parse_seeds(args.seeds if args.seeds is not None else (quick_seeds if args.quick else mod.DEFAULT_SEEDS))
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"reproduce: --methods takes a subset of {','.join(METHODS)}. Got: {args.methods!r}")
    if "GmP+IMN" in methods:
        from .common import imn_available

        if not imn_available():
            print("reproduce: GmP+IMN left out — georeparam.register has no imn=True in this build (georeparam/imn.py)", file=sys.stderr)
            methods.remove("GmP+IMN")
    args.methods = methods


def run_one(name: str, args, argv: List[str]) -> int:
    """Run experiment ``name`` with parsed ``args``; write NAME.md / NAME.json; print the report."""
    from . import common as C

    mod = _module(name)
    _finish_args(args, name)
    out = Path(args.out if args.out else Path("results") / name)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    import torch

    # Note [One thread]
    # These models are tiny: on a shared CPU a second intra-op thread mostly waits (measured 5×
    # more CPU time for the Levy runs with 2 threads on a loaded 2-core machine).
    threads = torch.get_num_threads()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    start = time.time()
    try:
        report = mod.run(args)
    except C.DataMissing as e:
        print(f"reproduce {name}: SKIPPED — {e}", file=sys.stderr)
        return 0
    finally:
        torch.set_num_threads(threads)
    seconds = time.time() - start
    command = "python -m georeparam reproduce " + " ".join(shlex.quote(a) for a in argv)
    text = [f"## {mod.TITLE}", "", f"Command: `{command}` ({seconds / 60:.1f} min)", ""]
    if args.quick:
        text += ["**Quick smoke run — not the paper's protocol; do not quote these numbers.**", ""]
    text += [report["table"], ""]
    for extra in report.get("extra_tables", []):
        text += [extra, ""]
    text += [report.get("notes", ""), ""]
    for f in report.get("files", []):
        text.append(f"![{Path(f).stem}]({Path(f).name})")
    md = "\n".join(text).rstrip() + "\n"
    (out / f"{name}.md").write_text(md)
    C.write_json(out / f"{name}.json", dict(command=command, seconds=seconds, quick=bool(args.quick), seeds=args.seeds, methods=args.methods, results=report.get("results")))
    print(md)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.name != "all":
        return run_one(args.name, args, argv)
    status = 0
    base = Path(args.out) if args.out else Path("results")
    rest, skip = [], False
    for a in argv[1:]:  # drop --out X / --out=X: each experiment gets base/NAME
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            rest.append(a)
    for name in CPU_EXPERIMENTS:
        sub_argv = [name] + rest + ["--out", str(base / name)]
        status |= run_one(name, _parser().parse_args(sub_argv), sub_argv)
    return status
