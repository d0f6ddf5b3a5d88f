"""nn.RNN, nn.LSTM, nn.GRU and their cells, exact per example without swapping the module: while a
forward pass is recorded, the module runs unrolled from its own parameters (`_recurrence.py`; its
type and state_dict stay the user's), and each layer and direction is two Linear layers over the
T time steps:

    weight_ih, bias_ih:  inputs x_t,      gradients dz_t  (dz = the gradient of W_ih x_t + b_ih)
    weight_hh, bias_hh:  states h_{t-1},  gradients dz_t  (a GRU's new gate: dz_t * r_t)

so every Linear method (ghost norm, book-keeping sum, rounding bound) applies unchanged.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.records import Call
from ._recurrence import cell_mode, gates, unrolled_forward
from .products import LinearProducts, Product, requiring_grad

_PARAM = re.compile(r"(weight|bias)_(ih|hh)(_l\d+(_reverse)?)?")


def _hidden_grad(mode: str, dz: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """The gradient of W_hh h + b_hh from that of W_ih x + b_ih: the same, except for a GRU's new
    gate, whose hidden part is multiplied by the reset gate."""
    if mode != "GRU":
        return dz
    hidden = reset.shape[-1]
    return torch.cat([dz[..., : 2 * hidden], dz[..., 2 * hidden :] * reset], -1)


def _product(inputs: torch.Tensor, grad: torch.Tensor, suffix: str, kind: str, bias: bool) -> Product:
    params = {"weight": (f"weight_{kind}{suffix}", 0)}
    if bias:
        params["bias"] = (f"bias_{kind}{suffix}", 0)
    return Product(Call((inputs,), {}, [grad]), params)


class _Recurrent(LinearProducts):
    records_inside = True
    params = ()  # the names follow a pattern: `declares`

    def declares(self, name: str) -> bool:
        return _PARAM.fullmatch(name) is not None


class RecurrentRule(_Recurrent):
    """nn.RNN, nn.LSTM, nn.GRU: any number of layers, bidirectional, batch first or not, with or
    without initial states, padded or packed sequences, dropout between layers."""

    def validate(self, module: nn.RNNBase) -> None:
        if getattr(module, "proj_size", 0):
            raise ValueError("an LSTM with proj_size > 0 has no per-example rule in dpspeed yet; "
                             "use proj_size=0 and an nn.Linear after it")

    def record_forward(self, module: nn.RNNBase, args: tuple, kwargs: dict, tap) -> object:
        output, directions = unrolled_forward(module, *args, **kwargs)
        kept = [t for d in directions for t in (d.inputs, d.states) + ((d.resets,) if d.resets is not None else ())]
        tap(tuple(kept), [d.projection for d in directions])
        return output

    def products(self, module: nn.RNNBase, call: Call) -> list[Product]:
        per_direction = 3 if module.mode == "GRU" else 2
        suffixes = [f"_l{layer}" + ("_reverse" if d else "") for layer in range(module.num_layers)
                    for d in range(2 if module.bidirectional else 1)]
        products = []
        for i, (suffix, dz) in enumerate(zip(suffixes, call.grads_or_zeros())):
            inputs, states, *resets = call.args[i * per_direction : (i + 1) * per_direction]
            hidden = _hidden_grad(module.mode, dz, resets[0] if resets else None)
            products += [_product(inputs, dz, suffix, "ih", module.bias), _product(states, hidden, suffix, "hh", module.bias)]
        return products


class CellRule(_Recurrent):
    """nn.RNNCell, nn.LSTMCell, nn.GRUCell, each call one step (a loop calls the cell once per step:
    a module called several times, summed over its calls)."""

    def record_forward(self, module: nn.RNNCellBase, args: tuple, kwargs: dict, tap) -> object:
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if x.dim() != 2:
            raise ValueError(f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}: "
                             "DP training needs a batch dimension")
        mode = cell_mode(module)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], module.hidden_size)
            hx = (zeros, zeros) if mode == "LSTM" else zeros
        h, c = hx if mode == "LSTM" else (hx, None)
        zx = requiring_grad(F.linear(x, module.weight_ih, module.bias_ih))
        zh = requiring_grad(F.linear(h, module.weight_hh, module.bias_hh))
        h_new, c_new, _ = gates(mode, zx, zh, h, c)
        tap((x.detach(), h.detach()), [zx, zh])
        return (h_new, c_new) if mode == "LSTM" else h_new

    def products(self, module: nn.RNNCellBase, call: Call) -> list[Product]:
        dzx, dzh = call.grads_or_zeros()
        x, h = call.args
        return [_product(x, dzx, "", "ih", module.bias), _product(h, dzh, "", "hh", module.bias)]
