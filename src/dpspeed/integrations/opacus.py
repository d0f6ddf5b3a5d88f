"""What scripts written for Opacus pass and call, in dpspeed's terms: make_private's Opacus-only
arguments (`translate`), `BatchMemoryManager`, `ModuleValidator`. A script switches by changing its
imports; an Opacus option dpspeed does not have is refused with what to do instead."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager

from torch import nn

from ..fix import fix_model, validate
from ..sampling import DPDataLoader, check_batching

logger = logging.getLogger(__name__)

#: Opacus's grad_sample_mode values that compute exact per-example gradients: dpspeed does too, its own way
_EXACT_MODES = {"hooks", "functorch", "ew"}


def translate(options: dict, clipping_mode: str, clipping_style) -> tuple[str, object]:
    """(clipping_mode, clipping_style) after Opacus's make_private arguments in `options`:
    clipping="flat" is all-layer clipping, "per_layer" param-wise (one max_grad_norm per
    parameter); grad_sample_mode="ghost" is the ghost mode, "hooks"/"functorch"/"ew" keep dpspeed's
    mode (every mode is exact); batch_first=True, wrap_model and rand_on_empty change nothing
    (dpspeed never wraps the model, and steps on an empty batch with noise only).
    Raises TypeError for an argument neither library has, ValueError for an Opacus option dpspeed
    does not offer."""
    unknown = set(options) - {"clipping", "grad_sample_mode", "batch_first", "rand_on_empty", "wrap_model"}
    if unknown:
        raise TypeError(f"make_private() got unexpected keyword argument(s) {sorted(unknown)}")
    clipping = options.get("clipping")
    if clipping == "flat":
        clipping_style = "all-layer"
    elif clipping == "per_layer":
        clipping_style = "param-wise"
    elif clipping is not None:
        raise ValueError(f"clipping={clipping!r}: dpspeed has 'flat' (all-layer) and 'per_layer' (param-wise) and "
                         "its clipping_style= groups; adaptive clipping's noisy quantile estimate is not in dpspeed "
                         "(use a fixed max_grad_norm, or clipping_fn='automatic')")
    mode = options.get("grad_sample_mode")
    if mode == "ghost":
        clipping_mode = "ghost"
    elif mode is not None and mode not in _EXACT_MODES:
        raise ValueError(f"grad_sample_mode={mode!r} has no dpspeed equivalent; leave it out (dpspeed's "
                         "clipping_mode='auto' picks the fastest exact method per layer)")
    if options.get("batch_first") is False:
        raise ValueError("batch_first=False: dpspeed needs each input's batch in dimension 0; transpose the "
                         "inputs (a recurrent layer with batch_first=False inside the model is fine)")
    if options:
        logger.info("dpspeed: Opacus arguments %s taken as clipping_mode=%r, clipping_style=%r", sorted(options),
                    clipping_mode, clipping_style)
    return clipping_mode, clipping_style


def thresholds_in_model_order(options: dict, max_grad_norm, optimizer, params: dict) -> object:
    """Opacus's clipping="per_layer" gives one max_grad_norm per parameter in the optimizer's order
    (its param_groups, e.g. weights then biases for a weight-decay split); dpspeed's param-wise
    groups follow the model's parameters: the list, reordered to them. Anything else as it is."""
    if options.get("clipping") != "per_layer" or not isinstance(max_grad_norm, (list, tuple)):
        return max_grad_norm
    ordered = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if len(ordered) != len(max_grad_norm):
        raise ValueError(f"clipping='per_layer' takes one max_grad_norm per trainable parameter of the optimizer "
                         f"({len(ordered)}), got {len(max_grad_norm)}")
    by_parameter = {id(p): r for p, r in zip(ordered, max_grad_norm)}
    missing = [n for n, p in params.items() if id(p) not in by_parameter]
    if missing:
        raise ValueError(f"clipping='per_layer': the optimizer does not hold the trainable parameters {missing}")
    return [by_parameter[id(p)] for p in params.values()]


class BatchMemoryManager(AbstractContextManager):
    """`with BatchMemoryManager(data_loader=loader, max_physical_batch_size=n, optimizer=opt) as
    loader:` the private loader yields physical batches of at most n examples while inside; the
    optimizer steps at the end of each logical batch as always (dpspeed's loader tells it which
    batch ends one). make_private(max_physical_batch_size=n) does the same for the whole run."""

    def __init__(self, data_loader: DPDataLoader, max_physical_batch_size: int, optimizer=None):
        if not isinstance(data_loader, DPDataLoader):
            raise TypeError("BatchMemoryManager takes the data loader make_private returned, got "
                            f"{type(data_loader).__name__}")
        check_batching(data_loader.dataset, max_physical_batch_size, False)
        if data_loader.fixed_size is not None and data_loader.fixed_size != max_physical_batch_size:
            raise ValueError(f"the loader pads every batch to {data_loader.fixed_size} rows (fixed_physical_batch); "
                             f"max_physical_batch_size={max_physical_batch_size} would not fit that shape")
        self.data_loader, self.size = data_loader, max_physical_batch_size
        self._previous: int | None = None

    def __enter__(self) -> DPDataLoader:
        self._previous, self.data_loader.batches.max_size = self.data_loader.batches.max_size, self.size
        return self.data_loader

    def __exit__(self, *exc) -> None:
        self.data_loader.batches.max_size = self._previous


class ModuleValidator:
    """Opacus's ModuleValidator, by dpspeed.validate and dpspeed.fix_model."""

    @staticmethod
    def validate(module: nn.Module, strict: bool = False) -> list[str]:
        """Every problem (strings); with strict=True, a ValueError listing them instead."""
        problems = validate(module)
        if strict and problems:
            raise ValueError("the model cannot be made private as it is:\n- " + "\n- ".join(problems))
        return problems

    @staticmethod
    def is_valid(module: nn.Module) -> bool:
        return not validate(module)

    @staticmethod
    def fix(module: nn.Module, **options) -> nn.Module:
        return fix_model(module, **options)
