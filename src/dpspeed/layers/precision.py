"""The precision policy of every layer rule, in one place.

- Per-example norms and clipped sums are products of a layer's input and output gradient in the
  dtype the layer computed in (its output gradient's): under bf16 autocast they run on the tensor
  cores with float32 accumulation inside, like the layer's own weight gradient would.
- Everything that leaves a rule (squared norms, clipped sums) is in float32, or float64 for
  float64 models; clipping factors are computed in float32.
- A factor cast to a 16-bit dtype is first shrunk by half an epsilon, so rounding never makes a
  clipped gradient larger than the threshold allows.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
_told_reduced_precision = False


def compute_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation and output gradient in the dtype the layer computed in, the output gradient's:
    under bf16 autocast a float32 input is cast down as the forward pass cast it, so the matrix
    products run on the tensor cores, like the weight gradients of non-private training."""
    global _told_reduced_precision
    if not _told_reduced_precision and torch.finfo(g.dtype).bits < 32:
        _told_reduced_precision = True
        logger.warning(
            "per-example norms and clipped sums are computed from %s products (float32 accumulation), as "
            "the layers' own gradients are: their rounding (about %.1g relative) can let a clipped "
            "gradient exceed max_grad_norm by that fraction; train in float32 or TF32 for norms at "
            "float32 precision", g.dtype, torch.finfo(g.dtype).eps / 2)
    return (a if a.dtype == g.dtype else a.to(g.dtype)), g


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """The tensor in its accumulation dtype."""
    return t.to(acc_dtype(t.dtype))


def factors_in(dtype: torch.dtype, factors: torch.Tensor) -> torch.Tensor:
    """Clipping factors cast to `dtype`, shrunk by half its machine epsilon first: rounding to the
    nearest value of `dtype` then never enlarges a clipped gradient beyond the threshold. Factors
    below the smallest normal value (where rounding is coarser) become 0."""
    if dtype == factors.dtype:
        return factors
    info = torch.finfo(dtype)
    shrunk = torch.where(factors < info.tiny, 0.0, factors * (1 - info.eps / 2))
    return shrunk.to(dtype)


def weighted_sum(factors: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] * per_sample[i]: one matrix product in the per-sample dtype (float32
    accumulation inside it), returned in float32 or better."""
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return to_acc(factors_in(per_sample.dtype, factors) @ flat).view(per_sample.shape[1:])
