"""The paper's experiments, for people who run benchmarks/: the same code as
``python -m georeparam reproduce NAME`` (see georeparam/experiments/).

    python benchmarks/reproduce.py levy --quick
    python benchmarks/reproduce.py all --out results        # levy, banana, uci, mnist1d, lr-sweep
    python benchmarks/reproduce.py imagenet32 --data-dir /data/imagenet32 --device cuda
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeparam.experiments import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
