"""Run one of the paper's experiments as its official code runs it (see benchmarks/reproduce/).

python benchmarks/reproduce.py uci --datasets yacht --quick
python benchmarks/reproduce.py banana --out results/banana
python benchmarks/reproduce.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*, georeparam

from benchmarks.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
