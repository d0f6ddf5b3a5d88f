"""The engine's contract: same model object, clean detach, clear errors, nothing half-attached."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from dpspeed import PrivacyEngine, fix_model
from tests.helpers.models import SmallViT


def _data(n=8):
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,))), batch_size=4)


def _private(model, **kw):
    engine = PrivacyEngine()
    options = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=_data(),
                   noise_multiplier=1.0, max_grad_norm=1.0)
    options.update(kw)
    return engine, engine.make_private(**options)


def _snapshot(model):
    return {
        "type": type(model), "keys": list(model.state_dict()),
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "forward_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attrs": [sorted(vars(m)) for m in model.modules()],
    }


def test_same_object_returned_and_detach_restores_everything():
    torch.manual_seed(0)
    model = SmallViT()
    before = _snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    out_before = model(x)
    engine, (m, opt, crit, loader) = _private(model, criterion=nn.CrossEntropyLoss())
    assert m is model and type(m) is SmallViT and list(m.state_dict()) == before["keys"]
    for xb, yb in loader:
        crit(m(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    engine.detach()
    after = _snapshot(model)
    assert after == before
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model2 = SmallViT()
    model2.load_state_dict(model.state_dict())
    assert torch.allclose(model(x), model2(x))
    assert out_before.shape == model(x).shape


def test_no_autograd_weight_gradient_during_training():
    """Parameters never receive autograd's (non-private) gradient: only the private one at step."""
    torch.manual_seed(0)
    model = SmallViT()
    engine, (m, opt, loader) = _private(model, max_physical_batch_size=2)
    for xb, yb in loader:
        nn.functional.cross_entropy(m(xb), yb).backward()
        assert all(p.grad is None for p in m.parameters())
        opt.step()
        if opt.is_last_physical_batch:
            assert all(p.grad is not None for p in m.parameters())
        opt.zero_grad()


def test_every_trainable_parameter_gets_an_update():
    torch.manual_seed(0)
    model = SmallViT()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, (m, opt, loader) = _private(model, noise_multiplier=0.0)
    for xb, yb in loader:
        nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged


def test_frozen_parameters_are_left_alone():
    torch.manual_seed(0)
    model = SmallViT()
    model.patch.weight.requires_grad_(False)
    frozen = model.patch.weight.detach().clone()
    engine, (m, opt, loader) = _private(model)
    for xb, yb in loader:
        nn.functional.cross_entropy(m(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.patch.weight, frozen) and not model.patch.weight.requires_grad


def test_nonfinite_example_contributes_nothing_and_is_counted():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    x[1, 0] = float("inf")
    loader = DataLoader(TensorDataset(x, torch.randn(4, 1)), batch_size=4)
    engine = PrivacyEngine()
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                         data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6,
                                         poisson_sampling=False, loss_reduction="sum")
    for xb, yb in loader:
        (m(xb) - yb).square().sum().backward()
        opt.step()
    keep = [0, 2, 3]
    private = model.weight.grad.clone()
    engine.detach()
    ref = torch.autograd.grad((model(x[keep]) - loader.dataset.tensors[1][keep]).square().sum(), model.weight)[0]
    assert engine.nonfinite_examples == 1
    assert torch.allclose(private, ref, rtol=1e-5)


