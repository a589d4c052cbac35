"""Loading plain checkpoints of other dtypes or with a key missing, casting a registered layer,
and ``remove`` keeping the memory format: each gives what the plain layer holds (within its
tolerance) or a clear error that names the tensor/module, with nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import georeparam
from conftest import rel_err
from test_errors import assert_unchanged, snapshot

F64 = torch.float64


# -------------------------------------------------------------------------------------------------
# A plain checkpoint missing a key reports it as a plain model does
# -------------------------------------------------------------------------------------------------


def _load_error(model, sd):
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd, strict=True)
    return str(info.value).replace("Parametrized", "")


@pytest.mark.parametrize("missing", ["bias", "weight"])
def test_plain_checkpoint_missing_a_key_fails_as_in_a_plain_model(missing):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(5, 3))
    sd = {k: v for k, v in src.state_dict().items() if k != f"0.{missing}"}
    plain = nn.Sequential(nn.Linear(5, 3))
    model = copy.deepcopy(plain)
    georeparam.register(model)
    # strict: the same error as the plain model's (PyTorch copies the keys present, then raises)
    assert _load_error(model, sd) == _load_error(copy.deepcopy(plain), sd)
    assert 'Missing key(s) in state_dict: "0.' + missing in _load_error(model, sd)
    # non-strict: the same missing keys, the loaded key taken, the missing one kept
    model = copy.deepcopy(plain)
    georeparam.register(model)
    kept = getattr(model[0], missing).detach().clone()
    expect = copy.deepcopy(plain)
    assert model.load_state_dict(sd, strict=False) == expect.load_state_dict(sd, strict=False)
    assert rel_err(getattr(model[0], missing), kept) <= 1e-6
    assert rel_err(model[0].weight, expect[0].weight) <= 1e-6 and rel_err(model[0].bias, expect[0].bias) <= 1e-6


# -------------------------------------------------------------------------------------------------
# Checkpoint dtypes: converted from the values the model will hold
# -------------------------------------------------------------------------------------------------


def _registered(dtype=torch.float32, n_in=4, n_out=3, seed=5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out)).to(dtype)
    plain = copy.deepcopy(model)
    georeparam.register(model)
    return model, plain


def _refused(model, sd, *words):
    snap = snapshot(model)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd, strict=True)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert "Got:" in msg
    assert_unchanged(model, snap)
    return msg


def test_float64_row_whose_norm_overflows_float32_is_refused():
    model, _ = _registered()
    w = torch.zeros(3, 4, dtype=F64)
    w[1] = 3e38  # each entry fits float32, the row norm 6e38 does not
    sd = {"0.weight": w, "0.bias": torch.zeros(3, dtype=F64)}
    _refused(model, sd, "0.weight", "units [1]", "overflows torch.float32")
    w[1] = 1e300  # entries that do not fit either
    _refused(model, sd, "0.weight", "overflow the model's torch.float32")


@pytest.mark.parametrize("row", [1e-50, 1e-40])
def test_float64_row_that_underflows_float32_under_a_bias_is_refused(row):
    model, _ = _registered()
    w = torch.randn(3, 4, dtype=F64)
    w[2] = row  # 1e-50: 0 in float32; 1e-40: a float32 subnormal, λ = 0.5 / 2e-40 overflows
    sd = {"0.weight": w, "0.bias": torch.full((3,), 0.5, dtype=F64)}
    msg = _refused(model, sd, "units [2]")
    assert (
        ("underflow to 0 in the model's torch.float32" in msg) if row == 1e-50 else ("overflows torch.float32" in msg)
    )


@settings(max_examples=25)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float64]),
    n_in=st.integers(2, 300),
    scale=st.sampled_from([1e-2, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_checkpoint_of_another_dtype_matches_the_plain_load(dtype, n_in, scale, seed):
    """The GmP layer computes what the plain float32 layer holds after loading (≤ 1e-6 relative;
    measured ~1e-7; coordinates in the checkpoint's dtype gave 4.6e-4 for float16, 3.8e-3 for
    bfloat16)."""
    model, plain = _registered(n_in=n_in, n_out=4)
    g = torch.Generator().manual_seed(seed)
    sd = {
        "0.weight": (scale * torch.randn(4, n_in, generator=g, dtype=F64)).to(dtype),
        "0.bias": torch.randn(4, generator=g, dtype=F64).to(dtype),
    }
    model.load_state_dict(sd, strict=True)
    plain.load_state_dict(sd, strict=True)
    assert rel_err(model[0].weight, plain[0].weight, dim=-1).max() <= 1e-6
    assert rel_err(model[0].bias, plain[0].bias) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_measured_worst_row_error_of_a_checkpoint_of_another_dtype(dtype):
    """docs/checkpoints.md's table (``pytest tests/test_loads_and_casts.py -s -k measured``): the worst row's
    error over 20 random 16×300 layers, GmP weight after loading vs the plain layer's."""
    worst = 0.0
    for seed in range(20):
        model, plain = _registered(n_in=300, n_out=16, seed=seed)
        g = torch.Generator().manual_seed(seed)
        sd = {
            "0.weight": torch.randn(16, 300, generator=g, dtype=F64).to(dtype),
            "0.bias": torch.randn(16, generator=g, dtype=F64).to(dtype),
        }
        model.load_state_dict(sd)
        plain.load_state_dict(sd)
        worst = max(worst, rel_err(model[0].weight, plain[0].weight, dim=-1).max().item())
    print(f"\n{dtype} checkpoint → float32 model: worst row {worst:.2e}")
    assert worst <= 1e-6


