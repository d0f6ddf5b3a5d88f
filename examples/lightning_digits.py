"""DP-SGD in Lightning: a LightningModule on scikit-learn's digits, made private by one callback.

    python examples/lightning_digits.py --epochs 10 --epsilon 8
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed.integrations.lightning import DPCallback

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--epsilon", type=float, default=8.0)
args = parser.parse_args()
warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory


class DigitsClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(  # GroupNorm, not BatchNorm: BatchNorm mixes the examples of a batch
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Tanh(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.Tanh(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)  # a mean of each example's own loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.9)


torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
labels = torch.tensor(digits.target)
train = DataLoader(TensorDataset(images[:1500], labels[:1500]), batch_size=256)
test = DataLoader(TensorDataset(images[1500:], labels[1500:]), batch_size=512)

private = DPCallback(target_epsilon=args.epsilon, target_delta=1e-5, max_grad_norm=1.0)
trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[private], logger=False, enable_checkpointing=False,
                     accelerator="cpu", log_every_n_steps=1)
trainer.fit(DigitsClassifier(), train, test)
print(f"epsilon {private.get_epsilon():.2f} (delta 1e-05), "
      f"val accuracy {float(trainer.callback_metrics['val_accuracy']):.3f}")