def test_lr_scheduler_works_on_the_private_optimizer():
    model = nn.Linear(3, 1)
    engine, (m, opt, loader) = _private(model, data_loader=DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for (xb,) in loader:
        m(xb).sum().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    assert opt.original_optimizer.param_groups[0]["lr"] < 0.1


class _Iterable(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3)


def _bad_cases():
    other = nn.Linear(2, 2)
    return {
        "optimizer has foreign params": (dict(optimizer=torch.optim.SGD(other.parameters(), lr=0.1)), ValueError, "not in the model"),
        "R <= 0": (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        "sigma < 0": (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
        "sigma infinite": (dict(noise_multiplier=float("inf")), ValueError, "finite"),
        "sigma nan": (dict(noise_multiplier=float("nan")), ValueError, "noise_multiplier"),
        "R infinite": (dict(max_grad_norm=float("inf")), ValueError, "finite"),
        "a group's R infinite": (dict(max_grad_norm=[1.0, float("inf")], clipping_style="param-wise"), ValueError, "finite"),
        "empty data set": (dict(data_loader=DataLoader(TensorDataset(torch.zeros(0, 3)), batch_size=2)), ValueError, "empty"),
        "thresholds wrong length": (dict(max_grad_norm=[1.0, 1.0], clipping_style="all-layer"), ValueError, "thresholds"),
        "iterable dataset": (dict(data_loader=DataLoader(_Iterable(), batch_size=2)), TypeError, "IterableDataset"),
        "unknown mode": (dict(clipping_mode="magic"), ValueError, "clipping_mode"),
        "unknown style": (dict(clipping_style="row-wise"), ValueError, "clipping_style"),
        "unknown function": (dict(clipping_fn="soft"), ValueError, "clipping_fn"),
        "too many groups": (dict(clipping_style=99), ValueError, "groups"),
        "param in two groups": (dict(clipping_style=[["0.weight", "0.bias"], ["0.bias"]]), ValueError, "exactly one"),
        "param in no group": (dict(clipping_style=[["0.weight"]]), ValueError, "no clipping group"),
        "unknown param in group": (dict(clipping_style=[["0.weight", "0.bias", "nope"]]), ValueError, "not a trainable"),
        "reduction mismatch": (dict(criterion=nn.CrossEntropyLoss(reduction="sum")), ValueError, "agree"),
        "bad reduction": (dict(loss_reduction="max"), ValueError, "loss_reduction"),
        "bad physical batch": (dict(max_physical_batch_size=0), ValueError, "max_physical_batch_size"),
        "fixed shape without a size": (dict(fixed_physical_batch=True), ValueError, "needs max_physical_batch_size"),
        "ghost without criterion": (dict(clipping_mode="ghost"), ValueError, "criterion"),
        "ghost with groups": (dict(clipping_mode="mix-ghost", clipping_style="param-wise", criterion=nn.CrossEntropyLoss()), ValueError, "all-layer"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_input_is_refused_and_model_unchanged(case):
    overrides, error, match = _bad_cases()[case]
    model = nn.Sequential(nn.Linear(3, 2))
    before = _snapshot(model)
    options = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    options.update(overrides)
    with pytest.raises(error, match=match):
        _private(model, **options)
    assert _snapshot(model) == before
    _private(model)  # still attachable after a refusal


def test_an_unsupported_layer_names_its_parameters():
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True))
    loader = DataLoader(TensorDataset(torch.randint(0, 10, (8, 2))), batch_size=4)
    with pytest.raises(ValueError, match=r"0\.weight.*sparse"):
        _private(model, data_loader=loader)


def test_make_private_twice_is_refused():
    model = nn.Linear(3, 2)
    _private(model)
    with pytest.raises(ValueError, match="already"):
        _private(model)


def test_batchnorm_points_to_fix_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="fix_model"):
        _private(model)
    fixed = fix_model(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 4
    _private(fixed)


def test_int_style_groups_follow_first_use_not_registration():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late, self.early, self.middle = nn.Linear(4, 2), nn.Linear(3, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.late(self.middle(self.early(x)))

    model = Reversed()
    engine = PrivacyEngine()
    loader = DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2)
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0, clipping_style=2)
    (xb,) = next(iter(loader))
    m(xb).sum().backward()
    assert engine.grouping.groups == [["early.weight", "early.bias", "middle.weight", "middle.bias"],
                                      ["late.weight", "late.bias"]]


def test_ghost_mode_without_the_returned_criterion_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 2))
    engine, (m, opt, crit, loader) = _private(model, clipping_mode="ghost", criterion=nn.CrossEntropyLoss(),
                                              data_loader=DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4))
    x, y = next(iter(loader))
    nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="criterion returned by make_private"):
        opt.step()


