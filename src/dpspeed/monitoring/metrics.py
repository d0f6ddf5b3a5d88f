"""One logical step in numbers: epsilon spent, how many examples were clipped, the per-example
gradient norms' quantiles and the noise's scale. Gathered only while a callback watches
(`PrivacyEngine.on_step`): the norms stay on the device until the step ends, then one transfer.
Under torchrun, the norms and counts are this rank's examples'. The two-pass modes (ghost,
mix-ghost) take their norms inside the criterion's second pass: there the examples, clipped
fraction and quantiles are not measured (0 and None)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

#: the quantiles of the per-example norms reported
QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class StepMetrics:
    step: int  # logical steps taken so far
    examples: int  # examples with a finite gradient in this logical batch
    clipped_fraction: float | None  # of them, those over a threshold in any group (None: not measured)
    norm_p10: float | None  # quantiles of the examples' gradient norms over all groups
    norm_p50: float | None
    norm_p90: float | None
    norm_max: float | None
    noise_std: float  # the noise's standard deviation per coordinate of the summed gradient
    nonfinite_examples: int  # dropped so far for a gradient that was not finite
    noise_only_steps: int  # logical steps so far whose sums were not finite (noise only)
    epsilon: float | None  # spent so far, at the delta watched with (None: not computed this step)

    def as_dict(self) -> dict:
        return asdict(self)


def norm_summary(passes: list[tuple[object, list[torch.Tensor]]]) -> dict:
    """examples, clipped_fraction and the norm quantiles of a logical batch's passes, each with its
    per-example [squared norm, over a threshold, counted]."""
    empty = {"examples": 0, "clipped_fraction": None, "norm_p10": None, "norm_p50": None, "norm_p90": None,
             "norm_max": None}
    if not passes:
        return empty
    total = torch.cat([sq[counted] for _, (sq, _, counted) in passes]).float().sqrt()
    over = torch.cat([over[counted] for _, (_, over, counted) in passes])
    if total.numel() == 0:
        return empty
    p10, p50, p90 = torch.quantile(total, torch.tensor(QUANTILES, device=total.device, dtype=total.dtype)).tolist()
    return {"examples": total.numel(), "clipped_fraction": float(over.float().mean()), "norm_p10": p10,
            "norm_p50": p50, "norm_p90": p90, "norm_max": float(total.max())}
