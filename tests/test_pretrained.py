"""The pretrained workflow, end to end (docs/pretrained.md).

plain checkpoint → new model → ``register`` → ``load_state_dict`` (outputs unchanged) → fine-tune with
``param_groups`` → ``remove`` → the plain state_dict loads into the plain class and reproduces the
fine-tuned outputs.

The model is a small pre-norm transformer built here (no downloads): token embedding, one block
with hand-written attention (q/k/v/out ``Linear``), one block with ``nn.MultiheadAttention`` (whose
``out_proj`` is a ``Linear`` subclass GmP registers, while its packed ``in_proj_weight`` stays
Cartesian), GELU MLPs, LayerNorms, a classifier head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import georeparam
from georeparam.optim import GeometricOptimizer, param_groups
from conftest import seeded

D, HEADS, HIDDEN, VOCAB, SEQ, CLASSES = 32, 4, 64, 50, 12, 5


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class TorchAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), attention
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(SEQ, D) * 0.02)
        self.blocks = nn.Sequential(Block(SelfAttention(D, HEADS)), Block(TorchAttention(D, HEADS)))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, tokens):
        return self.head(self.ln(self.blocks(self.embed(tokens) + self.pos)).mean(dim=1))


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (32, SEQ), generator=g)
    labels = tokens[:, :3].sum(dim=1) % CLASSES
    return tokens, labels


def _train(model, opt, steps: int, seed: int) -> None:
    tokens, labels = _data(seed)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _outputs(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_pretrained_workflow_end_to_end(tmp_path):
    probe = _data(99)[0]
    # 0. a "pretrained" plain model and its plain checkpoint (a file, loaded weights_only)
    with seeded(0):
        pretrained = TinyTransformer()
    _train(pretrained, torch.optim.Adam(pretrained.parameters(), lr=3e-3), steps=5, seed=0)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    plain_keys = sorted(pretrained.state_dict())
    y_pretrained = _outputs(pretrained, probe)

    # 1. a new model (different initial values), registered, then the plain checkpoint loaded
    with seeded(1):
        model = TinyTransformer()
    names = georeparam.register(model, exclude=["head"])
    assert "blocks.1.attn.mha.out_proj" in names and "blocks.0.attn.qkv" in names and "head" not in names
    assert len(names) == 8 and "blocks.1.attn.mha" in names  # in_proj_weight too (layouts: MultiheadAttention)
    model.load_state_dict(torch.load(tmp_path / "pretrained.pt"))  # strict: the hook converts w, b
    model.eval()
    sd = model.state_dict()
    assert "blocks.0.mlp.0.parametrizations.weight.original1" in sd and "blocks.0.mlp.0.weight" not in sd
    # 2. outputs unchanged (float32 registration error ~1e-7 relative per weight)
    torch.testing.assert_close(_outputs(model, probe), y_pretrained, rtol=1e-5, atol=1e-5)
    w_pre = pretrained.blocks[0].mlp[0].weight
    torch.testing.assert_close(model.blocks[0].mlp[0].weight, w_pre, rtol=1e-6, atol=1e-7)

    # 3. fine-tune with per-kind groups (angles at a larger rate, the Cartesian rest smaller)
    groups = param_groups(model, lr=3e-3, angle_lr=1e-2, other={"lr": 1e-3})
    assert [g["name"] for g in groups] == ["angles", "radius", "offset", "other"]
    angles_before = georeparam.geometry(model.blocks[0].mlp[0]).angles.detach().clone()
    opt = GeometricOptimizer(torch.optim.Adam(groups), model)
    _train(model, opt, steps=5, seed=1)
    assert not torch.equal(georeparam.geometry(model.blocks[0].mlp[0]).angles, angles_before)
    y_finetuned = _outputs(model, probe)
    assert (y_finetuned - y_pretrained).abs().max() > 1e-3  # fine-tuning changed the function

    # 4. remove: plain layers again, outputs unchanged (the weights are baked as computed)
    georeparam.remove(model)
    assert not any(georeparam.is_geometric(m) for m in model.modules())
    assert type(model.blocks[1].attn.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(_outputs(model, probe), y_finetuned, rtol=0, atol=0)
    finetuned = model.state_dict()
    assert sorted(finetuned) == plain_keys
    torch.save(finetuned, tmp_path / "finetuned.pt")

    # 5. the plain checkpoint loads into the plain class and reproduces the fine-tuned outputs
    with seeded(2):
        plain = TinyTransformer()
    plain.load_state_dict(torch.load(tmp_path / "finetuned.pt"))
    plain.eval()
    torch.testing.assert_close(_outputs(plain, probe), y_finetuned, rtol=0, atol=0)


def test_loading_a_mismatched_plain_checkpoint_fails_loudly():
    """A wrong-shaped plain weight is reported, not silently converted."""
    with seeded(0):
        model = TinyTransformer()
    georeparam.register(model, exclude=["head"])
    with seeded(0):
        other = TinyTransformer()
    sd = other.state_dict()
    sd["blocks.0.mlp.0.weight"] = torch.randn(HIDDEN + 1, D)
    sd["blocks.0.mlp.0.bias"] = torch.randn(HIDDEN + 1)
    with pytest.raises(RuntimeError, match="size mismatch for blocks.0.mlp.0.weight"):
        model.load_state_dict(sd)


def test_docs_pretrained_snippet_runs():
    """docs/pretrained.md's code block, executed as written."""
    import re

    from conftest import REPO_ROOT

    text = (REPO_ROOT / "docs" / "pretrained.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/pretrained.md", "exec"), {"__name__": "docs_pretrained"})
