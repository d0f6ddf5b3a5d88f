"""The precision policy of every layer rule, in one place.

- Per-example norms and clipped sums are products of a layer's input and output gradient in the
  dtype the layer computed in (its output gradient's): under bf16 autocast they run on the tensor
  cores with float32 accumulation inside, like the layer's own weight gradient would.
- Everything that leaves a rule (squared norms, clipped sums) is in float32, or float64 for
  float64 models; clipping factors are computed in float32.
- A factor cast to a 16-bit dtype is first shrunk by half an epsilon, so rounding never makes a
  clipped gradient larger than the threshold allows.
- A norm bounds what book-keeping adds, not only the exact gradient's norm. The factor-scaled
  operand of a book-keeping product is rounded to the compute dtype, which can undo a
  cancellation the norm saw: an example whose per-position terms cancel has norm ~0 and factor 1,
  while its rounded terms do not cancel (7·R at inputs of 2^10 in bf16, 7·10^6·R at 2^30).
  Rounding each element of C·g_t moves the contribution by at most u·C·M, with
  M = sum_t ||a_t||·||g_t|| and u the operands' unit roundoff (`product_roundoff`), so the
  clipping raises such a norm by u·M (`LayerRule.sum_rounding`). A ghost norm, from float32 Gram
  products, is raised from sqrt(n^2) to sqrt(n^2 + e·M^2) (`gram_error`), for the rounding of the
  Grams' accumulation: nothing for a typical example, e^(1/2)·M for one that cancels. For typical
  examples M is about sqrt(T) times the norm: in bf16 the norm of a book-keeping layer grows by
  about 2^-8·sqrt(T) (5% at T = 197), in float32 by 2^-24·sqrt(T).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from typing import Iterator

import torch

from ..capture.records import Call

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
            "the layers' own gradients are; so that their rounding (%.1g relative) never lets an example add "
            "more than max_grad_norm, the norms of book-keeping layers are raised by a bound on it (about "
            "%.1g·sqrt(positions)), which takes a little signal from clipped examples",
            g.dtype, torch.finfo(g.dtype).eps / 2, torch.finfo(g.dtype).eps / 2)
    return (a if a.dtype == g.dtype else a.to(g.dtype)), g


def kept_in_compute_dtype(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_dtype` of the call's input and output gradient; the call keeps its input cast in place
    of the original, one cast shared by the calls on the same input tensor (q, k and v)."""
    x, g = call.input(), call.grad()
    key = ("input in", g.dtype)
    a, g = compute_dtype(call.shared.get(key, x), g)
    if a is not x:
        call.shared[key] = a
        call.args = (a, *call.args[1:])
    return a, g


