"""Found by a review of the recurrent and attention rules: layouts and parameter uses that gave
wrong gradients, exceeded the clipping bound, or crashed. Each is now exact or refused clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpspeed.testing import check_losses, check_rule, private_grads

pytestmark = pytest.mark.usefixtures("float64")


def _squared(m, b):
    return m(b[0]).square().flatten(1).sum(1)


class SequenceFirstLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):  # (B, T, 3) -> (T, B, 3) through the layer -> back
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


class SequenceFirstTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 3), nn.Linear(3, 2)

    def forward(self, tokens):
        return self.head(self.embed(tokens.t()).mean(0))


@pytest.mark.parametrize("model,inputs", [
    (SequenceFirstLinear, lambda: (torch.randn(4, 4, 3),)),  # T = 4 rows, a multiple of the batch
    (SequenceFirstTokens, lambda: (torch.randint(0, 10, (4, 8)),)),
    (lambda: nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0), lambda: (torch.randn(8, 4, 6),)),  # batch_first=False
])
def test_a_sequence_first_layout_is_refused(model, inputs):
    """Its rows were clipped as examples in blocks: one example contributed up to 1.4x the bound."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="first dimension is not the batch"):
        private_grads(model(), lambda m, b: _squared(m, b).sum(), inputs(), physical=2)


def test_batch_first_attention_is_exact():
    torch.manual_seed(0)
    check_losses(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True), _squared, (torch.randn(4, 8, 6),),
                 modes=["per-example", "bk"])


class Chunked(nn.Module):
    """A bare parameter chunked, each part expanded to the batch and given to a child."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(2, 4))
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        first, second = self.p.chunk(2)
        return self.a(first.expand(len(x), -1)) * x + second.sum()


class ExpandedSquared(nn.Module):
    """An exponent equal to the batch size is not a batch size."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 3))

    def forward(self, x):
        return x * self.p.expand(len(x), -1) ** 2


@pytest.mark.parametrize("model", [Chunked, ExpandedSquared])
def test_chunked_parameters_and_integers_after_an_expansion_are_exact(model):
    """Each chunk of a parameter got a zero gradient; `** 2` in a batch of 2 was replayed as `** 1`."""
    torch.manual_seed(0)
    check_losses(model(), _squared, (torch.randn(4, 3),), modes=["per-example", "bk"])


def test_a_learned_lstm_state_unpacked_from_one_parameter_is_refused_not_zero():
    class Learned(nn.Module):
        def __init__(self):
            super().__init__()
            self.init = nn.Parameter(torch.randn(2, 1, 1, 5))
            self.rnn = nn.LSTM(4, 5, batch_first=True)

        def forward(self, x):
            h0, c0 = self.init.expand(-1, -1, len(x), -1)
            return self.rnn(x, (h0.contiguous(), c0.contiguous()))[0]

    with pytest.raises(RuntimeError, match=r"\['init'\].*enters LSTM"):
        private_grads(Learned(), lambda m, b: _squared(m, b).sum(), (torch.randn(3, 2, 4),))


class MaskFromParameter(nn.Module):
    """Tensors made from a parameter that carry no gradient (a detached copy, a mask, an index)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(3))
        self.child = nn.Linear(3, 3)

    def forward(self, x):
        return self.child(x * self.p.detach()) + (self.p > 0).float() + self.p.argmax() + x * self.p


def test_parameter_derived_tensors_without_gradient_may_enter_a_child():
    torch.manual_seed(0)
    check_losses(MaskFromParameter(), _squared, (torch.randn(4, 3),), modes=["bk"])


def test_a_recurrent_layer_inside_a_replayed_module_is_refused_clearly():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(10, 4), nn.LSTM(4, 4, batch_first=True)

        def forward(self, tokens):
            return F.linear(self.rnn(self.embed(tokens))[0], self.embed.weight)

    with pytest.raises(ValueError, match="recurrent layer inside it cannot be replayed"):
        private_grads(TiedLM(), lambda m, b: m(b[0]).square().sum(), (torch.randint(0, 10, (3, 5)),))


def test_a_recurrent_cell_as_the_whole_model_and_its_keyword_input():
    torch.manual_seed(0)
    check_rule(nn.GRUCell(4, 5), torch.randn(4, 4), modes=["per-example", "bk"])
    check_losses(_KeywordCell(), _squared, (torch.randn(4, 4),), modes=["bk"])


class _KeywordCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(4, 5)

    def forward(self, x):
        return self.cell(input=x, hx=None)[0]


class OwnCodeTiedLM(nn.Module):
    """The output projection is the embedding's weight, used in the model's own code."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.embed, self.mix, self.transposed = nn.Embedding(11, 6), nn.Linear(6, 6), transposed

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens)))
        return (h @ self.embed.weight.T if self.transposed else F.linear(h, self.embed.weight)).mean(1)


@pytest.mark.parametrize("transposed", [True, False])
def test_a_weight_tied_between_a_child_and_the_models_own_code_counts_each_use_once(transposed):
    """The replay of the model's own code differentiated the embedding's lookup too, which the
    embedding's rule had already counted (relative error 0.17 to 0.7)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (4, 5))
    check_losses(OwnCodeTiedLM(transposed), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                 (tokens, torch.randint(0, 11, (4,))))


class _LookupBlock(nn.Module):
    """Uses its child's weight in its own code: its binding names the weight "embed.weight"."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)

    def forward(self, tokens):
        return F.embedding(tokens, self.embed.weight) * 2


class _BlockTiedLM(nn.Module):
    """The model's own code uses the block's embedding weight as its output projection."""

    def __init__(self):
        super().__init__()
        self.block, self.mix = _LookupBlock(), nn.Linear(6, 6)

    def forward(self, tokens):
        return (torch.tanh(self.mix(self.block(tokens))) @ self.block.embed.weight.T).mean(1)


def test_a_weight_tied_through_a_childs_dotted_name_counts_each_use_once():
    """The replay held the weight constant under its dotted name and crashed (KeyError 'embed.weight')."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (4, 5))
    check_losses(_BlockTiedLM(), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                 (tokens, torch.randint(0, 11, (4,))))
