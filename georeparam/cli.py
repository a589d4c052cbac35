"""Command line: ``python -m georeparam demo`` (also installed as the ``georeparam`` script)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import demo

#: Printed for ``reproduce``, which left the installed package with the experiments.
REPRODUCE_MOVED = (
    "python -m georeparam reproduce is gone: the paper's experiments are not part of the installed "
    "package any more. In a source checkout of georeparam run\n"
    "    python benchmarks/reproduce.py NAME      (python benchmarks/reproduce.py --help lists the names)"
)


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "georeparam" if name == "georeparam" else "python -m georeparam"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    prog = prog or _prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="georeparam: Geometric Parameterization (GmP) for PyTorch models.",
        epilog=f"Run '{prog} demo --help' for the demo's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    d = sub.add_parser(
        "demo",
        help="train SP, WN and GmP side by side on two spirals; print the table",
        description=demo.DESCRIPTION,
        formatter_class=demo.help_formatter,
    )
    demo.add_arguments(d)
    d.set_defaults(command_parser=d)  # the demo's own parser reports the demo's bad values
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reproduce"]:
        print(REPRODUCE_MOVED, file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    return demo.run_from_args(args.command_parser, args)


if __name__ == "__main__":
    sys.exit(main())
