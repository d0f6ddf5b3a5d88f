"""DPCallback: a LightningModule trained with the callback takes exactly the steps make_private takes
in a plain loop (same seed: same Poisson batches, same noise), whether training_step calls a child
or the module itself, in whole or in physical parts; epsilon is logged and resumes from a
checkpoint; what it cannot make private is refused before anything runs."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.filterwarnings("ignore")  # Lightning's advice (workers, logging intervals) on tiny data

from dpspeed import PrivacyEngine  # noqa: E402
from dpspeed.integrations.lightning import DPCallback, smallest_holder  # noqa: E402

DATA = TensorDataset(torch.randn(48, 4, generator=torch.Generator().manual_seed(0)),
                     torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(1)))


class Classifier(pl.LightningModule):
    """`calls`: "child" (training_step calls self.net) or "root" (self(x), its parameters spread
    over two children)."""

    def __init__(self, calls: str = "child", manual: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.calls = calls
        self.automatic_optimization = not manual
        if calls == "child":
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        else:
            self.encoder, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if self.calls == "child" else self.head(self.encoder(x).tanh())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x) if self.calls == "child" else self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def _trainer(callback: DPCallback, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    return pl.Trainer(callbacks=[callback], **(options | kwargs))


def _fit(callback: DPCallback, calls: str = "child", **kwargs) -> Classifier:
    model = Classifier(calls)
    _trainer(callback, **kwargs).fit(model, DataLoader(DATA, batch_size=12))
    return model


def _plain_loop(calls: str = "child", epochs: int = 2, max_physical_batch_size: int | None = None) -> Classifier:
    model = Classifier(calls)
    attached = model.net if calls == "child" else model
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=attached, optimizer=model.configure_optimizers(), data_loader=DataLoader(DATA, batch_size=12),
        noise_multiplier=0.7, max_grad_norm=0.3, seed=3, max_physical_batch_size=max_physical_batch_size)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def _close(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("calls", ["child", "root"])
def test_the_callback_takes_the_steps_of_a_plain_private_loop(calls):
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3)
    trained = _fit(callback, calls)
    _close(trained, _plain_loop(calls))
    assert callback.engine.accountant.steps == 2 * 4
    assert not torch.allclose(trained.state_dict()[next(iter(trained.state_dict()))],
                              Classifier(calls).state_dict()[next(iter(trained.state_dict()))])


def test_physical_parts_make_one_step_per_logical_batch():
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3, max_physical_batch_size=5)
    trained = _fit(callback)
    _close(trained, _plain_loop(max_physical_batch_size=5))
    assert callback.engine.accountant.steps == 8 and callback.engine.optimizer.logical_steps == 8


def test_epsilon_is_logged_and_the_target_is_met():
    callback = DPCallback(target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0)
    trainer = _trainer(callback)
    trainer.fit(Classifier(), DataLoader(DATA, batch_size=12))
    epsilon = callback.get_epsilon()
    assert 2.9 < epsilon <= 3.0
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(epsilon)


def test_a_resumed_fit_continues_the_accountant_and_the_streams(tmp_path):
    first = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3)
    model = Classifier()
    trainer = _trainer(first, max_epochs=1)
    trainer.fit(model, DataLoader(DATA, batch_size=12))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    second = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3)
    resumed = Classifier()
    _trainer(second, max_epochs=2).fit(resumed, DataLoader(DATA, batch_size=12), ckpt_path=tmp_path / "one.ckpt")
    assert second.engine.accountant.steps == 8
    _close(resumed, _plain_loop())


def test_an_unseeded_checkpoint_holds_no_random_stream(tmp_path):
    """Neither the callback's state nor the private loader's (which Lightning and
    torch.distributed.checkpoint save for every stateful loader) holds the sampler's or the noise's
    generator; a seeded run's state holds both, to resume them."""
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3)
    trainer = _trainer(callback, max_epochs=1)
    trainer.fit(Classifier(), DataLoader(DATA, batch_size=12))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert "accountant" in repr(saved) and "random" not in str(list(saved["callbacks"].values()))
    assert "generator" not in repr(saved)
    assert callback.engine.data_loader.state_dict() == {}
    seeded = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3)
    _fit(seeded, max_epochs=1)
    assert "generator" in seeded.engine.data_loader.state_dict() and "random" in seeded.state_dict()["engine"]


def test_a_training_step_that_bypasses_the_attached_module_is_refused():
    class Bypass(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.head(self.encoder(x).tanh()), y)

    with pytest.raises(RuntimeError, match="did not call the module"):
        _trainer(DPCallback(noise_multiplier=1.0)).fit(Bypass("root"), DataLoader(DATA, batch_size=12))


class _TwoLoaders(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch["a"], batch_idx)


class _LoaderIterator(Classifier):
    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)
        return super().training_step(batch, 0)


def _loader() -> DataLoader:
    return DataLoader(DATA, batch_size=12)


