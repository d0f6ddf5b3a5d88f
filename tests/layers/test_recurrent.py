"""nn.RNN, nn.LSTM, nn.GRU and their cells: exact per-example gradients in every mode, the user's
module kept as it is (type, state_dict, its own forward outside recorded passes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dpspeed import PrivacyEngine, validate
from dpspeed.testing import ONE_PASS_MODES, assert_close, check_losses, private_grads, reference_sum
from dpspeed.testing import per_example_grads

pytestmark = pytest.mark.usefixtures("float64")
KINDS = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn_tanh": (nn.RNN, {}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}


class TextClassifier(nn.Module):
    """Embedding -> recurrent layer -> Linear, with every way of calling the recurrent layer."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 initial_state: bool = False, packed: bool = False, readout: str = "outputs", dropout: float = 0.0):
        super().__init__()
        cls, options = KINDS[kind]
        self.kind, self.batch_first, self.initial_state, self.packed, self.readout = (
            kind, batch_first, initial_state, packed, readout)
        directions = 2 if bidirectional else 1
        self.embed = nn.Embedding(10, 4)
        self.rnn = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                       dropout=dropout, **options)
        self.initial = nn.Linear(4, layers * directions * 5)  # a per-example initial state
        self.head = nn.Linear(5 * directions, 3)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        hx = None
        if self.initial_state:
            h = torch.tanh(self.initial(x[:, 0])).view(len(x), -1, 5).transpose(0, 1).contiguous()
            hx = (h, 0.5 * h) if self.kind == "lstm" else h
        if self.packed:
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        out, hidden = self.rnn(x, hx)
        hidden = hidden[0] if self.kind == "lstm" else hidden
        if self.packed:
            out = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if self.readout == "outputs":
            return self.head(out.mean(1))
        return self.head(hidden[-out.shape[-1] // 5 :].transpose(0, 1).flatten(1))  # the last layer's states


def _batch(n: int = 5, steps: int = 6) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 10, (n, steps), generator=generator)
    return tokens, torch.randint(0, 3, (n,), generator=generator), torch.tensor([6, 3, 5, 1, 4])[:n]


def _loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0], batch[2]), batch[1], reduction="none")


CONFIGS = [  # (kind, layers, bidirectional, batch_first, initial_state, packed, readout)
    *[(kind, 1, False, True, False, False, "outputs") for kind in KINDS],
    *[(kind, 2, True, False, True, False, "hidden") for kind in KINDS],
    *[(kind, 2, True, True, True, True, "outputs") for kind in KINDS],
    *[(kind, 1, True, True, False, True, "hidden") for kind in KINDS],
    ("lstm", 3, False, False, False, False, "hidden"),
    ("gru", 2, False, True, True, True, "hidden"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_recurrent_layer_is_exact(config):
    """Layers, directions, layouts, initial states and packed sequences of ragged lengths."""
    torch.manual_seed(0)
    kind, layers, bidirectional, batch_first, initial_state, packed, readout = config
    model = TextClassifier(kind, layers, bidirectional, batch_first, initial_state, packed, readout)
    check_losses(model, _loss, _batch(), modes=["per-example", "bk", "auto"], styles=["all-layer", "layer-wise"])


@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_every_mode_on_a_bidirectional_lstm(mode):
    torch.manual_seed(0)
    check_losses(TextClassifier("lstm", 2, True, True, True, True), _loss, _batch(), modes=[mode])


@pytest.mark.parametrize("mode", ["ghost", "mix-ghost"])
def test_two_pass_modes_on_a_gru(mode):
    torch.manual_seed(0)
    model, batch = TextClassifier("gru", 2, True), _batch()
    examples = [tuple(t[i : i + 1] for t in batch) for i in range(len(batch[0]))]
    want = reference_sum(per_example_grads(model, lambda m, b: _loss(m, b).sum(), examples), [list(dict(
        model.named_parameters()))], [0.3], "abadi")
    got, engine = private_grads(model, None, batch[:2], max_grad_norm=0.3, clipping_mode=mode, loss_reduction="sum",
                                criterion=nn.CrossEntropyLoss(reduction="sum"),
                                forward=lambda m, x: m(x, torch.full((len(x),), x.shape[1])))
    engine.detach()
    assert_close(got, want, 1e-6)


class CellLoop(nn.Module):
    """A cell called once per step: a module called several times in one forward pass."""

    def __init__(self, cell: type):
        super().__init__()
        self.cell, self.lstm = cell(4, 5), cell is nn.LSTMCell
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.lstm else state)


@pytest.mark.parametrize("cell", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_cells_called_once_per_step_are_exact(cell):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 4), torch.randint(0, 3, (5,))
    check_losses(CellLoop(cell), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), (x, y),
                modes=["per-example", "bk", "auto"])