def test_a_forward_without_the_hooks_is_refused_at_step():
    """Dynamo can reuse a graph compiled for a hookless copy of the model: the hooks never run and
    autograd computes ordinary gradients. The optimizer must refuse them, not train on noise."""
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = torch.compile(copy.deepcopy(base))
    nn.functional.cross_entropy(plain(x), y).backward()
    model = copy.deepcopy(base)
    engine, (m, opt, crit, loader) = _private(model, criterion=nn.CrossEntropyLoss(), clipping_mode="bk",
                                              data_loader=DataLoader(TensorDataset(x, y), batch_size=8))
    compiled = torch.compile(m)
    xb, yb = next(iter(loader))  # q = 1: all 8 examples, the shape the hookless graph was compiled for
    crit(compiled(xb), yb).backward()
    if all(p.grad is None for p in m.parameters()):
        pytest.skip("this torch version recompiled with the hooks: nothing to refuse")
    with pytest.raises(RuntimeError, match="without dpspeed's hooks"):
        opt.step()


def test_private_gradient_left_in_place_is_not_mistaken_for_autograd():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    engine, (m, opt, loader) = _private(model, data_loader=DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4))
    for _ in range(2):  # no zero_grad between logical steps: the old private gradient stays in .grad
        for (xb,) in loader:
            m(xb).sum().backward()
            opt.step()


def test_a_layer_on_a_tensor_without_the_batch_dimension_is_refused_naming_it():
    """A Linear applied to a sum over the batch (whose length happens to equal the batch size) has
    no per-example gradient: refused, for a built-in rule as for any other, rather than left at 0.
    (Returned beside the per-example output, it passes the independence check.)"""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.pooled = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.inner(x)
            return h, self.pooled(h.sum(0)).sum()

    engine, (m, opt, loader) = _private(Pooled(), data_loader=DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4),
                                        clipping_mode="bk", poisson_sampling=False)
    (xb,) = next(iter(loader))
    # refused at the first step's layout check (its input's rows are not examples), or where it returns
    with pytest.raises((RuntimeError, ValueError), match=r"Linear at 'pooled'(,| returns a tensor without the batch)"):
        out, aux = m(xb)
        (out.sum() + aux).backward()
    engine.detach()


class _Centered(nn.Module):
    """Batch centering: every example's output moves with the batch mean."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0)


class _RowMixing(nn.Module):
    """A parameter that mixes the rows of the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.mix = nn.Parameter(torch.eye(16) + 0.1)

    def forward(self, x):
        return self.mix[: len(x), : len(x)] @ self.fc(x)


class _SequenceFirst(nn.Module):
    """batch_first=False: dim 0 is the sequence; with as many positions as examples, dpspeed would
    take positions for examples, and attention runs across them."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0)

    def forward(self, x):  # x: (batch, sequence, features), passed on sequence-first
        return self.layer(x.transpose(0, 1))


@pytest.mark.parametrize("model", [_Centered, _RowMixing, _SequenceFirst])
def test_a_model_that_mixes_examples_is_refused_before_any_gradient(model):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 4, 4) if model is _SequenceFirst else torch.randn(8, 4)), batch_size=4)
    engine, (m, opt, loader) = _private(model(), data_loader=data, poisson_sampling=False)
    (xb,) = next(iter(loader))
    with pytest.raises(ValueError, match="mixes the examples of a batch"):
        m(xb)
    engine.detach()


def test_the_independence_check_leaves_randomness_and_training_as_they_were():
    """Dropout draws the same masks in both runs of the check, and the global random state is
    left as it was: the first step trains exactly as without the check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    engine, (m, opt, loader) = _private(model, data_loader=data, poisson_sampling=False, clipping_mode="per-example")
    (xb,) = next(iter(loader))
    state = torch.get_rng_state()
    m(xb)
    after_checked_forward = torch.get_rng_state()
    torch.set_rng_state(state)
    with torch.no_grad():
        m(xb)  # a forward without gradients is neither checked nor recorded
    assert torch.equal(torch.get_rng_state(), after_checked_forward)
    engine.detach()