def test_float16_row_of_norm_1e5_loads_into_float32():
    model, plain = _registered(n_in=4)
    sd = {"0.weight": torch.full((3, 4), 5e4, dtype=torch.float16), "0.bias": torch.ones(3, dtype=torch.float16)}
    model.load_state_dict(sd, strict=True)  # ‖row‖ = 1e5 > float16's 65,504, fine in float32
    plain.load_state_dict(sd, strict=True)
    assert rel_err(model[0].weight, plain[0].weight) <= 1e-6 and rel_err(model[0].bias, plain[0].bias) <= 1e-6
    # the other way: a float32 checkpoint into a float16 model, where the norm cannot be held
    half, _ = _registered(dtype=torch.float16)
    _refused(half, {k: v.float() for k, v in sd.items()}, "0.weight", "overflows torch.float16")


# -------------------------------------------------------------------------------------------------
# Casting a registered layer
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, bias, word",
    [
        (5e4, 0.0, "radius r = ‖w‖ overflows torch.float16"),
        (1e-9, 0.5, "rounds to 0"),
        (1e-3, 1000.0, "offset λ = b/r overflows"),
    ],
)
def test_half_of_a_layer_that_float16_gmp_cannot_hold_is_refused(row, bias, word):
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[1] = row
        layer.bias.fill_(bias)
    plain_half = copy.deepcopy(layer).half()
    assert torch.isfinite(plain_half.weight).all() and torch.isfinite(plain_half.bias).all()
    model = nn.Sequential(layer)
    georeparam.register(model)
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"Linear\.weight: cannot cast this GmP layer from torch.float32 to torch.float16: for units \[1\]",
    ) as info:
        model.half()
    assert word in str(info.value) and "Got:" in str(info.value)
    assert_unchanged(model, snap)
    assert georeparam.geometry(layer).radius.dtype == torch.float32


def test_casts_that_hold_still_work():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    model = nn.Sequential(layer)
    georeparam.register(model)
    w = layer.weight.detach().clone()
    model.half()
    assert layer.weight.dtype == torch.float16 and rel_err(layer.weight, w) <= 1e-3
    model.float().double().to("cpu")
    assert layer.weight.dtype == F64


# -------------------------------------------------------------------------------------------------
# Remove keeps the memory format
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv, fmt",
    [
        (nn.Conv2d(3, 5, 3), torch.channels_last),
        (nn.Conv3d(2, 4, 2), torch.channels_last_3d),
        (nn.Conv2d(3, 5, 3), None),
    ],
)
def test_remove_keeps_the_memory_format(conv, fmt):
    if fmt is not None:
        conv = conv.to(memory_format=fmt)
    georeparam.register(conv)
    w = conv.weight.detach().clone()
    georeparam.remove(conv)
    assert torch.equal(conv.weight, w)  # bit for bit
    if fmt is None:
        assert conv.weight.is_contiguous()
    else:
        assert conv.weight.is_contiguous(memory_format=fmt) and not conv.weight.is_contiguous()


def test_bias_only_checkpoint_in_the_paper_form_with_a_negative_radius():
    """In the paper's form b = |r|·λ: a plain bias loaded under a kept negative radius is still b."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    georeparam.register(model, exclude=["2"])
    g = georeparam.geometry(model[0])
    with torch.no_grad():
        g.radius[1] = -g.radius[1]  # a real state in the paper's form (its output is negated after ReLU)
    w = model[0].weight.detach().clone()
    bias = torch.tensor([0.5, -0.25, 2.0])
    result = model.load_state_dict(
        {"0.bias": bias, "2.weight": model[2].weight.detach(), "2.bias": model[2].bias.detach()}, strict=False
    )
    assert result.missing_keys == ["0.weight"] and not result.unexpected_keys
    assert rel_err(model[0].bias, bias) <= 1e-6 and torch.equal(model[0].weight, w) and g.radius[1] < 0
