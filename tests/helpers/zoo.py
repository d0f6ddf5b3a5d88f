"""A broad sample of real architectures, each built from its library's config with random weights
(nothing downloaded), scaled down to run on a CPU in float64: the model, a few examples of data
and each example's loss."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dpspeed

N = 3  # examples per check


@dataclass
class Entry:
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor | None
    loss_fn: Callable | None = None  # (outputs, targets) -> (B,); None: cross-entropy


def _images(size: int = 32, channels: int = 3) -> tuple[torch.Tensor, ...]:
    return (torch.randn(N, channels, size, size),)


def _labels(classes: int = 3) -> torch.Tensor:
    return torch.randint(0, classes, (N,))


def _tokens(vocab: int = 29, length: int = 7) -> torch.Tensor:
    return torch.randint(1, vocab, (N, length))


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth off (the reference and dpspeed would draw different masks)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if hasattr(m, "drop_prob"):  # timm's DropPath
            m.drop_prob = 0.0
    return model


def _logits(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs


def _classify(outputs, targets) -> torch.Tensor:
    return F.cross_entropy(_logits(outputs), targets, reduction="none")


def _next_token(outputs, tokens) -> torch.Tensor:
    """Each example's mean next-token loss (its own terms only)."""
    logits = _logits(outputs)[:, :-1]
    per_token = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return per_token.view(len(tokens), -1).mean(1)


# ----------------------------------------------------------------------------------------- timm
def _timm(name: str, fix: bool = False, **options) -> Entry:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=3, **options)
    if fix:
        dpspeed.fix_model(model)
    return Entry(_no_dropout(model), _images(options.get("img_size", 32)), _labels(), _classify)


def _bit() -> Entry:
    import timm
    from timm.models.resnetv2 import ResNetV2

    model = ResNetV2(layers=[1, 1, 1, 1], channels=(16, 16, 16, 16), stem_chs=8, num_classes=3, stem_type="fixed",
                     conv_layer=partial(timm.layers.StdConv2d, eps=1e-8),
                     norm_layer=partial(timm.layers.GroupNormAct, num_groups=4))
    return Entry(model, _images(), _labels(), _classify)


def _nf_resnet() -> Entry:
    from timm.models.nfnet import NfCfg, NormFreeNet

    cfg = NfCfg(depths=(1, 1, 1, 1), channels=(16, 16, 32, 32), stem_chs=8, bottle_ratio=0.25, group_size=None,
                act_layer="relu", attn_layer=None)
    return Entry(_no_dropout(NormFreeNet(cfg, num_classes=3)), _images(), _labels(), _classify)


def _mixer() -> Entry:
    from timm.models.mlp_mixer import MlpMixer

    model = MlpMixer(num_classes=3, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)
    return Entry(model, _images(), _labels(), _classify)


VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}
TIMM = {
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", **VIT),
    "timm_deit_distilled": lambda: _timm("deit_tiny_distilled_patch16_224", **VIT),
    "timm_swin": lambda: _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                               depths=(1, 1), num_heads=(1, 2)),
    "timm_convnext": lambda: _timm("convnext_atto"),
    "timm_efficientnet_fixed": lambda: _timm("efficientnet_b0", fix=True),
    "timm_nf_resnet": _nf_resnet,
    "timm_bit": _bit,
    "timm_mlp_mixer": _mixer,
}


# ---------------------------------------------------------------------------------- transformers
TEXT = {"vocab_size": 29, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 16}


def _hf_classifier(config_name: str, model_name: str, **options) -> Entry:
    import transformers

    config = getattr(transformers, config_name)(**{**TEXT, **options}, num_labels=3)
    model = getattr(transformers, model_name)(config)
    return Entry(_no_dropout(model), (_tokens(),), _labels(), _classify)


def _llama_tied() -> Entry:
    import transformers

    config = transformers.LlamaConfig(**TEXT, num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = _tokens()
    return Entry(model, (tokens,), tokens, _next_token)


def _gpt2() -> Entry:
    import transformers

    config = transformers.GPT2Config(vocab_size=29, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    tokens = _tokens()
    return Entry(_no_dropout(transformers.GPT2LMHeadModel(config)), (tokens,), tokens, _next_token)


class T5Classifier(nn.Module):
    """T5's encoder (relative position buckets, RMS-style norms, gated FF) and a mean-pooled head."""

    def __init__(self):
        super().__init__()
        import transformers

        config = transformers.T5Config(vocab_size=29, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                       feed_forward_proj="gated-gelu", dropout_rate=0.0)
        self.encoder = transformers.T5EncoderModel(config)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=tokens).last_hidden_state.mean(1))


def _distilbert() -> Entry:
    import transformers

    config = transformers.DistilBertConfig(vocab_size=29, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                           max_position_embeddings=16, num_labels=3)
    return Entry(_no_dropout(transformers.DistilBertForSequenceClassification(config)), (_tokens(),), _labels(),
                 _classify)


def _hf_vit() -> Entry:
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    return Entry(_no_dropout(transformers.ViTForImageClassification(config)), _images(), _labels(), _classify)


def _lora_bert() -> Entry:
    """peft's LoRA on BERT's attention: only the adapters and the head train."""
    import peft

    entry = _hf_classifier("BertConfig", "BertForSequenceClassification")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                             modules_to_save=["classifier"])
    model = peft.get_peft_model(entry.model, config)
    for m in model.modules():  # LoRA's B starts at zero: give the check gradients of every kind
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    return Entry(model, entry.inputs, entry.targets, _classify)


TRANSFORMERS = {
    "hf_bert": lambda: _hf_classifier("BertConfig", "BertForSequenceClassification"),
    "hf_roberta": lambda: _hf_classifier("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=0,
                                         max_position_embeddings=20),
    "hf_gpt2": _gpt2,
    "hf_llama_tied": _llama_tied,
    "hf_t5_encoder": lambda: Entry(T5Classifier(), (_tokens(),), _labels(), _classify),
    "hf_distilbert": _distilbert,
    "hf_vit": _hf_vit,
    "peft_lora_bert": _lora_bert,
}


# ----------------------------------------------------------------------------------- torchvision
def _resnet_fixed() -> Entry:
    from torchvision.models.resnet import BasicBlock, ResNet

    model = dpspeed.fix_model(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3))
    return Entry(model, _images(), _labels(), _classify)


def _mobilenet_fixed() -> Entry:
    from torchvision.models import mobilenet_v3_small

    return Entry(_no_dropout(dpspeed.fix_model(mobilenet_v3_small(num_classes=3))), _images(), _labels(), _classify)


TORCHVISION = {"torchvision_resnet_fixed": _resnet_fixed, "torchvision_mobilenet_fixed": _mobilenet_fixed}


# ------------------------------------------------------------------------------------------ text
class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type):
        super().__init__()
        self.embed = nn.Embedding(29, 8)
        self.rnn = cell(8, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


TEXT_RNN = {"lstm_classifier": lambda: Entry(RecurrentClassifier(nn.LSTM), (_tokens(),), _labels(), _classify),
            "gru_classifier": lambda: Entry(RecurrentClassifier(nn.GRU), (_tokens(),), _labels(), _classify)}

ZOO: dict[str, Callable[[], Entry]] = {**TIMM, **TRANSFORMERS, **TORCHVISION, **TEXT_RNN}
#: the library each entry needs
LIBRARY = {**{n: "timm" for n in TIMM}, **{n: "transformers" for n in TRANSFORMERS}, "peft_lora_bert": "peft",
           **{n: "torchvision" for n in TORCHVISION}}
