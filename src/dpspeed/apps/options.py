"""What `dpspeed train` is asked to do: its options, without importing torch (so that the command
line's help is instant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    model: str = "small_cnn"
    data: str = "digits"
    data_dir: str | None = None
    epochs: int = 20
    batch_size: int = 128
    physical_batch_size: int | None = None
    lr: float = 0.5
    epsilon: float | None = 8.0
    delta: float = 1e-5
    sigma: float | None = None
    max_grad_norm: float = 1.0
    clipping_mode: str = "auto"
    clipping_style: str = "all-layer"
    clipping_fn: str = "automatic"
    accountant: str = "pld"
    device: str = "cpu"
    seed: int = 0  # the model's initialisation and the data split
    reproducible: bool = False  # the batches and the noise from `seed` too (anyone with it can regenerate them)
    out: str | None = None
    resume: str | None = None  # a folder a run saved its checkpoint.pt to: continue that run


def parse_style(value: str):
    return int(value) if value.isdigit() else value
