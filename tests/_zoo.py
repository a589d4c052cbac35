"""The models the paper-form invariant is tested over (tests/test_paper_zoo.py), tiny and float64.

Each entry of :data:`ZOO` is ``name → (build, example input)``: the six patterns of issue 19's
table, conv → BN → ReLU, a residual block with and without norm, look-alikes of torchvision's
resnet18 / vgg11 (tests/_torchvision_like.py), mobilenet_v3_small and convnext_tiny (same module
structure at toy width; torchvision is not a dependency), and Hugging Face GPT-2 / Llama / BERT
at tiny configs.

``python tests/_zoo.py`` prints, per model, how many layers ``register`` puts in the paper's form,
the weight form, and skips (run with ``PYTHONPATH=<a checkout>`` to count another version).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _torchvision_like import BasicBlock, ResNet18, vgg11  # noqa: E402


# -- issue 19's six patterns ----------------------------------------------------------------------
class ViewFn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x).view(-1, 2, 4)).reshape(-1, 8))


class UnsqueezeTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.fc1(x).unsqueeze(1).transpose(1, 2).relu().squeeze(-1))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(F.relu(2.0 * self.fc1(x)))


class GLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(4, 1)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, -1)
        return self.fc2(F.relu(a) * b)


class ViewModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x).view(-1, 8)))


class Clamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.fc1(x).clamp(min=0))


class ChunkModules(nn.Module):
    """chunk along the unit axis, each half to its own ReLU module (each part followed on its own)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.a1, self.a2, self.fc2 = nn.Linear(3, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 1)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, -1)
        return self.fc2(torch.cat([self.a1(a), self.a2(b) * 0.5], -1))


# -- convolutional ----------------------------------------------------------------------------------
def conv_bn_relu():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))


class PlainResidual(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(c, 1)

    def forward(self, x):
        out = self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)
        return self.head(out.mean((2, 3)))


class NormResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = BasicBlock(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.block(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.activation = nn.Conv2d(c, squeeze, 1), nn.ReLU()
        self.fc2, self.scale_activation = nn.Conv2d(squeeze, c, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand, se: bool):
        super().__init__()
        layers = [nn.Conv2d(c, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU()]
        layers += [
            nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False),
            nn.BatchNorm2d(expand),
            nn.ReLU(),
        ]
        if se:
            layers.append(SqueezeExcite(expand, 8))
        layers += [nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


class MobileNetV3Small(nn.Module):
    """torchvision's mobilenet_v3_small module structure (stem, inverted residuals with SE, head) at toy width."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()),
            InvertedResidual(16, 16, se=True), InvertedResidual(16, 24, se=False),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXtTiny(nn.Module):
    """torchvision's convnext_tiny module structure (patchify stem, CNBlocks, downsample, head) at toy width."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8)), CNBlock(8),
            nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 16, 2, 2)), CNBlock(16),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(16), nn.Flatten(1), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# -- Hugging Face, tiny configs ---------------------------------------------------------------------
class HF(nn.Module):
    """A Hugging Face model called on token ids, returning its last hidden state or logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, tie_word_embeddings=True)
    return HF(GPT2LMHeadModel(cfg))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, max_position_embeddings=16)  # fmt: skip
    return HF(LlamaForCausalLM(cfg))


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=40,
                     max_position_embeddings=16)  # fmt: skip
    return HF(BertModel(cfg))


def _ids(*shape):
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(0))


ZOO = {
    "view_fn": (ViewFn, (5, 3)),
    "unsqueeze_transpose": (UnsqueezeTranspose, (5, 3)),
    "scaled": (Scaled, (5, 3)),
    "glu": (GLU, (5, 3)),
    "view_module": (ViewModule, (5, 3)),
    "clamp": (Clamp, (5, 3)),
    "chunk_modules": (ChunkModules, (5, 3)),
    "conv_bn_relu": (conv_bn_relu, (3, 2, 6, 6)),
    "residual_plain": (PlainResidual, (2, 4, 5, 5)),
    "residual_norm": (NormResidual, (2, 4, 5, 5)),
    "resnet18": (lambda: ResNet18(width=4), (2, 3, 32, 32)),
    "mobilenet_v3_small": (MobileNetV3Small, (2, 3, 16, 16)),
    "vgg11": (lambda: vgg11(width=4), (2, 3, 32, 32)),
    "convnext_tiny": (ConvNeXtTiny, (2, 3, 32, 32)),
    "gpt2": (gpt2, "ids"),
    "llama": (llama, "ids"),
    "bert": (bert, "ids"),
}


def make(name: str, seed: int = 0):
    """``(model in float64 eval mode, example input)``."""
    build, shape = ZOO[name]
    torch.manual_seed(seed)
    model = build().double().eval()
    x = (
        _ids(2, 6)
        if shape == "ids"
        else torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    )
    return model, x


if __name__ == "__main__":
    import warnings

    import georeparam

    warnings.simplefilter("ignore")
    print(f"{'model':20s} paper weight skipped")
    for name in ZOO:
        model, _ = make(name)
        report = georeparam.register(model)
        forms = [e.form for e in report.layers]
        print(f"{name:20s} {forms.count('paper'):5d} {forms.count('weight'):6d} {forms.count(None):7d}")
