"""The loss must keep the examples apart: checked at the first training step's backward pass."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.clipping.methods import MODES


def _private(mode: str = "bk", model: nn.Module | None = None, targets=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(16, 4)
    y = torch.randint(0, 3, (16,)) if targets is None else targets
    engine = PrivacyEngine()
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                                         noise_multiplier=1.0, max_grad_norm=1.0, clipping_mode=mode,
                                         poisson_sampling=False)
    return engine, m, opt, loader


def _train(loss_fn, mode: str = "bk") -> nn.Module:
    engine, m, opt, loader = _private(mode)
    for xb, yb in loader:
        loss_fn(m(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    engine.detach()
    return m


MIXING_LOSSES = {
    "batch-mean penalty": lambda out, y: F.cross_entropy(out, y) + 0.01 * out.mean(0).square().sum(),
    "contrastive": lambda out, y: F.cross_entropy(out @ out.T, torch.arange(len(out))),
    "normalised over the batch": lambda out, y: F.cross_entropy(out / out.norm(), y),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("loss", list(MIXING_LOSSES))
def test_a_loss_that_mixes_the_examples_is_refused_before_any_gradient_is_taken(mode, loss):
    engine, m, opt, loader = _private(mode)
    before = [p.detach().clone() for p in m.parameters()]
    xb, yb = next(iter(loader))
    with pytest.raises(ValueError, match="the loss mixes the examples of a batch"):
        MIXING_LOSSES[loss](m(xb), yb).backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    engine.detach()


@pytest.mark.parametrize("mode", list(MODES))
def test_per_example_losses_pass_and_train_as_before(mode):
    """A mean of per-example losses, a per-example weight, an MSE on matching shapes with a
    per-example penalty: not refused. (That the check leaves the gradients exact is what every
    exactness test, which trains through it, shows.)"""
    losses = [
        lambda out, y: F.cross_entropy(out, y),
        lambda out, y: F.cross_entropy(out, y, reduction="none").mul(torch.linspace(0.5, 1.5, len(y))).mean(),
        lambda out, y: F.mse_loss(out[:, 0], y.float()) + 0.01 * out.square().sum(1).mean(),
    ]
    for loss in losses:
        _train(loss, mode)


def test_a_broadcast_that_pairs_every_example_with_every_other_is_refused():
    """A (B, 1) output against (B,) targets: MSE over B² pairs. A tensor whose leading length
    equals the batch size only by chance, expanded against the output, is not refused."""
    engine, m, opt, loader = _private("bk", model=nn.Linear(4, 1))
    xb, yb = next(iter(loader))
    with pytest.raises(ValueError, match=r"broadcasts tensors of shapes \(8, 1\) and \(8,\) to \(8, 8\)"):
        F.mse_loss(m(xb), yb.float())
    engine.detach()

    engine, m, opt, loader = _private("bk", model=nn.Linear(4, 8))
    xb, yb = next(iter(loader))
    per_position = torch.linspace(0, 1, 8)  # 8 output features, 8 examples
    (m(xb) * per_position).sum().backward()
    opt.step()
    engine.detach()


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.square()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_a_loss_without_a_second_derivative_trains_and_is_said_to_be_unchecked(caplog):
    with caplog.at_level(logging.WARNING, logger="dpspeed"):
        _train(lambda out, y: _OnceDifferentiable.apply(out).mean())
    assert "could not check that the loss keeps the examples apart" in caplog.text


def test_only_the_first_training_step_is_watched():
    engine, m, opt, loader = _private("bk")
    types = []
    for xb, yb in loader:
        out = m(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        types.append((type(out), type(loss.detach() * 2)))
        opt.step()
        opt.zero_grad()
    assert types[0][0] is not torch.Tensor  # watched down to the loss
    assert types[0][1] is torch.Tensor  # after the check, torch calls give plain tensors
    assert types[1] == (torch.Tensor, torch.Tensor)
    engine.detach()


def test_a_loss_computed_inside_the_model_is_checked_against_its_logits():
    """As a transformers model does when given labels: the output holds the loss and the logits."""

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, labels):
            logits = self.fc(x)
            return {"loss": F.cross_entropy(logits, labels) + 0.01 * logits.mean(0).square().sum(), "logits": logits}

    engine, m, opt, loader = _private("bk", model=WithLoss())
    xb, yb = next(iter(loader))
    with pytest.raises(ValueError, match="the loss mixes the examples of a batch"):
        m(xb, yb)["loss"].backward()
    engine.detach()


@pytest.mark.parametrize("call", ["ignored targets", "class weights", "criterion module"])
def test_a_mean_whose_denominator_the_batch_sets_is_refused(call):
    """Token cross-entropy averaged over the batch's kept tokens, or a class-weighted mean: the
    count divides every example's loss, and one example moves it."""
    engine, m, opt, loader = _private("bk")
    xb, yb = next(iter(loader))
    yb = yb.clone()
    yb[3] = -100
    losses = {
        "ignored targets": lambda out: F.cross_entropy(out, yb),
        "class weights": lambda out: F.nll_loss(out.log_softmax(1), yb.clamp(min=0), weight=torch.tensor([1.0, 2.0, 3.0])),
        "criterion module": lambda out: nn.CrossEntropyLoss(ignore_index=-100)(out, yb),
    }
    with pytest.raises(ValueError, match="divides by a count the whole batch sets"):
        losses[call](m(xb))
    engine.detach()


