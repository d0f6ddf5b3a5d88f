"""nn.Embedding: the gradient of row v is the sum of output gradients at positions holding token v."""

from __future__ import annotations

import torch
from torch import nn

from ..capture.records import Call
from ._gram import gram
from .precision import acc_dtype, accumulation_roundoff, gram_error, product_roundoff, to_acc
from .rule import LayerRule


def _operands(module: nn.Embedding, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and output gradients (B, T, D), with padding positions zeroed."""
    ids = call.input()
    g = call.grad()
    ids = ids.reshape(ids.shape[0], -1)
    g = g.reshape(ids.shape[0], -1, g.shape[-1])
    if module.padding_idx is not None:
        g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return ids, g


class EmbeddingRule(LayerRule):
    ghost = True

    def validate(self, module: nn.Embedding) -> None:
        if module.sparse or module.scale_grad_by_freq:
            raise ValueError("nn.Embedding with sparse=True or scale_grad_by_freq=True is not supported")

    def per_sample_grads(self, module: nn.Embedding, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        ids, g = _operands(module, call)
        batch, vocab, dim = ids.shape[0], module.num_embeddings, g.shape[-1]
        rows = (ids + vocab * torch.arange(batch, device=ids.device).unsqueeze(1)).reshape(-1)
        out = torch.zeros(batch * vocab, dim, dtype=g.dtype, device=g.device)
        out.index_add_(0, rows, g.reshape(-1, dim))
        return {"weight": out.reshape(batch, vocab, dim)}

    def ghost_sq_norms(self, module: nn.Embedding, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """sum_v ||sum_{t: token v} g_t||^2 from the float32 Gram of the output gradients, raised by
        gram_error · (sum_t ||g_t||)^2 for its rounding."""
        ids, g = _operands(module, call)
        same_token = ids.unsqueeze(2) == ids.unsqueeze(1)
        grams = gram(g)[:, : ids.shape[1], : ids.shape[1]]
        m = torch.diagonal(grams, dim1=1, dim2=2).sqrt().sum(1)  # sum_t ||g_t||
        return {"weight": (grams * same_token).sum((1, 2)).clamp(min=0) + gram_error(grams.dtype) * m.square()}

    def sum_rounding(self, module: nn.Embedding, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """The clipped sum scales each g_t by its factor in float32 and adds up the positions of a
        token (at most T): (product_roundoff + T · accumulation roundoff) · sum_t ||g_t||."""
        ids, g = _operands(module, call)
        norms = torch.linalg.vector_norm(g, dim=-1, dtype=acc_dtype(g.dtype))
        rounding = product_roundoff(acc_dtype(g.dtype), g.device, matmul=False) + accumulation_roundoff(g.dtype, g.shape[1])
        return {"weight": rounding * norms.sum(1)}

    def clipped_sum(self, module: nn.Embedding, call: Call, names, factors) -> dict[str, torch.Tensor]:
        ids, g = _operands(module, call)
        g = to_acc(g) * factors["weight"].to(to_acc(g).dtype).view(-1, 1, 1)
        out = torch.zeros(module.num_embeddings, g.shape[-1], dtype=g.dtype, device=g.device)
        out.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
        return {"weight": out}

    def costs(self, module: nn.Embedding, call: Call) -> tuple[float, float]:
        tokens = call.input()[0].numel() if call.input().shape[0] else 1
        return 2.0 * tokens**2 * module.embedding_dim, float(module.num_embeddings * module.embedding_dim)
