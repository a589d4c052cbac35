"""Real models and their workflows: meta device, plain checkpoints, weight averages, transformers, tied weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import georeparam
from georeparam import WeightAverage, geometry, plain_state_dict, register

from conftest import rel_err, tiny_gpt2, transformers_or_skip


def conv_mlp():
    return nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 1)
    )


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
    with pytest.warns(UserWarning, match="AveragedModel wraps a GmP-registered model.*WeightAverage"):
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
    torch.testing.assert_close(avg.averaged_state_dict()["0.weight"], expected, rtol=1e-10, atol=1e-12)
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


def test_gpt2_conv1d_registered_tied_head_stays_tied_and_plain_save_loads(tmp_path):
    transformers = transformers_or_skip()
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
    transformers = transformers_or_skip()
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
    transformers = transformers_or_skip()
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


# -------------------------------------------------------------------------------------------------
# issue 21: conventions (selectors, pre-parametrized layers, what register returns)
# -------------------------------------------------------------------------------------------------


def _blocks():
    """Two 'attention-like' blocks with q/k/v projections, and a head: names like a transformer's."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.q_proj(x) + self.k_proj(x) * self.v_proj(x)

    return nn.Sequential(Block(), Block(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "include, expected",
    [
        (["q_proj"], {"0.q_proj", "1.q_proj"}),  # PEFT-style suffix
        (["q_proj", "v_proj"], {"0.q_proj", "1.q_proj", "0.v_proj", "1.v_proj"}),
        ("1.*", {"1.q_proj", "1.k_proj", "1.v_proj"}),  # glob over the qualified name
        (["*.[qk]_proj"], {"0.q_proj", "0.k_proj", "1.q_proj", "1.k_proj"}),
        ([__import__("re").compile(r"\d\.(q|v)_proj")], {"0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"}),
        (["2"], {"2"}),  # an exact name is that module only
        (nn.Linear, {"0.q_proj", "0.k_proj", "0.v_proj", "1.q_proj", "1.k_proj", "1.v_proj", "2"}),
    ],
)
def test_include_takes_names_suffixes_globs_regexes_and_types(include, expected):
    model = _blocks()
    assert set(register(model, include=include, form="weight")) == expected
    assert {q for q, m in model.named_modules() if georeparam.is_geometric(m)} == expected


def test_exclude_uses_the_same_parser_and_an_exact_name_is_not_a_suffix():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)))
    # "2" names no module at the top level (there are only "0" and "1"): as a suffix it is "1.2"
    report = register(model, exclude=["2", "*.0"], form="weight")
    assert set(report) == {"0", "1.1"}
    flat = nn.Sequential(
        nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 1)
    )
    assert "1.2" in register(flat, exclude=["2"], form="weight")  # "2" exists: that module only


@pytest.mark.parametrize("bad", [3, 3.0, [3], [None], {"0": 1}.values(), True])
def test_register_bad_selector_types_are_a_clear_type_error_and_change_nothing(bad):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"register: include takes qualified module names.*Got: "):
        register(model, include=bad)
    assert not any(georeparam.is_geometric(m) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("bad", ["nope", "*.nope", ["0", "x_proj"]])
def test_register_selectors_that_match_nothing_are_value_errors(bad):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="(matches no module|no module named .*, nor one whose name ends in)"):
        register(model, exclude=bad)
    assert not any(georeparam.is_geometric(m) for m in model.modules())


def test_pre_parametrized_layers_are_skipped_and_reported_like_tied_weights():
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(8)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)], nn.Linear(4, 1))
    P.weight_norm(model[1])
    P.spectral_norm(model[2])
    P.orthogonal(model[3])
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model[4])  # the old hook-based one (HF Wav2Vec2's pos_conv)
    x = torch.randn(3, 4)
    model.eval()
    with torch.no_grad():
        before = model(x)
    report = register(model, form="weight")
    assert set(report) == {"0", "5"}
    for name, what in (
        ("1", "_WeightNorm"),
        ("2", "_SpectralNorm"),
        ("3", "_Orthogonal"),
        ("4", "hook-based torch.nn.utils.weight_norm"),
    ):
        entry = report.layers[[e.name for e in report.layers].index(name)]
        assert entry.form is None and "already reparametrized" in entry.why and what in entry.why, entry
    with torch.no_grad():
        assert rel_err(model(x), before) <= 1e-6
    georeparam.remove(model)  # the others keep their own parametrizations
    assert torch.nn.utils.parametrize.is_parametrized(model[1]) and hasattr(model[4], "weight_g")


def test_the_report_is_not_the_model_and_says_so_at_once():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    wrong = register(model)  # the mistake: model = georeparam.register(model)
    with pytest.raises(TypeError, match=r"changes model in place and returns this Report.*keep using `model`"):
        wrong(torch.randn(1, 2))
    for attr in ("parameters", "to", "eval", "state_dict", "cuda"):
        with pytest.raises(AttributeError, match="returns this Report"):
            getattr(wrong, attr)
    with pytest.raises(AttributeError) as e:
        wrong.no_such_thing
    assert "returns this Report" not in str(e.value)
    assert copy.deepcopy(wrong) == wrong and list(wrong) == ["0", "2"]


# -------------------------------------------------------------------------------------------------
# issue 21 / 20: param_groups and GeometricOptimizer on plain models, and bad rates
# -------------------------------------------------------------------------------------------------


def test_plain_model_gets_one_other_group_and_one_warning_and_trains():
    import warnings

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = georeparam.param_groups(model, lr=0.1, weight_decay=1e-3)
        opt = georeparam.GeometricOptimizer(torch.optim.AdamW(groups), model)
    msgs = [str(w.message) for w in caught if "no GmP-registered layer" in str(w.message)]
    assert len(msgs) == 1 and "'other'" in msgs[0] and "georeparam.register(model) first" in msgs[0]
    assert [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups] == [("other", 4, 1e-3)]
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=1e-3)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert opt.units_canonicalized == 0


