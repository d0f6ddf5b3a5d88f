"""DPCallback: a LightningModule trained with the callback takes exactly the steps make_private takes
in a plain loop (same seed: same Poisson batches, same noise), whether training_step calls a child
or the module itself, in whole or in physical parts; epsilon is logged and resumes from a
checkpoint; what it cannot make private is refused before anything runs."""

from __future__ import annotations

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
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3)
    model = Classifier()
    trainer = _trainer(callback, max_epochs=1)
    trainer.fit(model, DataLoader(DATA, batch_size=12))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=False)
    text = repr(saved)
    assert "accountant" in text and "random" not in str(list(saved["callbacks"].values()))
    assert "generator" not in text


def test_a_training_step_that_bypasses_the_attached_module_is_refused():
    class Bypass(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.head(self.encoder(x).tanh()), y)

    with pytest.raises(RuntimeError, match="did not call the module"):
        _trainer(DPCallback(noise_multiplier=1.0)).fit(Bypass("root"), DataLoader(DATA, batch_size=12))


@pytest.mark.parametrize("option, reason", [
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
    ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
    ("fp16", "loss scaler"),
])
def test_what_cannot_be_private_is_refused(option, reason):
    if option == "fp16":  # 16-mixed, with its loss scaler (on the CPU, Lightning would turn it into bf16)
        from lightning.pytorch.plugins import MixedPrecision

        option = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    with pytest.raises(ValueError, match=reason):
        _trainer(DPCallback(noise_multiplier=1.0), **option).fit(Classifier(), DataLoader(DATA, batch_size=12))


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


def test_an_epoch_cut_short_leaves_no_stale_batch_for_the_next():
    """limit_train_batches cuts an epoch after a batch Lightning has fetched ahead: that batch's
    announcement must not be taken for the next epoch's first batch (its logical batches would be
    split at the wrong places). The unfinished logical batch is dropped, never stepped."""
    callback = DPCallback(noise_multiplier=0.7, max_grad_norm=0.3, seed=3, max_physical_batch_size=5)
    model = Classifier()
    trainer = _trainer(callback, max_epochs=3, limit_train_batches=4)
    trainer.fit(model, DataLoader(DATA, batch_size=12))
    optimizer = callback.engine.optimizer
    assert 0 < optimizer.logical_steps == callback.engine.accountant.steps <= 3 * 4 // 2
    assert not optimizer._announced
