"""Command line: ``python -m georeparam demo`` and ``python -m georeparam reproduce NAME``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m georeparam", description=__doc__)
    parser.add_argument("command", choices=["demo", "reproduce"], help="what to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the command's own arguments (see COMMAND --help)")
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    from .experiments import main as reproduce_main

    return reproduce_main(rest)


if __name__ == "__main__":
    sys.exit(main())