@pytest.mark.parametrize("option, reason", [
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
    ("accumulation scheduler", "GradientAccumulationScheduler"),
    ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
    ("fp16", "loss scaler"),
    ({"val_check_interval": 0.5, "parts": True}, "val_check_interval=0.5 with max_physical_batch_size"),
    ({"limit_train_batches": 0.5, "parts": True}, "limit_train_batches=0.5 with max_physical_batch_size"),
    ({"max_steps": 6, "parts": True, "target": True}, "Lightning's steps count parts"),
    ("dataloader_iter", "dataloader_iter"),
    ("two loaders", "one training loader"),
])
def test_what_cannot_be_private_is_refused(option, reason):
    module, loaders, callbacks = Classifier(), _loader(), []
    if option == "fp16":  # 16-mixed, with its loss scaler (on the CPU, Lightning would turn it into bf16)
        from lightning.pytorch.plugins import MixedPrecision

        option = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    elif option == "accumulation scheduler":
        from lightning.pytorch.callbacks import GradientAccumulationScheduler

        option, callbacks = {}, [GradientAccumulationScheduler({0: 2})]
    elif option == "dataloader_iter":
        option, module = {}, _LoaderIterator()
    elif option == "two loaders":
        option, module, loaders = {}, _TwoLoaders(), {"a": _loader(), "b": _loader()}
    option = dict(option)
    dp = dict(max_physical_batch_size=5 if option.pop("parts", False) else None)
    dp |= dict(target_epsilon=3.0) if option.pop("target", False) else dict(noise_multiplier=1.0)
    trainer = _trainer(DPCallback(**dp), **option)
    trainer.callbacks.extend(callbacks)
    with pytest.raises((ValueError, RuntimeError), match=reason):
        trainer.fit(module, loaders, _loader() if "val_check_interval" in option else None)


def test_manual_optimization_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        DPCallback(max_grad_norm=1.0)
    with pytest.raises(ValueError, match="second backward"):
        DPCallback(noise_multiplier=1.0, clipping_mode="ghost")
    manual = Classifier(manual=True)
    with pytest.raises(ValueError, match="manual optimization"):
        _trainer(DPCallback(noise_multiplier=1.0)).fit(manual, DataLoader(DATA, batch_size=12))


def test_the_smallest_holder_of_the_trainable_parameters():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    model.head = nn.Linear(2, 2)
    assert smallest_holder(model) == ""
    model.head.requires_grad_(False)
    model.backbone[0].requires_grad_(False)
    assert smallest_holder(model) == "backbone.1"
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        smallest_holder(model)


def test_bf16_mixed_precision_trains():
    """Lightning's bf16 autocast around training_step: no loss scaler, so the callback takes it."""
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3)
    trained = _fit(callback, precision="bf16-mixed", max_epochs=1)
    assert callback.engine.accountant.steps == 4
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert not torch.equal(trained.net[0].weight, Classifier().net[0].weight)


def test_a_callback_makes_one_fit_private():
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3)
    _fit(callback, max_epochs=1)
    with pytest.raises(RuntimeError, match="new DPCallback for each fit"):
        _trainer(callback, max_epochs=1).fit(Classifier(), DataLoader(DATA, batch_size=12))


class _CutShort(Classifier):
    """Ends each epoch at its fourth batch (Lightning has fetched the fifth by then)."""


    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 3 else None


def test_an_epoch_cut_short_leaves_no_stale_batch_for_the_next():
    """A batch Lightning fetched ahead in an epoch that ends early must not be taken for the next
    epoch's first batch (its logical batches would be split at the wrong places): the fit takes the
    steps of a plain loop that breaks off at the same batch, the unfinished logical batch dropped."""
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3, max_physical_batch_size=5)
    model = _CutShort()
    _trainer(callback, max_epochs=3).fit(model, DataLoader(DATA, batch_size=12))

    plain = Classifier()
    engine = PrivacyEngine()
    _, optimizer, loader = engine.make_private(
        module=plain.net, optimizer=plain.configure_optimizers(), data_loader=DataLoader(DATA, batch_size=12),
        noise_multiplier=0.7, max_grad_norm=0.3, seed=3, max_physical_batch_size=5)
    announce_next = loader.defer_announcements()  # as the callback does: the loop below fetches one ahead
    for _ in range(3):
        batches = iter(loader)
        ahead = next(batches)
        for i in range(3):
            (x, y), ahead = ahead, next(batches)
            announce_next()
            optimizer.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            optimizer.step()
        next(batches)  # handing out the fourth batch, which the module refuses, Lightning fetched the fifth
    assert 0 < callback.engine.accountant.steps == engine.accountant.steps < 3 * 4
    _close(model, plain)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_model_is_as_it_was_after_the_fit():
    """The hooks stayed on: a second private fit with a new callback was refused, and plain use of
    the model afterwards got no gradients."""
    model = Classifier()
    hooks = _hooks(model)
    _trainer(DPCallback(noise_multiplier=0.7, max_grad_norm=0.3), max_epochs=1).fit(model, _loader())
    assert _hooks(model) == hooks
    _trainer(DPCallback(noise_multiplier=0.7, max_grad_norm=0.3), max_epochs=1).fit(model, _loader())
    x, y = DATA.tensors
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(model, _loader())  # non-private, afterwards