@pytest.mark.parametrize(
    "arg", ["lr", "angle_lr", "radius_lr", "weight_decay", "angle_weight_decay", "offset_weight_decay"]
)
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "1e-3", None, True])
def test_param_groups_refuse_bad_rates_at_call_time(arg, bad):
    model = georeparam.geometric(nn.Linear(3, 2))
    kwargs = {"lr": 0.1, arg: bad}
    if bad is None and arg in ("angle_lr", "radius_lr"):
        georeparam.param_groups(model, **kwargs)  # None means "use lr" for the per-kind rates
        return
    with pytest.raises((TypeError, ValueError), match=rf"param_groups: {arg} must be .*Got: "):
        georeparam.param_groups(model, **kwargs)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "0.1", None])
def test_param_groups_refuse_bad_rates_in_other(bad):
    model = nn.Sequential(georeparam.geometric(nn.Linear(3, 2)), nn.LayerNorm(2))
    with pytest.raises((TypeError, ValueError), match=r"other\['lr'\] must be"):
        georeparam.param_groups(model, lr=0.1, other={"lr": bad})


# -------------------------------------------------------------------------------------------------
# issue 21 / 20: WeightAverage resumes bit for bit, and a failed update changes nothing
# -------------------------------------------------------------------------------------------------


def _train_steps(model, opt, avg, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        avg.update(model)


@pytest.mark.parametrize("decay", [0.9, None])
def test_weight_average_resumes_bit_for_bit(decay, tmp_path):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    register(model)
    opt = georeparam.GeometricOptimizer(torch.optim.Adam(georeparam.param_groups(model, lr=0.2)), model)
    avg = WeightAverage(model, decay=decay)
    _train_steps(model, opt, avg, 5, seed=1)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "avg": avg.state_dict()}, tmp_path / "ck.pt")
    _train_steps(model, opt, avg, 5, seed=2)  # the uninterrupted run
    # resume in a fresh process-like setting
    torch.manual_seed(99)
    again = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    register(again)
    opt2 = georeparam.GeometricOptimizer(torch.optim.Adam(georeparam.param_groups(again, lr=0.2)), again)
    ck = torch.load(tmp_path / "ck.pt")
    again.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    avg2 = WeightAverage(again, decay=decay)
    avg2.load_state_dict(ck["avg"])
    _train_steps(again, opt2, avg2, 5, seed=2)
    assert avg2.updates == avg.updates == 10
    a, b = avg.averaged_state_dict(), avg2.averaged_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(again, decay=0.5 if decay is None else None).load_state_dict(ck["avg"])
    with pytest.raises(ValueError, match="averaged_state_dict"):
        avg2.load_state_dict(a)  # averaged weights are not the averager's state


def test_a_failed_weight_average_update_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    avg = WeightAverage(model, decay=0.5)
    avg.update(model)
    saved = avg.state_dict()
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))  # same keys, other shapes
    with pytest.raises(ValueError, match="changed shape"):
        avg.update(other)
    assert avg.updates == 1
    now = avg.state_dict()
    assert all(torch.equal(now["average"][k], saved["average"][k]) for k in saved["average"])


def test_averaged_model_on_a_registered_model_warns_and_a_plain_one_does_not():
    import warnings

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.swa_utils.AveragedModel(model)  # plain: no word
    register(model)
    with pytest.warns(UserWarning, match="averages the coordinates r, θ, λ.*georeparam.WeightAverage"):
        torch.optim.swa_utils.AveragedModel(model)


# -------------------------------------------------------------------------------------------------
# issue 21: packaging (version, py.typed, LICENSE, the command line)
# -------------------------------------------------------------------------------------------------


def test_one_version_source_py_typed_and_license():
    from conftest import REPO_ROOT

    root = REPO_ROOT
    text = (root / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "georeparam.__version__" }' in text
    assert '\nversion = "' not in text  # written once, in georeparam/__init__.py
    assert (root / "georeparam" / "py.typed").exists() and '"py.typed"' in text
    assert "MIT License" in (root / "LICENSE").read_text() and 'license = { text = "MIT" }' in text
    for extra in ('"onnx"', '"onnxscript"', '"peft"', '"lightning"'):
        assert extra in text.split("test = [")[1].split("]")[0]


def test_cli_version_and_info(capsys):
    from georeparam import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"georeparam {georeparam.__version__}"
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"georeparam {georeparam.__version__} (")
    assert f"torch      {torch.__version__}" in out and f"threads    {torch.get_num_threads()}" in out
    assert f"kernel     {georeparam.kernel_status()}" in out
    assert "CPU float32: " in out and "CUDA: " in out


# -------------------------------------------------------------------------------------------------
# issue 21: versions (the torch 2.14.1 failure of test_canonical_parts_signs_are_the_derivatives)
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_canonical_parts_derivative_is_the_sign_where_the_bound_nudges(dtype):
    # r < 0 and last angle 0: θ + π rounds to float32's π, one ulp past the bound; the one-ulp
    # clamp must not zero the derivative (Note [The one-ulp clamp has no gradient])
    from georeparam.coords import canonical_parts

    r = torch.tensor([-1.0, -2.0, 0.5], dtype=dtype)
    a = torch.tensor([[0.0, 0.0], [1.0, -0.0], [2.0, 3.5]], dtype=dtype)
    _, _, _, signs = canonical_parts(r, a)
    jac = torch.func.jacrev(lambda aa: canonical_parts(r, aa)[1])(a).reshape(a.numel(), a.numel())
    assert torch.equal(jac, torch.diag(signs.reshape(-1)))