def tf32_matmuls() -> bool:
    """Whether CUDA float32 matmuls run in TF32, set through either of torch's two switches."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # set through fp32_precision, which makes reading allow_tf32 an error
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


@contextlib.contextmanager
def exact_float32_matmuls() -> Iterator[None]:
    """CUDA float32 matmuls without TF32 inside (its 10-bit operands would blur a cancellation),
    through whichever switch is in use."""
    matmul = torch.backends.cuda.matmul
    try:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        restore = lambda: setattr(matmul, "allow_tf32", previous)  # noqa: E731
    except RuntimeError:
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        restore = lambda: setattr(matmul, "fp32_precision", previous)  # noqa: E731
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """Autocast off on every device type where it is on: the clipping products take their operands'
    dtypes, which their rounding bounds assume (a backward pass run inside the user's autocast
    would otherwise round float32 layers' products to 16 bits, past those bounds)."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def product_roundoff(dtype: torch.dtype, device: torch.device, matmul: bool = True) -> float:
    """The unit roundoff of a product's operands as they are multiplied: bf16 2^-8, fp16 2^-11,
    float32 2^-24 (2^-11 in CUDA matmuls with TF32 on), float64 2^-53."""
    if matmul and dtype == torch.float32 and device.type == "cuda" and tf32_matmuls():
        return 2.0**-11
    return torch.finfo(dtype).eps / 2


def accumulation_roundoff(dtype: torch.dtype, terms: int) -> float:
    """A bound on the relative rounding of a sum of `terms` products of one example accumulated in
    dtype's accumulation dtype: terms × its unit roundoff."""
    return terms * torch.finfo(acc_dtype(dtype)).eps / 2


def book_keeping_roundoff(dtype: torch.dtype, device: torch.device, positions: int) -> float:
    """Per unit of an example's spread sum_t ||a_t||·||g_t||, what rounding can add to its
    contribution in a book-keeping product of `dtype` operands, its factor-scaled operand rounded
    and its `positions` products accumulated: product_roundoff + positions · accumulation roundoff."""
    return product_roundoff(dtype, device) + accumulation_roundoff(dtype, positions)


def gram_error(dtype: torch.dtype) -> float:
    """The relative error allowed for a Gram product's accumulation, per unit of M^2: 2^-20 in
    float32 (16-bit and float32 operands; 16-bit ones multiply exactly), 2^-48 in float64. An
    allowance for accumulations of up to a few hundred terms, not a worst-case bound."""
    return 2.0**-48 if dtype == torch.float64 else 2.0**-20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """The tensor in its accumulation dtype."""
    return t.to(acc_dtype(t.dtype))


#: factors_in's results while their factor tensor lives: in all-layer clipping every layer takes
#: the same factors, cast once per dtype instead of once per layer
_cast_factors: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def factors_in(dtype: torch.dtype, factors: torch.Tensor) -> torch.Tensor:
    """Clipping factors cast to `dtype`, shrunk by half its machine epsilon first: rounding to the
    nearest value of `dtype` then never enlarges a clipped gradient beyond the threshold. Factors
    below the smallest normal value (where rounding is coarser) become 0. (The factors must not be
    changed in place afterwards: their cast is kept while they live.)"""
    if dtype == factors.dtype:
        return factors
    key = (id(factors), dtype)
    if key not in _cast_factors:
        info = torch.finfo(dtype)
        shrunk = torch.where(factors < info.tiny, 0.0, factors * (1 - info.eps / 2))
        _cast_factors[key] = shrunk.to(dtype)
        weakref.finalize(factors, _cast_factors.pop, key, None)
    return _cast_factors[key]


def _tensor_core_product(x: torch.Tensor) -> bool:
    """Whether products of x are taken in its 16-bit dtype with float32 accumulation (a GPU)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def product_operand(x: torch.Tensor) -> torch.Tensor:
    """x as `accumulated_bmm` multiplies it: as it is on a GPU's tensor cores, otherwise in its
    accumulation dtype; cast once here, a Gram matrix's two operands (x and its transpose) are not
    cast each."""
    return x if _tensor_core_product(x) else to_acc(x)


def accumulated_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y (batched), accumulated and returned in float32 (float64 for float64): 16-bit operands
    stay 16-bit on the tensor cores, but the result is not rounded back to 16 bits, which would
    let one example move the rounding of everyone's sum."""
    if _tensor_core_product(x):
        try:
            return torch.bmm(x, y, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without out_dtype: the float32 copies below
            pass
    return torch.bmm(to_acc(x), to_acc(y))


def accumulated_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y for matrices, as `accumulated_bmm`. Where no 16-bit tensor-core product is taken, a
    plain mm: it reads a transposed operand in place, where a CPU bmm copies it first."""
    if _tensor_core_product(x):
        return accumulated_bmm(x.unsqueeze(0), y.unsqueeze(0))[0]
    return torch.mm(to_acc(x), to_acc(y))


def squared_row_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 for x (B, ...), in float32 (float64 for float64): one batched dot product of each
    row with itself (16-bit rows: a norm accumulated in float32, their cast fused into it)."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if flat.dtype not in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(flat, dim=1, dtype=acc_dtype(flat.dtype)).square()
    with exact_float32_matmuls():
        return torch.bmm(flat.unsqueeze(1), flat.unsqueeze(2)).view(flat.shape[0])


#: per-example elements up to which `squared_row_norms_together` stacks a tensor with others of its
#: shape: a bias's or a norm layer's gradient, where launches cost more than the copy
STACKED_ROWS_LIMIT = 1 << 12


def _small_and_alike(tensors: list[torch.Tensor], keys: list[tuple]) -> tuple[list[int], list[list[int]]]:
    """The indices of the tensors taken alone (above STACKED_ROWS_LIMIT coordinates per example, or
    the only one of their key), and the groups of small ones that share a key."""
    alike: dict[tuple, list[int]] = {}
    alone = []
    for i, (x, key) in enumerate(zip(tensors, keys)):
        if math.prod(x.shape[1:]) <= STACKED_ROWS_LIMIT:
            alike.setdefault(key, []).append(i)
        else:
            alone.append(i)
    alone += [members[0] for members in alike.values() if len(members) == 1]
    return alone, [members for members in alike.values() if len(members) > 1]


def squared_row_norms_together(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """`squared_row_norms` of each x (B, ...), the small ones of one shape, dtype and device in one
    stacked product: each row's dot product is the one it has alone, in a few launches instead of
    one per tensor."""
    alone, groups = _small_and_alike(rows, [(tuple(x.shape), x.dtype, x.device) for x in rows])
    out: list = [None] * len(rows)
    for i in alone:
        out[i] = squared_row_norms(rows[i])
    for members in groups:
        stacked = torch.stack([rows[i] for i in members])  # (L, B, ...)
        norms = squared_row_norms(stacked.flatten(0, 1)).view(len(members), -1)
        for row, i in enumerate(members):
            out[i] = norms[row]
    return out


#: a call's cache key for {parameter: squared row norm} of its rule's `row_operands`, computed
#: with other layers' (`squared_row_norms_together`)
ROW_NORMS = "row norms"


def kept_row_norm(call: Call, name: str, x: torch.Tensor) -> torch.Tensor:
    """`squared_row_norms(x)` for the parameter `name` of `call`: as the pipeline kept it, computed
    with other layers' (ROW_NORMS), or now."""
    kept = call.cache.get(ROW_NORMS, {}).pop(name, None)
    return kept if kept is not None else squared_row_norms(x)


def weighted_sum(factors: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] * per_sample[i]: one matrix product in the per-sample dtype, accumulated
    and returned in float32 or better."""
    flat = per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))
    row = factors_in(per_sample.dtype, factors).unsqueeze(0)
    return accumulated_mm(row, flat).view(per_sample.shape[1:])


def weighted_sums_together(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """`weighted_sum(factors, per_sample)` of each term, the small per-example tensors (as
    `squared_row_norms_together`) of one factor tensor, dtype and device side by side in one
    matrix product: each coordinate's sum is the one it has alone."""
    per_sample = [x for _, x in terms]
    alone, groups = _small_and_alike(per_sample, [(id(c), x.shape[0], x.dtype, x.device) for c, x in terms])
    out: list = [None] * len(terms)
    for i in alone:
        out[i] = weighted_sum(*terms[i])
    for members in groups:
        flats = [per_sample[i].reshape(per_sample[i].shape[0], math.prod(per_sample[i].shape[1:])) for i in members]
        sums = weighted_sum(terms[members[0]][0], torch.cat(flats, 1)).split([f.shape[1] for f in flats])
        for i, total in zip(members, sums):
            out[i] = total.view(per_sample[i].shape[1:])
    return out


#: a call's cache key for {parameter: clipped sum} of its rule's `row_operands`, formed with other
#: layers' (`weighted_sums_together`)
ROW_SUMS = "row sums"


def kept_row_sum(call: Call, name: str, factors: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weighted_sum(factors, x)` for the parameter `name` of `call`: as the pipeline kept it,
    formed with other layers' (ROW_SUMS), or now."""
    kept = call.cache.get(ROW_SUMS, {}).pop(name, None)
    return kept if kept is not None else weighted_sum(factors, x)

