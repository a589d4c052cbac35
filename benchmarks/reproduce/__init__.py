r"""The paper's experiments as its official code runs them: ``python benchmarks/reproduce.py NAME``.

Names: ``uci``, ``banana``, ``levy`` (the paper's), ``mnist1d``, ``digits`` and ``lr-sweep``
(external checks, not in the paper), ``imagenet32`` (GPU scale; ``--synthetic`` for a CPU run,
``--smoke`` for a one-epoch device check). ``mnist1d`` and ``digits`` tune the learning rate per
method on validation by default (``--protocol tuned``; ``uci --protocol tuned``), see
``tuned.py``'s Note [Which learning rate is compared]; ``levy --lr X`` runs every method at one
learning rate (a matched-lr control), ``levy --lrs 0.01,0.1`` at both (per-seed files). Each shows
tqdm progress on stderr and writes ``NAME.md`` (tables, protocol, command and wall time),
``NAME.json`` (every run) and PNG plots to ``--out`` (default ``results/NAME``). ``--quick`` is a
smoke run (its numbers mean nothing). Experiments whose data are absent say why and exit 0.

Methods (``--methods``): SP, WN, BN, GmP (the paper's form ``r·ReLU(uᵀx + λ)``), GmP-w (the weight
form ``ReLU(r·(uᵀx + λ))``), GmP+IMN. See ``common.py``'s Note [The official protocol] and
Note [Validation, never the test set].

    python benchmarks/reproduce.py uci --datasets boston,yacht --seeds 10
    python benchmarks/reproduce.py uci --targets standardized --methods SP,GmP
    python benchmarks/reproduce.py banana --monitor test          # the notebook's own choice
    python benchmarks/reproduce.py imagenet32 --data-dir DIR --device cuda
    python benchmarks/reproduce.py mnist1d --models mlp --seeds 5 --out benchmarks/results/mnist1d-mlp
    python benchmarks/reproduce.py uci --protocol tuned --lrs 0.01,0.1 --out benchmarks/results/uci-matched
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

#: name → module (imported lazily)
EXPERIMENTS = {
    "uci": "uci",
    "banana": "banana",
    "levy": "levy",
    "mnist1d": "mnist1d",
    "digits": "digits",
    "lr-sweep": "lr_sweep",
    "imagenet32": "imagenet32",
}


def _module(name: str):
    return importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")


def _parser() -> argparse.ArgumentParser:
    from .common import METHODS

    parser = argparse.ArgumentParser(
        prog="python benchmarks/reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="name", metavar="NAME", required=True)
    for name in EXPERIMENTS:
        mod = _module(name)
        p = sub.add_parser(
            name, help=mod.TITLE, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("--out", default=None, help="output directory (default results/NAME)")
        p.add_argument(
            "--quick", action="store_true", help="a smoke run (fewer seeds, epochs, data); its numbers mean nothing"
        )
        p.add_argument(
            "--seeds",
            default=None,
            help=f"a count (seeds 0..N-1) or a list 0,3,7 (default {mod.DEFAULT_SEEDS}; quick: 1)",
        )
        p.add_argument(
            "--data-dir",
            default=None,
            help="data root (holding uci/, banana/, …); default $GEOREPARAM_DATA or <repo>/../shared/data",
        )
        p.add_argument(
            "--methods",
            default=",".join(getattr(mod, "METHODS", METHODS)),
            help="comma-separated subset of " + ",".join(METHODS),
        )
        p.add_argument(
            "--threads", type=int, default=1, help="torch.set_num_threads (default 1: the CPU models are tiny)"
        )
        p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        mod.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from . import common as C

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    mod = _module(args.name)
    args.seeds = C.parse_seeds(args.seeds if args.seeds is not None else ("1" if args.quick else mod.DEFAULT_SEEDS))
    args.methods = C.parse_methods(args.methods)
    out = Path(args.out if args.out else Path("results") / args.name)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/reproduce.py " + " ".join(shlex.quote(a) for a in argv)
    args.command = command
    start = time.time()
    try:
        report = mod.run(args)
    except C.DataMissing as e:
        print(f"reproduce {args.name}: SKIPPED — {e}", file=sys.stderr)
        return 0
    finally:
        torch.set_num_threads(threads)
    seconds = time.time() - start
    text = [f"## {mod.TITLE}", "", f"Command: `{command}` ({seconds / 60:.1f} min wall, {args.threads} thread(s))", ""]
    if args.quick:
        text += ["**Quick smoke run — not the paper's protocol; do not quote these numbers.**", ""]
    text += [report["table"], ""]
    for extra in report.get("extra_tables", []):
        text += [extra, ""]
    text += [report.get("notes", ""), ""]
    for f in report.get("files", []):
        text.append(f"![{Path(f).stem}]({Path(f).name})")
    md = "\n".join(text).rstrip() + "\n"
    (out / f"{args.name}.md").write_text(md)
    C.write_json(
        out / f"{args.name}.json",
        dict(
            name=args.name,
            command=command,
            seconds=seconds,
            quick=bool(args.quick),
            seeds=args.seeds,
            methods=args.methods,
            config=report.get("config", {}),
            results=report.get("results"),
        ),
    )
    print(md)
    return 0
