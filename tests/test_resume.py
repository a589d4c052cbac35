"""Checkpoints: resuming in a new process is bit-for-bit; pickling a GmP model names the way out."""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import georeparam
from conftest import REPO_ROOT, seeded

WORKER = REPO_ROOT / "tests" / "_resume_worker.py"


def _run(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{args[0]} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _flatten(tree, prefix=""):
    """Every tensor/number of a nested state dict, keyed by its path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def test_resume_in_new_process_is_bit_for_bit(tmp_path):
    ckpt, full, resumed = tmp_path / "ckpt.pt", tmp_path / "full.pt", tmp_path / "resumed.pt"
    _run("full", "--ckpt", str(ckpt), "--out", str(full))
    _run("resume", "--ckpt", str(ckpt), "--out", str(resumed))
    a, b = torch.load(full), torch.load(resumed)
    # the checkpoint is a plain weights_only file: GmP coordinates, optimizer, scheduler, RNG states
    c = torch.load(ckpt)
    assert c["step"] == 17 and "0.parametrizations.weight.original1" in c["gmp"]["model"]
    assert "geometric" in c["gmp"]["optimizer"]  # the wrapper's own step counter travels too
    fa, fb = _flatten(a), _flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        va, vb = fa[k], fb[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), f"{k} differs after resuming"
        else:
            assert va == vb, k
    # the runs did move, and the wrapped one was canonicalized along the way
    for kind in ("adam", "gmp"):
        assert not torch.equal(
            a[kind]["model"]["0.parametrizations.weight.original1"],
            c[kind]["model"]["0.parametrizations.weight.original1"],
        )
    angles = a["gmp"]["model"]["0.parametrizations.weight.original1"]
    plain = a["adam"]["model"]["0.parametrizations.weight.original1"]
    assert angles[:, :-1].abs().max() <= math.pi / 2
    assert plain[:, :-1].abs().max() > math.pi / 2  # without the wrapper they left the range


# -------------------------------------------------------------------------------------------------
# pickling
# -------------------------------------------------------------------------------------------------


def _model():
    with seeded(0):
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    georeparam.register(model)
    return model


def _torch_save_load(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize(
    "dump", [_torch_save_load, lambda m: pickle.loads(pickle.dumps(m))], ids=["torch.save", "pickle"]
)
def test_a_registered_model_pickles_and_loads_registered(dump):
    # Note [Pickling a registered layer]: was refused (after torch.save had truncated the file)
    model = _model()
    x = torch.randn(4, 2, 4, 4)
    loaded = dump(model)
    assert type(loaded[0]).__name__ == "ParametrizedConv2d" and georeparam.is_geometric(loaded[0])
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert type(loaded[0]) is not type(model[0])  # its own class: removing one leaves the other


def test_pickling_works_after_remove_and_deepcopy_still_works():
    model = _model()
    x = torch.randn(4, 2, 4, 4)
    twin = copy.deepcopy(model)  # deepcopy is not pickling
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    georeparam.remove(model)
    loaded = _torch_save_load(model)
    assert type(loaded[0]) is nn.Conv2d
    torch.testing.assert_close(loaded(x), twin(x), rtol=0, atol=0)
    # the copy shares no class with the removed original: it is still registered and still pickles
    assert georeparam.is_geometric(pickle.loads(pickle.dumps(twin))[0])


def test_state_dict_checkpoint_round_trip_through_a_file(tmp_path):
    model = _model()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(torch.load(path))  # weights_only=True: no code in the file
    x = torch.randn(4, 2, 4, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
