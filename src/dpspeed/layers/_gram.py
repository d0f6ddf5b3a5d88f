"""The two products every matrix-multiply layer shares: the ghost norm from Gram matrices and the
book-keeping clipped sum, for activations a (B, T, d) and output gradients g (B, T, p)."""

from __future__ import annotations

import torch

from .precision import factors_in, to_acc


def aligned_positions(t: torch.Tensor) -> torch.Tensor:
    """(B, T, k) with T padded by zero rows to a multiple of 8: a T x T Gram matrix with rows of 16
    bytes' multiple runs on the fast tensor-core kernels (a ViT's T = 197 falls back to slow ones).
    Zero rows add nothing to a Gram inner product."""
    pad = -t.shape[1] % 8
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


def ghost_sq_norm(a: torch.Tensor, g: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
    """||a_i^T g_i||_F^2 = <a_i a_i^T, g_i g_i^T> for a (B, T, d), g (B, T, p): Gram matrices and
    their inner product as matrix products in the operands' dtype (float32 accumulation inside),
    returned in float32. `shared` keeps a_i a_i^T for the other layers fed by the same input (q, k,
    v projections)."""
    if a.shape[1] == 1:
        return to_acc(a).square().sum((1, 2)) * to_acc(g).square().sum((1, 2))
    key = ("gram", a.dtype)
    gram_a = shared.get(key) if shared is not None else None
    if gram_a is None:
        a = aligned_positions(a)
        gram_a = torch.bmm(a, a.transpose(1, 2)).flatten(1)
        if shared is not None:
            shared[key] = gram_a
    g = aligned_positions(g)
    gram_g = torch.bmm(g, g.transpose(1, 2)).flatten(1)
    return to_acc(torch.bmm(gram_a.unsqueeze(1), gram_g.unsqueeze(2)).flatten())


def clipped_matmul(a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] * g_i^T a_i for a (B, T, d), g (B, T, p): one (p, BT) x (BT, d) product,
    the factors folded into the smaller of the two operands."""
    column = factors_in(g.dtype, factors).view(-1, 1, 1)
    if a.shape[-1] < g.shape[-1]:
        a = a * column
    else:
        g = g * column
    return to_acc(torch.mm(g.reshape(-1, g.shape[-1]).t(), a.reshape(-1, a.shape[-1])))