def test_a_fit_that_fails_leaves_no_hooks():
    class Bypass(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.head(self.encoder(x).tanh()), y)

    model = Bypass("root")
    hooks = _hooks(model)
    with pytest.raises(RuntimeError, match="did not call the module"):
        _trainer(DPCallback(noise_multiplier=1.0)).fit(model, _loader())
    assert _hooks(model) == hooks


class _OneCycle(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        total = self.trainer.estimated_stepping_batches  # Lightning sets up the training loader here
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_configure_optimizers_may_size_its_schedule_from_the_training_loader():
    """Lightning sets up the loader inside configure_optimizers, before the optimizer exists: it was
    refused ("0 optimizers"). Whole logical batches have a length: an epoch of them."""
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3)
    trainer = _trainer(callback)
    trainer.fit(_OneCycle(), _loader())
    assert trainer.estimated_stepping_batches == 2 * 4 == callback.engine.accountant.steps
    with pytest.raises(RuntimeError, match="estimated_stepping_batches"):
        _trainer(DPCallback(noise_multiplier=0.7, max_physical_batch_size=5)).fit(_OneCycle(), _loader())


class _StopAfterOneEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_a_fit_resumed_with_a_longer_horizon_ends_within_the_target(tmp_path):
    """The noise was calibrated for the whole horizon as if no step had been taken: "train one more
    epoch" from a checkpoint ended at epsilon 3.6 for a target of 3."""
    first = DPCallback(target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0)
    trainer = _trainer(first, max_epochs=2)
    trainer.callbacks.append(_StopAfterOneEpoch())
    trainer.fit(Classifier(), _loader())
    assert first.engine.accountant.steps == 4
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    second = DPCallback(target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0)
    _trainer(second, max_epochs=3).fit(Classifier(), _loader(), ckpt_path=tmp_path / "one.ckpt")
    assert second.engine.accountant.steps == 12
    assert second.engine.noise_multiplier > first.engine.noise_multiplier
    assert 2.97 < second.get_epsilon() <= 3.0 * 1.0001


def test_the_fit_stops_before_max_epsilon(caplog):
    callback = DPCallback(noise_multiplier=1.5, max_grad_norm=0.3, target_delta=1e-3, max_epsilon=2.0)
    trainer = _trainer(callback, max_epochs=10)
    with caplog.at_level(logging.INFO, logger="dpspeed"):
        trainer.fit(Classifier(), _loader())
    assert any(r.levelno == logging.WARNING and "stopping before step 11" in r.message for r in caplog.records)
    assert callback.engine.accountant.steps == 10 and trainer.should_stop  # epsilon 1.94 after 10 steps
    assert callback.get_epsilon() <= 2.0
    callback.engine.accountant.step(1.5, 12 / 48)
    assert callback.get_epsilon() > 2.0  # one more step would have spent more


def test_batches_that_are_not_poisson_sampled_train_without_epsilon():
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, poisson_sampling=False)
    trainer = _trainer(callback, max_epochs=1)
    trainer.fit(Classifier(), DataLoader(DATA, batch_size=12, shuffle=True))
    assert callback.engine.accountant.steps == 4 and "epsilon" not in trainer.callback_metrics
    for budget in ({"target_epsilon": 3.0}, {"noise_multiplier": 0.7, "max_epsilon": 3.0}):
        with pytest.raises(ValueError, match="need Poisson sampling"):
            DPCallback(max_grad_norm=0.3, poisson_sampling=False, **budget)


def test_a_fit_that_reaches_its_horizon_ends_without_a_warning(caplog):
    """target_epsilon is spent exactly at the horizon, where the guard says the next step would
    spend more: every fit that simply ended warned that it was stopping."""
    callback = DPCallback(target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0)
    with caplog.at_level(logging.INFO, logger="dpspeed"):
        _trainer(callback, max_epochs=2).fit(Classifier(), _loader())
    assert callback.engine.accountant.steps == 8
    assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("horizon are taken" in r.message for r in caplog.records)


class _BatchNormed(Classifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_a_fit_refused_at_make_private_may_be_retried_with_the_same_callback():
    """The retry was refused as "another training loader", left over from the refused fit."""
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3)
    with pytest.raises(ValueError, match="BatchNorm"):
        _trainer(callback, max_epochs=1).fit(_BatchNormed(), _loader())
    _trainer(callback, max_epochs=1).fit(Classifier(), _loader())
    assert callback.engine.accountant.steps == 4
