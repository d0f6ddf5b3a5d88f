"""Small models for the exactness tests, each with the data and loss it is trained on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    name: str
    model: nn.Module
    tensors: tuple[torch.Tensor, ...]
    loss: Callable[[nn.Module, tuple, str], torch.Tensor]  # (model, batch, reduction) -> loss
    forward: Callable | None = None  # (model, inputs) -> logits, where not model(inputs)


def on_device(case: Case, device: torch.device) -> Case:
    """The case with its model and tensors moved to `device`."""
    case.model.to(device)
    case.tensors = tuple(t.to(device) for t in case.tensors)
    return case


def classify(model: nn.Module, batch: tuple, reduction: str) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction=reduction)


def language_model(model: nn.Module, batch: tuple, reduction: str) -> torch.Tensor:
    logits = model(batch[0])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[0].roll(-1, 1).flatten(), reduction="none")
    loss = loss.view(batch[0].shape).mean(1)  # each example's own loss: mean over its tokens
    return loss.mean() if reduction == "mean" else loss.sum()


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, norm: type, causal: bool = False, layer_scale: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).reshape(b, t, d)
        x = x + self.ls1(self.proj(att))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """cls_token and pos_embed as bare parameters of the root, LayerScale in the blocks."""

    def __init__(self, dim: int = 8, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.2)
        self.blocks = nn.Sequential(Block(dim, 2, nn.LayerNorm, layer_scale=True), Block(dim, 2, nn.LayerNorm))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyLM(nn.Module):
    """Input and output embeddings tied, RMSNorm, causal attention."""

    def __init__(self, vocab: int = 13, dim: int = 8, length: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.Sequential(Block(dim, 2, nn.RMSNorm, causal=True))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.norm(self.blocks(x)))


def cnn() -> nn.Module:
    """Depthwise and grouped convolutions, GroupNorm, 'same' padding, dilation, stride."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="same"), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(8, 8, 3, groups=2, dilation=2, padding=2), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.LayerNorm(10), nn.Linear(10, 3))


class Twice(nn.Module):
    """One Linear applied twice in a forward pass (a shared block, weights tied across steps)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def images(n: int, size: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, size, size), torch.randint(0, classes, (n,))


def small_cases(n: int = 6) -> dict[str, Callable[[], Case]]:
    return {
        "mlp": lambda: Case("mlp", mlp(), (torch.randn(n, 6), torch.randint(0, 3, (n,))), classify),
        "cnn": lambda: Case("cnn", cnn(), images(n, 8), classify),
        "vit": lambda: Case("vit", SmallViT(), images(n, 8), classify),
        "lm": lambda: Case("lm", TinyLM(), (torch.randint(0, 13, (n, 6)),), language_model),
        "twice": lambda: Case("twice", Twice(), (torch.randn(n, 6), torch.randint(0, 3, (n,))), classify),
    }


def timm_cases(n: int = 4) -> dict[str, Callable[[], Case]]:
    import timm

    def vit_tiny():
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, init_values=0.1)
        return Case("timm_vit_tiny", model, images(n, 32), classify)

    def bit():
        """resnetv2_50x1_bit's architecture (StdConv2d, GroupNormAct, fixed stem), scaled down."""
        from timm.models.resnetv2 import ResNetV2

        model = ResNetV2(
            layers=[1, 1, 1, 1], channels=(32, 32, 32, 32), stem_chs=16, num_classes=3, stem_type="fixed",
            conv_layer=partial(timm.layers.StdConv2d, eps=1e-8),
            norm_layer=partial(timm.layers.GroupNormAct, num_groups=4),
        )
        return Case("timm_bit", model, images(n, 32), classify)

    def convnext():
        return Case("timm_convnext_atto", timm.create_model("convnext_atto", num_classes=3), images(n, 32), classify)

    return {"timm_vit_tiny": vit_tiny, "timm_bit": bit, "timm_convnext_atto": convnext}


def hf_cases(n: int = 4) -> dict[str, Callable[[], Case]]:
    import transformers

    def gpt2():
        config = transformers.GPT2Config(
            vocab_size=23, n_positions=8, n_embd=16, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config)

        def loss(m, batch, reduction):
            logits = m(input_ids=batch[0]).logits
            per_token = F.cross_entropy(logits.flatten(0, 1), batch[0].roll(-1, 1).flatten(), reduction="none")
            per_example = per_token.view(batch[0].shape).mean(1)
            return per_example.mean() if reduction == "mean" else per_example.sum()

        return Case("hf_gpt2", model, (torch.randint(0, 23, (n, 7)),), loss)

    def bert():
        config = transformers.BertConfig(
            vocab_size=23, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        )
        model = transformers.BertForSequenceClassification(config)

        def loss(m, batch, reduction):
            return F.cross_entropy(m(input_ids=batch[0]).logits, batch[1], reduction=reduction)

        return Case("hf_bert", model, (torch.randint(0, 23, (n, 7)), torch.randint(0, 3, (n,))), loss,
                    forward=lambda m, ids: m(input_ids=ids).logits)

    return {"hf_gpt2": gpt2, "hf_bert": bert}