def test_running_statistics_of_the_private_data_are_refused_and_fix_model_removes_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    with pytest.raises(ValueError, match=r"InstanceNorm2d at '1' keeps running statistics.*fix_model"):
        _private(model)
    fixed = fix_model(model)
    assert isinstance(fixed[1], nn.InstanceNorm2d) and not fixed[1].track_running_stats
    assert fixed[1].affine and torch.equal(fixed[1].weight, torch.full((4,), 2.0))
    assert "1.running_mean" not in fixed.state_dict()
    _private(fixed)


@pytest.mark.parametrize("late", ["unfrozen", "appended"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_a_parameter_made_trainable_after_make_private_is_refused(late, mode):
    """Its raw gradient would reach the optimizer, neither clipped nor noised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    extra = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the frozen weight too, as is common
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)
    engine, (m, opt, crit, loader) = _private(model, optimizer=optimizer, data_loader=data, clipping_mode=mode,
                                              criterion=nn.CrossEntropyLoss())
    if late == "unfrozen":
        model[0].weight.requires_grad_(True)
        forward = m
    else:
        opt.param_groups[0]["params"].append(extra)
        forward = lambda x: m(x) * extra  # noqa: E731
    x, y = next(iter(loader))
    crit(forward(x), y).backward()
    with pytest.raises(RuntimeError, match="not trainable in the model when make_private was called"):
        opt.step()
    engine.detach()


def test_no_noise_is_said_to_be_no_privacy():
    with pytest.warns(UserWarning, match="not private"):
        _private(nn.Sequential(nn.Linear(3, 2)), noise_multiplier=0.0)


def test_a_class_weighted_mean_is_refused():
    """Its denominator is the batch's total target weight: no example's gradient is its own."""
    with pytest.raises(ValueError, match=r"divides by the total weight.*reduction='sum'"):
        _private(nn.Sequential(nn.Linear(3, 2)), criterion=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])))


@pytest.mark.parametrize("mode", ["bk", "per-example", "ghost", "mix-ghost"])
def test_no_mode_writes_a_non_finite_value_into_a_parameter(mode):
    """A NaN input row: every mode drops that example and keeps the others (the two-pass modes
    take that batch's sums by book-keeping: autograd would multiply its NaN activations by zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    x[2, 1] = float("nan")
    twin = copy.deepcopy(model)
    engine, (m, opt, crit, loader) = _private(model, data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                                              clipping_mode=mode, criterion=nn.CrossEntropyLoss(), poisson_sampling=False,
                                              noise_multiplier=0.0)
    for xb, yb in loader:
        crit(m(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert engine.nonfinite_examples == 1 and engine.accountant.steps == 1 and opt.noise_only_steps == 0
    keep = torch.arange(8) != 2
    reference = PrivacyEngine()
    twin_m, twin_opt, twin_crit, twin_loader = reference.make_private(
        module=twin, optimizer=torch.optim.SGD(twin.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x[keep], y[keep]), batch_size=8), noise_multiplier=0.0,
        max_grad_norm=1.0, clipping_mode="per-example", poisson_sampling=False)
    for xb, yb in twin_loader:  # the same step without the NaN example (both divide by 8 expected)
        twin_crit(twin_m(xb), yb).backward()
        twin_opt.step()
    for p, q in zip(m.parameters(), twin_m.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    engine.detach()
    reference.detach()


def test_a_step_whose_sums_overflow_adds_noise_only_and_is_accounted(caplog):
    engine, m, opt, xb = _one_batch()
    m(xb).sum().backward()
    original = opt.reduce
    opt.reduce = lambda: (original(), opt.summed.update({n: s * float("inf") for n, s in opt.summed.items()}))
    with caplog.at_level("WARNING", logger="dpspeed"):
        opt.step()
    assert opt.noise_only_steps == 1 and engine.accountant.steps == 1 and "adds noise only" in caplog.text
    assert all(torch.isfinite(p).all() for p in m.parameters())
    engine.detach()


def _one_batch():
    """A private Linear(3, 2) and the first batch of its loader."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    engine, (m, opt, loader) = _private(model, data_loader=DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4),
                                        poisson_sampling=False)
    (xb,) = next(iter(loader))
    return engine, m, opt, xb


def test_a_weight_penalty_in_the_loss_is_refused_pointing_to_weight_decay():
    """Its gradient reaches the parameters outside any example's clipping."""
    engine, m, opt, xb = _one_batch()
    (m(xb).square().mean() + 1e-3 * m[0].weight.square().sum()).backward()
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()
    engine.detach()


def test_a_grad_scaler_is_refused_clearly():
    """A scaled loss scales every example's gradient: clipping would happen at R / scale."""
    engine, m, opt, xb = _one_batch()
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = m(xb).square().mean()
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match="GradScaler is not supported"):
        scaler.step(opt)
    engine.detach()


@pytest.mark.parametrize("mode", ["ghost", "mix-ghost"])
def test_the_two_pass_modes_refuse_16_bit_autocast(mode):
    """Their clipped sum is autograd's weight gradient, rounded to 16 bits over the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=8)
    engine, (m, opt, crit, loader) = _private(model, data_loader=data, clipping_mode=mode,
                                              criterion=nn.CrossEntropyLoss(), poisson_sampling=False)
    x, y = next(iter(loader))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(m(x), y)
    with pytest.raises(ValueError, match="Use a one-pass mode"):
        loss.backward()
    engine.detach()


class _CentredInTraining(nn.Module):
    """Centres the batch only in training mode, like a hand-written BatchNorm."""

    def forward(self, x):
        return x - x.mean(0) if self.training else x


def test_an_evaluation_pass_first_does_not_let_a_mixing_model_through():
    """The check runs at the first training forward pass, not at an 'initial accuracy' pass in eval()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _CentredInTraining(), nn.Linear(4, 2))
    engine, (m, opt, loader) = _private(model, data_loader=DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4),
                                        poisson_sampling=False)
    m.eval()
    with torch.no_grad():
        m(torch.randn(6, 4))
    m.train()
    (xb,) = next(iter(loader))
    with pytest.raises(ValueError, match="mixes the examples"):
        m(xb)
    engine.detach()


def test_a_stateful_module_passes_the_check_and_keeps_its_state():
    """A spectral norm's power iteration moves its buffers at every training forward: the check's
    passes start from the same buffers (no false refusal) and leave them as they found them."""
    from dpspeed.capture.independence import check_examples_independent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.utils.spectral_norm(nn.Linear(8, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_examples_independent(model, (torch.randn(8, 4),), {}, 8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _private(model)  # and make_private accepts it


def test_an_output_without_per_example_rows_is_said_to_be_unchecked(caplog):
    class Summed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).square().sum()

    engine, (m, opt, loader) = _private(Summed(), data_loader=DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4),
                                        poisson_sampling=False)
    (xb,) = next(iter(loader))
    with caplog.at_level("WARNING", logger="dpspeed"):
        m(xb)
    assert "could not check" in caplog.text
    engine.detach()


def test_a_checkpoint_resumes_a_seeded_run_exactly(tmp_path):
    """save_checkpoint/load_checkpoint: model, optimizer (momentum), accountant, the sampler's and
    the noise's streams; the resumed run takes the steps the uninterrupted one took."""

    def start():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        loader = DataLoader(TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,))), batch_size=8)
        engine = PrivacyEngine()
        private = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                      data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, seed=7)
        return engine, *private

    def epoch(model, optimizer, loader):
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    engine, model, optimizer, loader = start()
    epoch(model, optimizer, loader)
    engine.save_checkpoint(tmp_path / "ck.pt", model, optimizer, epoch=1)
    epoch(model, optimizer, loader)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    engine2, model2, optimizer2, loader2 = start()
    assert engine2.load_checkpoint(tmp_path / "ck.pt", model2, optimizer2) == {"epoch": 1}
    epoch(model2, optimizer2, loader2)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model2.parameters()))
    assert engine2.accountant.steps == engine.accountant.steps == 8
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)


