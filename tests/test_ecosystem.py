"""Real models and their workflows: meta device, plain checkpoints, weight averages, transformers, tied weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import georeparam
from georeparam import WeightAverage, geometry, plain_state_dict, register

from conftest import rel_err


def conv_mlp():
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 1))


def pooled():
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 3 * 3, 1))


def _flip(model, every=2):
    with torch.no_grad():
        for m in model.modules():
            if georeparam.is_geometric(m):
                geometry(m).radius[::every] *= -1


# -------------------------------------------------------------------------------------------------
# meta device
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [conv_mlp, pooled])
def test_register_on_meta_then_load_a_plain_checkpoint(factory):
    torch.manual_seed(0)
    plain = factory()
    x = torch.randn(3, 2, 8, 8)
    with torch.device("meta"):
        model = factory()
    report = register(model)
    assert len(report) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    model.to_empty(device="cpu")
    assert str(model.load_state_dict(plain.state_dict())) == "<All keys matched successfully>"
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) <= 1e-6


# -------------------------------------------------------------------------------------------------
# plain_state_dict
# -------------------------------------------------------------------------------------------------


def test_plain_state_dict_loads_into_the_plain_class_and_changes_nothing():
    torch.manual_seed(1)
    model = conv_mlp().double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    register(model)
    _flip(model)  # negative radii: their signs go into the next layer's columns
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = plain_state_dict(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    plain = conv_mlp().double()
    assert sorted(sd) == sorted(plain.state_dict())
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) <= 1e-12
    # and into a registered model (the plain-checkpoint pre-hook), same function
    again = conv_mlp().double()
    register(again)
    again.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(again(x), model(x)) <= 1e-12


def test_plain_state_dict_refuses_a_sign_before_a_max_pool():
    model = pooled()
    register(model)
    with torch.no_grad():
        geometry(model[0]).radius[0] *= -1
    with pytest.raises(ValueError, match="max-pool"):
        plain_state_dict(model)
    with torch.no_grad():
        geometry(model[0]).radius[0] *= -1  # all positive again: nothing to hold
    assert sorted(plain_state_dict(model)) == sorted(pooled().state_dict())


def test_plain_state_dict_with_input_mean_norm_folds_it():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    x = torch.randn(32, 3, dtype=torch.float64) + 2
    register(model, imn=True)
    model(x)  # one batch: running means move
    _flip(model)
    model.eval()
    plain = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)).double().eval()
    plain.load_state_dict(plain_state_dict(model))
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) <= 1e-12
    assert georeparam.is_geometric(model[0])


# -------------------------------------------------------------------------------------------------
# weight averages across angle wraps
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.9, None])
def test_weight_average_is_the_average_of_w_and_b_across_wraps(decay):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    register(model, form="weight")  # no signs to bake: w and b are exactly the layers' weights
    opt = georeparam.GeometricOptimizer(torch.optim.Adam(model.parameters(), lr=0.3), model)
    avg = WeightAverage(model, decay=decay)
    coords = torch.optim.swa_utils.AveragedModel(model)  # averages r, angles, λ
    snaps = [{k: v.clone() for k, v in plain_state_dict(model).items()}]
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    for _ in range(60):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        avg.update(model)
        coords.update_parameters(model)
        snaps.append({"0.weight": model[0].weight.detach().clone(), "0.bias": model[0].bias.detach().clone()})
    assert opt.units_canonicalized > 0  # the coordinates did jump
    w = [s["0.weight"] for s in snaps]
    if decay is None:
        expected = torch.stack(w).mean(0)
    else:
        expected = w[0].clone()
        for v in w[1:]:
            expected = decay * expected + (1 - decay) * v
    torch.testing.assert_close(avg.state_dict()["0.weight"], expected, rtol=1e-10, atol=1e-12)
    if decay is None:  # the coordinate average (AveragedModel's) lands elsewhere once angles wrapped
        with torch.no_grad():
            assert rel_err(coords.module[0].weight, expected) > 1e-2
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


# -------------------------------------------------------------------------------------------------
# torch's own modules and transformers
# -------------------------------------------------------------------------------------------------


def test_transformer_encoder_layer_registers_attention_and_trains():
    torch.manual_seed(4)
    enc = nn.TransformerEncoderLayer(12, 2, 24, dropout=0.0, batch_first=True).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y0 = enc(x)
    report = register(enc)
    assert {"self_attn", "self_attn.out_proj", "linear1", "linear2"} == set(report)
    assert geometry(enc.self_attn, "in_proj_weight").radius.shape == (36,)
    assert rel_err(enc(x), y0) <= 1e-12
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    enc(x).square().mean().backward()
    opt.step()
    assert geometry(enc.self_attn, "in_proj_weight").angles.grad is not None


def _transformers():
    return pytest.importorskip("transformers")


def tiny_gpt2():
    transformers = _transformers()
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=12, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_registered_tied_head_stays_tied_and_plain_save_loads(tmp_path):
    transformers = _transformers()
    torch.manual_seed(5)
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    report = register(model)
    conv1d = [e for e in report.layers if e.kind == "Conv1D"]
    assert len(conv1d) == 4 and all(e.form is not None for e in conv1d)
    assert report.form_of("lm_head") is None and "tied" in str(report)
    with torch.no_grad():
        assert rel_err(model(ids).logits, before) <= 1e-6
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path, state_dict=plain_state_dict(model))
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(plain(ids).logits, trained) <= 1e-5


def test_llama_tied_embeddings_are_skipped_and_stay_tied():
    transformers = _transformers()
    torch.manual_seed(6)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=40, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    report = register(model)
    assert report.form_of("lm_head") is None and report.form_of("model.layers.0.mlp.gate_proj") == "weight"
    assert "silu" in report.layers[[e.name for e in report.layers].index("model.layers.0.mlp.gate_proj")].why
    ids = torch.randint(0, 40, (2, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bert_save_pretrained_plain_round_trip(tmp_path):
    transformers = _transformers()
    torch.manual_seed(7)
    cfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=40,
        max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 40, (2, 6))
    register(model)
    _flip(model)
    with torch.no_grad():
        out = model(ids).last_hidden_state
    model.save_pretrained(tmp_path, state_dict=plain_state_dict(model))
    plain = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(plain(ids).last_hidden_state, out) <= 1e-5
    assert not any(georeparam.is_geometric(m) for m in plain.modules())
    # a plain copy with the GmP keys would not load: they are exactly what plain_state_dict replaced
    assert not any("parametrizations" in k for k in plain_state_dict(copy.deepcopy(model)))
