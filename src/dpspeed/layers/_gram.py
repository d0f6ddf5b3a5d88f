"""The two products every matrix-multiply layer shares: the ghost norm from Gram matrices and the
book-keeping clipped sum, for activations a (B, T, d) and output gradients g (B, T, p)."""

from __future__ import annotations

import torch

from ..capture.records import Call
from ..kernels import ghost_norm as fused
from .precision import (accumulated_bmm, accumulated_mm, book_keeping_roundoff, exact_float32_matmuls, factors_in,
                        gram_error, product_operand, to_acc)


def aligned_positions(t: torch.Tensor) -> torch.Tensor:
    """(B, T, k) with T padded by zero rows to a multiple of 8 on a GPU: a T x T Gram matrix with rows
    of 16 bytes' multiple runs on the fast tensor-core kernels (a ViT's T = 197 falls back to slow
    ones). Zero rows add nothing to a Gram inner product. On a CPU the copy and the larger product
    only cost (ViT-tiny at 64x64: T = 17 would become 24), so t is returned as it is."""
    pad = -t.shape[1] % 8 if t.is_cuda else 0
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


def gram(x: torch.Tensor) -> torch.Tensor:
    """x_i x_i^T for x (B, T, k), in float32 (float64 for float64): 16-bit operands multiply
    exactly into float32 on the tensor cores; float32 ones without TF32."""
    x = product_operand(aligned_positions(x))
    with exact_float32_matmuls():
        return accumulated_bmm(x, x.transpose(1, 2))


def _grams(a: torch.Tensor, g: torch.Tensor, shared: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_i a_i^T, g_i g_i^T); `shared` keeps a_i a_i^T for the other layers fed by the same input
    (q, k, v)."""
    key = ("gram", a.dtype)  # layers on one input may compute in different dtypes (autocast off for one)
    gram_a = shared.get(key) if shared is not None else None
    if gram_a is None:
        gram_a = gram(a)
        if shared is not None:
            shared[key] = gram_a
    return gram_a, gram(g)


def _inner_and_diagonals(a: torch.Tensor, g: torch.Tensor, shared: dict | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(<a_i a_i^T, g_i g_i^T> (B,), the diagonals of the two Grams (B, T) each), from Gram
    matrices in float32 (float64 for float64)."""
    gram_a, gram_g = _grams(a, g, shared)
    batch = gram_g.shape[0]
    with exact_float32_matmuls():  # one batched dot product of the flattened Grams
        inner = torch.bmm(gram_a.view(batch, 1, -1), gram_g.view(batch, -1, 1)).view(batch)
    return inner, torch.diagonal(gram_a, dim1=1, dim2=2), torch.diagonal(gram_g, dim1=1, dim2=2)


def _single_position(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    product = to_acc(a).square().sum((1, 2)) * to_acc(g).square().sum((1, 2))
    return product, product.sqrt()


def ghost_sq_norms_and_spreads(layers: list[tuple[torch.Tensor, torch.Tensor, dict | None]], bounds: bool = False
                               ) -> list[tuple[torch.Tensor, ...]]:
    """(||a_i^T g_i||_F^2, M_i) for each layer's a (B, T, d), g (B, T, p) (and `shared`, as in
    `_grams`), with `bounds` also the rounding bound of the layer's book-keeping sum,
    `book_keeping_roundoff` · M_i (one product for all layers taken together). The squared norm
    is <a_i a_i^T, g_i g_i^T> from Gram matrices in float32 (16-bit operands multiply exactly
    into float32 on the tensor cores), raised by gram_error · M^2 for their rounding (precision.py); M = sum_t ||a_t||·||g_t|| comes from the Grams' diagonals, and
    is what a book-keeping sum's rounding scales with (`spread`). Layers alike in batch,
    positions and dtype are taken together: with DPSPEED_FUSED_GHOST_NORM=1 on a GPU with Triton,
    in one launch of the fused kernel without any T x T matrix in memory (kernels/ghost_norm.py);
    otherwise their spreads and allowances at once."""
    results: list = [None] * len(layers)
    alike: dict[tuple, list[int]] = {}
    for i, (a, g, _) in enumerate(layers):
        if a.shape[1] == 1:
            raised, m = _single_position(a, g)
            results[i] = (raised, m, m * book_keeping_roundoff(g.dtype, g.device, 1)) if bounds else (raised, m)
        else:
            alike.setdefault((tuple(a.shape[:2]), a.dtype, g.dtype, fused.available(a, g)), []).append(i)
    for (_, _, dtype, kernel), members in alike.items():
        if kernel:
            inner, m = fused.ghost_sq_norms_and_spreads([layers[i][:2] for i in members])
            error = gram_error(torch.float32)
        else:
            inners, diagonals_a, diagonals_g = zip(*(_inner_and_diagonals(*layers[i]) for i in members))
            inner, diagonal_a, diagonal_g = (torch.stack(parts) if len(parts) > 1 else parts[0][None]
                                              for parts in (inners, diagonals_a, diagonals_g))
            m, error = (diagonal_a * diagonal_g).sqrt().sum(-1), gram_error(inner.dtype)
        raised = torch.addcmul(inner.clamp(min=0), m, m, value=error)
        a, g, _ = layers[members[0]]  # alike: one rounding per unit of spread for all of them
        bound = m * book_keeping_roundoff(g.dtype, g.device, a.shape[1]) if bounds else None
        for row, i in enumerate(members):
            results[i] = (raised[row], m[row], bound[row]) if bounds else (raised[row], m[row])
    return results


#: a call's cache key for its weight's (squared ghost norm, spread), computed with other layers'
GRAM_NORM = "gram norm"


def keep_gram_norms(layers: list[tuple[Call, torch.Tensor, torch.Tensor]]) -> None:
    """`ghost_sq_norms_and_spreads` of every (call, a, g) at once, each kept in its call's cache
    under GRAM_NORM for its rule's `ghost_sq_norms` and `sum_rounding` (`LayerRule.gram_operands`)."""
    norms = ghost_sq_norms_and_spreads([(a, g, call.shared) for call, a, g in layers], bounds=True)
    for (call, _, _), norm in zip(layers, norms):
        call.cache[GRAM_NORM] = norm


def ghost_sq_norm_and_spread(a: torch.Tensor, g: torch.Tensor,
                             shared: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ghost_sq_norms_and_spreads` of one layer."""
    return ghost_sq_norms_and_spreads([(a, g, shared)])[0]


def ghost_sq_norm(a: torch.Tensor, g: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
    """||a_i^T g_i||_F^2, raised for the Grams' rounding, as `ghost_sq_norm_and_spread`."""
    return ghost_sq_norm_and_spread(a, g, shared)[0]


def spread(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """M_i = sum_t ||a_t||·||g_t|| for a (B, T, d), g (B, T, p), in float32: what rounding in a
    product of the two can move, per unit of roundoff (precision.py)."""
    norms_a = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32 if a.dtype != torch.float64 else None)
    norms_g = torch.linalg.vector_norm(g, dim=-1, dtype=torch.float32 if g.dtype != torch.float64 else None)
    return (norms_a * norms_g).sum(1)


def clipped_matmul(a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] * g_i^T a_i for a (B, T, d), g (B, T, p): one (p, BT) x (BT, d) product,
    the factors folded into the smaller of the two operands."""
    column = factors_in(g.dtype, factors).view(-1, 1, 1)
    if a.shape[-1] < g.shape[-1]:
        a = a * column
    else:
        g = g * column
    return accumulated_mm(g.reshape(-1, g.shape[-1]).t(), a.reshape(-1, a.shape[-1]))
