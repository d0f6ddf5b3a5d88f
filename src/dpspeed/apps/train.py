"""`dpspeed train`: train a model under DP end to end, with a progress bar, and report accuracy and epsilon."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, TensorDataset

from . import data, models
from ..engine import PrivacyEngine



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


@dataclass
class TrainResult:
    test_accuracy: float
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def parse_style(value: str):
    return int(value) if value.isdigit() else value


def accuracy(model: torch.nn.Module, dataset: TensorDataset, device: str, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch):
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    model.train()
    return correct / len(dataset)


def train(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    """Train `config.model` on `config.data` with DP-SGD (momentum 0.9); return test accuracy and epsilon."""
    if (config.epsilon is None) == (config.sigma is None):
        raise ValueError("give exactly one of a target epsilon or a noise multiplier sigma")
    torch.manual_seed(config.seed)
    train_set, test_set, classes = data.load(config.data, config.data_dir, config.seed)
    sample = train_set[0][0]
    model = models.build(config.model, sample.shape[0], sample.shape[-1], classes).to(config.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    loader = DataLoader(train_set, batch_size=config.batch_size)
    engine = PrivacyEngine(accountant=config.accountant)
    options = dict(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=config.max_grad_norm,
        clipping_mode=config.clipping_mode, clipping_style=parse_style(config.clipping_style),
        clipping_fn=config.clipping_fn, max_physical_batch_size=config.physical_batch_size,
        seed=config.seed if config.reproducible else None,
    )
    if config.epsilon is not None:
        model, optimizer, loader = engine.make_private_with_epsilon(
            target_epsilon=config.epsilon, target_delta=config.delta, epochs=config.epochs, **options
        )
    else:
        model, optimizer, loader = engine.make_private(noise_multiplier=config.sigma, **options)

    history: list[dict] = []
    start = time.perf_counter()
    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  ε {task.fields[eps]:.2f}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("train", total=config.epochs * len(loader), epoch=1, loss=float("nan"), acc=0.0, eps=0.0)
        for epoch in range(1, config.epochs + 1):
            total_loss, seen = 0.0, 0
            for x, y in loader:
                x, y = x.to(config.device), y.to(config.device)
                loss = F.cross_entropy(model(x), y, reduction="sum") / max(len(x), 1)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                total_loss, seen = total_loss + float(loss.detach()) * len(x), seen + len(x)
                if optimizer.is_last_physical_batch:
                    progress.update(task, advance=1, epoch=epoch, loss=total_loss / max(seen, 1))
            eps = engine.get_epsilon(config.delta)
            acc = accuracy(model, test_set, config.device)
            history.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "test_accuracy": acc, "epsilon": eps})
            progress.update(task, acc=acc, eps=eps)

    result = TrainResult(
        test_accuracy=history[-1]["test_accuracy"], epsilon=history[-1]["epsilon"], delta=config.delta,
        noise_multiplier=engine.noise_multiplier, steps=optimizer.logical_steps,
        seconds=time.perf_counter() - start, history=history,
    )
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"config": asdict(config), **asdict(result)}, indent=2))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.original_optimizer.state_dict(),
                    "privacy": engine.state_dict(), "config": asdict(config)}, out / "checkpoint.pt")
    engine.detach()
    return result
