"""The ghost norm in one Triton kernel: ||a_i^T g_i||_F^2 = <a_i a_i^T, g_i g_i^T> for a (B, T, d)
and g (B, T, p), without a T x T matrix in memory, for all the layers of a pass that share B, T
and a dtype in one launch (each layer with its own d, p, strides and addresses, read from a
small table).

Each program owns one (BT x BT) tile pair (i <= j: the Gram matrices are symmetric, so only the
upper triangle is visited and off-diagonal pairs count twice) of one example of one layer. It accumulates its
tile of a_i a_i^T and of g_i g_i^T in float32 registers over d and p (16-bit operands multiply
exactly on the tensor cores), multiplies them element by element and adds the sum into the
example's result. Rows past T and columns past d or p are masked, not padded; any strides with
a unit last one. The diagonal tiles also give M = sum_t ||a_t||·||g_t||, the spread that the
precision policy's Gram allowance scales with (`layers/precision.py`): the caller raises the norm
by it exactly as on the torch path, so rounding can only over-estimate.

Checked on the CPU by Triton's interpreter (`TRITON_INTERPRET=1`) against a float64 one-example
reference in `tests/kernels/test_ghost_norm.py`.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # absent, or broken on this machine: the torch path is used instead
    triton = None

#: positions per tile side, and the chunk of features per loaded block
TILE, CHUNK = 64, 64


#: the training path uses the kernel only when asked, until a GPU run has measured it against the
#: torch path (benchmarks/ghost_norm_kernel.py)
ENABLE_VARIABLE = "DPSPEED_FUSED_GHOST_NORM"


def available(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the training path uses the kernel on these operands: asked for (DPSPEED_FUSED_GHOST_NORM=1),
    Triton present, a CUDA device (or Triton's interpreter standing in for one, TRITON_INTERPRET=1:
    the tests, and counting a GPU step's operations on a CPU), one 16-bit or float32 dtype for both."""
    device_ok = a.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (os.environ.get(ENABLE_VARIABLE) == "1" and triton is not None and device_ok and a.dtype == g.dtype
            and a.dtype in _DTYPES)


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if triton is not None:
    @triton.jit
    def _gram_tile(base, rows_i, rows_j, mask_i, mask_j, stride_t, width,
                   TILE: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr, FP32: tl.constexpr):
        """The (rows_i, rows_j) tile of x x^T for one example's x (T, width), in float32."""
        acc = tl.zeros((TILE, TILE), dtype=tl.float32)
        cols = tl.arange(0, CHUNK)
        for k in range(0, width, CHUNK):
            mask_k = (k + cols) < width
            xi = tl.load(base + rows_i[:, None] * stride_t + (k + cols)[None, :],
                         mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            xj = tl.load(base + rows_j[:, None] * stride_t + (k + cols)[None, :],
                         mask=mask_j[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:  # the interpreter has no 16-bit dot: float32 products of 16-bit values are exact
                xi = xi.to(tl.float32)
                xj = xj.to(tl.float32)
            if FP32:  # float32 operands without TF32, as the torch path multiplies them
                acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee")
            else:
                acc = tl.dot(xi, tl.trans(xj), acc)
        return acc

    @triton.jit
    def _ghost_norm_kernel(pairs, layers, norm_ptr, spread_ptr, T, B, DTYPE: tl.constexpr,
                           TILE: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr, FP32: tl.constexpr):
        pair = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        row = layers + layer * 8  # the layer's _FIELDS: addresses, widths and strides (_table)
        a_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
        d, p = tl.load(row + 2), tl.load(row + 3)
        a_sb, a_st, g_sb, g_st = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7)
        ti = tl.load(pairs + 2 * pair)
        tj = tl.load(pairs + 2 * pair + 1)
        rows_i = ti * TILE + tl.arange(0, TILE)
        rows_j = tj * TILE + tl.arange(0, TILE)
        mask_i = rows_i < T
        mask_j = rows_j < T
        gram_a = _gram_tile(a_ptr + b * a_sb, rows_i, rows_j, mask_i, mask_j, a_st, d, TILE, CHUNK, UPCAST, FP32)
        gram_g = _gram_tile(g_ptr + b * g_sb, rows_i, rows_j, mask_i, mask_j, g_st, p, TILE, CHUNK, UPCAST, FP32)
        inner = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
        out = layer * B + b
        tl.atomic_add(norm_ptr + out, tl.where(ti == tj, inner, 2.0 * inner))
        if ti == tj:
            on_diagonal = rows_i[:, None] == rows_j[None, :]
            both = tl.sum(tl.where(on_diagonal, gram_a * gram_g, 0.0), axis=1)
            tl.atomic_add(spread_ptr + out, tl.sum(tl.sqrt(both), axis=0))

    _TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

#: the table's fields per layer: a's and g's addresses, d, p, a's batch and position strides, g's
_FIELDS = 8


@functools.lru_cache(maxsize=64)
def _tile_pairs(tiles: int, device: torch.device) -> torch.Tensor:
    """The (i, j) tile pairs with i <= j, as an int32 tensor on the device."""
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).flatten()


def _table(operands: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The kernel's table of layers (_FIELDS int64 each), on the device (through pinned memory on a GPU:
    the copy waits for nothing)."""
    rows = [[a.data_ptr(), g.data_ptr(), a.shape[2], g.shape[2], a.stride(0), a.stride(1), g.stride(0), g.stride(1)]
            for a, g in operands]
    table = torch.tensor(rows, dtype=torch.int64)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def ghost_sq_norms_and_spreads(operands: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(<a_i a_i^T, g_i g_i^T>, M_i = sum_t ||a_t||·||g_t||) of every layer's a (B, T, d) and g (B, T, p),
    both float32 (layers, B), in one launch: every a and g of one 16-bit or float32 dtype, with the
    same B and T. Float32 operands are multiplied without TF32."""
    operands = [(a if a.stride(-1) == 1 else a.contiguous(), g if g.stride(-1) == 1 else g.contiguous())
                for a, g in operands]  # alive until the launch has read them (the same stream)
    a0 = operands[0][0]
    batch, positions, dtype, device = a0.shape[0], a0.shape[1], a0.dtype, a0.device
    if any(a.shape[:2] != (batch, positions) or g.shape[:2] != (batch, positions) or {a.dtype, g.dtype} != {dtype}
           for a, g in operands):
        raise ValueError("one launch takes layers of one batch size, one number of positions and one dtype")
    norms = torch.zeros(len(operands), batch, dtype=torch.float32, device=device)
    spreads = torch.zeros_like(norms)
    if batch == 0 or positions == 0:
        return norms, spreads
    pairs = _tile_pairs(triton.cdiv(positions, TILE), device)
    _ghost_norm_kernel[(pairs.numel() // 2, batch, len(operands))](
        pairs, _table(operands, device), norms, spreads, positions, batch, DTYPE=_TRITON_DTYPES[dtype], TILE=TILE,
        CHUNK=CHUNK, UPCAST=device.type == "cpu" and dtype != torch.float32, FP32=dtype == torch.float32)
    return norms, spreads


def ghost_sq_norm_and_spread(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ghost_sq_norms_and_spreads` of one layer: both float32 (B,)."""
    norms, spreads = ghost_sq_norms_and_spreads([(a, g)])
    return norms[0], spreads[0]
