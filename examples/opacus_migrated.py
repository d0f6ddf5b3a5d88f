"""A training script written for Opacus, switched to dpspeed by its imports alone.

Everything below the imports is Opacus's API as Opacus users write it: make_private with Opacus's
own arguments (clipping=, grad_sample_mode=, poisson_sampling=), BatchMemoryManager to cap the
physical batch, ModuleValidator, the accountant's get_privacy_spent, make_private_with_epsilon
(epochs=), and the ghost-clipping mode through the returned criterion. Data: scikit-learn's digits.

    python examples/opacus_migrated.py                     # dpspeed
    python examples/opacus_migrated.py --library opacus    # the same script on Opacus, if installed
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--library", choices=["dpspeed", "opacus"], default="dpspeed")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--delta", type=float, default=1e-5)
args = parser.parse_args()

if args.library == "opacus":  # the only lines that differ between the two libraries
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from opacus.validators import ModuleValidator
else:
    from dpspeed import BatchMemoryManager, ModuleValidator, PrivacyEngine


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)  # not private: ModuleValidator.fix replaces it
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.norm(self.conv(x))), 2)
        return self.fc(x.flatten(1))


digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
labels = torch.tensor(digits.target)
train = TensorDataset(images[:1500], labels[:1500])
test_images, test_labels = images[1500:], labels[1500:]


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(test_images).argmax(1) == test_labels).float().mean().item()
    model.train()
    return correct


def make_model() -> nn.Module:
    model = DigitsNet()
    if not ModuleValidator.is_valid(model):
        model = ModuleValidator.fix(model)
    assert ModuleValidator.validate(model, strict=False) == []
    return model


torch.manual_seed(0)

# 1. A fixed noise multiplier, flat clipping, physical batches of at most 32 examples
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
privacy_engine = PrivacyEngine(accountant="rdp")
model, optimizer, train_loader = privacy_engine.make_private(
    module=model, optimizer=optimizer, data_loader=DataLoader(train, batch_size=args.batch_size),
    noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat", grad_sample_mode="hooks", poisson_sampling=True,
)
criterion = nn.CrossEntropyLoss()
for epoch in range(args.epochs):
    with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=32, optimizer=optimizer) as loader:
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    epsilon, best_alpha = privacy_engine.accountant.get_privacy_spent(delta=args.delta)
    print(f"fixed sigma   epoch {epoch + 1}: accuracy {accuracy(model):.3f}, epsilon {epsilon:.2f} (alpha {best_alpha})")

# 2. A target epsilon, and the ghost-clipping mode through the criterion make_private returns
model = make_model()
privacy_engine = PrivacyEngine()
model, optimizer, criterion, train_loader = privacy_engine.make_private_with_epsilon(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=DataLoader(train, batch_size=args.batch_size),
    target_epsilon=3.0, target_delta=args.delta, epochs=args.epochs, max_grad_norm=1.0,
    criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost",
)
for epoch in range(args.epochs):
    for x, y in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    print(f"target eps=3  epoch {epoch + 1}: accuracy {accuracy(model):.3f}, "
          f"epsilon {privacy_engine.get_epsilon(args.delta):.2f}")
