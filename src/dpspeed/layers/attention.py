"""nn.MultiheadAttention without replaying it per example: while a training pass is recorded it
runs its attention from its own parameters (the masks, dropout, weights and options torch's
forward takes), with its four projections as Linear products of their own:

    q, k, v:  inputs query, key, value -> rows 0, E, 2E of in_proj_weight/in_proj_bias (or the
              separate q/k/v_proj_weight when kdim or vdim differ from embed_dim)
    output:   the attended values -> out_proj.weight/out_proj.bias

so ghost norms and book-keeping apply (`products.py`). add_bias_kv and add_zero_attn go to the
fallback, which replays the module one example at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.records import Call
from .products import LinearProducts, Product, requiring_grad

Fills = dict[str, tuple[str, int]]  # "weight"/"bias" -> (the parameter, its first row filled)


def _fills(weight: str, bias: str | None, row: int, weight_row: int | None = None) -> Fills:
    fills = {"weight": (weight, row if weight_row is None else weight_row)}
    if bias is not None:
        fills["bias"] = (bias, row)
    return fills


def _projections(module: nn.MultiheadAttention, query, key, value, project):
    """q, k, v (B, T, E) from batch-first inputs; `project(x, weight, bias, fills)` is one product."""
    e = module.embed_dim
    bias = module.in_proj_bias
    b = (lambda i: None) if bias is None else (lambda i: bias[i * e : (i + 1) * e])
    bias_name = None if bias is None else "in_proj_bias"
    if not module._qkv_same_embed_dim:
        return [project(x, getattr(module, f"{kind}_proj_weight"), b(i), _fills(f"{kind}_proj_weight", bias_name, i * e, 0))
                for i, (kind, x) in enumerate(zip("qkv", (query, key, value)))]
    w = module.in_proj_weight
    if query is key and key is value:
        return project(query, w, bias, _fills("in_proj_weight", bias_name, 0)).chunk(3, -1)
    return [project(x, w[i * e : (i + 1) * e], b(i), _fills("in_proj_weight", bias_name, i * e))
            for i, x in enumerate((query, key, value))]


def _mask(module: nn.MultiheadAttention, attn_mask, key_padding_mask, batch: int, dtype: torch.dtype):
    """The additive mask, (1 or B*heads, L, S) as torch's forward merges it, or None."""
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=dtype, check_other=False)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if key_padding_mask is not None:
        heads, source = module.num_heads, key_padding_mask.shape[-1]
        padding = key_padding_mask.view(batch, 1, 1, source).expand(-1, heads, -1, -1).reshape(batch * heads, 1, source)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    return attn_mask


def attention_forward(module: nn.MultiheadAttention, project, query, key, value, key_padding_mask=None,
                      need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                      is_causal: bool = False):
    """module(query, key, value, ...) with every projection made by `project`."""
    if query.dim() != 3:
        raise ValueError(f"MultiheadAttention got an unbatched query of shape {tuple(query.shape)}: "
                         "DP training needs a batch dimension")
    if is_causal and attn_mask is None:
        raise RuntimeError("need attn_mask if specifying the is_causal hint")
    if not module.batch_first:  # transposed, the same objects staying the same (self-attention)
        q_first = query.transpose(0, 1)
        k_first = q_first if key is query else key.transpose(0, 1)
        value = k_first if value is key else (q_first if value is query else value.transpose(0, 1))
        query, key = q_first, k_first
    batch, target, _ = query.shape
    heads, sdp_causal = module.num_heads, is_causal and key_padding_mask is None and not need_weights
    mask = None if sdp_causal else _mask(module, attn_mask, key_padding_mask, batch, query.dtype)
    if mask is not None and mask.shape[0] > 1:
        mask = mask.view(batch, heads, *mask.shape[1:])
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in _projections(module, query, key, value, project))
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        weights = torch.softmax(scores if mask is None else scores + mask, -1)
        if dropout > 0:
            weights = F.dropout(weights, dropout)
        attended = weights @ v
        weights = weights.mean(1) if average_attn_weights else weights
    else:
        attended = F.scaled_dot_product_attention(q, k, v, mask, dropout, sdp_causal)
    attended = attended.transpose(1, 2).reshape(batch, target, -1)
    out = project(attended, module.out_proj.weight, module.out_proj.bias,
                  _fills("out_proj.weight", None if module.out_proj.bias is None else "out_proj.bias", 0))
    return (out if module.batch_first else out.transpose(0, 1)), weights


class AttentionRule(LinearProducts):
    records_inside = True
    params = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
              "out_proj.weight", "out_proj.bias")

    def covers(self, module: nn.MultiheadAttention) -> bool:
        return module.bias_k is None and not module.add_zero_attn

    def record_forward(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict, tap) -> object:
        inputs, leaves, fills = [], [], []

        def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, where: Fills) -> torch.Tensor:
            y = requiring_grad(F.linear(x, weight, bias))
            inputs.append(x.detach())
            leaves.append(y)
            fills.append(where)
            return y

        output = attention_forward(module, project, *args, **kwargs)
        tap(tuple(inputs), leaves, {"fills": fills})
        return output

    def products(self, module: nn.MultiheadAttention, call: Call) -> list[Product]:
        return [Product(Call((x,), {}, [g]), where)
                for x, g, where in zip(call.args, call.grads_or_zeros(), call.kwargs["fills"])]
