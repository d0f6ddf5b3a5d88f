"""What is trained in a benchmark: a model by name and synthetic inputs of a given batch size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..apps import models


@dataclass(frozen=True)
class Workload:
    model: str
    image_size: int = 32
    channels: int = 3
    classes: int = 10
    seq_len: int = 128
    seed: int = 0

    @property
    def text(self) -> bool:
        return models.is_text(self.model)

    @property
    def unit(self) -> str:
        return "sequences" if self.text else "images"

    def build(self, device: torch.device | str) -> nn.Module:
        """The model with the same random weights every time."""
        torch.manual_seed(self.seed)
        return models.build(self.model, self.channels, self.image_size, self.classes).to(device)

    def batch(self, size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels; the same for every mode (fixed seed), made on the device."""
        generator = torch.Generator().manual_seed(self.seed + size)
        if self.text:
            x = torch.randint(1, 1000, (size, self.seq_len), generator=generator)
        else:
            x = torch.randn(size, self.channels, self.image_size, self.image_size, generator=generator)
        y = torch.randint(0, self.classes, (size,), generator=generator)
        return x.to(device), y.to(device)


def logits(output) -> torch.Tensor:
    """The logits of a model's output (transformers return an object holding them)."""
    return getattr(output, "logits", output)