def test_the_users_module_keeps_its_type_state_dict_and_own_forward():
    """Unrolled only while a training pass is recorded; a deep copy runs its own weights, unrecorded."""
    torch.manual_seed(0)
    model = TextClassifier("lstm", 2, True)
    keys = list(model.state_dict())
    tokens, labels, lengths = _batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=5)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                   data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    assert type(model.rnn) is nn.LSTM and list(model.state_dict()) == keys
    for batch_tokens, batch_labels in loader:
        F.cross_entropy(model(batch_tokens, lengths[: len(batch_tokens)]), batch_labels).backward()
        optimizer.step()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.rnn.weight_hh_l0.mul_(2)
        assert not torch.allclose(twin(tokens, lengths), model(tokens, lengths))
    model.eval()
    with torch.no_grad():
        evaluated = model(tokens, lengths)
    engine.detach()
    assert "forward" not in model.rnn.__dict__
    with torch.no_grad():
        assert torch.allclose(model(tokens, lengths), evaluated)


def test_dropout_between_layers_trains():
    """The dropout masks the unrolled pass drew are the ones its per-example gradients use."""
    torch.manual_seed(0)
    model = TextClassifier("gru", 3, dropout=0.5)
    tokens, labels, lengths = _batch()
    got, engine = private_grads(model, lambda m, b: F.cross_entropy(m(b[0], lengths), b[1]), (tokens, labels),
                                clipping_mode="bk")
    engine.detach()
    assert all(torch.isfinite(g).all() for g in got.values()) and got["rnn.weight_ih_l2"].abs().sum() > 0


def test_unsupported_configurations_are_refused_by_name():
    problems = validate(nn.Sequential(nn.LSTM(3, 6, proj_size=2)))
    assert len(problems) == 1 and "proj_size" in problems[0] and "LSTM at '0' (parameters 0.weight_ih_l0" in problems[0]
    model = nn.LSTM(3, 5, batch_first=True)
    with pytest.raises(ValueError, match="unbatched"):
        private_grads(_Unbatched(model), lambda m, b: m(b[0]).sum(), (torch.randn(4, 2, 3),))


class _Unbatched(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.rnn(row)[0].sum(0) for row in x])


def test_a_learned_initial_state_is_refused_not_silently_zero():
    """A parameter that enters the recurrent layer without meeting the batch (shape (layers, 1, H)
    expanded in dimension 1) got a zero gradient; it is refused with what to do."""

    class Learned(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0 = nn.Parameter(torch.randn(1, 1, 5))
            self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x, self.h0.expand(-1, len(x), -1).contiguous())[1][0])

    with pytest.raises(RuntimeError, match=r"\['h0'\].*enters GRU.*Expand it to \(batch, \.\.\.\)"):
        private_grads(Learned(), lambda m, b: m(b[0]).sum(), (torch.randn(4, 3, 4),))


@pytest.mark.parametrize("mode", ["per-example", "bk", "auto"])
def test_a_parameter_expanded_to_the_batch_entering_a_submodule_is_exact(mode):
    """It reached no recorded op (its gradient was zero); now its entry is a use of its own."""

    class Expanded(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(1, 4))
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(self.p.expand(len(x), -1)) * self.b(x)

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    check_losses(Expanded(), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), (x, y), modes=[mode])

