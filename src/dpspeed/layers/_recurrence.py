"""nn.RNN, nn.LSTM and nn.GRU (and their cells) computed step by step from their own parameters:
the same function as their fused kernels, to rounding, keeping what the per-example rule reads.

Each layer and direction keeps its input sequence x, the state h entering every step, and its
input projection z = W_ih x + b_ih for the whole sequence at once (its gradient dz is the one
tapped); a GRU also keeps its reset gate r, since its new gate's hidden part enters as r * (W_hn h
+ b_hn). Packed sequences run padded in the batch's own order, each example's state held once
its sequence has ended (a reverse direction starting at each example's own last step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .products import requiring_grad


@dataclass(eq=False)
class Direction:
    """What one layer and direction of a recorded forward keeps, each (B, T, ...) batch first."""

    inputs: torch.Tensor  # (B, T, d): the layer's input sequence
    projection: torch.Tensor  # (B, T, G): W_ih x_t + b_ih, in the graph (its gradient is tapped)
    states: torch.Tensor  # (B, T, H): the state entering every step
    resets: torch.Tensor | None  # (B, T, H): a GRU's reset gate at every step


def cell_mode(module: nn.RNNCellBase) -> str:
    """The `mode` an nn.RNN/LSTM/GRU of this cell would have."""
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"


def gates(mode: str, zx: torch.Tensor, zh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """One step from the input and hidden projections zx = W_ih x + b_ih, zh = W_hh h + b_hh:
    (new h, new c or None, the GRU's reset gate or None), as torch's cells compute it."""
    if mode == "LSTM":
        i, f, g, o = (zx + zh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c, None
    if mode == "GRU":
        xr, xz, xn = zx.chunk(3, -1)
        hr, hz, hn = zh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None, r
    pre = zx + zh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None, None


def _sequence(module: nn.RNNBase, input) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input as (B, T, d) in the batch's order, and for a packed one the (B, T) mask of steps
    inside each sequence."""
    if isinstance(input, PackedSequence):
        x, lengths = pad_packed_sequence(input, batch_first=True)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        return x, mask.to(x.device)
    if input.dim() != 3:
        raise ValueError(f"{type(module).__name__} got an unbatched input of shape {tuple(input.shape)}: "
                         "DP training needs a batch dimension")
    return (input if module.batch_first else input.transpose(0, 1)), None


def _packed_like(out: torch.Tensor, like: PackedSequence, mask: torch.Tensor) -> PackedSequence:
    """(B, T, H) outputs in the batch's order, packed as `like` is."""
    lengths = mask.sum(1).cpu()
    order = like.sorted_indices
    if order is not None:
        out, lengths = out.index_select(0, order), lengths.index_select(0, order.cpu())
    data = pack_padded_sequence(out, lengths, batch_first=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _direction(mode: str, zx: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_hh: torch.Tensor,
               b_hh: torch.Tensor | None, mask: torch.Tensor | None, reverse: bool):
    """One layer and direction over the sequence: (outputs (B, T, H), last h, last c, states, resets)."""
    steps = zx.shape[1]
    outputs: list = [None] * steps
    states: list = [None] * steps
    resets: list = [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        states[t] = h
        h_new, c_new, resets[t] = gates(mode, zx[:, t], F.linear(h, w_hh, b_hh), h, c)
        if mask is not None:  # the state is held outside the example's sequence
            keep = mask[:, t, None]
            h_new = torch.where(keep, h_new, h)
            c_new = None if c is None else torch.where(keep, c_new, c)
        h, c = h_new, c_new
        outputs[t] = h
    kept_resets = torch.stack(resets, 1).detach() if mode == "GRU" else None
    return torch.stack(outputs, 1), h, c, torch.stack(states, 1).detach(), kept_resets


def _initial_states(module: nn.RNNBase, hx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h0, c0 or None), each (layers * directions, B, H)."""
    directions = 2 if module.bidirectional else 1
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, x.shape[0], module.hidden_size)
        return h0, (torch.zeros_like(h0) if module.mode == "LSTM" else None)
    return hx if module.mode == "LSTM" else (hx, None)


def unrolled_forward(module: nn.RNNBase, input, hx=None) -> tuple[object, list[Direction]]:
    """The module's output for (input, hx), exactly as module(input, hx) returns it, and what each
    layer and direction keeps."""
    x, mask = _sequence(module, input)
    h0, c0 = _initial_states(module, hx, x)
    directions = 2 if module.bidirectional else 1
    kept: list[Direction] = []
    last_h, last_c = [], []
    for layer in range(module.num_layers):
        if layer and module.dropout and module.training:
            x = F.dropout(x, module.dropout, training=True)
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            bias = (lambda kind: getattr(module, f"bias_{kind}{suffix}")) if module.bias else (lambda kind: None)
            zx = requiring_grad(F.linear(x, getattr(module, f"weight_ih{suffix}"), bias("ih")))
            state = layer * directions + d
            out, h, c, states, resets = _direction(module.mode, zx, h0[state], None if c0 is None else c0[state],
                                                   getattr(module, f"weight_hh{suffix}"), bias("hh"), mask, d == 1)
            kept.append(Direction(x.detach(), zx, states, resets))
            outputs.append(out)
            last_h.append(h)
            last_c.append(c)
        x = torch.cat(outputs, -1) if directions > 1 else outputs[0]
    if isinstance(input, PackedSequence):
        output = _packed_like(x, input, mask)
    else:
        output = x if module.batch_first else x.transpose(0, 1)
    hidden = torch.stack(last_h)
    return (output, (hidden, torch.stack(last_c)) if module.mode == "LSTM" else hidden), kept