def test_a_mean_over_kept_targets_of_each_example_passes():
    """Each example's own mean over its kept tokens, then the mean over examples: separable."""
    engine, m, opt, loader = _private("bk", model=nn.Linear(4, 3 * 5))
    xb, _ = next(iter(loader))
    tokens = torch.randint(0, 3, (len(xb), 5))
    tokens[:, -1] = -100
    out = m(xb).view(len(xb), 3, 5)
    per_token = F.cross_entropy(out, tokens, reduction="none")
    kept = (tokens != -100).sum(1)
    (per_token.sum(1) / kept).mean().backward()
    opt.step()
    engine.detach()


class _TokenModel(nn.Module):
    """A language model that computes its loss itself when given labels, as transformers' do:
    token cross-entropy averaged over the batch's kept tokens."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 8), nn.Linear(8, 7)

    def forward(self, tokens, labels):
        logits = self.head(self.embed(tokens))
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def _token_run(labels_of):
    torch.manual_seed(0)
    model = _TokenModel()
    tokens = torch.randint(0, 7, (16, 5))
    engine = PrivacyEngine()
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(TensorDataset(tokens), batch_size=8),
                                         noise_multiplier=1.0, max_grad_norm=1.0, clipping_mode="bk",
                                         poisson_sampling=False)
    try:
        for (xb,) in loader:
            m(xb, labels_of(xb))["loss"].backward()
            opt.step()
            opt.zero_grad()
    finally:
        engine.detach()


def test_a_loss_the_model_computes_over_unequally_kept_tokens_is_refused():
    def padded(tokens):
        labels = tokens.clone()
        labels[0, 2:] = -100  # example 0 padded: the batch's count of kept tokens depends on it
        return labels

    with pytest.raises(ValueError, match="leaves out different numbers of each example's targets"):
        _token_run(padded)


def test_shifted_labels_leave_out_the_same_number_per_example_and_pass():
    """A causal language model's shifted labels end each example with one ignored position: every
    example's loss is divided by the same count."""
    def shifted(tokens):
        return F.pad(tokens[:, 1:], (0, 1), value=-100)

    _token_run(shifted)


def test_a_one_dimensional_output_is_checked():
    """A regression head squeezed to (B,) crashed the check."""
    engine, m, opt, loader = _private("bk", model=nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)))
    xb, yb = next(iter(loader))
    F.mse_loss(m(xb), yb.float()).backward()
    opt.step()
    engine.detach()

    engine, m, opt, loader = _private("bk", model=nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)))
    xb, yb = next(iter(loader))
    out = m(xb)
    with pytest.raises(ValueError, match="the loss mixes the examples"):
        (out - out.mean()).square().mean().backward()
    engine.detach()


def test_a_compiled_loss_trains_and_is_said_to_be_unchecked(caplog):
    from dpspeed.capture import loss_check

    loss_check._told_compiled = False
    compiled = torch.compile(lambda out, y: F.cross_entropy(out, y), backend="eager")
    with caplog.at_level(logging.WARNING, logger="dpspeed"):
        _train(compiled)
    assert "the loss is computed under torch.compile" in caplog.text


def test_the_first_steps_outputs_are_saved_as_plain_tensors_and_freed():
    import gc
    import io
    import weakref

    engine, m, opt, loader = _private("bk")
    xb, yb = next(iter(loader))
    out = m(xb)
    buffer = io.BytesIO()
    torch.save(out, buffer)  # the watch (the running engine) is not saved
    buffer.seek(0)
    assert type(torch.load(buffer)) is torch.Tensor
    F.cross_entropy(out, yb).backward()
    first = weakref.ref(out)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del out
        assert first() is None  # no reference cycle through the watch keeps it
    finally:
        if enabled:
            gc.enable()
    engine.detach()