def test_a_model_compiled_before_make_private_trains_as_the_uncompiled_one():
    """make_private(module=torch.compile(model)): the hooks go on the model the wrapper runs, and
    the wrapper comes back as it was given (it crashed inside dynamo)."""

    def train(compile_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        given = torch.compile(model, backend="eager") if compile_first else model
        data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
        _, (m, opt, loader) = _private(given, data_loader=data, seed=5, max_grad_norm=0.1)
        assert m is given
        for x, y in loader:
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for compiled, plain in zip(train(True), train(False), strict=True):
        torch.testing.assert_close(compiled, plain)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_a_compiled_wrapper_run_before_make_private_runs_the_hooks_after_it(mode):
    """A wrapper that trained without DP first ("compile, then fine-tune with DP") kept its graph,
    compiled without hooks (dynamo does not guard on them): bk refused the step, ghost stepped
    with noise only."""

    def step(compile_and_warm_up: bool) -> torch.Tensor:
        torch._dynamo.reset()  # no graph of earlier tests (past dynamo's cache limit it would run eagerly)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        given = torch.compile(model, backend="eager") if compile_and_warm_up else model
        x, y = torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))
        if compile_and_warm_up:
            nn.functional.cross_entropy(given(x), y).backward()
            model.zero_grad()
        _, (m, opt, criterion, loader) = _private(
            given, data_loader=DataLoader(TensorDataset(x, y), batch_size=8), criterion=nn.CrossEntropyLoss(),
            noise_multiplier=0.0, max_grad_norm=0.01, clipping_mode=mode, poisson_sampling=False)
        for xb, yb in loader:
            criterion(m(xb), yb).backward()
            opt.step()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = step(compile_and_warm_up=False)
    assert plain.norm() > 0
    torch.testing.assert_close(step(compile_and_warm_up=True), plain)


