"""DP-SGD on scikit-learn's handwritten digits with dpspeed: a small CNN to a target epsilon.

    python examples/digits.py --epochs 10 --epsilon 8
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--epsilon", type=float, default=8.0)
parser.add_argument("--delta", type=float, default=1e-5)
args = parser.parse_args()

torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
labels = torch.tensor(digits.target)
train, test = TensorDataset(images[:1500], labels[:1500]), (images[1500:], labels[1500:])

model = nn.Sequential(  # GroupNorm, not BatchNorm: BatchNorm mixes the examples of a batch
    nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Tanh(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.Tanh(),
    nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10),
)
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private_with_epsilon(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9),
    data_loader=DataLoader(train, batch_size=256), target_epsilon=args.epsilon, target_delta=args.delta,
    epochs=args.epochs, max_grad_norm=1.0,
)
print(f"noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {args.epsilon} after {args.epochs} epochs")
for epoch in range(args.epochs):
    for x, y in loader:  # Poisson-sampled batches: use this loader, not the original
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        accuracy = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    print(f"epoch {epoch + 1}: test accuracy {accuracy:.3f}, epsilon {engine.get_epsilon(args.delta):.2f}")
