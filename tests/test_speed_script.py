"""benchmarks/speed.py runs end to end at toy size and prints its one table (no timing claims)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "speed.py"


def test_quick_run_prints_one_complete_table():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| measurement |") and set(lines[1]) <= set("|-")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # every line of the table is contiguous (one table) and has all columns
    table_start = proc.stdout.splitlines().index(lines[0])
    assert proc.stdout.splitlines()[table_start : table_start + len(lines)] == lines
    assert all(len(r) == 7 for r in rows)
    kinds = [r[0] for r in rows]
    assert sum(k.startswith("transform fwd+bwd") for k in kinds) == 2
    for model in ("MLP", "CNN"):
        for what in ("training step", "inference after remove()", "inference, GmP registered", "extra peak memory"):
            assert sum(k.startswith(what) and model in k for k in kinds) == 1, (what, model)
    for r in rows:
        for cell in r[2:5]:
            if cell != "–":
                v = float(cell.split()[0])  # "1.23 [1.20, 1.26]": median [quartiles]
                assert math.isfinite(v)
                if not r[0].startswith("extra peak memory"):
                    assert v > 0