def test_a_two_pass_loss_without_a_recorded_forward_pass_is_refused():
    """ghost's loss from a forward pass that bypassed the hooks stepped with noise only."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=8)
    _, (m, opt, criterion, loader) = _private(model, data_loader=data, criterion=nn.CrossEntropyLoss(),
                                              clipping_mode="ghost", poisson_sampling=False)
    x, y = next(iter(loader))
    with pytest.raises(RuntimeError, match="recorded nothing"):
        criterion(m.forward(x), y).backward()


@pytest.mark.parametrize("order", ["auxiliary-first", "penalty-after"])
def test_a_gradient_outside_the_two_pass_loss_is_refused(order):
    """ghost's clipped sum is what autograd leaves in .grad: an auxiliary loss backpropagated before
    the private loss (or a weight penalty after it) added its unclipped gradient, and the step
    released it (a parameter change of 27 where clipping allowed 0.001)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))), batch_size=8)
    _, (m, opt, criterion, loader) = _private(model, data_loader=data, criterion=nn.CrossEntropyLoss(),
                                              clipping_mode="ghost", poisson_sampling=False)
    x, y = next(iter(loader))
    out = m(x)
    with pytest.raises(RuntimeError, match="no example's clipping bounds"):
        if order == "auxiliary-first":
            (1000 * out.pow(2).mean()).backward(retain_graph=True)
            criterion(out, y).backward()
        else:
            criterion(out, y).backward()
            model[0].weight.square().sum().backward()
            opt.step()


def test_a_second_two_pass_backward_through_one_forward_pass_is_refused_as_such():
    """An auxiliary loss backpropagated on its own after the first: its examples were clipped once
    already. The refusal used to blame missing hooks."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=8)
    _, (m, opt, criterion, loader) = _private(model, data_loader=data, criterion=nn.CrossEntropyLoss(),
                                              clipping_mode="ghost", poisson_sampling=False)
    x, y = next(iter(loader))
    out = m(x)
    criterion(out, y).backward()
    with pytest.raises(RuntimeError, match="a second backward pass through the same forward pass"):
        criterion(out, y).backward()
    opt.step()
    opt.zero_grad()
    criterion(m(x), y).backward()  # the next physical batch is clipped as usual
    assert all(p.grad is not None for p in model.parameters())


class _EveryKindOfHook(nn.Module):
    """A layer rule's tap (Linear), a recurrent layer's routed forward (GRU) and the op taps of a
    bare parameter used in the model's own code (scale)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head, self.scale = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2), nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]) * self.scale


