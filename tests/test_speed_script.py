"""benchmarks/speed.py and benchmarks/gpu_check.py run end to end at toy size (no timing claims)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "speed.py"
GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.py"


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
    for model in ("transformer block", "ResNet-18"):
        assert sum(k.startswith("training step") and model in k for k in kinds) == 1, model
    assert sum(k.startswith("register, ns per parameter") for k in kinds) == 1
    assert sum(k.startswith("paper form − weight form") for k in kinds) == 1
    assert "kernel:" in proc.stdout  # says whether the compiled kernel ran
    for r in rows:
        for cell in r[2:5]:
            if cell != "–":
                v = float(cell.split()[0])  # "1.23 [1.20, 1.26]": median [quartiles]
                assert math.isfinite(v)
                if not r[0].startswith(("extra peak memory", "paper form")):  # differences can be ≤ 0 at toy size
                    assert v > 0


def test_resnet_breakdown_splits_the_extra_into_the_map_and_the_rest():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "resnet", "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {}
    for line in proc.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            name, ms = [c.strip() for c in line.strip("|").split("|")][:2]
            cells[name.split(" (")[0]] = float(ms)
    assert {
        "standard step",
        "GmP step",
        "GmP's extra",
        "… the map alone, fwd+bwd over all layers",
        "… the rest",
    } <= set(cells), cells
    assert cells["standard step"] > 0 and cells["… the map alone, fwd+bwd over all layers"] > 0
    assert math.isclose(
        cells["GmP's extra"], cells["… the map alone, fwd+bwd over all layers"] + cells["… the rest"], abs_tol=0.15
    )


def test_gpu_check_runs_on_cpu_at_toy_size(tmp_path):
    """The GPU script's dry run: every section completes and lands in one JSON."""
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"registration", "trajectories", "step_ratios", "map_cost"}
    assert all("error" not in s for s in sections.values())
    assert sections["registration"]["pass"] and sections["trajectories"]["pass"]
    assert sections["step_ratios"]["paths"] == ["torch"]  # no Triton path on the CPU
    for model in ("mlp", "cnn", "transformer"):
        row = sections["step_ratios"][model]
        assert math.isfinite(row["exact_over_standard"])
        assert math.isfinite(row["exact_torch_extra_peak_over_param_bytes"])
    for shape in (v for v in sections["map_cost"].values() if isinstance(v, dict)):
        # the three float32 maps are all within 1e-6 of float64 (exact-mode precision)
        assert all(e <= 1e-6 for e in shape["fp32_row_rel_err_vs_fp64"].values())
        assert all(e <= 1e-6 for e in shape["bf16_autocast_row_rel_err_vs_fp64"].values())
