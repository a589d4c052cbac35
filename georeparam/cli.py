"""Command line: ``python -m georeparam demo`` (also installed as the ``georeparam`` script).

``python -m georeparam --version`` prints the version; ``python -m georeparam info`` prints what a
bug report needs: the versions, whether the compiled CPU kernel is in use and where it is cached,
the thread count, and which implementation of the map a CPU or CUDA tensor gets.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__, demo


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
    i = sub.add_parser(
        "info",
        help="print versions, the CPU kernel's status and cache, threads, and which map each device uses",
        description="Print what a bug report needs: versions, the compiled CPU kernel's status and where it is cached, "
        "torch's thread count, and which implementation of the GmP map a CPU or CUDA tensor gets.",
    )
    i.set_defaults(command_parser=i)
    parser.add_argument("--version", action="version", version=f"georeparam {__version__}")
    return parser


def info_lines() -> List[str]:
    """The lines ``python -m georeparam info`` prints (also importable, for bug-report tooling)."""
    import platform

    import torch

    import georeparam

    from ._map import triton_impl

    status = georeparam.kernel_status()  # builds/loads the kernel once if it can; never raises
    cuda = torch.cuda.is_available()
    kernel_on = status.startswith("loaded")
    lines = [
        f"georeparam {__version__} ({os.path.dirname(os.path.abspath(georeparam.__file__))})",
        f"python     {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch      {torch.__version__} (CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'})",
        f"threads    {torch.get_num_threads()} (torch.get_num_threads(); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"kernel     {status}",
        "map        CPU float32: "
        + ("the compiled kernel" if kernel_on else "the pure-torch map (no kernel, see above)")
        + "; CPU float64 and other dtypes: the pure-torch map; CUDA: "
        + (
            "the Triton map (eager float32/float64), else the pure-torch map"
            if triton_impl.available()
            else "the pure-torch map (triton not importable)"
        )
        + ("" if cuda else " (no CUDA device here)"),
    ]
    from ._map.build import KernelUnavailable, cache_dir

    try:
        where = cache_dir()
    except KernelUnavailable as e:
        where = f"none ({e})"
    lines.insert(5, f"cache      {where} (GEOREPARAM_CACHE_DIR overrides it)")
    return lines


def _info() -> int:
    print("\n".join(info_lines()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return demo.run_from_args(args.command_parser, args)


if __name__ == "__main__":
    sys.exit(main())