def test_a_copy_of_a_private_model_is_a_plain_model(tmp_path):
    """An EMA copy, or a copy fine-tuned without DP: its passes must not record into the private
    model, toggle its parameters or crash (a deep copy's hooks did, bound to a copy of the
    controller); a pickled model loads as a plain one too."""
    x, y = torch.randn(8, 5, 3), torch.randint(0, 2, (8,))

    def private_step(copies: str) -> tuple[list, list]:
        torch.manual_seed(0)
        model = _EveryKindOfHook()
        plain = copy.deepcopy(model)
        _, (m, opt, loader) = _private(model, data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                                       noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False)
        xb, yb = next(iter(loader))
        loss = nn.functional.cross_entropy(m(xb), yb)  # the private model's pass is under way
        copied = {"deep": lambda: copy.deepcopy(m), "pickled": lambda: _pickled(m, tmp_path)}.get(copies)
        copy_grads = []
        if copied is not None:
            other = copied()
            nn.functional.cross_entropy(other(x), y).backward()
            nn.functional.cross_entropy(plain(x), y).backward()
            copy_grads = [(p.grad, q.grad) for p, q in zip(other.parameters(), plain.parameters(), strict=True)]
        loss.backward()
        opt.step()
        return [p.grad.clone() for p in m.parameters()], copy_grads

    alone, _ = private_step("none")
    for copies in ("deep", "pickled"):
        private, copy_grads = private_step(copies)
        for got, want in copy_grads:
            torch.testing.assert_close(got, want)
        for got, want in zip(private, alone, strict=True):
            torch.testing.assert_close(got, want)


def _pickled(model: nn.Module, tmp_path) -> nn.Module:
    torch.save(model, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=False)


def _ghost_run(mode: str = "ghost", rows: int = 16):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    data = DataLoader(TensorDataset(torch.randn(rows, 4) * 100, torch.randint(0, 3, (rows,))), batch_size=rows // 2)
    _, (m, opt, criterion, loader) = _private(model, data_loader=data, criterion=nn.CrossEntropyLoss(reduction="sum"),
                                              optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                              clipping_mode=mode, poisson_sampling=False, loss_reduction="sum",
                                              noise_multiplier=0.0)
    return model, m, opt, criterion, loader


def test_an_abandoned_two_pass_batch_leaves_no_sum_in_grad():
    """A loop broken off after backward and before step left ghost's sums in .grad; the next step
    released them on top of its own batch (4.4 for one example clipped to R = 1)."""
    model, m, opt, criterion, loader = _ghost_run(rows=32)
    for x, y in loader:
        criterion(m(x), y).backward()
        break
    start = model.weight.detach().clone()
    for x, y in loader:  # the unfinished logical batch is dropped
        criterion(m(x[:1]), y[:1]).backward()
        opt.step()
        break
    assert float((model.weight.detach() - start).norm()) <= 1.0 + 1e-6


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_gradients_zeroed_in_place_are_not_taken_for_unclipped_ones(mode):
    model, m, opt, criterion, loader = _ghost_run(mode, rows=32)
    for x, y in loader:
        opt.zero_grad(set_to_none=False)
        criterion(m(x), y).backward()
        opt.step()
    assert opt.logical_steps == 2


def test_a_pending_state_make_private_cannot_apply_leaves_everything_as_it_was():
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    first, model = PrivacyEngine(), nn.Linear(3, 2)
    first.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0, seed=7)
    state = first.state_dict()
    unusable = [torch.zeros(3, dtype=torch.uint8)] * len(first.optimizer.noise.generators_for(torch.device("cpu")))
    state["random"]["noise"] = {"replicated": {"cpu": unusable}, "sharded": None}
    engine, model = PrivacyEngine(), nn.Linear(3, 2)
    engine.load_state_dict(state)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0, seed=7)
    assert engine.controller is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with pytest.raises(RuntimeError):  # still pending: the retry meets the same state
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)
