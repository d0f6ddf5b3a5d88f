"""The `auto` clipping mode: per layer, ghost norm with book-keeping or explicit per-example gradients
reused for the sum, whichever a cost model of FLOPs and bytes moved says is faster, with the
explicit gradients of all layers (held at once until the factors are known) within a memory budget.

On a GPU, time is estimated as FLOPs / balance + bytes, in byte-equivalents, where the balance is
the device's FLOPs per byte of memory traffic in the dtype the layers compute in: about 250 for bf16
tensor-core products on an H100, 130 for TF32 and 20 for float32. On a CPU, where small layers
cost what their operations' overhead costs rather than their FLOPs, both methods are timed on the
first recorded call instead (best of three, no gradient changes; a layer whose explicit gradients
would exceed TIMING_LIMIT is modelled). Shapes come from the first
physical batch; the plan is made again when a larger batch arrives (the explicit gradients' memory
grows with it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..capture.records import Binding, Call
from ..layers.precision import tf32_matmuls, weighted_sum
from .methods import EXPLICIT, GHOST_BK, LayerMethod


@dataclass
class LayerPlan:
    layer: str
    kind: str
    method: str  # "ghost" or "explicit"
    ghost_cost: float  # per example: byte-equivalents when modelled, nanoseconds when timed
    explicit_cost: float
    explicit_bytes: int  # per-example gradient memory of the whole batch
    timed: bool = False

    def __str__(self) -> str:
        unit = "ns" if self.timed else "B "
        return (f"{self.layer or '<root>':40} {self.kind:16} {self.method:9} ghost {self.ghost_cost:10.3g}{unit} "
                f"explicit {self.explicit_cost:10.3g}{unit} ({self.explicit_bytes / 2**20:.1f} MiB)")


def _balance(device: torch.device, dtype: torch.dtype) -> float:
    if device.type != "cuda":
        return 10.0
    if dtype in (torch.bfloat16, torch.float16):
        return 250.0
    return 130.0 if dtype == torch.float32 and tf32_matmuls() else 20.0


def default_budget(device: torch.device) -> int | None:
    """A quarter of the GPU's memory for explicit per-example gradients; no limit on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return None


#: layers whose explicit gradients would take more memory than this are modelled, not timed
TIMING_LIMIT = 256 * 2**20


def _best_time(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _timed(binding: Binding, call: Call, plan: LayerPlan) -> LayerPlan:
    """The plan with both methods' costs timed on `call`: norms, rounding bound and book-keeping sum
    against per-example gradients, their norms and their weighted sum (factors of one)."""
    rule, module, names = binding.rule, binding.module, list(binding.params)
    ones = torch.ones(call.batch_size, device=call.grad().device)

    def ghost() -> None:
        rule.ghost_sq_norms(module, call, names)
        rule.sum_rounding(module, call, names)
        rule.clipped_sum(module, call, names, {n: ones for n in names})

    def explicit() -> None:
        for g in rule.per_sample_grads(module, call, names).values():
            torch.linalg.vector_norm(g.flatten(1), dim=1)
            weighted_sum(ones, g)

    per_example = 1e9 / max(call.batch_size, 1)
    return LayerPlan(plan.layer, plan.kind, plan.method, _best_time(ghost) * per_example,
                     _best_time(explicit) * per_example, plan.explicit_bytes, timed=True)


def _estimate(binding: Binding, call: Call) -> LayerPlan:
    """The binding's ghost and explicit costs for this call's shapes; planned as ghost (the budget
    decides about explicit), or explicit when the rule has no ghost norm."""
    costs = binding.rule.costs(binding.module, call) if binding.rule.ghost else None
    kind = type(binding.module).__name__
    if costs is None:
        return LayerPlan(binding.name, kind, "explicit", float("inf"), 0.0, 0)
    ghost_flops, explicit_flops = costs
    grad = call.grad()
    batch, size = grad.shape[0], grad.element_size()
    balance = _balance(grad.device, grad.dtype)
    params = sum(binding.module.get_parameter(n).numel() for n in binding.params)
    io = (call.input().numel() + grad.numel()) / max(batch, 1) * size
    ghost = (ghost_flops + 2 * explicit_flops) / balance + 2 * io
    # explicit gradients are written, read for the norm and read for the sum
    explicit = (2 * explicit_flops + 2 * params) / balance + io + 3 * params * size
    return LayerPlan(binding.name, kind, "ghost", ghost, explicit, batch * params * size)


class Planner:
    """A Chooser: plans a LayerMethod per binding when it first sees it (again when a larger batch
    arrives) and keeps the choice (`plan`)."""

    def __init__(self, memory_budget: int | None = None, timed: bool | None = None):
        self.memory_budget = memory_budget
        self.timed = timed  # time the methods (True), model them (False), or time them on a CPU (None)
        self.plan: dict[Binding, LayerPlan] = {}
        self.batch = 0  # the batch size the plan was made for

    def prepare(self, calls: dict[Binding, list[Call]]) -> None:
        """Plan every binding not planned yet; a larger batch than planned for starts afresh."""
        first = next(iter(calls.values()))[0]
        if first.batch_size > self.batch:
            self.plan.clear()
            self.batch = first.batch_size
        new = [b for b in calls if b not in self.plan]
        if not new:
            return
        for binding in new:
            call = calls[binding][0]
            plan = _estimate(binding, call)
            timed = call.device.type == "cpu" if self.timed is None else self.timed
            timed = timed and math.isfinite(plan.ghost_cost) and plan.explicit_bytes <= TIMING_LIMIT
            self.plan[binding] = _timed(binding, call, plan) if timed else plan
        budget = self.memory_budget if self.memory_budget is not None else default_budget(first.device)
        self._fit_budget([self.plan[b] for b in new], budget)

    def _fit_budget(self, new: list[LayerPlan], budget: int | None) -> None:
        """Turn the new entries that are cheaper explicit to explicit, the best saving per byte
        first, while all explicit gradients together fit the budget."""
        candidates = [e for e in new if e.method == "ghost" and e.explicit_cost < e.ghost_cost]
        used = sum(e.explicit_bytes for e in self.plan.values() if e.method == "explicit")
        for entry in sorted(candidates, key=lambda e: (e.ghost_cost - e.explicit_cost) / max(e.explicit_bytes, 1), reverse=True):
            if budget is None or used + entry.explicit_bytes <= budget:
                entry.method = "explicit"
                used += entry.explicit_bytes

    def __call__(self, binding: Binding, calls: list[Call]) -> LayerMethod:
        entry = self.plan.get(binding)
        return GHOST_BK if entry is not None and entry.method == "ghost" else EXPLICIT
