"""Export of a registered model (issue 11): torch.export and ONNX, checked by running them.

The ONNX models are run with onnx's own reference evaluator (no onnxruntime needed) and
compared with the eager registered model; Note [Export without cumprod] in georeparam/_map/torch_impl.py.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import georeparam
from conftest import seeded


def _onnx(dynamo: bool = True):
    """onnx (and, for the dynamo exporter, onnxscript), or a skip naming the missing one: per test,
    so that the torch.export tests run without them (a module-level skip hid them all)."""
    onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx: pip install -e '.[test]'")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript: pip install -e '.[test]'")
    return onnx


def _model(mode: str) -> nn.Module:
    with seeded(0):
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.ReLU(), nn.Linear(6, 3)
        )
    georeparam.register(model, mode=mode)
    return model.eval()


def _run_onnx(proto, x: torch.Tensor) -> torch.Tensor:
    from onnx.reference import ReferenceEvaluator

    sess = ReferenceEvaluator(proto)
    name = proto.graph.input[0].name
    return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_torch_export_matches_eager(mode):
    model = _model(mode)
    x = torch.randn(3, 2, 5, 5)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_onnx_export_dynamo_runs_and_matches_eager(mode):
    _onnx(dynamo=True)
    model = _model(mode)
    x = torch.randn(3, 2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    # the exporter folds the map of the (constant) coordinates into baked weights
    with torch.no_grad():
        assert torch.allclose(_run_onnx(program.model_proto, x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_legacy_runs_and_matches_eager():
    onnx = _onnx(dynamo=False)
    model = _model("exact")
    x = torch.randn(3, 2, 5, 5)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False)
    proto = onnx.load_from_string(f.getvalue())
    with torch.no_grad():
        assert torch.allclose(_run_onnx(proto, x), model(x), rtol=1e-5, atol=1e-6)
