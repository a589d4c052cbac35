"""The paper's experiments, reproduced: ``python -m georeparam reproduce NAME``."""


def main(argv=None) -> int:
    raise SystemExit("reproduce: not implemented yet")
