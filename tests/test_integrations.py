"""GmP with the tools people train with (issue 21): PEFT LoRA in either order, Hugging Face
``save_pretrained`` and ``GmPTrainer``, Lightning's ``GmPCallback``. Each test skips when its library
is missing; all of them are in the ``[test]`` extras."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import georeparam
from georeparam import geometry, plain_state_dict, register

from conftest import rel_err, tiny_gpt2, transformers_or_skip


def _flip(model, every=2):
    with torch.no_grad():
        for m in model.modules():
            if georeparam.is_geometric(m):
                geometry(m).radius[::every] *= -1


# -------------------------------------------------------------------------------------------------
# PEFT (LoRA) in either order
# -------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.head = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def test_peft_lora_then_register_trains_merges_and_reloads_plain():
    peft = pytest.importorskip("peft")
    torch.manual_seed(11)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model = peft.get_peft_model(_Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    report = register(model)
    skipped = {e.name: e.why for e in report.skipped}
    assert set(skipped) == {"base_model.model.fc1.base_layer", "base_model.model.fc2.base_layer"}
    assert all("PEFT adapter" in why for why in skipped.values())
    assert "base_model.model.fc1.lora_B.default" in report
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        trained = model(x)
    merged = model.merge_and_unload()
    plain = _Net()
    plain.load_state_dict(plain_state_dict(merged))
    with torch.no_grad():
        assert rel_err(merged(x), trained) <= 1e-6
        assert rel_err(plain(x), trained) <= 1e-6
        assert rel_err(trained, _Net()(x)) > 1e-2  # (it did train: not a trivially equal output)


def test_peft_on_a_registered_model_is_refused_before_anything_changes():
    peft = pytest.importorskip("peft")
    model = _Net()
    register(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(
        TypeError, match=r"PEFT is wrapping a GmP-registered layer.*merge would be lost.*Apply PEFT first"
    ):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    assert all(type(m).__module__.startswith("torch.") for m in (model.fc1, model.fc2))
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# -------------------------------------------------------------------------------------------------
# Hugging Face save_pretrained and Trainer
# -------------------------------------------------------------------------------------------------


def test_save_pretrained_of_a_registered_model_writes_plain_weights(tmp_path):
    transformers = transformers_or_skip()
    torch.manual_seed(12)
    model = tiny_gpt2()
    register(model)
    _flip(model)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path / "plain")  # no state_dict=: the plain hand-back
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    assert not any(georeparam.is_geometric(m) for m in plain.modules())
    with torch.no_grad():
        assert rel_err(plain(ids).logits, out) <= 1e-6
    # an explicit state_dict is written as given: the GmP coordinates, for a model registered the same way
    model.save_pretrained(tmp_path / "gmp", state_dict=model.state_dict())
    import safetensors.torch

    keys = safetensors.torch.load_file(str(tmp_path / "gmp" / "model.safetensors")).keys()
    assert any("parametrizations.weight.original1" in k for k in keys)
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.__self__ is copied  # the instance method follows the copy


def test_gmp_trainer_groups_plain_save_and_bit_identical_resume(tmp_path, capsys):
    transformers = transformers_or_skip()
    pytest.importorskip("accelerate")
    from georeparam.integrations.hf import GmPTrainer

    def fresh():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return tiny_gpt2().train()

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 40, (8,), generator=g)), "labels": ids} for _ in range(16)]

    def args():
        return transformers.TrainingArguments(
            str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
            logging_steps=100, disable_tqdm=True, weight_decay=0.1, learning_rate=1e-2, seed=0, data_seed=0,
        )  # fmt: skip

    trainer = GmPTrainer(model=fresh(), args=args(), train_dataset=data)
    trainer.train()
    assert "georeparam: registered 4 GmP layer(s)" in capsys.readouterr().err
    decay = {grp["name"]: grp["weight_decay"] for grp in trainer.optimizer.param_groups}
    assert decay["angles"] == 0.0 and decay["offset"] == 0.0 and decay["radius"] == 0.1
    assert isinstance(trainer.optimizer.optimizer, georeparam.GeometricOptimizer)  # (inside accelerate's wrapper)
    model = trainer.model.eval()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        out = model(ids).logits
    trainer.save_model(str(tmp_path / "final"))
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        assert rel_err(plain(ids).logits, out) <= 1e-6
    resumed = GmPTrainer(model=fresh(), args=args(), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    a, b = trainer.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------
# Lightning
# -------------------------------------------------------------------------------------------------


def test_lightning_callback_registers_exports_plain_and_resumes_the_ema(tmp_path, capsys):
    pl = pytest.importorskip("lightning.pytorch")
    from georeparam.integrations.lightning import GmPCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(georeparam.param_groups(self, lr=0.05))

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g))

    def run(epochs, ckpt=None, export=None):
        torch.manual_seed(1)
        module, callback = Module(), GmPCallback(ema_decay=0.9, export=export)
        trainer = pl.Trainer(
            max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=str(tmp_path), accelerator="cpu", callbacks=[callback],
        )  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=ckpt)
        return module, callback, trainer

    module, callback, trainer = run(2, export=str(tmp_path / "plain.pt"))
    assert georeparam.is_geometric(module.net[0]) and "georeparam: registered 2 GmP layer(s)" in capsys.readouterr().err
    trainer.save_checkpoint(str(tmp_path / "e2.ckpt"))
    plain = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    plain.load_state_dict({k.removeprefix("net."): v for k, v in torch.load(tmp_path / "plain.pt").items()})
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert rel_err(plain(x), module(x)) <= 1e-6
    ema_plain = torch.load(tmp_path / "plain.pt.ema.pt")
    assert all(torch.equal(ema_plain[k], v) for k, v in callback.ema.averaged_state_dict().items())
    _, straight, _ = run(4)
    _, resumed, _ = run(4, ckpt=str(tmp_path / "e2.ckpt"))
    a, b = straight.ema.averaged_state_dict(), resumed.ema.averaged_state_dict()
    assert resumed.ema.updates == straight.ema.updates == 16 and all(torch.equal(a[k], b[k]) for k in a)
